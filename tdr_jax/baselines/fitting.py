"""The training run of a trained baseline (YouTubeDNN, DIN): its settings and `fit_params`.

`fit_params` runs `tdr_jax.training.fit` the way every tree method does: the run's training
samples (`data.batches.training_samples`: all, or the seeded subset of `max_train_samples`),
the shared batch stream (`batch_for_step`, salt `batches.STREAM`: a seeded permutation per
epoch, last batch padded and masked), Adam with the per-epoch exponential decay of
`train.make_optimizer`, randomness from `fold_in(base_key, step)` with the base key
`fold_in(key(seed), crc32(name))`, and Orbax checkpoints (`training.Checkpointer`) in
`<workdir>/checkpoints` that a rerun resumes from (or, when finished, just restores).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tdr_jax import train, training
from tdr_jax.data import batches as batches_lib
from tdr_jax.data.preprocess import corpus_fingerprint

__all__ = ["FitConfig", "fit_params"]


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Training-run settings of a baseline."""
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


def fit_params(name: str, loss_fn: Callable, params, fc: FitConfig, ds, *,
               workdir: str | None = None, identity: dict | None = None,
               verbose: bool = False, mesh: Mesh | None = None) -> tuple[Any, dict]:
  """Minimises `loss_fn(params, batch: Batch, key) -> scalar` over the training samples.

  Args:
    name: baseline name (seeds the random stream, names the run and its checkpoints).
    loss_fn: pure loss, jit-compatible; `batch.mask` (bool[B]) marks real rows.
    params: initial parameters (a pytree, e.g. an `nnx.State`).
    fc: run settings.
    ds: the `Dataset`.
    workdir: if set, checkpoints go to `<workdir>/checkpoints` and a rerun resumes there.
    identity: JSON-able settings that determine the trained model, hashed with the corpus
      and the run settings other than epochs and logging into the checkpoint's fingerprint
      (a mismatch on resume is an error; a rerun with more epochs continues the same run).
    verbose: show progress.
    mesh: device mesh of the data-parallel steps (default: all devices).
  Returns:
    (params, info) with info = {"steps", "steps_run", "resumed_from" (0 = not resumed),
    "seconds", "losses": float32[steps_run] losses of the steps run by this call}.
  """
  samples = batches_lib.training_samples(ds, max_train_samples=fc.max_train_samples,
                                         seed=fc.seed)
  if len(samples) == 0:
    raise ValueError("the dataset has no training samples")
  steps_per_epoch, total_steps = batches_lib.steps_for(len(samples), batch_size=fc.batch_size,
                                                       epochs=fc.epochs)
  optimizer = train.make_optimizer(learning_rate=fc.learning_rate, decay_steps=steps_per_epoch,
                                   decay_rate=fc.decay_rate)

  def batches(step: int) -> batches_lib.Batch:
    return batches_lib.batch_for_step(ds, samples, step, steps_per_epoch=steps_per_epoch,
                                      batch_size=fc.batch_size, history_len=fc.history_len,
                                      seed=fc.seed, levels=1)

  checkpointer = None
  if workdir:
    run = {"name": name, "identity": identity or {},
           "fit": {k: v for k, v in dataclasses.asdict(fc).items()
                   if k not in ("checkpoint_every", "log_every", "epochs")},
           "corpus": corpus_fingerprint(ds)}
    checkpointer = training.Checkpointer(
        os.path.join(workdir, "checkpoints"), identity={"fingerprint": training.fingerprint(run)},
        phrases={"fingerprint": f"another {name} run"}, record=run)
  base_key = jax.random.fold_in(jax.random.key(fc.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  out = training.fit(training.loss_step(lambda p, batch, aux, key: loss_fn(p, batch, key),
                                        optimizer),
                     training.init_state(params, optimizer), batches, total_steps=total_steps,
                     base_key=base_key, checkpointer=checkpointer, mesh=mesh,
                     checkpoint_every=fc.checkpoint_every, log_every=fc.log_every, name=name,
                     progress=verbose)
  info = {"steps": out.steps, "steps_run": out.steps_run,
          "resumed_from": int(out.resumed_from or 0), "seconds": out.seconds,
          "losses": np.asarray(out.metrics.get("loss", np.zeros(0)), np.float32)}
  return jax.tree.map(jnp.asarray, out.state.params), info
