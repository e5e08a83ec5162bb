"""Non-learned reference rankers: item popularity and a category-popularity heuristic.

Both count only the *training interactions a run's learned methods use*: the targets of the
run's training samples (`preprocess.training_samples`, the seeded subset when
`max_train_samples` is set). A learned method has to beat them to claim anything.

* `popularity`: the K items most frequent among those targets, the same list for every user
  (ties to the lower item id).
* `heuristic`: scores item i for a user with visible history h (the same last-L items the
  learned methods see, most recent last) by

      pop(i | cat(i)) * (sum_j w_j [cat(h_j) = cat(i)] + a * P(cat(i))) + b * sum_j w_j [h_j = i]

  with recency weights w_j = decay^(age of h_j), pop(i | c) the item's share of its published
  category's training targets and P(c) the category's share of all targets: "more of the
  categories you visited, their popular items first, and what you had before". Without
  categories (one category for all items) it is popularity plus repeats. The three numbers
  (decay, a, b) are picked from a small grid on the *validation* users (`tune_heuristic`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from tdr_jax import metrics as metrics_lib

__all__ = ["target_counts", "popularity", "HeuristicParams", "heuristic_scores", "heuristic",
           "tune_heuristic", "HEURISTIC_GRID"]


def target_counts(ds, samples: np.ndarray) -> np.ndarray:
  """int64[N]: how often each item is the target of the given training samples."""
  targets = np.asarray(ds.seq_items)[np.asarray(ds.train_sample_pos)[samples]]
  return np.bincount(targets, minlength=ds.num_items).astype(np.int64)


def popularity(counts: np.ndarray, num_users: int, topk: int) -> np.ndarray:
  """int32[num_users, topk]: the topk most counted items for every user (ties: lower id)."""
  order = np.lexsort((np.arange(len(counts)), -counts))[:topk]
  out = np.full((num_users, topk), -1, np.int32)
  out[:, :len(order)] = order
  return out


@dataclasses.dataclass(frozen=True)
class HeuristicParams:
  decay: float = 0.9  # recency weight per step back in the history
  category_prior: float = 0.1  # a: weight of the category's global share
  repeat: float = 0.0  # b: weight of an item's own (recency-weighted) history count


# (decay, a, b) candidates of `tune_heuristic`.
HEURISTIC_GRID = tuple(HeuristicParams(d, a, b) for d, a, b in itertools.product(
    (1.0, 0.9, 0.7), (0.03, 0.3, 3.0, 30.0), (0.0, 0.03, 0.3, 3.0)))


def heuristic_scores(history: np.ndarray, counts: np.ndarray, item_category: np.ndarray,
                     params: HeuristicParams) -> np.ndarray:
  """float64[U, N] heuristic scores (module docstring).

  Args:
    history: int[U, L] visible histories, -1 padded on the left, most recent last.
    counts: int[N] training-target counts.
    item_category: int[N] published categories.
    params: the three numbers.
  """
  history = np.asarray(history)
  u, length = history.shape
  cat = np.asarray(item_category, np.int64)
  num_cat = int(cat.max()) + 1 if len(cat) else 1
  cat_counts = np.bincount(cat, weights=counts, minlength=num_cat)
  pop_in_cat = counts / np.maximum(cat_counts[cat], 1.0)
  cat_share = cat_counts / max(cat_counts.sum(), 1.0)
  weight = params.decay ** np.arange(length - 1, -1, -1, dtype=np.float64)  # [L]
  valid = history >= 0
  rows = np.broadcast_to(np.arange(u)[:, None], history.shape)[valid]
  w = np.broadcast_to(weight, history.shape)[valid]
  items = history[valid]
  visits = np.zeros((u, num_cat))
  np.add.at(visits, (rows, cat[items]), w)
  scores = pop_in_cat[None, :] * (visits[:, cat] + params.category_prior * cat_share[cat][None])
  if params.repeat:
    repeats = np.zeros((u, len(cat)))
    np.add.at(repeats, (rows, items), w)
    scores += params.repeat * repeats
  return scores


def _top(scores: np.ndarray, topk: int) -> np.ndarray:
  """int32[U, topk]: best columns first, ties to the lower column."""
  part = np.argpartition(-scores, min(topk, scores.shape[1] - 1), axis=1)[:, :topk]
  vals = np.take_along_axis(scores, part, 1)
  order = np.lexsort((part, -vals), axis=1)
  return np.take_along_axis(part, order, 1).astype(np.int32)


def heuristic(history: np.ndarray, counts: np.ndarray, item_category: np.ndarray,
              params: HeuristicParams, topk: int, *, batch_users: int = 512) -> np.ndarray:
  """int32[U, topk]: the heuristic's top items for every user."""
  out = [_top(heuristic_scores(history[lo:lo + batch_users], counts, item_category, params),
              topk) for lo in range(0, len(history), batch_users)]
  return np.concatenate(out) if out else np.zeros((0, topk), np.int32)


def tune_heuristic(valid_set, counts: np.ndarray, item_category: np.ndarray, *, k: int,
                   num_items: int, grid: Sequence[HeuristicParams] = HEURISTIC_GRID,
                   max_users: int = 2000) -> tuple[HeuristicParams, dict]:
  """The grid point with the best F@k on (up to max_users of) the validation users.

  Returns (params, {"validation_f@k": value, "validation_users": n})."""
  n = min(len(valid_set.users), max_users)
  hist = np.asarray(valid_set.history)[:n]
  lab_off = np.asarray(valid_set.label_offsets)[:n + 1]
  lab = np.asarray(valid_set.label_items)[:lab_off[-1]]
  best, best_f = grid[0], -1.0
  for params in grid:
    got = heuristic(hist, counts, item_category, params, k)
    f = metrics_lib.retrieval_metrics(got, lab_off, lab, num_items=num_items,
                                      ks=(k,))[f"f_measure@{k}"]
    if f > best_f:
      best, best_f = params, f
  return best, {f"validation_f@{k}": float(best_f), "validation_users": int(n)}
