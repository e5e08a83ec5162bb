"""Tests for tdr_jax.tree: layout, builders, queries (numpy and jit), validate()."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdr_jax import tree as T

SETTINGS = settings(max_examples=100, deadline=None)


def _build(kind: str, seed: int, n: int, b: int) -> T.Tree:
  rng = np.random.default_rng(seed)
  if kind == "random":
    return T.build_random(rng, n, branching=b)
  if kind == "categories":
    cats = rng.integers(-2, max(2, n // 7), size=n)
    return T.build_from_categories(rng, cats, branching=b)
  if kind == "kmeans":
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return T.build_kmeans(rng, x, branching=b, iters=3)
  raise AssertionError(kind)


def _node_item_counts(tree: T.Tree) -> np.ndarray:
  """int64[num_nodes]: items in each node's subtree, from item_paths."""
  return np.bincount(tree.item_paths.reshape(-1), minlength=tree.num_nodes)


# --------------------------------------------------------------------------
# Hand-computed fixtures
# --------------------------------------------------------------------------


def test_fixture_binary_n5():
  # N=5, B=2 -> H=3 (4 < 5 <= 8); offsets [0, 1, 3, 7, 15]; 15 nodes, 8 leaves.
  # Balanced split of item counts:
  #   level 0: [5]
  #   level 1: 5 -> 5//2 + (0 < 1), 5//2      = [3, 2]
  #   level 2: 3 -> [2, 1]; 2 -> [1, 1]       = [2, 1, 1, 1]
  #   level 3: [1,1 | 1,0 | 1,0 | 1,0]        -> occupied leaves 0, 1, 2, 4, 6
  # Order [3, 0, 4, 1, 2] fills them left to right:
  #   item3 -> leaf 0, item0 -> 1, item4 -> 2, item1 -> 4, item2 -> 6.
  # Paths (leaf global = 7 + leaf, level-2 node = 3 + leaf // 2,
  #        level-1 node = 1 + leaf // 4):
  #   item0 leaf 1: [0, 1, 3, 8]    item1 leaf 4: [0, 2, 5, 11]
  #   item2 leaf 6: [0, 2, 6, 13]   item3 leaf 0: [0, 1, 3, 7]
  #   item4 leaf 2: [0, 1, 4, 9]
  tree = T.from_leaf_order(np.array([3, 0, 4, 1, 2]), branching=2)
  T.validate(tree)
  assert (tree.branching, tree.height, tree.num_items) == (2, 3, 5)
  assert (tree.num_nodes, tree.num_leaves) == (15, 8)
  np.testing.assert_array_equal(tree.level_offsets, [0, 1, 3, 7, 15])
  np.testing.assert_array_equal(tree.item_to_leaf, [1, 4, 6, 0, 2])
  np.testing.assert_array_equal(tree.leaf_to_item, [3, 0, 4, -1, 1, -1, 2, -1])
  np.testing.assert_array_equal(
      tree.parent, [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
  )
  want_children = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14]]
  want_children += [[-1, -1]] * 8
  np.testing.assert_array_equal(tree.children, want_children)
  np.testing.assert_array_equal(
      tree.item_paths,
      [[0, 1, 3, 8], [0, 2, 5, 11], [0, 2, 6, 13], [0, 1, 3, 7], [0, 1, 4, 9]],
  )
  # leaves 7..14 -> occupied leaf indices 0, 1, 2, 4, 6 (globals 7, 8, 9, 11, 13)
  np.testing.assert_array_equal(
      tree.node_valid, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 0]
  )
  for arr in (tree.parent, tree.children, tree.level_offsets, tree.item_to_leaf,
              tree.leaf_to_item, tree.item_paths):
    assert arr.dtype == np.int32
  assert tree.node_valid.dtype == np.bool_
  np.testing.assert_array_equal(T.level_sizes(branching=2, height=3), [1, 2, 4, 8])
  np.testing.assert_array_equal(T.valid_counts(tree), [1, 2, 4, 5])
  np.testing.assert_array_equal(T.item_leaf_nodes(tree), [8, 11, 13, 7, 9])
  np.testing.assert_array_equal(T.leaf_order(tree), [3, 0, 4, 1, 2])
  # leaf ranges: node 2 (level 1, pos 1) spans leaves [4, 8); node 5 -> [4, 6)
  first, end = T.leaf_range(np.array([0, 2, 5, 11]), branching=2, height=3)
  np.testing.assert_array_equal(first, [0, 4, 4, 4])
  np.testing.assert_array_equal(end, [8, 8, 6, 5])


