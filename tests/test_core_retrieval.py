"""Losses, samplers and beam search on small hand-made trees and table scorers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdr_jax import beam_search as bs
from tdr_jax import losses, sampling
from tdr_jax import tree as tree_lib


def table_score(params, tree, history, nodes, level=None):
  """Scorer reading a table: params[user, node]; the user id is history[:, -1]."""
  user = history[:, -1]
  scores = params[user[:, None], nodes]
  if level is not None:  # callers promise that every node lies on `level`: NaN if not
    lv = tree_lib.node_level(nodes, branching=tree.branching)
    scores = jnp.where(lv == level, scores, jnp.nan)
  return scores


# ---- losses --------------------------------------------------------------------------------

def test_full_softmax_loss_hand_computed():
  logits = jnp.array([1.0, 2.0, 0.5, 9.0])
  mask = jnp.array([True, True, True, False])
  got = losses.full_softmax_loss(logits, 1, mask)
  want = -np.log(np.exp(2.0) / (np.exp(1.0) + np.exp(2.0) + np.exp(0.5)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(losses.full_softmax_loss(logits, 1, mask, 0.5), want / 2, rtol=1e-6)


def test_sampled_softmax_logq_and_accidental_hits():
  pos, neg = jnp.array(1.0), jnp.array([0.5, 2.0, 1.0])
  log_q = jnp.log(jnp.array([0.5, 0.25, 0.25]))
  mask = jnp.array([True, True, False])  # the third draw hit the positive
  got = losses.sampled_softmax_loss(pos, neg, log_q, mask, num_samples=3)
  corrected = np.array([0.5 - np.log(3 * 0.5), 2.0 - np.log(3 * 0.25)])
  want = np.log(np.exp(1.0) + np.exp(corrected).sum()) - 1.0
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_binary_cross_entropy_hand_computed():
  got = losses.binary_cross_entropy_loss(jnp.array(0.0), jnp.array([0.0, 3.0]),
                                         jnp.array([True, False]))
  np.testing.assert_allclose(got, 2 * np.log(2.0), rtol=1e-6)


def test_sampled_softmax_gradient_unbiased_when_q_is_softmax():
  """Theorem 2: with q proportional to exp(o) over the negatives, the expected gradient of the
  sampled loss w.r.t. the logits equals the full-softmax gradient (p - y), as m grows the bias
  vanishes; with uniform q at small m it does not."""
  o = jnp.array([0.3, 1.2, -0.5, 2.0, 0.0, -1.0])
  pos = 2
  full_grad = jax.grad(lambda o: losses.full_softmax_loss(o, pos, jnp.ones(6, bool)))(o)
  neg_ids = jnp.array([i for i in range(6) if i != pos])
  q = jax.nn.softmax(o[neg_ids])
  m = 2000

  def sampled_grad(key, q_draw):
    draws = jax.random.choice(key, 5, (m,), p=q_draw)
    nodes = neg_ids[draws]

    def loss(o):
      return losses.sampled_softmax_loss(o[pos], o[nodes], jnp.log(q_draw[draws]),
                                         jnp.ones(m, bool), num_samples=m)
    return jax.grad(loss)(o)

  keys = jax.random.split(jax.random.key(0), 200)
  mean_grad = jax.vmap(lambda k: sampled_grad(k, q))(keys).mean(0)
  np.testing.assert_allclose(mean_grad, full_grad, atol=3e-3)
  # Small m with softmax q is still unbiased; uniform q is biased at small m.
  m_small = 3

  def small(key, q_draw):
    draws = jax.random.choice(key, 5, (m_small,), p=q_draw)
    nodes = neg_ids[draws]
    return jax.grad(lambda o: losses.sampled_softmax_loss(
        o[pos], o[nodes], jnp.log(q_draw[draws]), jnp.ones(m_small, bool),
        num_samples=m_small))(o)

  keys = jax.random.split(jax.random.key(1), 40000)
  g_soft = jax.vmap(lambda k: small(k, q))(keys).mean(0)
  g_unif = jax.vmap(lambda k: small(k, jnp.full(5, 0.2)))(keys).mean(0)
  err_soft = float(jnp.abs(g_soft - full_grad).max())
  err_unif = float(jnp.abs(g_unif - full_grad).max())
  assert err_soft < 0.01
  assert err_unif > 5 * err_soft


# ---- samplers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tree():
  # 11 items, B = 2 -> H = 4, 16 leaves, 5 of them empty.
  return tree_lib.build_random(np.random.default_rng(0), 11, branching=2)


def test_uniform_negatives(small_tree):
  index = sampling.level_index(small_tree)
  counts = tree_lib.valid_counts(small_tree)
  levels = jnp.arange(1, small_tree.height + 1)
  pos = jnp.asarray(small_tree.item_paths[3, 1:])
  fn = jax.jit(functools.partial(sampling.uniform_negatives, num_samples=4000))
  nodes, log_q, mask = fn(jax.random.key(0), pos, levels, index)
  nodes, log_q = np.asarray(nodes), np.asarray(log_q)
  for j in range(small_tree.height):
    lvl = j + 1
    assert not np.any(nodes[j] == int(pos[j])), "the positive must never be drawn"
    assert np.all(np.asarray(small_tree.node_valid)[nodes[j]])
    assert np.all(tree_lib.node_level(nodes[j], branching=2) == lvl)
    np.testing.assert_allclose(np.exp(log_q[j]), 1.0 / (counts[lvl] - 1), rtol=1e-6)
    # Every other valid node of the level is drawn with about equal frequency.
    others = [n for n in np.asarray(index.valid_nodes) if tree_lib.node_level(n, branching=2)
              == lvl and n != int(pos[j])]
    freq = np.array([(nodes[j] == n).mean() for n in others])
    np.testing.assert_allclose(freq, 1.0 / len(others), atol=0.035)
  assert np.all(np.asarray(mask))


def _chi_square_ok(counts, probs, num):
  expected = probs * num
  keep = expected > 0
  assert np.all(counts[~keep] == 0), "a zero-probability node was drawn"
  stat = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
  dof = keep.sum() - 1
  # 99.9% quantile of chi-square, Wilson-Hilferty approximation.
  z = 3.09
  crit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
  return stat, crit


@pytest.mark.parametrize("start_level", [0, 2])
def test_top_down_matches_level_softmax_under_theorem3(small_tree, start_level):
  """Leaf scores arbitrary; internal node scores = log-sum-exp of their children's (condition
  (23) with equal constants): then top-down q at every level equals the level softmax."""
  t = small_tree
  rng = np.random.default_rng(1)
  num_nodes = t.parent.shape[0]
  o = np.full(num_nodes, -np.inf)
  leaves = t.item_paths[:, t.height]
  o[leaves] = rng.normal(size=len(leaves)) * 1.5
  for lvl in range(t.height - 1, -1, -1):
    for n in range(t.level_offsets[lvl], t.level_offsets[lvl + 1]):
      kids = t.children[n]
      if np.any(np.isfinite(o[kids])):
        o[n] = np.logaddexp.reduce(o[kids][np.isfinite(o[kids])])
  table = jnp.asarray(np.where(np.isfinite(o), o, -50.0)[None, :].astype(np.float32))
  m = 30000
  history = jnp.zeros((1, 3), jnp.int32)
  fn = jax.jit(functools.partial(sampling.top_down_negatives, score_fn=table_score,
                                 num_samples=m, start_level=start_level))
  nodes, log_q = fn(jax.random.key(3), params=table, tree=t, history=history)
  nodes, log_q = np.asarray(nodes[0]), np.asarray(log_q[0])
  assert nodes.shape == (t.height - start_level, m)
  for lvl in range(start_level + 1, t.height + 1):
    ids = np.arange(t.level_offsets[lvl], t.level_offsets[lvl + 1])
    logits = o[ids]
    probs = np.where(np.isfinite(logits), np.exp(logits - np.logaddexp.reduce(
        logits[np.isfinite(logits)])), 0.0)
    row = lvl - 1 - start_level
    counts = np.array([(nodes[row] == n).sum() for n in ids])
    stat, crit = _chi_square_ok(counts, probs, m)
    assert stat < crit, (lvl, stat, crit)
    # log q reported for each draw equals the softmax log-probability of the drawn node.
    np.testing.assert_allclose(np.exp(log_q[row]), probs[nodes[row] - ids[0]], rtol=1e-4)


def test_top_down_never_draws_empty_subtrees(small_tree):
  t = small_tree
  table = jnp.zeros((1, t.parent.shape[0]))  # uniform scores everywhere
  nodes, _ = sampling.top_down_negatives(jax.random.key(0), table_score, table, t,
                                         jnp.zeros((1, 2), jnp.int32), num_samples=500)
  assert np.all(np.asarray(t.node_valid)[np.asarray(nodes)])


# ---- beam search ---------------------------------------------------------------------------

def _heap_table(t, leaf_scores):
  """[U, num_nodes] scores with the max-heap property: node = max over its subtree's items."""
  num_users = leaf_scores.shape[0]
  table = np.full((num_users, t.parent.shape[0]), -1e9, np.float32)
  table[:, t.item_paths[:, t.height]] = leaf_scores
  for lvl in range(t.height - 1, -1, -1):
    ids = np.arange(t.level_offsets[lvl], t.level_offsets[lvl + 1])
    table[:, ids] = table[:, t.children[ids]].max(-1)
  return table


