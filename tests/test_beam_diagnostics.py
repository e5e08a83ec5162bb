"""Per-level beam diagnostics (`beam_diagnostics`): hand-computed recall per level on a tiny
tree with a table scorer, -1 padding, an exhaustive beam, agreement with the metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from tdr_jax import beam_diagnostics as bd
from tdr_jax import beam_search as bs
from tdr_jax import label_tree
from tdr_jax import metrics as metrics_lib
from tdr_jax import parallel
from tdr_jax import tree as tree_lib


def table_score(params, tree, history, nodes, level=None):
  """Scorer reading a table: params[user, node]; the user id is history[:, -1]."""
  del tree, level
  user = history[:, -1]
  return params[user[:, None], jnp.maximum(nodes, 0)]


def user_history(num_users):
  return jnp.broadcast_to(jnp.arange(num_users)[:, None], (num_users, 2)).astype(jnp.int32)


@pytest.fixture(scope="module")
def hand_case():
  """8 items on B = 2, H = 3, item i at leaf node 7 + i; level 2 = nodes 3..6 (items 2m, 2m+1
  under node 3 + m). Beam 2 starts at level 2 (4 nodes > 2) and keeps nodes {3, 5}; their
  children 7, 8, 11, 12 (items 0, 1, 4, 5) compete at level 3 and {8, 11} (items 1, 4) stay.
  Leaf scores by item: 0.3, 0.6, 0.95, 0.0, 0.5, 0.1, 0.7, 0.0 (brute force: 2, 6, 1, 4, ...).
  """
  t = tree_lib.from_item_to_leaf(np.arange(8), branching=2, num_items=8)
  row = np.zeros(t.parent.shape[0], np.float32)
  row[3:7] = [0.9, 0.1, 0.8, 0.2]
  row[7:15] = [0.3, 0.6, 0.95, 0.0, 0.5, 0.1, 0.7, 0.0]
  table = jnp.asarray(np.stack([row, row]))
  # user 0: {0, 1, 2}; user 1: {6, 5} with 6 repeated (counts once).
  offsets = np.array([0, 3, 6])
  items = np.array([0, 1, 2, 6, 5, 6])
  return t, table, offsets, items


def test_hand_computed_level_recall(hand_case):
  t, table, offsets, items = hand_case
  d = bd.level_recall(table_score, table, t, np.asarray(user_history(2)), offsets, items,
                      beam_size=2, ks=(1, 2), batch_size=4, mesh=parallel.make_mesh())
  assert (d["start_level"], d["height"], d["levels"]) == (2, 3, [2, 3])
  assert d["label_items"] == 5
  # Level 2: user 0 keeps items 0, 1 (node 3), loses 2 (node 4); user 1 keeps 5 (node 5),
  # loses 6 (node 6). Level 3: only item 1 (leaf 8) of user 0 survives.
  np.testing.assert_allclose(d["beam_recall_per_level"], [3 / 5, 1 / 5])
  np.testing.assert_allclose(d["beam_recall_per_level_user_mean"],
                             [(2 / 3 + 1 / 2) / 2, (1 / 3 + 0) / 2])
  # Beam top-2 = items 1, 4; brute force top-2 = items 2, 6.
  assert d["beam_recall@1"] == pytest.approx(1 / 5)
  assert d["beam_recall@2"] == pytest.approx(1 / 5)
  assert d["brute_force_recall@1"] == pytest.approx(1 / 5)
  assert d["brute_force_recall@2"] == pytest.approx(2 / 5)
  assert d["brute_force_recall_user_mean@2"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  assert d["beam_recall_user_mean@1"] == pytest.approx((1 / 3) / 2)
  # Brute force in chunks of 3 items (a running top-K merge) gives the same shares.
  small = bd.level_recall(table_score, table, t, np.asarray(user_history(2)), offsets, items,
                          beam_size=2, ks=(1, 2), batch_size=4, mesh=parallel.make_mesh(),
                          chunk_size=3)
  assert {k: v for k, v in small.items() if k != "seconds"} == {
      k: v for k, v in d.items() if k != "seconds"}


def test_brute_force_chunk_bounds_the_activations():
  # 2^25 / (256 * 20 * 16) = 409 items per chunk (default preset); paper: 2^25 / (256*69*36).
  assert bd.brute_force_chunk(num_items=4918, batch_size=256, history_len=20,
                              attention_width=16) == 409
  assert bd.brute_force_chunk(num_items=4918, batch_size=256, history_len=69,
                              attention_width=36) == 52
  assert bd.brute_force_chunk(num_items=4918, batch_size=256, history_len=20,
                              attention_width=16, levels=13) == 31
  assert bd.brute_force_chunk(num_items=100, batch_size=1, history_len=2,
                              attention_width=1) == 100  # never more than the items


def test_padding_is_ignored(hand_case):
  t, table, _, _ = hand_case
  trace = bs.beam_trace(table_score, table, t, user_history(2), beam_size=2)
  np.testing.assert_array_equal(
      np.asarray(bd.kept_beams(trace, beam_size=2)),
      [[[3, 5], [3, 5]], [[8, 11], [8, 11]]])
  labels = jnp.asarray([[0, 1, 2, -1, -1], [6, 5, -1, -1, -1]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(bd.level_hits(trace, t, labels, beam_size=2)),
                                [[2, 1], [1, 0]])
  # Only padding: nothing counts (a clamped -1 would read item 7's ancestors: node 6, leaf 14).
  kept_everything = bs.beam_trace(table_score, table, t, user_history(2), beam_size=8)
  none = jnp.full((2, 3), -1, jnp.int32)
  np.testing.assert_array_equal(np.asarray(bd.level_hits(kept_everything, t, none,
                                                         beam_size=8)), [[0], [0]])
  np.testing.assert_array_equal(bd.padded_labels(np.array([0, 3, 6]),
                                                 np.array([0, 1, 2, 6, 5, 6])),
                                [[0, 1, 2], [5, 6, -1]])


def test_beam_over_all_leaves_keeps_everything(hand_case):
  t, table, offsets, items = hand_case
  d = bd.level_recall(table_score, table, t, np.asarray(user_history(2)), offsets, items,
                      beam_size=8, ks=(1, 2, 8), batch_size=2, mesh=parallel.make_mesh())
  assert d["levels"] == [3] and d["beam_recall_per_level"] == [1.0]
  for k in (1, 2, 8):  # an exhaustive beam is the brute force
    assert d[f"beam_recall@{k}"] == pytest.approx(d[f"brute_force_recall@{k}"])
  assert d["beam_recall@8"] == 1.0


def _heap_table(t, leaf_scores):
  """[U, num_nodes] scores with the max-heap property: node = max over its subtree's items."""
  table = np.full((leaf_scores.shape[0], t.parent.shape[0]), -1e9, np.float32)
  table[:, t.item_paths[:, t.height]] = leaf_scores
  for lvl in range(t.height - 1, -1, -1):
    ids = np.arange(t.level_offsets[lvl], t.level_offsets[lvl + 1])
    table[:, ids] = table[:, t.children[ids]].max(-1)
  return table


