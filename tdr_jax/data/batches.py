"""The training batch stream every trained method reads: seeded, resumable, plain arguments.

A run picks its training samples once (`training_samples`: all, or a seeded subset); an epoch
is a seeded permutation of them; the batch of global step `s` is a pure function of
`(seed, stream, s)`, so a resumed run reads exactly the batches an uninterrupted one reads and
a run that continues over several rounds or phases keeps walking the same stream. The last
batch of an epoch is padded to full size with masked rows (static shapes under jit).

    samples = training_samples(ds, max_train_samples=0, seed=0)
    steps_per_epoch, total = steps_for(len(samples), batch_size=256, epochs=1.0)
    batch = batch_for_step(ds, samples, step, steps_per_epoch=steps_per_epoch,
                           batch_size=256, history_len=69, levels=H, seed=0)

With several processes (multi-host data parallel) each process builds only its rows of every
global batch: inside `with only_rows(select):` (`training.fit` enters it), `step_indices` and
`batch_for_step` return the rows `select(B)` of the global batch of B rows, which is the same
whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, NamedTuple

import numpy as np

from tdr_jax.data.preprocess import Dataset, train_batch, training_samples

__all__ = ["Batch", "STREAM", "batch_for_step", "only_rows", "step_indices", "steps_for",
           "training_samples", "window_labels"]

# Salt of the per-epoch permutation `default_rng([seed, stream, epoch])`. The tree methods and
# the baselines share STREAM; the SASRec estimator has its own (its numbers predate sharing).
STREAM = 11

# `only_rows`'s row selector: global batch size B -> the slice of rows this process builds.
_ROWS: contextvars.ContextVar[Callable[[int], slice] | None] = contextvars.ContextVar(
    "tdr_jax_batch_rows", default=None)


@contextlib.contextmanager
def only_rows(select: Callable[[int], slice]) -> Iterator[None]:
  """Within the block, `step_indices` and `batch_for_step` return only the rows `select(B)` of
  each global batch of B rows (`parallel.process_rows`: this process's share)."""
  token = _ROWS.set(select)
  try:
    yield
  finally:
    _ROWS.reset(token)


def rows_of(batch_size: int) -> slice:
  """The rows of a global batch of `batch_size` rows built here (all, outside `only_rows`)."""
  select = _ROWS.get()
  return slice(0, batch_size) if select is None else select(batch_size)


class Batch(NamedTuple):
  """A training batch (all arrays share the leading batch axis B).

  history: int32[B, L] left-padded with -1; target: int32[B] item ids; weight: float32[B, H]
  label weight per tree level 1..H (ones for plain labels; H = 1 for the flat models);
  mask: bool[B] False for padding rows; labels: int32[B, W] or None: the distinct items of the
  sample's next W interactions (`window_labels`; column 0 = target, -1 padding), for
  multi-label training (OTM); None = the single label `target`.
  """
  history: np.ndarray
  target: np.ndarray
  weight: np.ndarray
  mask: np.ndarray
  labels: np.ndarray | None = None


def window_labels(ds: Dataset, sample_idx: np.ndarray, window: int) -> np.ndarray:
  """Multi-label targets: the distinct items of each sample's next `window` interactions.

  Sample s (history = the user's items before position p) gets the items at positions
  p .. p+window-1 of the same user (fewer at the end of the user's sequence), first
  occurrences in time order, so column 0 is the sample's target.

  Args:
    ds: the dataset.
    sample_idx: int[B] training-sample indices.
    window: W >= 1.
  Returns:
    int32[B, W] item ids, -1 padding.
  """
  if window < 1:
    raise ValueError(f"window must be at least 1, got {window}")
  sample_idx = np.asarray(sample_idx, np.int64)
  pos = ds.train_sample_pos[sample_idx]
  user = np.searchsorted(ds.seq_offsets, ds.train_sample_start[sample_idx], side="right") - 1
  end = ds.seq_offsets[user + 1]  # one past the user's last interaction
  at = pos[:, None] + np.arange(window)[None, :]  # [B, W]
  items = np.where(at < end[:, None], ds.seq_items[np.minimum(at, len(ds.seq_items) - 1)], -1)
  # Drop repeats of an earlier column, then move the kept items to the front.
  repeat = np.any((items[:, :, None] == items[:, None, :])
                  & np.tri(window, k=-1, dtype=bool)[None], axis=2)
  items = np.where(repeat, -1, items)
  order = np.argsort(items < 0, axis=1, kind="stable")
  return np.take_along_axis(items, order, axis=1).astype(np.int32)


def steps_for(num_samples: int, *, batch_size: int, epochs: float) -> tuple[int, int]:
  """(steps per epoch, training steps of `epochs` epochs, at least 1)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  steps_per_epoch = math.ceil(num_samples / batch_size)
  return steps_per_epoch, max(1, int(round(epochs * steps_per_epoch)))


def step_indices(num_samples: int, step: int, *, steps_per_epoch: int, batch_size: int,
                 seed: int, stream: int = STREAM) -> tuple[np.ndarray, np.ndarray]:
  """Which of the run's samples the batch of global step `step` holds (`batch_for_step`).

  Returns:
    idx: int[b] positions in the run's `samples` array (0 on padding rows).
    mask: bool[b] False for the padding rows of an epoch's last batch.
    b = B = batch_size, or inside `only_rows` the selected rows of the B.
  """
  epoch, i = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([seed, stream, epoch]).permutation(num_samples)
  idx = perm[i * batch_size:(i + 1) * batch_size]
  mask = np.ones(batch_size, bool)
  if len(idx) < batch_size:
    mask[len(idx):] = False
    idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
  rows = rows_of(batch_size)
  return idx[rows], mask[rows]


def batch_for_step(ds: Dataset, samples: np.ndarray, step: int, *, steps_per_epoch: int,
                   batch_size: int, history_len: int, seed: int, levels: int = 1,
                   stream: int = STREAM, label_window: int | None = None) -> Batch:
  """The batch of global step `step`.

  Args:
    ds: the dataset.
    samples: int[S] training-sample indices (`training_samples`).
    step: global step; epoch = step // steps_per_epoch.
    steps_per_epoch: ceil(S / batch_size).
    batch_size: B.
    history_len: L.
    seed: the run's seed.
    levels: H, columns of the label-weight array.
    stream: salt of the permutation (see STREAM).
    label_window: W: also return the labels of the next W interactions (`window_labels`);
      None: labels None. The rest of the batch does not depend on it.
  Returns:
    Batch with history int32[b, L], target int32[b], weight float32[b, H] (ones), mask bool[b],
    labels int32[b, W] or None; b = B, or inside `only_rows` the selected rows of the B.
  """
  idx, mask = step_indices(len(samples), step, steps_per_epoch=steps_per_epoch,
                           batch_size=batch_size, seed=seed, stream=stream)
  hist, target = train_batch(ds, samples[idx], history_len)
  weight = np.ones((len(idx), levels), np.float32)
  labels = None if label_window is None else window_labels(ds, samples[idx], label_window)
  return Batch(hist.astype(np.int32), target.astype(np.int32), weight, mask, labels)
