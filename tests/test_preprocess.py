"""Preprocessing, batch helpers and the dataset cache on hand-computed cases."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdr_jax.data import (
    DATASETS,
    Dataset,
    eval_split,
    gather_histories,
    load_dataset,
    preprocess,
    train_batch,
)
from tdr_jax.data import datasets as datasets_mod
from tdr_jax.data.preprocess import split_sizes

# file order; u3 has 2 interactions and is dropped with min_user_interactions=3
ROWS = [
    ("u1", "i1", 10, "c1"),
    ("u2", "i2", 5, "c2"),
    ("u1", "i2", 5, "c2"),
    ("u3", "i9", 1, "c9"),
    ("u1", "i3", 10, None),  # ties with row 0: stays after it
    ("u2", "i1", 1, "c1"),
    ("u3", "i1", 2, "c1"),
    ("u2", "i4", 7, "c2"),
    ("u1", "i2", 20, "c2"),
    ("u4", "i4", 3, "c2"),
    ("u4", "i3", 1, None),
    ("u5", "i5", 4, "c3"),
    ("u5", "i1", 4, "c1"),  # ties with the row above: stays after it
    ("u6", "i2", 8, "c2"),
    ("u6", "i2", 9, "c2"),
    ("u6", "i5", 1, "c3"),
    ("u4", "i1", 9, "c1"),
    ("u5", "i4", 2, "c2"),
    ("u1", "i3", 30, None),
]


def table(rows=ROWS) -> pa.Table:
  u, i, t, c = zip(*rows)
  return pa.table(
      {
          "user": pa.array(u, pa.string()),
          "item": pa.array(i, pa.string()),
          "timestamp": pa.array(t, pa.int64()),
          "category": pa.array(c, pa.string()),
      }
  )


@pytest.fixture
def ds() -> Dataset:
  # 5 users kept; seed 0 permutation of 5 is [2, 4, 3, 0, 1]:
  # train = users 2, 4, 3; valid = user 0; test = user 1
  return preprocess(table(), min_user_interactions=3, split=(0.6, 0.2, 0.2), seed=0)


def test_filter_ids_and_order(ds):
  assert (ds.num_users, ds.num_items, ds.num_categories) == (5, 5, 4)
  assert ds.user_raw_ids.tolist() == ["u1", "u2", "u4", "u5", "u6"]
  assert ds.item_raw_ids.tolist() == ["i1", "i2", "i3", "i4", "i5"]  # i9 only had u3
  assert ds.category_names.tolist() == ["c1", "c2", "c3", "<unknown>"]
  np.testing.assert_array_equal(ds.item_category, [0, 1, 3, 1, 2])
  assert ds.item_category.dtype == np.int32
  np.testing.assert_array_equal(
      ds.seq_items, [1, 0, 2, 1, 2, 0, 1, 3, 2, 3, 0, 3, 4, 0, 4, 1, 1]
  )
  assert ds.seq_items.dtype == np.int32
  np.testing.assert_array_equal(ds.seq_offsets, [0, 5, 8, 11, 14, 17])
  assert ds.seq_offsets.dtype == np.int64
  np.testing.assert_array_equal(ds.user_split, [1, 2, 0, 0, 0])
  assert ds.user_split.dtype == np.int8
  assert ds.settings == {"min_user_interactions": 3, "split": [0.6, 0.2, 0.2], "seed": 0}
  s = ds.stats()
  assert (s["users"], s["items"], s["interactions"], s["samples"]) == (5, 5, 17, 6)
  assert s["density"] == pytest.approx(17 / 25)
  assert (s["train_users"], s["valid_users"], s["test_users"]) == (3, 1, 1)


def test_training_samples(ds):
  np.testing.assert_array_equal(ds.train_sample_pos, [9, 10, 12, 13, 15, 16])
  np.testing.assert_array_equal(ds.train_sample_start, [8, 8, 11, 11, 14, 14])
  hist, target = train_batch(ds, np.arange(6), history_len=3)
  np.testing.assert_array_equal(
      hist,
      [[-1, -1, 2], [-1, 2, 3], [-1, -1, 3], [-1, 3, 4], [-1, -1, 4], [-1, 4, 1]],
  )
  np.testing.assert_array_equal(target, [3, 0, 4, 0, 1, 1])
  assert hist.dtype == np.int32 and target.dtype == np.int32
  hist1, target1 = ds.train_batch(np.array([5, 0]), 1)
  np.testing.assert_array_equal(hist1, [[1], [2]])
  np.testing.assert_array_equal(target1, [1, 3])


def test_eval_halves(ds):
  v = eval_split(ds, "valid", history_len=3)  # user 0: [1, 0 | 2, 1, 2]
  np.testing.assert_array_equal(v.users, [0])
  np.testing.assert_array_equal(v.history, [[-1, 1, 0]])
  np.testing.assert_array_equal(v.full_history_offsets, [0, 2])
  np.testing.assert_array_equal(v.full_history_items, [1, 0])
  np.testing.assert_array_equal(v.label_offsets, [0, 2])
  np.testing.assert_array_equal(v.label_items, [1, 2])  # unique, sorted
  t = ds.eval_split("test", 1)  # user 1: [0 | 1, 3]
  np.testing.assert_array_equal(t.users, [1])
  np.testing.assert_array_equal(t.history, [[0]])
  np.testing.assert_array_equal(t.full_history_items, [0])
  np.testing.assert_array_equal(t.label_items, [1, 3])
  assert v.users.dtype == np.int32 and v.history.dtype == np.int32
  assert v.label_offsets.dtype == np.int64 and v.label_items.dtype == np.int32
  with pytest.raises(ValueError):
    eval_split(ds, "train", 3)


def test_eval_labels_unique_many_users():
  rng = np.random.default_rng(3)
  n = 3000
  rows = [(f"u{rng.integers(60)}", f"i{rng.integers(20)}", int(rng.integers(50)), None) for _ in range(n)]
  d = preprocess(table(rows), min_user_interactions=15, seed=5)
  for which in ("valid", "test"):
    e = d.eval_split(which, 7)
    assert e.history.shape == (len(e.users), 7)
    for k, u in enumerate(e.users):
      seq = d.user_sequence(u)
      h = len(seq) // 2
      np.testing.assert_array_equal(e.labels(k), np.unique(seq[h:]))
      np.testing.assert_array_equal(e.full_history(k), seq[:h])
      tail = seq[:h][-7:]
      np.testing.assert_array_equal(e.history[k], np.r_[np.full(7 - len(tail), -1), tail])


def test_time_order_matches_reference():
  rng = np.random.default_rng(0)
  rows = [(f"u{rng.integers(8)}", f"i{rng.integers(30)}", int(rng.integers(5)), None) for _ in range(400)]
  d = preprocess(table(rows), min_user_interactions=1, seed=1)
  for u, raw in enumerate(d.user_raw_ids):
    ref = [it for _, _, it in sorted((t, k, it) for k, (uu, it, t, _) in enumerate(rows) if uu == raw)]
    got = d.item_raw_ids[d.user_sequence(u)].tolist()
    assert got == ref


def test_split_sizes():
  assert split_sizes(139234, (0.8, 0.1, 0.1)) == (111388, 13923, 13923)
  assert split_sizes(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
  assert split_sizes(9, (0.8, 0.1, 0.1)) == (9, 0, 0)
  with pytest.raises(ValueError):
    split_sizes(10, (0.5, 0.1, 0.1))


def test_empty_after_filter():
  with pytest.raises(ValueError, match=r"min_user_interactions=100 removed every user: 6 users, 19 interactions"):
    preprocess(table(), min_user_interactions=100)
  with pytest.raises(ValueError, match="empty"):
    preprocess(table().slice(0, 0))


def test_no_category_column():
  t = table().drop_columns(["category"])
  d = preprocess(t, min_user_interactions=3)
  assert d.category_names.tolist() == ["<unknown>"]
  np.testing.assert_array_equal(d.item_category, np.zeros(5))


def _naive_histories(seq, starts, positions, L):
  out = np.full((len(positions), L), -1, np.int64)
  for b, (s, p) in enumerate(zip(starts, positions)):
    prev = seq[max(s, p - L) : p]
    if len(prev):
      out[b, L - len(prev) :] = prev
  return out


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    L=st.integers(1, 6),
    data=st.data(),
)
def test_gather_histories_property(lengths, L, data):
  offsets = np.r_[0, np.cumsum(lengths)]
  seq = np.arange(offsets[-1], dtype=np.int32) * 3 + 1
  users = [u for u, n in enumerate(lengths) if n > 0]
  if not users:
    return
  picks = data.draw(st.lists(st.sampled_from(users), min_size=1, max_size=10))
  positions = [int(offsets[u] + data.draw(st.integers(0, lengths[u] - 1))) for u in picks]
  starts = offsets[picks]
  got = gather_histories(seq, starts, positions, L)
  np.testing.assert_array_equal(got, _naive_histories(seq, starts, positions, L))
  assert got.dtype == np.int32


# ---------------------------------------------------------------------------
# cache


def _write_csv(path, rows=ROWS):
  lines = ["user,item,timestamp,category"] + [f"{u},{i},{t},{c or ''}" for u, i, t, c in rows]
  path.write_text("\n".join(lines) + "\n")


def test_cache_hit_and_miss(tmp_path, monkeypatch, caplog):
  from absl import logging as absl_logging

  _write_csv(tmp_path / "interactions.csv")
  # absl's verbosity is global: a test that parsed run.py's flags earlier may have left it
  # above INFO; the messages checked below are INFO.
  old = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  caplog.set_level(logging.INFO)
  try:
    _cache_hit_and_miss(tmp_path, monkeypatch, caplog)
  finally:
    absl_logging.set_verbosity(old)


def _cache_hit_and_miss(tmp_path, monkeypatch, caplog):
  first = load_dataset("csv", tmp_path, min_user_interactions=3, split=(0.6, 0.2, 0.2))
  ref = preprocess(table(), min_user_interactions=3, split=(0.6, 0.2, 0.2))
  assert first.equals(ref)
  cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
  assert len(cached) == 2 and cached[0].endswith(".json") and cached[1].endswith(".npz")

  calls = []
  real = datasets_mod.load_interactions

  def counting(*a, **k):
    calls.append(a)
    return real(*a, **k)

  monkeypatch.setattr(datasets_mod, "load_interactions", counting)
  caplog.clear()
  second = load_dataset("csv", tmp_path, min_user_interactions=3, split=(0.6, 0.2, 0.2))
  assert calls == [] and "loaded cached dataset" in caplog.text
  assert second.equals(first)
  assert second.settings == first.settings
  assert second.source["load_report"]["rows_out"] == 19
  for k in Dataset.ARRAY_FIELDS:
    assert getattr(second, k).dtype == getattr(first, k).dtype

  load_dataset("csv", tmp_path, min_user_interactions=3, split=(0.6, 0.2, 0.2), seed=1)
  assert len(calls) == 1  # changed setting: miss
  load_dataset("csv", tmp_path, min_user_interactions=3, split=(0.6, 0.2, 0.2), cache=False)
  assert len(calls) == 2
  _write_csv(tmp_path / "interactions.csv", ROWS + [("u1", "i5", 40, "c3")])
  changed = load_dataset("csv", tmp_path, min_user_interactions=3, split=(0.6, 0.2, 0.2))
  assert len(calls) == 3 and changed.num_interactions == 18  # raw file changed: miss
  assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_settings_routing(tmp_path):
  _write_csv(tmp_path / "interactions.csv")
  with pytest.raises(TypeError, match="unknown setting"):
    load_dataset("csv", tmp_path, cache=False, min_rating=3)
  with pytest.raises(KeyError):
    load_dataset("nope", tmp_path)


def test_synthetic_hook(tmp_path, monkeypatch):
  assert "synthetic" in DATASETS
  monkeypatch.setitem(sys.modules, "tdr_jax.data.synthetic", None)
  with pytest.raises(ModuleNotFoundError, match="tdr_jax/data/synthetic.py"):
    load_dataset("synthetic", tmp_path / "syn")

  seen = {}

  def prepare(data_dir, **options):
    seen.update(options)
    p = data_dir / "interactions.csv"
    if not p.exists():
      _write_csv(p)
    return None

  fake = types.ModuleType("tdr_jax.data.synthetic")
  fake.prepare = prepare
  monkeypatch.setitem(sys.modules, "tdr_jax.data.synthetic", fake)
  d = load_dataset("synthetic", tmp_path / "syn", num_users=7, min_user_interactions=3)
  assert seen == {"num_users": 7}
  assert d.num_users == 5 and d.source["prepare_options"] == {"num_users": 7}
  again = load_dataset("synthetic", tmp_path / "syn", num_users=7, min_user_interactions=3)
  assert again.equals(d)