def test_exact_beam_keeps_its_top_items_at_every_level():
  """On a max-heap table the beam is exact: each user's top-k items keep every ancestor."""
  t = tree_lib.build_random(np.random.default_rng(1), 21, branching=2)
  rng = np.random.default_rng(2)
  table = jnp.asarray(_heap_table(t, rng.normal(size=(5, 21))))
  beam = 3
  top, _ = bs.brute_force(table_score, table, t, user_history(5), topk=beam)
  top = np.asarray(top)
  offsets = np.arange(0, top.size + 1, beam)
  d = bd.level_recall(table_score, table, t, np.asarray(user_history(5)), offsets,
                      top.reshape(-1), beam_size=beam, ks=(beam,), batch_size=2,
                      mesh=parallel.make_mesh())
  assert d["levels"] == [2, 3, 4, 5]
  assert d["beam_recall_per_level"] == [1.0] * 4
  assert d[f"beam_recall@{beam}"] == 1.0 == d[f"brute_force_recall@{beam}"]


@pytest.mark.parametrize("path_scores", [False, True])
def test_agrees_with_the_search_and_the_metrics(path_scores):
  """Random table: the beam's user-mean recall@K is the metrics' recall@K of `beam_search`,
  the brute force's that of `brute_force` (path scores for PLT); the curve never rises."""
  t = tree_lib.build_random(np.random.default_rng(5), 30, branching=3)
  rng = np.random.default_rng(6)
  num_users = 7
  table = jnp.asarray(rng.normal(size=(num_users, t.parent.shape[0])).astype(np.float32))
  counts = rng.integers(1, 6, size=num_users)
  offsets = np.concatenate([[0], np.cumsum(counts)])
  items = rng.integers(0, 30, size=offsets[-1])
  hist = user_history(num_users)
  ks = (2, 4)
  d = bd.level_recall(table_score, table, t, np.asarray(hist), offsets, items, beam_size=4,
                      ks=ks, batch_size=3, mesh=parallel.make_mesh(), path_scores=path_scores)
  beam_items, _ = bs.beam_search(table_score, table, t, hist, beam_size=4, topk=4,
                                 path_scores=path_scores)
  brute_fn = label_tree.path_score_fn(table_score) if path_scores else table_score
  brute_items, _ = bs.brute_force(brute_fn, table, t, hist, topk=4)
  for name, got in (("beam", beam_items), ("brute_force", brute_items)):
    m = metrics_lib.retrieval_metrics(np.asarray(got), offsets, items, num_items=30, ks=ks)
    for k in ks:
      assert d[f"{name}_recall_user_mean@{k}"] == pytest.approx(m[f"recall@{k}"]), (name, k)
  curve = d["beam_recall_per_level"]
  assert all(a >= b for a, b in zip(curve, curve[1:]))
  assert curve[-1] >= d["beam_recall@4"] - 1e-12
