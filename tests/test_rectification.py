"""Tests for label rectification (tdr_jax.rectification, TDR sec. 4.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdr_jax import beam_search as bs
from tdr_jax import rectification as rect
from tdr_jax import tree as tree_lib

# Proposition 1 of the TDR paper: item i on leaf i of a binary tree of height 3.
PROP1_ETA = np.array([0.21, 0.0, 0.12, 0.18, 0.19, 0.0, 0.16, 0.14], np.float32)

_jit_weights = jax.jit(rect.rectified_weights)


def identity_tree(n: int = 8, branching: int = 2) -> tree_lib.Tree:
  return tree_lib.from_leaf_order(np.arange(n), branching=branching)


def table_score(params, tree, history, nodes, level=None):
  """Scorer reading a [U, num_nodes] table of node scores (one row per user)."""
  del tree, history, level
  return jnp.take_along_axis(params, jnp.maximum(nodes, 0), axis=1)


# ---------------------------------------------------------------------------- hand-computed


def test_eta_in_leaf_order_scatters_and_marks_empty_leaves():
  # 5 items on a binary tree of height 3: 3 of the 8 leaves stay empty.
  tree = tree_lib.from_leaf_order(np.array([3, 0, 4, 1, 2]), branching=2)
  eta = np.array([[10.0, 11.0, 12.0, 13.0, 14.0]], np.float32)
  got = np.asarray(rect.eta_in_leaf_order(eta, tree))
  l2i = np.asarray(tree.leaf_to_item)
  want = np.where(l2i >= 0, eta[0, np.maximum(l2i, 0)], -np.inf)
  np.testing.assert_array_equal(got[0], want)
  assert np.isneginf(got).sum() == 8 - 5


def test_subtree_max_hand_computed():
  eta_leaf = jnp.asarray(PROP1_ETA[None])
  levels = rect.subtree_max_eta(eta_leaf, branching=2, height=3)
  assert [lv.shape for lv in levels] == [(1, 1), (1, 2), (1, 4), (1, 8)]
  np.testing.assert_allclose(levels[2][0], [0.21, 0.18, 0.19, 0.16])
  np.testing.assert_allclose(levels[1][0], [0.21, 0.19])
  np.testing.assert_allclose(levels[0][0], [0.21])
  np.testing.assert_array_equal(levels[3], eta_leaf)


def test_subtree_max_branching_three_with_empty_leaves():
  # B=3, H=2: leaves 0..8, empty leaves are -inf.
  eta_leaf = jnp.asarray([[1.0, 5.0, -np.inf, 2.0, -np.inf, -np.inf, -np.inf, -np.inf, 0.5]])
  levels = rect.subtree_max_eta(eta_leaf, branching=3, height=2)
  np.testing.assert_array_equal(levels[1][0], [5.0, 2.0, 0.5])
  np.testing.assert_array_equal(levels[0][0], [5.0])


def test_rectified_weights_hand_computed_8_items():
  tree = identity_tree()
  eta = np.tile(PROP1_ETA, (8, 1))
  w = np.asarray(rect.rectified_weights(eta, np.arange(8), tree))
  # Column j-1 = level j. Level-1 subtrees {0..3} (max item 0) and {4..7} (max item 4);
  # level-2 subtrees {0,1} -> 0, {2,3} -> 3, {4,5} -> 4, {6,7} -> 6; leaves always 1.
  want = np.array([
      [1, 1, 1],  # item 0: 0.21
      [0, 0, 1],  # item 1: 0.0
      [0, 0, 1],  # item 2: 0.12 < 0.18
      [0, 1, 1],  # item 3: 0.18 best of {2,3}, not of {0..3}
      [1, 1, 1],  # item 4: 0.19
      [0, 0, 1],  # item 5: 0.0
      [0, 1, 1],  # item 6: 0.16
      [0, 0, 1],  # item 7: 0.14
  ], np.float32)
  np.testing.assert_array_equal(w, want)
  assert w.dtype == np.float32


def test_rectified_weights_with_permuted_tree_and_padding_target():
  # Items placed in a scrambled leaf order: the subtree of each ancestor is read from the tree.
  order = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # order[k] = item on leaf k
  tree = tree_lib.from_leaf_order(order, branching=2)
  eta = np.array([[0.3, 0.1, 0.05, 0.2, 0.02, 0.15, 0.08, 0.1]], np.float32)
  targets = np.array([0, 5, 2, -1])
  w = np.asarray(rect.rectified_weights(np.repeat(eta, 4, 0), targets, tree))
  # Leaves: [5, 2 | 7, 0 | 3, 6 | 1, 4]; level 1: {5,2,7,0} max item 0, {3,6,1,4} max item 3.
  np.testing.assert_array_equal(w[0], [1, 1, 1])   # item 0: best of {7,0} and of its half
  np.testing.assert_array_equal(w[1], [0, 1, 1])   # item 5: best of {5,2}, not of {5,2,7,0}
  np.testing.assert_array_equal(w[2], [0, 0, 1])   # item 2
  np.testing.assert_array_equal(w[3], [0, 0, 0])   # padding target


def test_ties_every_maximizer_gets_weight_one():
  tree = identity_tree(4)
  # Leaves [0, 1 | 2, 3]; items 0 and 1 tie for the maximum of the left half.
  eta = np.tile(np.array([0.3, 0.3, 0.2, 0.1], np.float32), (4, 1))
  w = np.asarray(rect.rectified_weights(eta, np.arange(4), tree))
  np.testing.assert_array_equal(w, [[1, 1], [1, 1], [1, 1], [0, 1]])


def test_logits_and_probabilities_give_the_same_weights():
  rng = np.random.default_rng(0)
  tree = tree_lib.build_random(rng, 37, branching=3)
  logits = rng.normal(size=(6, 37)).astype(np.float32) * 3
  probs = jax.nn.softmax(logits, axis=1)
  targets = rng.integers(0, 37, size=6)
  np.testing.assert_array_equal(_jit_weights(logits, targets, tree),
                                _jit_weights(probs, targets, tree))


def test_rectified_weights_jit_and_single_level_tree():
  tree = identity_tree(2)  # H = 1: only the leaf level, always 1
  w = jax.jit(rect.rectified_weights)(jnp.asarray([[0.9, 0.1]]), jnp.asarray([1]), tree)
  np.testing.assert_array_equal(w, [[1.0]])
  tree8 = identity_tree()
  eta = np.tile(PROP1_ETA, (8, 1))
  np.testing.assert_array_equal(jax.jit(rect.rectified_weights)(eta, np.arange(8), tree8),
                                rect.rectified_weights(eta, np.arange(8), tree8))


def test_first_rectified_level_is_the_beam_start_level():
  # B = 2, H = 3: levels 1, 2, 3 hold 2, 4, 8 nodes. The first level with more nodes than
  # the beam is scored whole and cut to the beam: rectification starts there.
  assert [rect.first_rectified_level(branching=2, height=3, beam_size=k)
          for k in (1, 2, 3, 4, 7, 8, 150)] == [1, 2, 2, 3, 3, 3, 3]
  assert rect.first_rectified_level(branching=4, height=5, beam_size=60) == 3  # 64 > 60


def test_levels_above_the_first_rectified_level_keep_plain_labels():
  tree = identity_tree()
  eta = np.tile(PROP1_ETA, (9, 1))
  targets = np.concatenate([np.arange(8), [-1]])
  # Eq. 15 at every level (the hand-computed table above), then with plain levels on top.
  every = np.array([[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1],
                    [0, 1, 1], [0, 0, 1], [0, 0, 0]], np.float32)
  from_2 = every.copy()
  from_2[:8, 0] = 1  # level 1 plain
  from_3 = every.copy()
  from_3[:8, :2] = 1  # levels 1 and 2 plain; the leaf is 1 either way
  for first, want in ((0, every), (1, every), (2, from_2), (3, from_3), (4, from_3)):
    np.testing.assert_array_equal(rect.rectified_weights(eta, targets, tree, first_level=first),
                                  want, err_msg=f"first_level={first}")
  jitted = jax.jit(rect.rectified_weights, static_argnames="first_level")
  np.testing.assert_array_equal(jitted(eta, targets, tree, first_level=2), from_2)
  with pytest.raises(ValueError, match="first_level"):
    rect.rectified_weights(eta, targets, tree, first_level=-1)


# ---------------------------------------------------------------------------- Proposition 1


def test_expected_rectified_label_is_subtree_max_and_plain_is_subtree_sum():
  tree = identity_tree()
  eta = PROP1_ETA[None]
  rectified = np.asarray(rect.expected_node_labels(eta, tree, rectified=True))[0]
  plain = np.asarray(rect.expected_node_labels(eta, tree, rectified=False))[0]
  # Level 2 (global ids 3..6) and level 1 (ids 1..2), as in the paper's example.
  np.testing.assert_allclose(rectified[3:7], [0.21, 0.18, 0.19, 0.16], atol=1e-6)
  np.testing.assert_allclose(rectified[1:3], [0.21, 0.19], atol=1e-6)
  np.testing.assert_allclose(plain[3:7], [0.21, 0.30, 0.19, 0.30], atol=1e-6)
  np.testing.assert_allclose(plain[1:3], [0.51, 0.49], atol=1e-6)
  # Every non-root node: E[z] = max of eta over the subtree, == subtree_max_nodes.
  np.testing.assert_allclose(rectified[1:], np.asarray(rect.subtree_max_nodes(eta, tree))[0, 1:],
                             atol=1e-6)
  np.testing.assert_allclose(rectified[7:], PROP1_ETA, atol=1e-6)  # leaves: eta itself


def test_beam_search_on_expected_rectified_labels_is_bayes_optimal():
  tree = identity_tree()
  eta = PROP1_ETA[None]
  history = jnp.zeros((1, 1), jnp.int32)  # unused by the table scorer
  bayes = set(np.argsort(-PROP1_ETA, kind="stable")[:3].tolist())
  assert bayes == {0, 3, 4}  # items {1, 4, 5} 1-based
  rect_scores = rect.expected_node_labels(eta, tree, rectified=True)
  items, _ = bs.beam_search(table_score, rect_scores, tree, history, beam_size=3, topk=3)
  assert set(np.asarray(items[0]).tolist()) == bayes
  plain_scores = rect.expected_node_labels(eta, tree, rectified=False)
  items, _ = bs.beam_search(table_score, plain_scores, tree, history, beam_size=3, topk=3)
  assert set(np.asarray(items[0]).tolist()) == {0, 3, 6}  # items {1, 4, 7}: sub-optimal


def test_rectifying_from_the_beam_start_level_is_enough_and_needed():
  # Beam 3 on the 8-leaf tree starts at level 2 (4 nodes, scored whole, cut to 3).
  tree = identity_tree()
  eta = PROP1_ETA[None]
  history = jnp.zeros((1, 1), jnp.int32)
  s = rect.first_rectified_level(branching=2, height=3, beam_size=3)
  assert s == 2
  # Plain level 1 (sums 0.51, 0.49) is never scored: beam search is still Bayes optimal.
  scores = rect.expected_node_labels(eta, tree, first_level=s)
  np.testing.assert_allclose(np.asarray(scores)[0, 1:3], [0.51, 0.49], atol=1e-6)
  items, _ = bs.beam_search(table_score, scores, tree, history, beam_size=3, topk=3)
  assert set(np.asarray(items[0]).tolist()) == {0, 3, 4}
  # Plain labels at the start level too (sums 0.21, 0.30, 0.19, 0.30): the cut to 3 nodes
  # keeps {0,1}, {2,3}, {6,7} and loses item 4 (0.19), as with plain labels everywhere.
  scores = rect.expected_node_labels(eta, tree, first_level=s + 1)
  items, _ = bs.beam_search(table_score, scores, tree, history, beam_size=3, topk=3)
  assert set(np.asarray(items[0]).tolist()) == {0, 3, 6}


def test_beam_search_is_bayes_optimal_when_rectified_from_its_start_level():
  history = jnp.zeros((2, 1), jnp.int32)
  for branching, n, beam, seed in ((2, 40, 5, 0), (3, 50, 4, 1), (2, 29, 3, 2)):
    rng = np.random.default_rng(seed)
    tree = tree_lib.from_leaf_order(rng.permutation(n), branching=branching)
    eta = rng.dirichlet(np.full(n, 0.3), size=2).astype(np.float32)  # distinct values
    s = rect.first_rectified_level(branching=branching, height=tree.height, beam_size=beam)
    assert 1 < s < tree.height  # some plain levels, some rectified ones
    scores = rect.expected_node_labels(eta, tree, first_level=s)
    items, _ = bs.beam_search(table_score, scores, tree, history, beam_size=beam, topk=beam)
    for u in range(2):
      assert set(np.asarray(items[u]).tolist()) == set(np.argsort(-eta[u])[:beam].tolist())


# ---------------------------------------------------------------------------- property


@st.composite
def tie_free_problem(draw):
  # A few sizes only (and a fixed user count), so that the jitted function is compiled for a
  # handful of shapes; leaf orders and eta values vary freely.
  branching = draw(st.sampled_from([2, 3, 4]))
  n = draw(st.sampled_from([1, 5, 16, 41]))
  seed = draw(st.integers(0, 2**31 - 1))
  return branching, n, 2, seed


@settings(max_examples=30, deadline=None)
@given(tie_free_problem())
def test_one_positive_per_nonempty_subtree_without_ties(problem):
  branching, n, users, seed = problem
  rng = np.random.default_rng(seed)
  tree = tree_lib.from_leaf_order(rng.permutation(n), branching=branching)
  # Distinct values per user: no ties.
  eta = np.stack([rng.permutation(n) for _ in range(users)]).astype(np.float32) / n
  # Every (user, item) pair as a sample.
  w = np.asarray(_jit_weights(np.repeat(eta, n, axis=0), np.tile(np.arange(n), users), tree))
  w = w.reshape(users, n, tree.height)
  paths = np.asarray(tree.item_paths)
  offs = np.asarray(tree.level_offsets)
  valid = np.asarray(tree.node_valid)
  for j in range(1, tree.height + 1):
    anc = paths[:, j]  # [N] level-j ancestor of every item
    for node in range(offs[j], offs[j + 1]):
      members = np.flatnonzero(anc == node)
      assert (members.size > 0) == valid[node]
      if members.size == 0:
        continue
      for u in range(users):
        winners = members[w[u, members, j - 1] == 1]
        assert winners.tolist() == [members[np.argmax(eta[u, members])]]
  assert (w[:, :, -1] == 1).all()
