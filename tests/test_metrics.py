"""Precision/Recall/F-measure@K and the oracle ratio on hand-computed cases."""

import numpy as np
import pytest

from tdr_jax import metrics


def _csr(label_sets):
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in label_sets])])
  return offsets, np.concatenate([np.asarray(s, dtype=np.int64) for s in label_sets])


def test_hand_computed():
  # user 0: labels {1, 2, 3}; retrieved [1, 5, 2, 7] -> hits@2 = 1, hits@4 = 2
  # user 1: labels {4};       retrieved [0, 4, 4, -1] -> the repeated 4 counts once
  offsets, items = _csr([[3, 1, 2], [4]])
  retrieved = np.array([[1, 5, 2, 7], [0, 4, 4, -1]])
  m = metrics.per_user_metrics(retrieved, offsets, items, num_items=10, ks=(2, 4))
  np.testing.assert_allclose(m["precision@2"], [1 / 2, 1 / 2])
  np.testing.assert_allclose(m["recall@2"], [1 / 3, 1.0])
  np.testing.assert_allclose(m["f_measure@2"], [2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3),
                                                2 * 0.5 * 1.0 / 1.5])
  np.testing.assert_allclose(m["precision@4"], [2 / 4, 1 / 4])
  np.testing.assert_allclose(m["recall@4"], [2 / 3, 1.0])
  avg = metrics.retrieval_metrics(retrieved, offsets, items, num_items=10, ks=(2, 4))
  assert avg["precision@4"] == pytest.approx((0.5 + 0.25) / 2)


def test_no_hits_gives_zero_f_and_duplicate_labels_count_once():
  offsets, items = _csr([[1, 1, 2], [3]])
  retrieved = np.array([[5, 6], [7, 8]])
  m = metrics.per_user_metrics(retrieved, offsets, items, num_items=10, ks=(2,))
  np.testing.assert_array_equal(m["f_measure@2"], [0.0, 0.0])
  m = metrics.per_user_metrics(np.array([[1, 2], [3, 0]]), offsets, items, num_items=10, ks=(2,))
  # user 0 holds 3 label entries but 2 distinct items: recall is against the 2 distinct ones.
  assert m["precision@2"][0] == 1.0
  assert m["recall@2"][0] == 1.0


def test_errors():
  offsets, items = _csr([[1], []])
  with pytest.raises(ValueError, match="empty label set"):
    metrics.per_user_metrics(np.zeros((2, 3), int), offsets, items, num_items=5, ks=(2,))
  with pytest.raises(ValueError, match="K=4"):
    metrics.per_user_metrics(np.zeros((2, 3), int), *_csr([[1], [2]]), num_items=5, ks=(4,))


def test_oracle_ratio():
  eta = np.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
  retrieved = np.array([[1, 2], [3, 3]])
  r = metrics.oracle_ratio(retrieved, eta, ks=(1, 2))
  # user 0: K=1 -> 0.3/0.5, K=2 -> 0.4/0.8; user 1: K=1 -> 1, K=2 -> 0.25/0.5 (repeat once)
  assert r["oracle_ratio@1"] == pytest.approx((0.6 + 1.0) / 2)
  assert r["oracle_ratio@2"] == pytest.approx((0.5 + 0.5) / 2)