def test_fixture_ternary_n5():
  # N=5, B=3 -> H=2 (3 < 5 <= 9); offsets [0, 1, 4, 13]; 13 nodes, 9 leaves.
  #   level 1: 5 -> 5//3 + (b < 2) = [2, 2, 1]
  #   level 2: 2 -> [1, 1, 0]; 2 -> [1, 1, 0]; 1 -> [1, 0, 0]
  #   occupied leaves: 0, 1, 3, 4, 6
  # Order [4, 2, 0, 3, 1]: item4 -> 0, item2 -> 1, item0 -> 3, item3 -> 4, item1 -> 6.
  # Paths (leaf global = 4 + leaf, level-1 node = 1 + leaf // 3):
  #   item0 leaf 3: [0, 2, 7]   item1 leaf 6: [0, 3, 10]  item2 leaf 1: [0, 1, 5]
  #   item3 leaf 4: [0, 2, 8]   item4 leaf 0: [0, 1, 4]
  tree = T.from_leaf_order(np.array([4, 2, 0, 3, 1]), branching=3)
  T.validate(tree)
  assert (tree.height, tree.num_nodes, tree.num_leaves) == (2, 13, 9)
  np.testing.assert_array_equal(tree.level_offsets, [0, 1, 4, 13])
  np.testing.assert_array_equal(tree.item_to_leaf, [3, 6, 1, 4, 0])
  np.testing.assert_array_equal(tree.leaf_to_item, [4, 2, -1, 0, 3, -1, 1, -1, -1])
  np.testing.assert_array_equal(tree.parent, [-1, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  want_children = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]] + [[-1, -1, -1]] * 9
  np.testing.assert_array_equal(tree.children, want_children)
  np.testing.assert_array_equal(
      tree.item_paths, [[0, 2, 7], [0, 3, 10], [0, 1, 5], [0, 2, 8], [0, 1, 4]]
  )
  np.testing.assert_array_equal(
      tree.node_valid, [1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0]
  )
  np.testing.assert_array_equal(T.valid_counts(tree), [1, 3, 5])
  np.testing.assert_array_equal(T.level_sizes(branching=3, height=2), [1, 3, 9])


def test_single_item_tree():
  tree = T.build_random(np.random.default_rng(0), 1, branching=2)
  T.validate(tree)
  assert tree.height == 1 and tree.num_nodes == 3
  np.testing.assert_array_equal(tree.item_to_leaf, [0])
  np.testing.assert_array_equal(tree.leaf_to_item, [0, -1])
  np.testing.assert_array_equal(tree.item_paths, [[0, 1]])
  np.testing.assert_array_equal(tree.node_valid, [True, True, False])


@pytest.mark.parametrize("n,b,h", [(1, 2, 1), (2, 2, 1), (3, 2, 2), (4, 2, 2), (5, 2, 3),
                                   (9, 3, 2), (10, 3, 3), (16, 4, 2), (17, 4, 3),
                                   (10**6, 2, 20), (2**20 + 1, 2, 21)])
def test_tree_height(n, b, h):
  assert T.tree_height(n, branching=b) == h


def test_tree_is_a_pytree():
  tree = T.build_random(np.random.default_rng(0), 11, branching=3)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  assert len(leaves) == 7
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (back.branching, back.height, back.num_items) == (3, 3, 11)
  on_device = jax.tree_util.tree_map(jnp.asarray, tree)
  T.validate(on_device)  # validate accepts jax arrays too
  assert isinstance(on_device.item_paths, jax.Array)


