"""Pieces shared by the trained baselines: fit settings, the training loop and exact top-K.

The loop follows `tdr_jax.experiment`: the same training samples (`training_samples`, seeded
subset when `max_train_samples` is set), the same batches (`batch_for_step`: a seeded
permutation per epoch, last batch padded and masked), Adam with the per-epoch exponential
decay of `train.make_optimizer`, one jitted step whose randomness is
`fold_in(base_key, state.step)` (so a resumed run continues the same random stream), and Orbax
checkpoints of the whole train state in `<workdir>/checkpoints` that a rerun resumes from.

`tdr_jax.experiment` is imported inside the functions only, so that the experiment driver can
import this package at module level without an import cycle.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdr_jax import train
from tdr_jax.errors import InputError
from tdr_jax.exact_topk import _lax_top_k, pad_rows, topk_rows  # noqa: F401


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Training-run settings of a baseline (duck-types the fields of `experiment.Config` that
  `experiment.training_samples`, `steps_per_round` and `batch_for_step` read)."""
  seed: int = 0
  epochs: float = 1.0
  batch_size: int = 256
  history_len: int = 69
  max_train_samples: int = 0
  learning_rate: float = 1e-3
  decay_rate: float = 0.9  # learning rate multiplied by this once per epoch
  checkpoint_every: int = 500
  log_every: int = 50

  def __post_init__(self):
    if self.batch_size < 1 or self.history_len < 1:
      raise ValueError(f"batch_size ({self.batch_size}) and history_len ({self.history_len}) "
                       "must be positive")
    if self.epochs <= 0:
      raise ValueError(f"epochs must be positive, got {self.epochs}")


def fingerprint(obj: Any) -> str:
  """Short hash of a JSON-able description (settings + corpus)."""
  blob = json.dumps(obj, sort_keys=True, default=lambda x: np.asarray(x).tolist())
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Checkpoints:
  """Orbax manager for one baseline's train state plus a JSON identity record."""

  def __init__(self, directory: str, meta: dict):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = os.path.abspath(directory)
    self.meta = meta
    self.manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False):
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(state)),
        meta=ocp.args.JsonSave(self.meta)), force=force)

  def restore(self, step: int, like):
    ocp = self._ocp
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("fingerprint") != self.meta["fingerprint"]:
      raise InputError(
          f"checkpoint {self.dir} (step {step}) was written by another {self.meta['name']} "
          f"run (fingerprint {meta.get('fingerprint')} != {self.meta['fingerprint']}); use a "
          "new workdir or the original settings")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def train_loop(name: str, loss_fn: Callable, params, fc: FitConfig, ds, *,
               workdir: str | None = None, identity: dict | None = None,
               verbose: bool = False) -> tuple[Any, dict]:
  """Minimises `loss_fn(params, batch: train.Batch, key) -> scalar` over the training samples.

  Args:
    name: baseline name (seeds the random stream, names the checkpoint).
    loss_fn: pure loss, jit-compatible; `batch.mask` marks real rows.
    params: initial parameters (a pytree, e.g. an `nnx.State`).
    fc: run settings.
    ds: the `Dataset`.
    workdir: if set, checkpoints go to `<workdir>/checkpoints` and a rerun resumes there.
    identity: JSON-able settings that determine the trained model (hashed together with the
      corpus and the run settings other than epochs and logging into the checkpoint's
      fingerprint; a mismatch on resume is an error). As in `experiment`, a rerun with more
      epochs continues the same run.
  Returns:
    (params, info) with info = {"steps", "steps_run", "resumed_from", "seconds",
    "losses": float32[steps_run] losses of the steps run by this call}.
  """
  from tdr_jax import experiment  # lazy: see the module docstring

  samples = experiment.training_samples(fc, ds)
  if len(samples) == 0:
    raise ValueError("the dataset has no training samples")
  steps_per_epoch, total_steps = experiment.steps_per_round(fc, len(samples))
  optimizer = train.make_optimizer(learning_rate=fc.learning_rate, decay_steps=steps_per_epoch,
                                   decay_rate=fc.decay_rate)
  state = train.init_state(params, optimizer)

  def step(state: train.TrainState, batch: train.Batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return train.TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                            opt_state), loss

  jit_step = jax.jit(step, donate_argnums=0)
  ckpt = None
  start = 0
  if workdir:
    meta = {"name": name, "fingerprint": fingerprint(
        {"name": name, "identity": identity or {},
         "fit": {k: v for k, v in dataclasses.asdict(fc).items()
                 if k not in ("checkpoint_every", "log_every", "epochs")},
         "corpus": experiment.corpus_fingerprint(ds)})}
    ckpt = _Checkpoints(os.path.join(workdir, "checkpoints"), meta)
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(latest, state)
      start = int(state.step)
      if verbose:
        print(f"{name}: resuming from checkpoint step {start} of {total_steps}")
  base_key = jax.random.fold_in(jax.random.key(fc.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)

  t0 = time.perf_counter()
  losses, pending = [], []

  def flush():
    vals = np.asarray(jax.device_get(pending), np.float32)
    bad = np.flatnonzero(~np.isfinite(vals))
    if len(bad):
      raise FloatingPointError(f"{name}: non-finite training loss {vals[bad[0]]} at step "
                               f"{start + len(losses) + int(bad[0])}; try a lower learning rate")
    losses.extend(vals.tolist())
    pending.clear()

  for s in range(start, total_steps):
    batch = experiment.batch_for_step(fc, ds, samples, s, steps_per_epoch, 1)
    state, loss = jit_step(state, batch, base_key)
    pending.append(loss)
    last = s + 1 == total_steps
    if len(pending) >= fc.log_every or last:
      flush()
      if verbose:
        print(f"{name}: step {s + 1}/{total_steps} loss {losses[-1]:.4f}", flush=True)
    if ckpt is not None and ((s + 1) % fc.checkpoint_every == 0 or last):
      ckpt.save(s + 1, state, force=last)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  if ckpt is not None:
    ckpt.close()
  info = {"steps": int(total_steps), "steps_run": int(total_steps - start),
          "resumed_from": int(start), "seconds": float(seconds),
          "losses": np.asarray(losses, np.float32)}
  return state.params, info