@pytest.mark.parametrize("branching,num_items,beam", [(2, 37, 5), (3, 50, 4), (2, 11, 20)])
def test_beam_search_equals_brute_force_on_max_heap(branching, num_items, beam):
  t = tree_lib.build_random(np.random.default_rng(branching), num_items, branching=branching)
  rng = np.random.default_rng(7)
  num_users = 6
  table = jnp.asarray(_heap_table(t, rng.normal(size=(num_users, num_items))))
  history = jnp.broadcast_to(jnp.arange(num_users)[:, None], (num_users, 2)).astype(jnp.int32)
  topk = min(beam, num_items, 4)
  items, scores = bs.beam_search(table_score, table, t, history, beam_size=beam, topk=topk)
  bf_items, bf_scores = bs.brute_force(table_score, table, t, history, topk=topk, chunk_size=8)
  np.testing.assert_array_equal(np.asarray(items), np.asarray(bf_items))
  np.testing.assert_allclose(np.asarray(scores), np.asarray(bf_scores))


def test_proposition1_plain_labels_are_suboptimal():
  """8 items on 8 leaves in order; with expected plain labels (subtree sums) as node scores,
  beam 3 returns {1, 4, 7} (1-based) while the Bayes-optimal set is {1, 4, 5}."""
  eta = np.array([0.21, 0, 0.12, 0.18, 0.19, 0, 0.16, 0.14])
  t = tree_lib.from_leaf_order(np.arange(8), branching=2)
  table = np.zeros((1, t.parent.shape[0]), np.float32)
  table[0, t.item_paths[:, 3]] = eta
  for lvl in (2, 1, 0):
    ids = np.arange(t.level_offsets[lvl], t.level_offsets[lvl + 1])
    table[0, ids] = table[0, t.children[ids]].sum(-1)
  items, _ = bs.beam_search(table_score, jnp.asarray(table), t, jnp.zeros((1, 1), jnp.int32),
                            beam_size=3, topk=3)
  assert set(np.asarray(items[0]) + 1) == {1, 4, 7}
  assert set(np.argsort(-eta)[:3] + 1) == {1, 4, 5}