# --------------------------------------------------------------------------
# Properties of every builder
# --------------------------------------------------------------------------


def _check_invariants(tree: T.Tree, n: int, b: int) -> None:
  T.validate(tree)
  h = tree.height
  assert tree.num_items == n and tree.branching == b
  # H = ceil(log_B N) by integer arithmetic
  assert b**h >= n and (h == 1 or b ** (h - 1) < n)
  # bijection item <-> non-empty leaf
  assert np.unique(tree.item_to_leaf).size == n
  np.testing.assert_array_equal(tree.leaf_to_item[tree.item_to_leaf], np.arange(n))
  assert (tree.leaf_to_item >= 0).sum() == n
  # valid <=> subtree holds >= 1 item; siblings differ by <= 1
  counts = _node_item_counts(tree)
  np.testing.assert_array_equal(tree.node_valid, counts > 0)
  internal = np.arange(tree.level_offsets[h])
  # counts[children]: [num_internal, B] item counts of each sibling group
  sib = counts[tree.children[internal]]
  assert (sib.max(axis=1) - sib.min(axis=1) <= 1).all()
  np.testing.assert_array_equal(sib.sum(axis=1), counts[internal])
  # node_level / level_sizes / valid_counts agree with the layout
  lv = T.node_level(np.arange(tree.num_nodes), branching=b)
  np.testing.assert_array_equal(
      lv, np.repeat(np.arange(h + 1), T.level_sizes(branching=b, height=h))
  )
  np.testing.assert_array_equal(
      T.valid_counts(tree), np.bincount(lv[tree.node_valid], minlength=h + 1)
  )
  # ancestor() of each leaf node and item_ancestor() both reproduce item_paths
  leaves = T.item_leaf_nodes(tree)
  items = np.arange(n)
  for j in range(h + 1):
    np.testing.assert_array_equal(T.ancestor(leaves, j, branching=b), tree.item_paths[:, j])
    np.testing.assert_array_equal(T.item_ancestor(tree, items, j), tree.item_paths[:, j])
  # children_of() equals the stored children; parent is consistent
  all_nodes = np.arange(tree.num_nodes)
  kids = T.children_of(tree, all_nodes)
  np.testing.assert_array_equal(kids, tree.children)
  nonroot = all_nodes[1:]
  assert (T.children_of(tree, tree.parent[nonroot]) == nonroot[:, None]).any(axis=1).all()
  np.testing.assert_array_equal(
      T.ancestor(nonroot, lv[nonroot] - 1, branching=b), tree.parent[nonroot]
  )
  # leaf_range: each item's leaf lies in the range of each ancestor on its
  # path; the occupied leaves in a node's range are exactly its item count;
  # children split the parent's range into B equal consecutive pieces.
  first, end = T.leaf_range(all_nodes, branching=b, height=h)
  for j in range(h + 1):
    f, e = first[tree.item_paths[:, j]], end[tree.item_paths[:, j]]
    assert ((f <= tree.item_to_leaf) & (tree.item_to_leaf < e)).all()
  occ = np.concatenate([[0], np.cumsum(tree.leaf_to_item >= 0)])
  np.testing.assert_array_equal(occ[end] - occ[first], counts)
  kf, ke = first[tree.children[internal]], end[tree.children[internal]]
  np.testing.assert_array_equal(kf[:, 0], first[internal])
  np.testing.assert_array_equal(ke[:, -1], end[internal])
  np.testing.assert_array_equal(kf[:, 1:], ke[:, :-1])
  # builders place items by the balanced rule: round trips are exact
  again = T.from_leaf_order(T.leaf_order(tree), branching=b)
  np.testing.assert_array_equal(again.item_to_leaf, tree.item_to_leaf)
  restored = T.from_item_to_leaf(tree.item_to_leaf, branching=b, num_items=n)
  for field in ("parent", "children", "level_offsets", "leaf_to_item", "item_paths",
                "node_valid"):
    np.testing.assert_array_equal(getattr(restored, field), getattr(tree, field))


