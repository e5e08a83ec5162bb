"""Reference rows: popularity, the heuristic, the near-popularity warning, fair Item-CF counts."""

import dataclasses

import numpy as np
import pytest

from tdr_jax import experiment
from tdr_jax import report
from tdr_jax.baselines import itemcf
from tdr_jax.baselines import popularity as pop_lib


@dataclasses.dataclass
class _DS:
  """The fields of a Dataset that the reference rankers read."""
  seq_items: np.ndarray
  train_sample_pos: np.ndarray
  num_items: int


def test_target_counts_and_popularity_by_hand():
  # Sequence positions 0..7; samples are positions 1, 2, 3, 5, 6, 7 (targets 1, 2, 1, 0, 2, 2).
  ds = _DS(seq_items=np.array([0, 1, 2, 1, 3, 0, 2, 2]),
           train_sample_pos=np.array([1, 2, 3, 5, 6, 7]), num_items=5)
  np.testing.assert_array_equal(pop_lib.target_counts(ds, np.arange(6)), [1, 2, 3, 0, 0])
  # Only the subset a run trains on is counted: samples 0 and 5 -> targets 1 and 2.
  np.testing.assert_array_equal(pop_lib.target_counts(ds, np.array([0, 5])), [0, 1, 1, 0, 0])
  got = pop_lib.popularity(np.array([1, 2, 3, 0, 2]), num_users=2, topk=4)
  # Ties (items 1 and 4 with count 2) go to the lower id.
  np.testing.assert_array_equal(got, [[2, 1, 4, 0], [2, 1, 4, 0]])


def test_heuristic_scores_by_hand():
  counts = np.array([6, 2, 4, 8], float)  # categories: {0, 1} -> cat 0, {2, 3} -> cat 1
  cat = np.array([0, 0, 1, 1])
  history = np.array([[-1, 0, 2, 3]])  # oldest first; item 3 most recent
  params = pop_lib.HeuristicParams(decay=0.5, category_prior=1.0, repeat=2.0)
  got = pop_lib.heuristic_scores(history, counts, cat, params)[0]
  # Weights by age: item 0 -> 0.25, item 2 -> 0.5, item 3 -> 1. Category visits: cat 0 0.25,
  # cat 1 1.5. Shares: cat 0 8/20, cat 1 12/20. pop_in_cat: 6/8, 2/8, 4/12, 8/12.
  want = np.array([
      6 / 8 * (0.25 + 8 / 20) + 2 * 0.25,
      2 / 8 * (0.25 + 8 / 20),
      4 / 12 * (1.5 + 12 / 20) + 2 * 0.5,
      8 / 12 * (1.5 + 12 / 20) + 2 * 1.0])
  np.testing.assert_allclose(got, want)
  top = pop_lib.heuristic(history, counts, cat, params, topk=3)
  np.testing.assert_array_equal(top[0], np.argsort(-want)[:3])


def test_flag_near_popularity():
  rows = [{"method": "A", "f_measure@20": 0.104}, {"method": "B", "f_measure@20": 0.2},
          {"method": "C", "f_measure@20": 0.05}, {"method": "popularity", "f_measure@20": 0.1},
          {"method": "oracle", "f_measure@20": 0.3}, {"method": "random", "f_measure@20": 0.0}]
  msgs = report.flag_near_popularity(rows, 20)
  assert [r["method"] for r in rows if r.get("warning")] == ["A", "C"]
  assert len(msgs) == 2 and "learned little beyond item popularity" in msgs[0]
  assert report.flag_near_popularity([{"method": "A", "f_measure@20": 0.1}], 20) == []


def test_itemcf_counts_only_the_runs_training_interactions():
  """With `samples`, the user-item matrix holds exactly their targets."""
  from tdr_jax.data.preprocess import preprocess
  import pyarrow as pa
  rng = np.random.default_rng(0)
  n = 40 * 20
  table = pa.table({"user": np.repeat(np.arange(40), 20).astype(str),
                    "item": rng.integers(0, 30, n).astype(str),
                    "timestamp": np.tile(np.arange(20), 40)})
  ds = preprocess(table, min_user_interactions=15, seed=0)
  samples = np.sort(rng.choice(len(ds.train_sample_pos), 100, replace=False))
  x = itemcf.user_item_matrix(ds, samples=samples)
  pos = ds.train_sample_pos[samples]
  owner = np.searchsorted(ds.seq_offsets, pos, side="right") - 1
  want = set(zip(owner.tolist(), ds.seq_items[pos].tolist()))
  rows, cols = x.nonzero()
  assert set(zip(rows.tolist(), cols.tolist())) == want
  assert itemcf.user_item_matrix(ds).nnz > x.nnz  # whole sequences hold more


@pytest.mark.parametrize("name", ["pop", "heuristic"])
def test_reference_methods_are_method_names(name):
  assert name in experiment.parse_methods(name)
