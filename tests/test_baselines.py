"""Baselines (tdr_jax.baselines): Item-CF on a hand-computed case, YouTubeDNN and brute-force
DIN trained on the smoke synthetic dataset, exact top-K, the uniform run_baseline interface."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdr_jax import experiment, metrics
from tdr_jax.baselines import din_brute, itemcf, run_baseline, youtube_dnn
from tdr_jax.exact_topk import topk_rows
from tdr_jax.data.preprocess import Dataset, eval_split

# ---- Item-CF on a hand-computed case --------------------------------------------------------

# Train users 0-3 over items 0-3 (user 0 repeats item 0: it counts once); users 4 and 5 are
# test users whose first halves are [2, 3] and [0, 0].
_SEQS = [[0, 1, 0], [0, 1, 2], [1, 2], [3, 0], [2, 3, 1, 0], [0, 0, 2, 2]]
_SPLIT = [0, 0, 0, 0, 2, 2]


def _hand_dataset() -> Dataset:
  items = np.concatenate([np.asarray(s, np.int32) for s in _SEQS])
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in _SEQS])]).astype(np.int64)
  return Dataset(
      num_users=len(_SEQS), num_items=4, num_categories=1,
      item_category=np.zeros(4, np.int32), item_raw_ids=np.array(["a", "b", "c", "d"]),
      user_raw_ids=np.array([str(u) for u in range(len(_SEQS))]),
      category_names=np.array(["x"]), seq_items=items, seq_offsets=offsets,
      user_split=np.asarray(_SPLIT, np.int8), train_sample_pos=np.zeros(0, np.int64),
      train_sample_start=np.zeros(0, np.int64))


# Users of items: 0 -> {0,1,3}, 1 -> {0,1,2}, 2 -> {1,2}, 3 -> {3}; sim = |common| / sqrt(n_i n_j).
_R6, _R3 = 1 / math.sqrt(6), 1 / math.sqrt(3)
_SIM = np.array([[0, 2 / 3, _R6, _R3],
                 [2 / 3, 0, 2 * _R6, 0],
                 [_R6, 2 * _R6, 0, 0],
                 [_R3, 0, 0, 0]])


def test_itemcf_hand_computed_similarities_and_retrieval():
  ds = _hand_dataset()
  ev = eval_split(ds, "test", 2)
  np.testing.assert_array_equal(ev.history, [[2, 3], [0, 0]])
  model = itemcf.fit(ds)
  np.testing.assert_allclose(model.similarity.toarray(), _SIM, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(model.popularity, [3, 3, 2, 1])
  # User 4, history {2, 3}: scores (1/sqrt6 + 1/sqrt3, 2/sqrt6, 0, 0); the 0-0 tie goes to the
  # more popular item 2. User 5, history {0}: (0, 2/3, 1/sqrt6, 1/sqrt3).
  np.testing.assert_array_equal(itemcf.retrieve(model, ev, topk=4), [[0, 1, 2, 3], [1, 3, 2, 0]])
  scores = itemcf.score_users(model, itemcf.history_matrix(ev, 4)).toarray()
  np.testing.assert_allclose(scores, [[_R6 + _R3, 2 * _R6, 0, 0], [0, 2 / 3, _R6, _R3]],
                             rtol=1e-6)
  # topk > N pads with -1; exclude_history drops the history items.
  np.testing.assert_array_equal(itemcf.retrieve(model, ev, topk=5)[:, 4], [-1, -1])
  np.testing.assert_array_equal(itemcf.retrieve(model, ev, topk=4, exclude_history=True),
                                [[0, 1, -1, -1], [1, 3, 2, -1]])


def test_itemcf_self_similarity_and_neighbour_cap():
  ds = _hand_dataset()
  ev = eval_split(ds, "test", 2)
  with_self = itemcf.fit(ds, include_self=True)
  np.testing.assert_allclose(with_self.similarity.toarray(), _SIM + np.eye(4), rtol=1e-6)
  # User 4: (0.985, 0.816, 1, 1) -> 2 before 3 by popularity; user 5: (1, 2/3, .408, .577).
  np.testing.assert_array_equal(itemcf.retrieve(with_self, ev, topk=4),
                                [[2, 3, 0, 1], [0, 1, 3, 2]])
  # One neighbour per item: 0 -> 1, 1 -> 2, 2 -> 1, 3 -> 0.
  capped = itemcf.fit(ds, num_neighbors=1)
  expect = np.zeros((4, 4))
  for i, j in ((0, 1), (1, 2), (2, 1), (3, 0)):
    expect[i, j] = _SIM[i, j]
  np.testing.assert_allclose(capped.similarity.toarray(), expect, rtol=1e-6)
  # User 4: item 1 gets sim(2,1), item 0 gets sim(3,0); user 5: only item 1 scores, then
  # popularity order 0, 2, 3.
  np.testing.assert_array_equal(itemcf.retrieve(capped, ev, topk=4),
                                [[1, 0, 2, 3], [1, 0, 2, 3]])


def test_itemcf_eval_histories_add_only_first_halves():
  ds = _hand_dataset()
  x = itemcf.user_item_matrix(ds, include_eval_histories=True).toarray()
  np.testing.assert_array_equal(x[4], [0, 0, 1, 1])  # first half of [2, 3, 1, 0]
  np.testing.assert_array_equal(x[5], [1, 0, 0, 0])  # first half of [0, 0, 2, 2]
  np.testing.assert_array_equal(x[:4], itemcf.user_item_matrix(ds).toarray()[:4])
  assert itemcf.user_item_matrix(ds).toarray()[4:].sum() == 0


def test_itemcf_blocks_and_cap_match_dense_reference():
  rng = np.random.default_rng(0)
  x = (rng.random((40, 29)) < 0.2).astype(np.float32)
  x[:, 7] = 0  # an item nobody touched
  n = x.sum(0)
  co = x.T @ x
  with np.errstate(divide="ignore", invalid="ignore"):
    dense = np.where(np.outer(n, n) > 0, co / np.sqrt(np.outer(n, n)), 0.0)
  np.fill_diagonal(dense, 0.0)
  sim, pop = itemcf.item_similarity(itemcf._binary_csr(*np.nonzero(x), x.shape), block_items=6)
  np.testing.assert_allclose(sim.toarray(), dense, rtol=1e-6, atol=1e-7)
  # Blocks bounded by co-occurrence entries instead (many small blocks) give the same matrix.
  small, _ = itemcf.item_similarity(itemcf._binary_csr(*np.nonzero(x), x.shape),
                                    max_block_entries=40)
  np.testing.assert_array_equal(small.toarray(), sim.toarray())
  np.testing.assert_array_equal(pop, n)
  k = 3
  capped, _ = itemcf.item_similarity(itemcf._binary_csr(*np.nonzero(x), x.shape),
                                     num_neighbors=k, block_items=5)
  for i in range(29):
    nz = np.flatnonzero(dense[i] > 0)
    keep = nz[np.lexsort((nz, -dense[i, nz].astype(np.float32)))][:k]
    row = capped.getrow(i).toarray()[0]
    np.testing.assert_array_equal(np.flatnonzero(row), np.sort(keep))


def test_topk_rows_exact_with_tie_order():
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 4, (9, 13)).astype(np.float32)  # many ties
  order = rng.permutation(13)
  got = topk_rows(scores, 5, column_order=order, rows_per_call=4)
  rank = np.empty(13, np.int64)
  rank[order] = np.arange(13)
  expect = np.stack([np.lexsort((rank, -row))[:5] for row in scores])
  np.testing.assert_array_equal(got, expect)


# ---- trained baselines on the smoke dataset -------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  cfg = experiment.make_config("smoke", data_dir=str(tmp_path_factory.mktemp("data")))
  ds, _ = experiment.load_data(cfg)
  ev = experiment.evaluation_set(cfg, ds)
  return cfg, ds, ev


def _shared(cfg, epochs=4.0):
  return dict(topk=max(cfg.eval.topk), seed=cfg.seed, history_len=cfg.data.history_len,
              epochs=epochs, batch_size=cfg.train.batch_size,
              max_train_samples=cfg.data.max_train_samples)


def _recall20(retrieved, ev, ds):
  return metrics.retrieval_metrics(retrieved, ev.label_offsets, ev.label_items,
                                   num_items=ds.num_items, ks=(20,))["recall@20"]


@pytest.fixture(scope="module")
def youtube_run(smoke, tmp_path_factory):
  cfg, ds, ev = smoke
  workdir = str(tmp_path_factory.mktemp("yt"))
  return workdir, run_baseline("youtube_dnn", ds, ev, workdir=workdir, **_shared(cfg))


@pytest.fixture(scope="module")
def din_run(smoke, tmp_path_factory):
  cfg, ds, ev = smoke
  model = din_brute.fit(ds, seed=cfg.seed, epochs=4.0, batch_size=cfg.train.batch_size,
                        history_len=cfg.data.history_len,
                        max_train_samples=cfg.data.max_train_samples, windows=cfg.model.windows, attention_hidden=cfg.model.attention_hidden,
                        mlp_hidden=cfg.model.mlp_hidden, num_negatives=50)
  return model, din_brute.retrieve(model, ev, topk=20, batch_size=16)


def _assert_valid_lists(retrieved, num_users, k, num_items):
  assert retrieved.shape == (num_users, k) and retrieved.dtype == np.int32
  assert ((retrieved >= 0) & (retrieved < num_items)).all()
  assert all(len(set(row)) == k for row in retrieved.tolist()), "K distinct items per user"


def test_itemcf_on_smoke_beats_random(smoke):
  cfg, ds, ev = smoke
  # Every training sample's target (the smoke preset's 800-sample subset is too thin for
  # co-occurrence counts); run_baseline counts only the samples a run trains on.
  shared = dict(_shared(cfg), max_train_samples=0)
  retrieved, seconds, settings = run_baseline("itemcf", ds, ev, **shared)
  _assert_valid_lists(retrieved, ev.num_users, 20, ds.num_items)
  assert _recall20(retrieved, ev, ds) > 2 * 20 / ds.num_items
  assert settings["training_interactions"] == "sample targets"
  assert settings["matrix_nnz"] < itemcf.user_item_matrix(ds).nnz  # first items not counted
  json.dumps(settings)


def test_youtube_dnn_learns(smoke, youtube_run):
  cfg, ds, ev = smoke
  _, (retrieved, seconds, settings) = youtube_run
  assert settings["steps"] == settings["steps_run"] == 100
  _assert_valid_lists(retrieved, ev.num_users, 20, ds.num_items)
  # Random K items have expected recall K / N.
  assert _recall20(retrieved, ev, ds) > 1.5 * 20 / ds.num_items
  assert settings["final_loss"] < math.log(ds.num_items) - 0.1  # below the uniform model
  assert seconds > 0
  json.dumps(settings)


def test_youtube_dnn_resume_restores_finished_run(smoke, youtube_run):
  cfg, ds, ev = smoke
  workdir, (retrieved, _, _) = youtube_run
  again, _, settings = run_baseline("youtube_dnn", ds, ev, workdir=workdir, **_shared(cfg))
  assert settings["steps_run"] == 0 and settings["resumed_from"] == 100
  np.testing.assert_array_equal(again, retrieved)


def test_youtube_dnn_loss_decreases_and_tower_masks_padding(smoke):
  cfg, ds, ev = smoke
  model = youtube_dnn.fit(ds, seed=1, epochs=3.0, batch_size=cfg.train.batch_size,
                          history_len=cfg.data.history_len,
                          max_train_samples=cfg.data.max_train_samples, num_negatives=200, learning_rate=3e-3, log_every=10)
  losses = model.info["losses"]
  assert len(losses) == 75
  # With the logQ correction the loss estimates the full softmax: ln(N) for a uniform model.
  assert abs(losses[0] - math.log(ds.num_items)) < 0.1
  assert losses[:5].mean() > losses[-5:].mean() + 0.25
  module = model.module()
  h = jnp.asarray([[-1, -1, 3, 5, 5, 9], [-1] * 6], jnp.int32)
  u = np.asarray(module.user_vectors(h))
  emb = np.asarray(module.history_embed.embedding[...])
  # Mean pooling over the real positions only; an empty history pools to the zero vector.
  x = jnp.asarray(np.stack([emb[[3, 5, 5, 9]].mean(0), np.zeros(emb.shape[1], np.float32)]))
  for i, layer in enumerate(module.layers):
    x = layer(x)
    x = jax.nn.relu(x) if i + 1 < len(module.layers) else x
  np.testing.assert_allclose(u, np.asarray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topk,chunk", [(10, 16), (7, 64), (60, 16)])
def test_mips_topk_equals_numpy_argsort(topk, chunk):
  rng = np.random.default_rng(topk)
  users = rng.normal(size=(7, 5)).astype(np.float32)
  items = rng.normal(size=(53, 5)).astype(np.float32)
  got, got_scores = youtube_dnn.mips_topk(jnp.asarray(users), jnp.asarray(items), topk=topk,
                                          chunk_size=chunk)
  scores = users.astype(np.float64) @ items.T.astype(np.float64)
  k = min(topk, 53)
  expect = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.asarray(got)[:, :k], expect)
  np.testing.assert_allclose(np.asarray(got_scores)[:, :k],
                             np.take_along_axis(scores, expect, 1), rtol=1e-5, atol=1e-5)
  if topk > 53:
    assert (np.asarray(got)[:, 53:] == -1).all()


def test_din_brute_force_trains_and_retrieves(smoke, din_run):
  cfg, ds, ev = smoke
  model, retrieved = din_run
  losses = model.info["losses"]
  assert losses[:10].mean() > losses[-10:].mean()
  _assert_valid_lists(retrieved, ev.num_users, 20, ds.num_items)
  assert _recall20(retrieved, ev, ds) > 1.5 * 20 / ds.num_items
  # Exactness: the retrieved items are the top 20 of every item's leaf score.
  tree = model.tree
  leaves = jnp.asarray(tree.item_paths[:, tree.height])
  h = jnp.asarray(ev.history[:4])
  all_scores = np.asarray(model.score_fn(model.params, tree, h,
                                         jnp.broadcast_to(leaves, (4, ds.num_items)),
                                         level=tree.height))
  got = np.take_along_axis(all_scores, retrieved[:4], 1)
  np.testing.assert_allclose(got, -np.sort(-all_scores, axis=1)[:, :20], rtol=1e-5, atol=1e-5)


def test_run_baseline_din_and_argument_checks(smoke, tmp_path):
  cfg, ds, ev = smoke
  retrieved, seconds, settings = run_baseline(
      "din", ds, ev, workdir=str(tmp_path), windows=cfg.model.windows,
      attention_hidden=cfg.model.attention_hidden, mlp_hidden=cfg.model.mlp_hidden,
      num_negatives=20, batch_size_eval=32, **dict(_shared(cfg, epochs=0.2), topk=cfg.eval.topk))
  _assert_valid_lists(retrieved, ev.num_users, max(cfg.eval.topk), ds.num_items)
  assert settings["windows"] == list(cfg.model.windows) and settings["steps"] == 5
  json.dumps(settings)
  with pytest.raises(ValueError, match="unknown baseline"):
    run_baseline("tdm", ds, ev, **_shared(cfg))
  with pytest.raises(TypeError, match="unknown option"):
    run_baseline("itemcf", ds, ev, num_negatives=3, **_shared(cfg))
  with pytest.raises(ValueError, match="history_len"):
    run_baseline("itemcf", ds, ev, **dict(_shared(cfg), history_len=cfg.data.history_len + 1))


def test_default_windows():
  assert din_brute.default_windows(69) == (1, 1, 1, 2, 2, 2, 10, 10, 20, 20)
  assert din_brute.default_windows(6) == (1, 1, 1, 2, 1)
  assert sum(din_brute.default_windows(20)) == 20


@pytest.mark.parametrize("include_self", [False, True])
def test_itemcf_neighbour_cap_dense_and_sorted_paths_agree(include_self):
  rng = np.random.default_rng(3)
  x = (rng.random((60, 50)) < rng.random(50) * 0.5).astype(np.float32)
  m = itemcf._binary_csr(*np.nonzero(x), x.shape)
  full, _ = itemcf.item_similarity(m, include_self=include_self)
  dense_path, _ = itemcf.item_similarity(m, include_self=include_self, num_neighbors=4,
                                         block_items=16, dense_topk=True)
  sorted_path, _ = itemcf.item_similarity(m, include_self=include_self, num_neighbors=4,
                                          block_items=16, dense_topk=False)
  np.testing.assert_array_equal(dense_path.toarray(), sorted_path.toarray())
  f = full.toarray()
  for i in range(50):
    nz = np.flatnonzero(f[i])
    keep = np.sort(nz[np.lexsort((nz, -f[i, nz]))][:4])
    np.testing.assert_array_equal(np.flatnonzero(dense_path.toarray()[i]), keep)
    np.testing.assert_array_equal(dense_path.toarray()[i, keep], f[i, keep])
