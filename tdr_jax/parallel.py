"""Data parallelism over a `jax.sharding.Mesh` with one axis, "data", on one or many processes.

Every method trains and evaluates the same way on 1 or N devices: parameters and the tree are
replicated, batches (of training samples or of test users) are split along their first axis,
and XLA inserts the all-reduce of the gradients. A batch size must be divisible by the number
of devices; evaluation pads the last user batch with -1 rows (a history of only padding).

Several processes (JAX's multi-controller runtime: one process per host, started with
`jax.distributed.initialize`, see experiments/cli.py) run the same program on one global mesh
of all their devices. The mesh puts each process's devices next to each other, so a process
holds one contiguous block of rows of every global batch (`process_rows`): it builds only
those rows and `global_batch` assembles the global array from every process's block. Results
the host reads (`to_host`, `map_user_batches`) are gathered to every process, so every process
computes the same metrics; only the writer (process 0, `is_writer`) writes files.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tdr_jax.errors import InputError


def process_index() -> int:
  """This process's index among the processes of the run (0 without jax.distributed)."""
  return jax.process_index()


def process_count() -> int:
  """The number of processes of the run (1 without jax.distributed)."""
  return jax.process_count()


def is_writer() -> bool:
  """Whether this process writes the run's files (results, figures, config, trees): process 0.
  Checkpoints are the exception: every process takes part in Orbax's saves and restores."""
  return process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process got here (a no-op with one process). `name` must be the same
  on every process and differ from the names of the other barriers met in between."""
  if process_count() > 1:
    multihost_utils.sync_global_devices(name)


def writer_first(fn: Callable[[], Any], name: str) -> Any:
  """`fn()` on the writer first, then (after a barrier) on the other processes: for work that
  fills a cache on a shared filesystem (data preprocessing), which the others then read."""
  if process_count() == 1:
    return fn()
  out = fn() if is_writer() else None
  barrier(name)
  return out if is_writer() else fn()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis ("data") mesh over `devices` (default: every device of every process, those of
  process 0 first, then process 1's, ...: each process's devices are contiguous)."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: d.process_index)  # stable: ids within
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """First axis split over the mesh's devices."""
  return NamedSharding(mesh, P("data"))


def replicate(tree, mesh: Mesh):
  """`tree` (any pytree, the same on every process) copied to every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def check_divisible(batch_size: int, mesh: Mesh, flag: str = "--batch_size") -> None:
  ndev = mesh.devices.size
  if batch_size % ndev:
    raise InputError(f"{flag}={batch_size} must be divisible by the {ndev} devices")


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows lo:hi of a global batch of `batch_size` rows that this process's devices hold
  when the batch is split over "data" (all rows with one process).

  Raises InputError when `batch_size` does not divide over the mesh's devices, ValueError when
  this process's devices are not contiguous on the mesh (a mesh not made by `make_mesh`).
  """
  check_divisible(batch_size, mesh)
  spans = sorted((s[0].start or 0, s[0].stop if s[0].stop is not None else batch_size)
                 for s in data_sharded(mesh).addressable_devices_indices_map(
                     (batch_size,)).values())
  lo, hi = spans[0][0], spans[-1][1]
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(f"process {process_index()}'s devices hold rows {spans} of the batch: not "
                     f"one block (build the mesh with parallel.make_mesh)")
  return slice(lo, hi)


def global_batch(local, mesh: Mesh, batch_size: int | None = None):
  """The global batch split over "data", from this process's rows.

  Args:
    local: pytree of host arrays [b, ...]: this process's rows `process_rows(mesh,
      batch_size)` of the global batch, or, with `batch_size` None, the whole batch (each
      process then keeps its own rows of it).
    mesh: the mesh.
    batch_size: B, rows of the global batch; None: `local` is the whole batch.
  Returns:
    The pytree of jax.Arrays [B, ...] sharded over "data" (identical for any process count).
  """
  sharding = data_sharded(mesh)
  if process_count() == 1:
    return jax.device_put(local, sharding)
  if batch_size is None:
    batch_size = len(jax.tree.leaves(local)[0])
    rows = process_rows(mesh, batch_size)
    local = jax.tree.map(lambda x: np.asarray(x)[rows], local)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (batch_size,) + np.shape(x)[1:]), local)


def to_host(tree):
  """`tree`'s arrays as host numpy arrays on every process: sharded arrays spread over
  several processes are gathered (an all-gather every process must call)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def same_on_all(x: np.ndarray) -> np.ndarray:
  """The writer's value of `x` on every process (e.g. a measured time a decision depends on,
  which differs between hosts); `x` itself with one process."""
  if process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def map_user_batches(fn: Callable, arrays: Sequence[np.ndarray], *, batch_size: int,
                     mesh: Mesh) -> np.ndarray:
  """`fn(*batch_arrays)` over fixed-size row batches of `arrays` (all with the same number of
  rows U), each sharded over the mesh's data axis; the last batch is padded with -1 rows, so
  one compilation serves all. Returns the results' rows [U, ...] concatenated on the host (on
  every process, with several: each process passes all of `arrays`, keeps its rows of every
  batch on its devices and gets the whole result back).
  `batch_size` is rounded down to a multiple of the device count (at least one per device).
  """
  n = len(arrays[0])
  ndev = mesh.devices.size
  batch_size = max(ndev, batch_size - batch_size % ndev)
  sharding = data_sharded(mesh)
  out = []
  for lo in range(0, n, batch_size):
    chunk = [np.asarray(a[lo:lo + batch_size]) for a in arrays]
    pad = batch_size - len(chunk[0])
    if pad:
      chunk = [np.concatenate([a, np.full((pad,) + a.shape[1:], -1, a.dtype)]) for a in chunk]
    result = fn(*[jax.device_put(a, sharding) for a in chunk])
    out.append(jax.tree.map(lambda r: r[:batch_size - pad], to_host(result)))
  if not out:
    return np.zeros((0,), np.int32)
  return jax.tree.map(lambda *rs: np.concatenate(rs), *out)
