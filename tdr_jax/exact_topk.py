"""Exact top-K over host score matrices, in fixed-size padded device calls (one compilation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k",))
def _lax_top_k(scores, k: int):
  return jax.lax.top_k(scores, k)


def topk_rows(scores: np.ndarray, k: int, *, column_order: np.ndarray | None = None,
              rows_per_call: int = 256) -> np.ndarray:
  """Exact top-k columns of every row of a host score matrix, best first.

  Ties are broken by `column_order` (a permutation of the columns: earlier = preferred) or,
  without it, by the lower column index (`lax.top_k`'s rule). Columns scored -inf are never
  returned (-1 instead). Rows are processed in fixed-size, padded groups (one compilation).

  Args:
    scores: float[R, C].
    k: number of columns per row; if k > C the rest of the row is -1.
    column_order: optional int[C] permutation used for tie-breaking.
    rows_per_call: rows per device call.
  Returns:
    int32[R, k].
  """
  scores = np.asarray(scores, np.float32)
  r, c = scores.shape
  kk = min(k, c)
  out = np.full((r, k), -1, np.int32)
  if r == 0 or kk == 0:
    return out
  if column_order is not None:
    column_order = np.asarray(column_order, np.int64)
    scores = scores[:, column_order]
  rows_per_call = max(1, rows_per_call)
  for lo in range(0, r, rows_per_call):
    part = scores[lo:lo + rows_per_call]
    pad = rows_per_call - len(part)
    if pad:
      part = np.concatenate([part, np.full((pad, c), -np.inf, np.float32)])
    vals, idx = jax.device_get(_lax_top_k(jnp.asarray(part), kk))
    vals, idx = vals[:len(vals) - pad], idx[:len(idx) - pad]
    if column_order is not None:
      idx = column_order[idx]
    out[lo:lo + len(idx), :kk] = np.where(np.isfinite(vals), idx, -1)
  return out


def pad_rows(x: np.ndarray, rows: int, fill) -> np.ndarray:
  """`x` padded with `fill` rows up to `rows` rows."""
  if len(x) >= rows:
    return x
  return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], fill, x.dtype)])