def test_beam_search_masks_empty_leaves():
  t = tree_lib.build_random(np.random.default_rng(5), 5, branching=2)  # 8 leaves, 3 empty
  table = jnp.zeros((1, t.parent.shape[0]))  # every node ties
  items, scores = bs.beam_search(table_score, table, t, jnp.zeros((1, 1), jnp.int32),
                                 beam_size=8, topk=8)
  got = np.asarray(items[0])
  assert sorted(got[got >= 0].tolist()) == list(range(5))
  assert np.sum(got == -1) == 3


def test_binary_loss_targets_are_every_ancestor(small_tree):
  """TDM/JTM (Eq. 2): at every level 1..H the positive's ancestor has target 1 and each of the
  m uniform negatives target 0. With a table scorer giving ancestors a_j and every other node
  b_j, the loss is exactly sum_j softplus(-a_j) + m softplus(b_j), whatever nodes are drawn."""
  from tdr_jax import train
  tree, m = small_tree, 5
  h = tree.height
  a = np.linspace(-1.0, 2.0, h).astype(np.float32)  # ancestors' logits per level
  b = np.linspace(0.5, -1.5, h).astype(np.float32)  # every other node's logits per level
  items = np.array([0, 3, 7, 10])
  levels_of = np.asarray(tree_lib.node_level(np.arange(tree.num_nodes), branching=2))
  table = np.zeros((len(items), tree.num_nodes), np.float32)
  for u, y in enumerate(items):
    lv = np.clip(levels_of, 1, h) - 1
    table[u] = b[lv]
    path = tree.item_paths[y, 1:]
    table[u, path] = a
  batch = train.Batch(history=jnp.asarray(np.stack([[-1, u] for u in range(len(items))]),
                                          jnp.int32),
                      target=jnp.asarray(items, jnp.int32),
                      weight=jnp.ones((len(items), h), jnp.float32),
                      mask=jnp.ones(len(items), bool))
  cfg = train.StepConfig(loss="bce", sampler="uniform", num_negatives=m)
  loss_fn = train.make_loss_fn(table_score, cfg, branching=2, height=h)
  loss, metrics = jax.jit(loss_fn)(jnp.asarray(table), batch, tree, sampling.level_index(tree),
                                   jax.random.key(1))
  softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
  want = softplus(-a) + m * softplus(b)  # per level
  np.testing.assert_allclose(np.asarray(metrics["level_loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want.sum(), rtol=1e-5)
