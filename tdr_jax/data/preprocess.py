"""From an interaction table to the arrays the models train and evaluate on.

Protocol (TDR paper, sec. 8.1):

* implicit feedback: every row the loader kept is one interaction (repeats of
  the same user-item pair are kept as separate events);
* users with fewer than ``min_user_interactions`` interactions are dropped, in
  a single pass (items are not filtered, so no user drops below the
  threshold afterwards; items that only those users touched disappear);
* users, items and categories get dense ids ``0..n-1`` in order of first
  appearance in the (filtered) table, i.e. in file order, and their raw ids
  are kept; an item's category is the one on its first row; a null category
  becomes its own category named ``"<unknown>"`` (the last id);
* each user's sequence is ordered by timestamp, ties keeping file order;
* users are split by a seeded permutation (``numpy.random.default_rng(seed)``):
  ``floor(U*split[1])`` valid and ``floor(U*split[2])`` test users, the rest
  train (:func:`split_sizes`); valid and test users use the first half
  (``floor(n/2)`` items) of their sequence as history and the second half as
  labels.

Training samples (sliding window): every interaction of a training user that
has at least one earlier interaction is a target; its history is the up to
``history_len`` items that precede it in the same user's sequence.  A user's
first interaction is never a target because its history would be empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tdr_jax.data._read import to_numpy
from tdr_jax.errors import InputError

__all__ = [
    "Dataset",
    "EvalSet",
    "preprocess",
    "gather_histories",
    "train_batch",
    "eval_split",
    "split_sizes",
    "UNKNOWN_CATEGORY",
    "SPLIT_IDS",
]

UNKNOWN_CATEGORY = "<unknown>"
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


@dataclasses.dataclass
class EvalSet:
  """Validation or test users.

  ``history[i]``: the last L items of user i's first half, left-padded with
  -1 (most recent last).  ``full_history_*``: CSR of the whole first half in
  time order.  ``label_*``: CSR of the sorted unique items of the second
  half.
  """

  users: np.ndarray  # int32 [U_s]
  history: np.ndarray  # int32 [U_s, L]
  full_history_offsets: np.ndarray  # int64 [U_s+1]
  full_history_items: np.ndarray  # int32
  label_offsets: np.ndarray  # int64 [U_s+1]
  label_items: np.ndarray  # int32

  @property
  def num_users(self) -> int:
    return int(self.users.shape[0])

  def labels(self, i: int) -> np.ndarray:
    return self.label_items[self.label_offsets[i] : self.label_offsets[i + 1]]

  def full_history(self, i: int) -> np.ndarray:
    return self.full_history_items[self.full_history_offsets[i] : self.full_history_offsets[i + 1]]


@dataclasses.dataclass
class Dataset:
  """Preprocessed interactions (all arrays numpy).

  Sequences are stored CSR-style: user ``u``'s time-ordered items are
  ``seq_items[seq_offsets[u]:seq_offsets[u+1]]``.
  """

  num_users: int
  num_items: int
  num_categories: int
  item_category: np.ndarray  # int32 [N]
  item_raw_ids: np.ndarray  # str [N]
  user_raw_ids: np.ndarray  # str [U]
  category_names: np.ndarray  # str [C]
  seq_items: np.ndarray  # int32 [T]
  seq_offsets: np.ndarray  # int64 [U+1]
  user_split: np.ndarray  # int8 [U]
  train_sample_pos: np.ndarray  # int64 [S]
  train_sample_start: np.ndarray  # int64 [S]
  settings: dict = dataclasses.field(default_factory=dict)
  source: dict = dataclasses.field(default_factory=dict)

  ARRAY_FIELDS = (
      "item_category",
      "item_raw_ids",
      "user_raw_ids",
      "category_names",
      "seq_items",
      "seq_offsets",
      "user_split",
      "train_sample_pos",
      "train_sample_start",
  )

  @property
  def num_interactions(self) -> int:
    return int(self.seq_items.shape[0])

  @property
  def num_train_samples(self) -> int:
    return int(self.train_sample_pos.shape[0])

  @property
  def seq_lengths(self) -> np.ndarray:
    return np.diff(self.seq_offsets)

  def user_sequence(self, u: int) -> np.ndarray:
    return self.seq_items[self.seq_offsets[u] : self.seq_offsets[u + 1]]

  def split_users(self, which: str) -> np.ndarray:
    return np.flatnonzero(self.user_split == SPLIT_IDS[which]).astype(np.int32)

  def stats(self) -> dict:
    u, n, t = self.num_users, self.num_items, self.num_interactions
    return {
        "users": u,
        "items": n,
        "categories": self.num_categories,
        "interactions": t,
        "density": t / (u * n) if u and n else 0.0,
        "train_users": int((self.user_split == 0).sum()),
        "valid_users": int((self.user_split == 1).sum()),
        "test_users": int((self.user_split == 2).sum()),
        "samples": self.num_train_samples,
        "mean_seq_len": t / u if u else 0.0,
    }

  def train_batch(self, sample_idx, history_len: int):
    return train_batch(self, sample_idx, history_len)

  def eval_split(self, which: str, history_len: int) -> EvalSet:
    return eval_split(self, which, history_len)

  def arrays(self) -> dict:
    return {k: getattr(self, k) for k in self.ARRAY_FIELDS}

  def equals(self, other: "Dataset") -> bool:
    if (self.num_users, self.num_items, self.num_categories) != (
        other.num_users,
        other.num_items,
        other.num_categories,
    ):
      return False
    return all(
        getattr(self, k).dtype == getattr(other, k).dtype
        and np.array_equal(getattr(self, k), getattr(other, k))
        for k in self.ARRAY_FIELDS
    )


# ---------------------------------------------------------------------------
# batch helpers


def gather_histories(seq_items, starts, positions, history_len: int) -> np.ndarray:
  """For each target position, the up to ``history_len`` items just before
  it that belong to the same user (``starts`` = that user's offset).

  Returns int32 ``[B, history_len]``, left-padded with -1, most recent item
  in the last column.
  """
  seq_items = np.asarray(seq_items)
  starts = np.asarray(starts, np.int64).reshape(-1)
  positions = np.asarray(positions, np.int64).reshape(-1)
  L = int(history_len)
  if L <= 0:
    return np.zeros((positions.shape[0], 0), np.int32)
  idx = positions[:, None] + np.arange(-L, 0, dtype=np.int64)[None, :]
  valid = idx >= starts[:, None]
  if seq_items.shape[0] == 0:
    return np.full(idx.shape, -1, np.int32)
  vals = seq_items[np.clip(idx, 0, None)]
  return np.where(valid, vals, -1).astype(np.int32, copy=False)


def train_batch(ds: Dataset, sample_idx, history_len: int):
  """Histories and targets of training samples ``sample_idx``."""
  sample_idx = np.asarray(sample_idx, np.int64)
  pos = ds.train_sample_pos[sample_idx]
  start = ds.train_sample_start[sample_idx]
  hist = gather_histories(ds.seq_items, start, pos, history_len)
  return hist, ds.seq_items[pos].astype(np.int32, copy=False)


def _ragged_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised."""
  lengths = lengths.astype(np.int64)
  total = int(lengths.sum())
  if total == 0:
    return np.zeros(0, np.int64)
  out_start = np.cumsum(lengths) - lengths
  return np.repeat(starts.astype(np.int64) - out_start, lengths) + np.arange(total, dtype=np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
  out = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=out[1:])
  return out


def eval_split(ds: Dataset, which: str, history_len: int) -> EvalSet:
  """Histories (first halves) and label sets (unique items of the second
  halves) of the ``"valid"`` or ``"test"`` users."""
  if which not in ("valid", "test"):
    raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
  users = ds.split_users(which)
  starts = ds.seq_offsets[users]
  lengths = ds.seq_offsets[users + 1] - starts
  half = lengths // 2
  history = gather_histories(ds.seq_items, starts, starts + half, history_len)
  fh_items = ds.seq_items[_ragged_index(starts, half)].astype(np.int32, copy=False)
  n_lab = lengths - half
  lab_items = ds.seq_items[_ragged_index(starts + half, n_lab)].astype(np.int64)
  owner = np.repeat(np.arange(len(users), dtype=np.int64), n_lab)
  key = np.unique(owner * max(ds.num_items, 1) + lab_items)
  lab_owner = key // max(ds.num_items, 1)
  lab_unique = (key % max(ds.num_items, 1)).astype(np.int32)
  return EvalSet(
      users=users,
      history=history,
      full_history_offsets=_offsets(half),
      full_history_items=fh_items,
      label_offsets=_offsets(np.bincount(lab_owner, minlength=len(users))),
      label_items=lab_unique,
  )


# ---------------------------------------------------------------------------
# preprocessing


def split_sizes(num_users: int, split) -> tuple[int, int, int]:
  """(train, valid, test) user counts: valid = floor(U*split[1]),
  test = floor(U*split[2]), train = the rest."""
  fr = np.asarray(split, np.float64)
  if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
    raise ValueError(f"split must be 3 non-negative fractions summing to 1, got {split}")
  n_valid = int(np.floor(num_users * fr[1] + 1e-9))
  n_test = int(np.floor(num_users * fr[2] + 1e-9))
  return num_users - n_valid - n_test, n_valid, n_test


def _codes(arr) -> tuple[np.ndarray, pa.Array]:
  """Dense codes in order of first appearance, and the dictionary."""
  arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
  enc = pc.dictionary_encode(arr, null_encoding="mask")
  return to_numpy(pc.fill_null(enc.indices, -1)).astype(np.int64), enc.dictionary


def _first_rows(codes: np.ndarray) -> np.ndarray:
  """Row of the first appearance of each code, for codes numbered in order
  of first appearance (as produced by dictionary encoding)."""
  if len(codes) == 0:
    return np.zeros(0, np.int64)
  running = np.maximum.accumulate(codes)
  new = np.empty(len(codes), bool)
  new[0] = True
  new[1:] = running[1:] > running[:-1]
  return np.flatnonzero(new)


def _str_np(arr: pa.Array) -> np.ndarray:
  arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
  vals = arr.to_numpy(zero_copy_only=False)
  return vals.astype(str) if len(vals) else np.zeros(0, dtype="<U1")


def _time_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
  """Permutation sorting rows by (user, timestamp), ties in row order."""
  n = len(user)
  if n == 0:
    return np.zeros(0, np.int64)
  t_min = int(ts.min())
  t_range = int(ts.max()) - t_min + 1
  n_users = int(user.max()) + 1
  if n_users * t_range < (1 << 62):
    key = user.astype(np.int64) * t_range + (ts - t_min)
    return np.argsort(key, kind="stable")
  return np.lexsort((ts, user))


def preprocess(
    table: pa.Table,
    *,
    min_user_interactions: int = 15,
    split=(0.8, 0.1, 0.1),
    seed: int = 0,
) -> Dataset:
  """Turn an interaction table (user, item, timestamp[, category]) into a
  :class:`Dataset`; see the module docstring for the protocol."""
  t0 = time.perf_counter()
  min_n = int(min_user_interactions)
  split = tuple(float(x) for x in split)
  settings = {"min_user_interactions": min_n, "split": list(split), "seed": int(seed)}
  for c in ("user", "item", "timestamp"):
    if c not in table.column_names:
      raise ValueError(f"interaction table lacks column {c!r} (has {table.column_names})")
  n_rows = table.num_rows
  if n_rows == 0:
    raise InputError("no interactions to preprocess: the loaded table is empty")
  for c in ("user", "item", "timestamp"):
    if table[c].null_count:
      raise ValueError(f"interaction table has {table[c].null_count} null value(s) in {c!r}")

  # --- user filter (single pass)
  ucode, user_dict = _codes(table["user"])
  counts = np.bincount(ucode)
  keep_user = counts >= min_n
  n_users_before = len(counts)
  if not keep_user.any():
    raise InputError(
        f"no data left after filtering: min_user_interactions={min_n} removed every user: "
        f"{n_users_before} users, {n_rows} interactions, the most active user has "
        f"{int(counts.max())}"
    )
  row_keep = keep_user[ucode]
  if not row_keep.all():
    table = table.filter(pa.array(row_keep))
    # compacting the codes keeps the first-appearance order
    ucode = np.cumsum(keep_user)[ucode[row_keep]] - 1
    user_dict = user_dict.take(pa.array(np.flatnonzero(keep_user)))
  user_ids = ucode
  num_users = int(keep_user.sum())

  # --- items and categories
  icode, item_dict = _codes(table["item"])
  num_items = len(item_dict)
  first = _first_rows(icode)
  if "category" in table.column_names:
    cat_col = table["category"].combine_chunks().take(pa.array(first))
    if cat_col.type != pa.string():
      cat_col = pc.cast(cat_col, pa.string())
  else:
    cat_col = pa.nulls(num_items, pa.string())
  ccode, cat_dict = _codes(cat_col)
  names = _str_np(cat_dict)
  if (ccode < 0).any():
    ccode = np.where(ccode < 0, len(names), ccode)
    names = np.concatenate([names, np.array([UNKNOWN_CATEGORY])])
  item_category = ccode.astype(np.int32)

  # --- time order
  ts = to_numpy(table["timestamp"]).astype(np.int64)
  order = _time_order(user_ids, ts)
  seq_items = icode[order].astype(np.int32)
  seq_user = user_ids[order]
  seq_offsets = _offsets(np.bincount(user_ids, minlength=num_users))

  # --- user split
  n_train, n_valid, n_test = split_sizes(num_users, split)
  perm = np.random.default_rng(seed).permutation(num_users)
  user_split = np.empty(num_users, np.int8)
  user_split[perm[:n_train]] = 0
  user_split[perm[n_train : n_train + n_valid]] = 1
  user_split[perm[n_train + n_valid :]] = 2

  # --- training samples: positions with >= 1 earlier item of a train user
  pos = np.arange(len(seq_items), dtype=np.int64)
  sample_mask = (user_split[seq_user] == 0) & (pos != seq_offsets[seq_user])
  train_sample_pos = np.flatnonzero(sample_mask).astype(np.int64)
  train_sample_start = seq_offsets[seq_user[train_sample_pos]]

  ds = Dataset(
      num_users=num_users,
      num_items=num_items,
      num_categories=len(names),
      item_category=item_category,
      item_raw_ids=_str_np(item_dict),
      user_raw_ids=_str_np(user_dict),
      category_names=names.astype(str),
      seq_items=seq_items,
      seq_offsets=seq_offsets,
      user_split=user_split,
      train_sample_pos=train_sample_pos,
      train_sample_start=train_sample_start,
      settings=settings,
      source={
          "rows_in": int(n_rows),
          "users_before_filter": int(n_users_before),
          "rows_dropped_by_user_filter": int(n_rows - len(seq_items)),
      },
  )
  ds.source["preprocess_seconds"] = round(time.perf_counter() - t0, 3)
  return ds


def preprocess_settings(**settings: Any) -> dict:
  """Settings with defaults filled in (used for cache keys)."""
  sig = inspect.signature(preprocess)
  out = {
      k: p.default for k, p in sig.parameters.items() if p.kind == inspect.Parameter.KEYWORD_ONLY
  }
  unknown = set(settings) - set(out)
  if unknown:
    raise TypeError(f"unknown preprocessing setting(s) {sorted(unknown)}; accepted: {sorted(out)}")
  out.update(settings)
  out["split"] = [float(x) for x in out["split"]]
  out["min_user_interactions"] = int(out["min_user_interactions"])
  out["seed"] = int(out["seed"])
  return out


def training_samples(ds: Dataset, *, max_train_samples: int = 0, seed: int = 0) -> np.ndarray:
  """Indices of the training samples a run uses: all, or a seeded subset of the given size
  (sorted). Every trained method of a run calls this, so they all see the same samples."""
  n = len(ds.train_sample_pos)
  if max_train_samples and max_train_samples < n:
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(n, max_train_samples, replace=False))
  return np.arange(n)


def corpus_fingerprint(ds: Dataset) -> str:
  """Short hash of the corpus (sizes, sequences, split): checkpoints record it and refuse to
  resume on another corpus."""
  h = hashlib.sha256()
  h.update(np.asarray([ds.num_users, ds.num_items], np.int64).tobytes())
  h.update(np.ascontiguousarray(ds.seq_items).tobytes())
  h.update(np.ascontiguousarray(ds.user_split).tobytes())
  return h.hexdigest()[:16]
