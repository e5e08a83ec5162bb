"""Retrieval metrics: Precision/Recall/F-measure@K (TDR paper sec. 8.3) and the oracle ratio.

All functions are vectorized numpy over users. Retrieved lists are `int[U, K_max]` item ids,
best first, padded with -1 where a method returned fewer than K_max items. Label sets are CSR
(`label_offsets: int64[U+1]`, `label_items: int[T]`); duplicates inside a user's labels count
once. A retrieved item that appears twice in one row counts once (the second copy is a miss).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (20, 40, 60)


def _hit_matrix(retrieved: np.ndarray, label_offsets: np.ndarray, label_items: np.ndarray,
                num_items: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (bool[U, K_max] whether retrieved[u, r] is a label of u, counting a repeated
  retrieved item once; int64[U] number of distinct labels of each user)."""
  retrieved = np.asarray(retrieved, dtype=np.int64)
  num_users = retrieved.shape[0]
  label_offsets = np.asarray(label_offsets, dtype=np.int64)
  if label_offsets.shape != (num_users + 1,):
    raise ValueError(f"label_offsets has shape {label_offsets.shape}, expected ({num_users + 1},)")
  counts = np.diff(label_offsets)
  label_user = np.repeat(np.arange(num_users, dtype=np.int64), counts)
  # One sortable key per (user, item): user-major, so the keys of all users sort together.
  label_items = np.asarray(label_items, dtype=np.int64)
  if label_items.size and (label_items.min() < 0 or label_items.max() >= num_items):
    raise ValueError(f"label item ids must lie in [0, {num_items})")
  label_keys = np.unique(label_user * num_items + label_items)
  num_distinct = np.bincount(label_keys // num_items, minlength=num_users)
  valid = (retrieved >= 0) & (retrieved < num_items)
  keys = np.arange(num_users, dtype=np.int64)[:, None] * num_items + np.where(valid, retrieved, 0)
  pos = np.searchsorted(label_keys, keys)
  pos = np.minimum(pos, max(len(label_keys) - 1, 0))
  hit = valid & (label_keys[pos] == keys) if len(label_keys) else np.zeros_like(valid)
  return hit & ~repeated_in_row(keys), num_distinct


def repeated_in_row(x: np.ndarray) -> np.ndarray:
  """bool[U, K]: True where x[u, r] already appeared earlier in row u (first occurrence kept)."""
  order = np.argsort(x, axis=1, kind="stable")
  sorted_x = np.take_along_axis(x, order, axis=1)
  dup_sorted = np.zeros_like(sorted_x, dtype=bool)
  dup_sorted[:, 1:] = sorted_x[:, 1:] == sorted_x[:, :-1]
  dup = np.zeros_like(dup_sorted)
  np.put_along_axis(dup, order, dup_sorted, axis=1)
  return dup


def per_user_metrics(retrieved: np.ndarray, label_offsets: np.ndarray, label_items: np.ndarray,
                     *, num_items: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
  """Per-user precision@K, recall@K, f_measure@K for every K in `ks`.

  Args:
    retrieved: int[U, K_max] item ids, best first, -1 padded; K_max >= max(ks).
    label_offsets: int64[U+1] CSR offsets of the label sets.
    label_items: int[T] label item ids.
    num_items: corpus size N (item ids are 0..N-1).
    ks: cut-offs.
  Returns:
    {"precision@K": float64[U], "recall@K": ..., "f_measure@K": ...}.
  """
  retrieved = np.asarray(retrieved)
  if retrieved.ndim != 2:
    raise ValueError(f"retrieved must be [users, K], got shape {retrieved.shape}")
  if max(ks) > retrieved.shape[1]:
    raise ValueError(f"retrieved has {retrieved.shape[1]} columns but K={max(ks)} was asked")
  hits, num_labels = _hit_matrix(retrieved, label_offsets, label_items, num_items)
  if np.any(num_labels <= 0):
    raise ValueError(f"{int(np.sum(num_labels <= 0))} users have an empty label set")
  cum = np.cumsum(hits, axis=1)
  out = {}
  for k in ks:
    h = cum[:, k - 1].astype(np.float64)
    p = h / k
    r = h / num_labels
    denom = p + r
    f = np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1.0), 0.0)
    out[f"precision@{k}"] = p
    out[f"recall@{k}"] = r
    out[f"f_measure@{k}"] = f
  return out


def retrieval_metrics(retrieved, label_offsets, label_items, *, num_items: int,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Metrics of `per_user_metrics` averaged over users (paper sec. 8.3)."""
  per_user = per_user_metrics(retrieved, label_offsets, label_items, num_items=num_items, ks=ks)
  return {k: float(v.mean()) for k, v in per_user.items()}


def oracle_ratio(retrieved: np.ndarray, eta: np.ndarray, *, ks: Sequence[int] = DEFAULT_KS
                 ) -> dict[str, float]:
  """Summed true probability of the retrieved K items over that of the Bayes-optimal K items.

  Args:
    retrieved: int[U, K_max] item ids (-1 padded).
    eta: float[U, N] true conditional probabilities eta_y(u) of every corpus item.
  Returns:
    {"oracle_ratio@K": mean over users} for each K.
  """
  retrieved = np.asarray(retrieved)
  eta = np.asarray(eta, dtype=np.float64)
  valid = retrieved >= 0
  got = np.where(valid, np.take_along_axis(eta, np.where(valid, retrieved, 0), axis=1), 0.0)
  # Count a repeated item once, as the metrics do.
  first = np.zeros_like(valid)
  for r in range(retrieved.shape[1]):
    first[:, r] = valid[:, r] & ~np.any(retrieved[:, :r] == retrieved[:, r:r + 1], axis=1)
  got = np.where(first, got, 0.0)
  best = -np.sort(-eta, axis=1)
  out = {}
  for k in ks:
    num = got[:, :k].sum(1)
    den = best[:, :k].sum(1)
    out[f"oracle_ratio@{k}"] = float(np.mean(num / np.maximum(den, 1e-300)))
  return out
