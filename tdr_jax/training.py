"""The one training loop and the one checkpointer of every trained method.

`fit` runs jitted train steps over a seeded batch stream (`tdr_jax.data.batches`) on a device
mesh (state and step arguments replicated, batches split over "data"), checks the losses for
NaN/inf, shows progress, checkpoints with `Checkpointer` and resumes from the latest
checkpoint of its directory, so an interrupted run ends with the same state as an
uninterrupted one. A run may be cut into phases with a host-side hook between them (Deep
Retrieval's M-step between its E-steps); the tree methods call `fit` once per round of joint
learning and update the tree between the calls.

Several processes (multi-host data parallel, `jax.distributed`) run `fit` together on one global
mesh: each builds only its rows of every global batch (`batches` is called inside
`data.batches.only_rows`) and the global batch, the losses and the trained state are those of
one process on the same number of devices. Every process takes part in the checkpoints (Orbax
writes and restores them collectively; the workdir must be on a filesystem all processes see).

Step contract: `step_fn(state, batch, aux, base_key) -> (state, metrics)`, pure and jittable,
drawing its randomness from `fold_in(base_key, state.step)`; `state` has an int `step` field
(`TrainState`); `metrics` is a dict of scalars with a "loss" entry. `loss_step` builds such a
step from a loss function and an optax optimizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from tdr_jax import parallel
from tdr_jax.data import batches as batches_lib
from tdr_jax.data.batches import Batch
from tdr_jax.errors import InputError


class SimulatedCrash(RuntimeError):
  """Raised by `fit(crash_after=...)` to test resumption from checkpoints."""


class TrainState(NamedTuple):
  step: jax.Array  # int32[]: steps taken
  params: Any
  opt_state: Any


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def fingerprint(obj: Any) -> str:
  """Short hash of a JSON-able description (settings, corpus, tree): what a checkpoint
  records about the run that wrote it."""
  blob = json.dumps(obj, sort_keys=True, default=lambda x: np.asarray(x).tolist())
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def loss_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
              has_aux: bool = False) -> Callable:
  """The step `(state, batch, aux, base_key) -> (state, metrics)` of
  `loss_fn(params, batch, aux, key) -> loss` (or `(loss, dict of scalars)` with `has_aux`)."""

  def step(state: TrainState, batch: Batch, aux, base_key):
    key = jax.random.fold_in(base_key, state.step)
    out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(state.params, batch, aux, key)
    loss, extra = out if has_aux else (out, {})
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return (TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state),
            {"loss": loss, **extra})

  return step


def _restore_target(x) -> jax.ShapeDtypeStruct:
  """What a checkpointed leaf like `x` is restored as: with several processes, replicated over
  every device of every process (each process then holds the whole value, as with one)."""
  target = ocp.utils.to_shape_dtype_struct(x)
  if parallel.process_count() == 1:
    return target
  return jax.ShapeDtypeStruct(target.shape, target.dtype,
                              sharding=parallel.replicated(parallel.make_mesh()))


class Checkpointer:
  """Orbax checkpoints of named pytrees plus the identity of the run that wrote them.

  With several processes every process calls `save` and `restore` (Orbax's collective saves:
  the replicated values are written once) on a directory they all see.

  `identity` maps names to fingerprints (`fingerprint`); `restore` refuses a checkpoint whose
  recorded identity differs, naming what differs with `phrases[name]` (e.g. "another
  configuration"). `record` is extra JSON stored alongside (the settings, for people).
  """

  def __init__(self, directory: str, *, identity: dict[str, str],
               phrases: dict[str, str] | None = None, record: Any = None,
               max_to_keep: int = 2):
    self.dir = os.path.abspath(directory)
    self.identity = dict(identity)
    self.phrases = phrases or {}
    self.meta = dict(identity, record=record)
    self.manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, items: dict[str, Any], *, force: bool = False) -> None:
    args = {k: ocp.args.StandardSave(jax.device_get(v)) for k, v in items.items()}
    self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(self.meta), **args),
                      force=force)

  def check(self, step: int) -> None:
    """Raises InputError when checkpoint `step` was written by a run of another identity."""
    got = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    for key, want in self.identity.items():
      if got.get(key) != want:
        what = self.phrases.get(key, f"another {key}")
        raise InputError(f"checkpoint {self.dir} (step {step}) was written for {what} ({key} "
                         f"{got.get(key)} != {want}); use a new --workdir or the original "
                         f"settings")

  def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
    """The items of checkpoint `step`, shaped like the pytrees of `like` (after `check`)."""
    self.check(step)
    args = {k: ocp.args.StandardRestore(jax.tree.map(_restore_target, v))
            for k, v in like.items()}
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {k: restored[k] for k in like}

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class FitResult(NamedTuple):
  state: Any  # the final train state (on the host)
  carry: Any  # the final host-side carry of the phase hook
  steps: int  # total steps of the run
  steps_run: int  # steps taken by this call
  resumed_from: int | None  # step of the checkpoint this call resumed from
  seconds: float  # wall time of this call's steps (compilation included)
  metrics: dict[str, np.ndarray]  # per step of this call: name -> float32[steps_run]


class _Progress:
  """A tqdm bar on a terminal; plain lines every ~10% elsewhere (CI, redirected output)."""

  def __init__(self, name: str, total: int, start: int, every: int, enabled: bool):
    self.enabled = enabled
    self.bar = tqdm(total=total, initial=start, desc=name, unit="step", mininterval=2.0,
                    disable=None if enabled else True)
    self.plain = enabled and self.bar.disable
    self.total, self.every, self.batch_size = total, every, 0
    self.next_print, self.samples, self.t0 = start, 0, time.perf_counter()

  def update(self, done: int, steps: int, loss: float, last: bool) -> None:
    self.samples += steps * self.batch_size
    rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
    if not self.bar.disable:
      self.bar.update(done - self.bar.n)
      self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.0f}")
    elif self.plain and (done >= self.next_print or last):
      self.next_print = done + max(self.every, self.total // 10)
      print(f"step {done}/{self.total}  loss {loss:.4f}  {rate:.0f} samples/s", flush=True)

  def close(self) -> None:
    self.bar.close()


def phase_ends(phase_steps: int | Sequence[int], total_steps: int) -> list[int]:
  """The global steps at which the phases of `fit` end (the last one is `total_steps`)."""
  if isinstance(phase_steps, (int, np.integer)):
    if phase_steps < 1:
      raise ValueError(f"phase_steps must be >= 1, got {phase_steps}")
    return list(range(int(phase_steps), total_steps, int(phase_steps))) + [total_steps]
  lengths = [int(n) for n in phase_steps]
  if min(lengths, default=0) < 1 or sum(lengths) != total_steps:
    raise ValueError(f"phase lengths {lengths} must be >= 1 and sum to total_steps="
                     f"{total_steps}")
  return list(np.cumsum(lengths))


def fit(step_fn: Callable, state, batches: Callable[[int], Batch], *, total_steps: int,
        base_key: jax.Array, aux: Any = None, checkpointer: Checkpointer | None = None,
        mesh: Mesh | None = None, checkpoint_every: int = 500, log_every: int = 50,
        crash_after: int = 0, name: str = "train", progress: bool = False,
        phase_steps: int | Sequence[int] | None = None, between: Callable | None = None,
        carry: Any = None,
        make_aux: Callable | None = None) -> FitResult:
  """Trains `state` for `total_steps` steps of `step_fn` (see the module docstring).

  Args:
    step_fn: `(state, batch, aux, base_key) -> (state, metrics)`; jitted here.
    state: the initial train state (its `step` is the global step; a restored checkpoint
      replaces it).
    batches: `batches(step) -> Batch` (host arrays), the batch of global step `step`. It is
      called inside `data.batches.only_rows` (this process's rows of the global batch;
      `batch_for_step` honours it); a stream that ignores it returns the whole global batch,
      of which each process keeps its rows.
    total_steps: steps of the whole run (all phases).
    base_key: PRNG key of the run; the step folds in its step.
    aux: replicated step argument (e.g. the tree), or `make_aux(carry)` when that is given.
    checkpointer: where to save/resume; None = no checkpoints.
    mesh: device mesh (default: all devices); the batch size must divide over it.
    checkpoint_every, log_every: steps between checkpoints / host syncs of the losses.
    crash_after: > 0: raise SimulatedCrash right after that step (and its checkpoint, if one
      is due) unless it is the last step (testing resumption).
    name: label of the progress bar and of error messages.
    progress: show a progress bar (or plain progress lines without a terminal).
    phase_steps: with `between`: the run is cut into phases, of this many steps each (an int;
      the last phase may be shorter) or of the given lengths (a sequence summing to
      `total_steps`), and `between(phase, state, carry) -> (state, carry)` runs on the host
      after every phase but the last (phase = 0, 1, ...). `carry` (a pytree of host arrays)
      is checkpointed with the state; checkpoint numbers are global step + phases done.
  Returns:
    FitResult (`metrics` holds the per-step values of this call's steps, e.g. "loss").
  """
  with contextlib.ExitStack() as cleanup:  # on every exit (SimulatedCrash, errors too) wait
    if checkpointer is not None:              # for pending saves and close the manager
      cleanup.callback(checkpointer.close)
    mesh = mesh or parallel.make_mesh()
    ends = phase_ends(phase_steps, total_steps) if between is not None and phase_steps else []
    phased = bool(ends)
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if latest is not None:
      items = checkpointer.restore(latest, {"state": state, "carry": {
          "carry": carry, "phases": np.zeros((), np.int32)}})
      state, carry = items["state"], items["carry"]["carry"]
      phases_done = int(items["carry"]["phases"])
      resumed_from = int(state.step)
      if resumed_from > total_steps:
        raise InputError(f"checkpoint {checkpointer.dir} is at step {resumed_from}, beyond the "
                         f"{total_steps} steps of this run; use another workdir")
      logging.info("%s: resuming from checkpoint step %d of %d (%s)", name, resumed_from,
                   total_steps, checkpointer.dir)
      if progress:
        print(f"Resuming from checkpoint at step {resumed_from} of {total_steps}", flush=True)
    else:
      resumed_from, phases_done = None, 0
    start = int(state.step)
    jit_step = jax.jit(step_fn, donate_argnums=0)

    rows: dict[int, slice] = {}  # global batch size -> this process's rows

    def global_batch(step: int) -> Batch:
      """The batch of `step` split over "data", built from this process's rows."""
      asked = []  # the global batch size, when the stream built only this process's rows

      def select(batch_size: int) -> slice:
        asked.append(batch_size)
        if batch_size not in rows:
          rows[batch_size] = parallel.process_rows(mesh, batch_size)
        return rows[batch_size]

      with batches_lib.only_rows(select):
        local = batches(step)
      if not asked:  # a stream of whole batches: they must divide over the devices too
        parallel.check_divisible(len(local.mask), mesh)
      return parallel.global_batch(local, mesh, asked[-1] if asked else None)

    state = parallel.replicate(state, mesh)
    aux_dev = parallel.replicate(make_aux(carry) if make_aux else aux, mesh)

    def save(step: int, force: bool) -> None:
      if checkpointer is not None:
        checkpointer.save(step + phases_done, {"state": state, "carry": {
            "carry": carry, "phases": np.asarray(phases_done, np.int32)}}, force=force)

    bar = _Progress(name, total_steps, start, log_every, progress)
    cleanup.callback(bar.close)
    history: dict[str, list] = {}
    pending: list = []

    def flush(step: int) -> float:
      got = jax.device_get(pending)
      for i, m in enumerate(got):
        v = float(m["loss"])
        if not np.isfinite(v):
          raise FloatingPointError(f"{name}: non-finite training loss {v} at step "
                                   f"{step - len(got) + i + 1}; stopping (try a lower learning "
                                   f"rate)")
        for k, x in m.items():
          history.setdefault(k, []).append(np.asarray(x, np.float32))
      pending.clear()
      return float(got[-1]["loss"])

    t0 = time.perf_counter()
    for step in range(start, total_steps):
      if phased and phases_done < len(ends) - 1 and step >= ends[phases_done]:
        state, carry = between(phases_done, jax.device_get(state), carry)
        phases_done += 1
        state = parallel.replicate(state, mesh)
        if make_aux:
          aux_dev = parallel.replicate(make_aux(carry), mesh)
        save(step, force=True)
      batch = global_batch(step)
      if step == start:
        bar.batch_size = len(batch.mask)
      state, m = jit_step(state, batch, aux_dev, base_key)
      pending.append(m)
      done = step + 1
      last = done == total_steps
      if len(pending) >= log_every or last:
        steps = len(pending)
        bar.update(done, steps, flush(done), last)
      phase_end = phased and done in ends
      if done % checkpoint_every == 0 or last or phase_end:
        save(done, force=last or phase_end)
      if crash_after and done == crash_after and not last:
        raise SimulatedCrash(f"{name}: simulated crash after step {done}")
    state = jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    metrics = {k: np.stack(v) for k, v in history.items()}
    return FitResult(jax.device_get(state), carry, int(total_steps), int(total_steps - start),
                     resumed_from, float(seconds), metrics)