@SETTINGS
@given(n=st.integers(1, 300), b=st.integers(2, 5), seed=st.integers(0, 2**31 - 1))
def test_build_random_properties(n, b, seed):
  _check_invariants(_build("random", seed, n, b), n, b)


@SETTINGS
@given(n=st.integers(1, 300), b=st.integers(2, 5), seed=st.integers(0, 2**31 - 1))
def test_build_from_categories_properties(n, b, seed):
  _check_invariants(_build("categories", seed, n, b), n, b)


@SETTINGS
@given(n=st.integers(1, 300), b=st.integers(2, 5), seed=st.integers(0, 2**31 - 1))
def test_build_kmeans_properties(n, b, seed):
  _check_invariants(_build("kmeans", seed, n, b), n, b)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 300),
    b=st.integers(2, 5),
    kind=st.sampled_from(["random", "categories", "kmeans"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_jit_matches_numpy(n, b, kind, seed):
  tree = _build(kind, seed, n, b)
  h = tree.height
  rng = np.random.default_rng(seed)
  nodes = rng.integers(-1, tree.num_nodes, size=64).astype(np.int32)
  nodes[:2] = -1
  levels = rng.integers(0, h + 1, size=64).astype(np.int32)
  items = rng.integers(-1, n, size=64).astype(np.int32)

  def queries(tr, nodes, levels, items):
    return (
        T.node_level(nodes, branching=tr.branching),
        T.ancestor(nodes, levels, branching=tr.branching),
        T.children_of(tr, nodes),
        T.leaf_range(nodes, branching=tr.branching, height=tr.height),
        T.item_ancestor(tr, items, levels),
        T.item_leaf_nodes(tr),
    )

  want = queries(tree, nodes, levels, items)
  got = jax.jit(queries)(tree, jnp.asarray(nodes), jnp.asarray(levels), jnp.asarray(items))
  for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    assert g.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(g), w)


# --------------------------------------------------------------------------
# Builder-specific behaviour
# --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), b=st.integers(2, 5), ncat=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_categories_are_contiguous_in_leaf_order(n, b, ncat, seed):
  rng = np.random.default_rng(seed)
  cats = rng.integers(-1, ncat, size=n)  # -1: unknown category, its own group
  tree = T.build_from_categories(rng, cats, branching=b)
  T.validate(tree)
  ordered = cats[T.leaf_order(tree)]
  # each category occupies one run: the number of runs equals the number of categories
  runs = 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))
  assert runs == np.unique(cats).size


def test_categories_order_is_shuffled():
  cats = np.repeat(np.arange(8), 4)
  firsts = {
      int(cats[T.leaf_order(T.build_from_categories(np.random.default_rng(s), cats))[0]])
      for s in range(20)
  }
  assert len(firsts) > 1


