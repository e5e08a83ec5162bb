"""Warm start: node rows from item vectors, the informative-categories rule, initial trees."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from tdr_jax import experiment, warm_start
from tdr_jax.methods import tree_family
from tdr_jax import methods
from tdr_jax import tree as tree_lib
from tdr_jax.data.preprocess import preprocess


def test_node_rows_by_hand():
  # 3 items on a B = 2, H = 2 tree (leaves 3, 4, 5 hold items 0, 1, 2; leaf 6 empty).
  tree = tree_lib.from_leaf_order(np.array([0, 1, 2]), branching=2)
  v = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 6.0]])
  rows = warm_start.node_rows(v, tree, width=2, rms=1.0)
  raw = np.array([[4 / 3, 2.0], [2.0, 0.0], [0.0, 6.0], [1.0, 0.0], [3.0, 0.0], [0.0, 6.0],
                  [0.0, 0.0]])
  valid = np.asarray(tree.node_valid)
  scale = 1.0 / np.sqrt(np.mean(raw[valid] ** 2))
  np.testing.assert_allclose(rows, raw * scale, rtol=1e-6)
  # Another width: a fixed orthonormal map keeps inner products between rows (up to the
  # rescaling to a per-entry RMS of 1 over 5 columns instead of 2).
  wide = warm_start.node_rows(v, tree, width=5, rms=1.0, seed=3)
  assert wide.shape == (7, 5)
  np.testing.assert_allclose(wide @ wide.T, 2.5 * (raw * scale) @ (raw * scale).T, rtol=1e-5,
                             atol=1e-6)


def _table(cat_of_item, seqs):
  users = np.concatenate([np.full(len(s), u) for u, s in enumerate(seqs)])
  items = np.concatenate(seqs)
  cols = {"user": users.astype(str), "item": items.astype(str),
          "timestamp": np.concatenate([np.arange(len(s)) for s in seqs])}
  if cat_of_item is not None:
    cols["category"] = np.asarray(cat_of_item)[items].astype(str)
  return pa.table(cols)


def test_informative_categories_rule():
  rng = np.random.default_rng(0)
  cat_of_item = np.repeat(np.arange(10), 10)  # 100 items, 10 categories of 10
  # Each user stays inside one category, never repeating an item back to back by design of
  # the draw (repeats are left out of the measure anyway).
  seqs = [rng.choice(np.flatnonzero(cat_of_item == u % 10), 20) for u in range(200)]
  ds = preprocess(_table(cat_of_item, seqs), min_user_interactions=15, seed=0)
  ok, info = warm_start.informative_categories(ds, np.arange(len(ds.train_sample_pos)),
                                               history_len=5)
  assert ok and info["lift"] > 2.0, info
  # Categories unrelated to behaviour: users draw from everywhere.
  seqs = [rng.choice(100, 20) for _ in range(200)]
  ds = preprocess(_table(cat_of_item, seqs), min_user_interactions=15, seed=0)
  ok, info = warm_start.informative_categories(ds, np.arange(len(ds.train_sample_pos)),
                                               history_len=5)
  assert not ok and info["lift"] < 1.3, info
  # No category column: never.
  ds = preprocess(_table(None, seqs), min_user_interactions=15, seed=0)
  ok, info = warm_start.informative_categories(ds, np.arange(len(ds.train_sample_pos)))
  assert not ok and info["coverage"] == 0.0


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
  cfg = experiment.make_config("smoke", data_dir=str(tmp_path_factory.mktemp("data")))
  ds, _ = experiment.load_data(cfg)
  return cfg, ds


def test_initial_trees_and_warm_params(smoke_data, tmp_path):
  cfg, ds = smoke_data
  warm = methods.warm_start_setup(cfg.replace(initial_tree="kmeans"), ds,
                                     str(tmp_path))
  assert warm["initial_tree"] == "kmeans" and warm["vectors"].shape == (ds.num_items, 24)
  for kind in ("category", "kmeans", "random"):
    tree = tree_family.build_initial_tree(cfg, ds, kind, warm["vectors"])
    tree_lib.validate(tree)
  kmeans = tree_family.build_initial_tree(cfg, ds, "kmeans", warm["vectors"])
  # Items that share a k-means leaf pair are closer in vector space than random pairs.
  leaf = np.asarray(kmeans.item_to_leaf)
  by_pair = {}
  for i, lf in enumerate(leaf):
    by_pair.setdefault(lf // 2, []).append(i)
  norm = np.linalg.norm(warm["vectors"], axis=1)
  v = warm["vectors"] / np.maximum(norm, 1e-12)[:, None]
  seen = np.flatnonzero(norm > 0)  # items without training targets have the zero vector
  sib = [v[a] @ v[b] for a, b in (p for p in by_pair.values() if len(p) == 2)
         if norm[a] > 0 and norm[b] > 0]
  rnd = np.random.default_rng(0).choice(seen, (500, 2))
  assert np.mean(sib) > np.mean([v[a] @ v[b] for a, b in rnd]) + 0.1
  # Warm node rows: a leaf's row is its item's vector (same width), scaled like the init.
  score_fn, params = tree_family.build_model(cfg, kmeans)
  init = np.asarray(params["embed"]["embedding"][...])
  got = np.asarray(tree_family.warm_params(cfg, params, kmeans, warm["vectors"])
                   ["embed"]["embedding"][...])
  leaves = np.asarray(kmeans.item_paths)[:, kmeans.height]
  scale = np.linalg.norm(got[leaves][seen]) / np.linalg.norm(warm["vectors"][seen])
  np.testing.assert_allclose(got[leaves][seen], scale * warm["vectors"][seen], rtol=1e-4,
                             atol=1e-6)
  valid = np.asarray(kmeans.node_valid)
  np.testing.assert_allclose(np.sqrt(np.mean(got[valid] ** 2)), np.sqrt(np.mean(init ** 2)),
                             rtol=1e-4)
  # Deterministic: a second call gives the same vectors.
  again = methods.warm_start_setup(cfg.replace(initial_tree="kmeans"), ds,
                                      str(tmp_path))
  np.testing.assert_array_equal(again["vectors"], warm["vectors"])


def test_svd_vectors_by_hand():
  """Two groups of items never shared by a user: their SVD vectors are orthogonal, and items
  of one group (bought by the same users) get parallel vectors."""
  seqs = [np.array([0, 1, 2] * 6)] * 4 + [np.array([3, 4] * 9)] * 4
  ds = preprocess(_table(None, seqs), min_user_interactions=15, split=(0.99, 0.005, 0.005),
                  seed=0)
  v = warm_start.svd_vectors(ds, np.arange(len(ds.train_sample_pos)), dim=3)
  raw = np.asarray([int(x) for x in ds.item_raw_ids])
  v = v[np.argsort(raw)]  # rows by raw item id 0..4
  unit = v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(unit[:3] @ unit[3:].T, 0.0, atol=1e-6)
  np.testing.assert_allclose(np.abs(unit[:3] @ unit[:3].T), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.abs(unit[3] @ unit[4]), 1.0, atol=1e-6)


def test_two_tower_warm_start_is_checkpointed(smoke_data, tmp_path):
  cfg, ds = smoke_data
  cfg = cfg.replace(warm_start_model="two_tower", warm_start_epochs=1.0)
  first = methods.warm_start_setup(cfg, ds, str(tmp_path))
  assert first["info"]["steps_run"] > 0
  again = methods.warm_start_setup(cfg, ds, str(tmp_path))
  assert again["info"]["steps_run"] == 0  # restored, not retrained
  np.testing.assert_array_equal(again["vectors"], first["vectors"])


def test_bad_initial_tree_is_refused():
  with pytest.raises(ValueError, match="initial_tree"):
    experiment.make_config("smoke", initial_tree="nope")