@pytest.mark.parametrize("b", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_separates_well_separated_clusters(b, seed):
  rng = np.random.default_rng(seed)
  per = 40
  centers = rng.normal(size=(b, 6)) * 30.0
  label = np.repeat(np.arange(b), per)
  x = centers[label] + rng.normal(size=(b * per, 6))
  perm = rng.permutation(b * per)  # cluster membership not visible in item ids
  x, label = x[perm], label[perm]
  tree = T.build_kmeans(rng, x, branching=b)
  T.validate(tree)
  top = tree.item_paths[:, 1]  # child of the root holding each item
  for c in range(b):
    assert np.unique(top[label == c]).size == 1
  assert np.unique(top).size == b


def test_kmeans_two_clusters_binary():
  rng = np.random.default_rng(7)
  x = np.concatenate([rng.normal(size=(50, 8)) + 10.0, rng.normal(size=(50, 8)) - 10.0])
  tree = T.build_kmeans(rng, x, branching=2)
  T.validate(tree)
  left = tree.item_paths[:, 1]
  assert np.unique(left[:50]).size == 1 and np.unique(left[50:]).size == 1
  assert left[0] != left[50]


def test_kmeans_is_deterministic_given_rng():
  x = np.random.default_rng(0).normal(size=(500, 4))
  a = T.build_kmeans(np.random.default_rng(3), x, branching=3)
  b = T.build_kmeans(np.random.default_rng(3), x, branching=3)
  np.testing.assert_array_equal(a.item_to_leaf, b.item_to_leaf)


def test_builders_scale_to_many_items():
  n = 200_000
  tree = T.build_random(np.random.default_rng(0), n, branching=2)
  T.validate(tree)
  assert tree.height == 18 and tree.num_nodes == 2**19 - 1


def test_from_leaf_order_rejects_non_permutation():
  with pytest.raises(ValueError, match="duplicate"):
    T.from_leaf_order(np.array([0, 1, 1]), branching=2)
  with pytest.raises(ValueError, match="out of range"):
    T.from_leaf_order(np.array([0, 1, 3]), branching=2)


def test_from_item_to_leaf_accepts_other_balanced_placements():
  # N=3, B=2, H=2: leaves {0, 2, 3} gives root children 1 and 2 items.
  tree = T.from_item_to_leaf(np.array([2, 0, 3]), branching=2, num_items=3)
  np.testing.assert_array_equal(tree.leaf_to_item, [1, -1, 0, 2])
  np.testing.assert_array_equal(tree.node_valid, [1, 1, 1, 1, 0, 1, 1])


def test_from_item_to_leaf_rejects_bad_mappings():
  with pytest.raises(ValueError, match="duplicate"):
    T.from_item_to_leaf(np.array([0, 0, 1]), branching=2, num_items=3)
  with pytest.raises(ValueError, match="out of range"):
    T.from_item_to_leaf(np.array([0, 1, 4]), branching=2, num_items=3)
  with pytest.raises(ValueError, match="shape"):
    T.from_item_to_leaf(np.array([0, 1]), branching=2, num_items=3)
  with pytest.raises(ValueError, match="unbalanced"):
    T.from_item_to_leaf(np.arange(5), branching=2, num_items=5)


# --------------------------------------------------------------------------
# validate() rejects each broken invariant
# --------------------------------------------------------------------------


@pytest.fixture
def good_tree() -> T.Tree:
  return T.from_leaf_order(np.array([3, 0, 4, 1, 2]), branching=2)  # the N=5 fixture


def _with(tree: T.Tree, field: str, edit) -> T.Tree:
  arr = np.array(getattr(tree, field), copy=True)
  edit(arr)
  return dataclasses.replace(tree, **{field: arr})


def test_validate_rejects_duplicate_item(good_tree):
  bad = _with(good_tree, "item_to_leaf", lambda a: a.__setitem__(1, a[0]))
  with pytest.raises(ValueError, match="duplicate"):
    T.validate(bad)


def test_validate_rejects_item_to_leaf_out_of_range(good_tree):
  bad = _with(good_tree, "item_to_leaf", lambda a: a.__setitem__(0, 8))
  with pytest.raises(ValueError, match="out of range"):
    T.validate(bad)


def test_validate_rejects_item_on_empty_leaf(good_tree):
  # item 2 moved to leaf 7 (empty according to leaf_to_item)
  bad = _with(good_tree, "item_to_leaf", lambda a: a.__setitem__(2, 7))
  with pytest.raises(ValueError, match="leaf_to_item inconsistent.*marks empty"):
    T.validate(bad)


def test_validate_rejects_empty_leaf_claiming_item(good_tree):
  bad = _with(good_tree, "leaf_to_item", lambda a: a.__setitem__(3, 2))
  with pytest.raises(ValueError, match="leaf_to_item inconsistent.*empty leaf 3"):
    T.validate(bad)


def test_validate_rejects_unknown_item_on_leaf(good_tree):
  bad = _with(good_tree, "leaf_to_item", lambda a: a.__setitem__(0, 99))
  with pytest.raises(ValueError, match="unknown item"):
    T.validate(bad)


def test_validate_rejects_wrong_path(good_tree):
  bad = _with(good_tree, "item_paths", lambda a: a.__setitem__((2, 1), 1))
  with pytest.raises(ValueError, match="item_paths"):
    T.validate(bad)


def test_validate_rejects_wrong_node_valid(good_tree):
  bad = _with(good_tree, "node_valid", lambda a: a.__setitem__(10, True))
  with pytest.raises(ValueError, match="node_valid"):
    T.validate(bad)


def test_validate_rejects_unbalanced_placement():
  # every item in the left half: root children hold 4 and 1 items
  bad = T.from_item_to_leaf(np.arange(5), branching=2, num_items=5, check=False)
  with pytest.raises(ValueError, match="unbalanced.*differ by more than one"):
    T.validate(bad)


def test_validate_rejects_wrong_height(good_tree):
  with pytest.raises(ValueError, match="height 4 != ceil"):
    T.validate(dataclasses.replace(good_tree, height=4))
  # a consistent but too-deep tree: 2 items on a height-2 binary tree
  deep = T._assemble(np.array([0, 2]), 2, 2)
  with pytest.raises(ValueError, match="height"):
    T.validate(deep)


def test_validate_rejects_bad_parent(good_tree):
  bad = _with(good_tree, "parent", lambda a: a.__setitem__(5, 1))
  with pytest.raises(ValueError, match="parent inconsistent"):
    T.validate(bad)


def test_validate_rejects_bad_children(good_tree):
  bad = _with(good_tree, "children", lambda a: a.__setitem__((7, 0), 3))
  with pytest.raises(ValueError, match="children inconsistent"):
    T.validate(bad)


def test_validate_rejects_bad_shapes_and_dtypes(good_tree):
  with pytest.raises(ValueError, match="item_paths: wrong dtype"):
    T.validate(dataclasses.replace(good_tree, item_paths=good_tree.item_paths.astype(np.int64)))
  with pytest.raises(ValueError, match="node_valid: wrong shape"):
    T.validate(dataclasses.replace(good_tree, node_valid=good_tree.node_valid[:-1]))
  with pytest.raises(ValueError, match="level_offsets"):
    T.validate(_with(good_tree, "level_offsets", lambda a: a.__setitem__(2, 4)))


# --------------------------------------------------------------------------
# Sentinel (-1) handling and query edge cases
# --------------------------------------------------------------------------


def test_minus_one_sentinel_numpy_and_jit(good_tree):
  tree = good_tree

  @jax.jit
  def f(tr, node, item):
    return (
        T.ancestor(node, 0, branching=2),
        T.children_of(tr, node),
        T.item_ancestor(tr, item, 1),
        T.leaf_range(node, branching=2, height=tr.height),
        T.node_level(node, branching=2),
    )

  for out in (f(tree, jnp.int32(-1), jnp.int32(-1)), f(tree, -1 * jnp.ones(3, jnp.int32),
                                                        -1 * jnp.ones(3, jnp.int32))):
    anc, kids, ianc, (lo, hi), lv = out
    assert (np.asarray(anc) == -1).all()
    assert (np.asarray(kids) == -1).all() and kids.shape[-1] == 2
    assert (np.asarray(ianc) == -1).all()
    assert (np.asarray(lo) == -1).all() and (np.asarray(hi) == -1).all()
    assert (np.asarray(lv) == -1).all()
  assert T.ancestor(-1, 0, branching=2) == -1
  assert (T.children_of(tree, np.array([-1, 7, 14, 15])) == -1).all()
  assert T.item_ancestor(tree, -1, 2) == -1
  assert T.item_ancestor(tree, 5, 2) == -1  # item id past N
  assert T.item_ancestor(tree, 0, 4) == -1  # level past H
  # jit with the tree closed over as numpy constants
  g = jax.jit(lambda i: T.item_ancestor(tree, i, 2))
  np.testing.assert_array_equal(g(jnp.array([-1, 0, 4])), [-1, 3, 4])


def test_ancestor_edge_cases():
  # ancestor at the node's own level is itself; deeper levels are invalid
  assert T.ancestor(9, 3, branching=2) == 9
  assert T.ancestor(9, 4, branching=2) == -1
  assert T.ancestor(3, -1, branching=2) == -1
  np.testing.assert_array_equal(T.ancestor(np.array([[7, 8], [13, 14]]), 1, branching=2),
                                [[1, 1], [2, 2]])
  # broadcast a batch of levels against one node
  np.testing.assert_array_equal(T.ancestor(13, np.arange(5), branching=2), [0, 2, 6, 13, -1])


@pytest.mark.parametrize("b", [2, 3, 7])
def test_node_level_exact_near_level_boundaries(b):
  offs, _ = T._tables(b)
  offs = offs[offs <= np.iinfo(np.int32).max]
  probes = np.concatenate([offs - 1, offs, offs + 1])
  probes = np.unique(np.clip(probes, 0, np.iinfo(np.int32).max))
  probes = np.append(probes, np.iinfo(np.int32).max).astype(np.int64)
  want = np.array([max(j for j, o in enumerate(offs) if o <= p) for p in probes])
  np.testing.assert_array_equal(T.node_level(probes, branching=b), want)
  got = jax.jit(lambda x: T.node_level(x, branching=b))(jnp.asarray(probes, jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_children_of_batch_shape(good_tree):
  out = T.children_of(good_tree, np.zeros((3, 4), np.int32))
  assert out.shape == (3, 4, 2)
  out_j = jax.jit(T.children_of)(good_tree, jnp.zeros((3, 4), jnp.int32))
  assert out_j.shape == (3, 4, 2)
  np.testing.assert_array_equal(np.asarray(out_j), out)


# --------------------------------------------------------------------------
# Internals of the k-means builder
# --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(b=st.integers(2, 5), nseg=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_greedy_assign_fills_capacities_exactly(b, nseg, seed):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(b, 40, size=nseg)
  seg = np.repeat(np.arange(nseg), sizes)
  # sizes[:, None]: one row per segment, B balanced capacities as columns
  caps = sizes[:, None] // b + (np.arange(b)[None, :] < sizes[:, None] % b)
  cost = rng.normal(size=(seg.size, b)).astype(np.float32)
  child = T._greedy_assign(cost, seg, caps)
  counts = np.bincount(seg * b + child, minlength=nseg * b)
  np.testing.assert_array_equal(counts, caps.reshape(-1))
  # a row that would be happiest in a child with spare room is never refused:
  # every row sits in its cheapest child or that child is exactly full.
  cheapest = cost.argmin(axis=1)
  unhappy = child != cheapest
  full = counts[seg * b + cheapest] == caps.reshape(-1)[seg * b + cheapest]
  assert full[unhappy].all()


@settings(max_examples=40, deadline=None)
@given(nseg=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_split_two_puts_smallest_keys_first(nseg, seed):
  rng = np.random.default_rng(seed)
  base = int(rng.integers(3, 30))
  sizes = base + rng.integers(0, 2, size=nseg)  # sizes differ by <= 1, as in a level
  start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  seg = np.repeat(np.arange(nseg), sizes)
  cap0 = (sizes + 1) // 2
  key = rng.normal(size=seg.size).astype(np.float32)
  perm = T._split_two(key, seg, start, int(sizes.max()), cap0)
  assert np.array_equal(np.sort(perm), np.arange(seg.size))
  for s in range(nseg):
    block = key[perm[start[s] : start[s] + sizes[s]]]
    assert set(perm[start[s] : start[s] + sizes[s]]) == set(range(start[s], start[s] + sizes[s]))
    assert block[: cap0[s]].max() <= block[cap0[s] :].min()
