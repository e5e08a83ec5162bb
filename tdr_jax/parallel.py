"""Data parallelism over a `jax.sharding.Mesh` with one axis, "data".

Every method trains and evaluates the same way on 1 or N devices: parameters and the tree are
replicated, batches (of training samples or of test users) are split along their first axis,
and XLA inserts the all-reduce of the gradients. A batch size must be divisible by the number
of devices; evaluation pads the last user batch with -1 rows (a history of only padding).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tdr_jax.errors import InputError


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis ("data") mesh over `devices` (default: all devices of this process)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """First axis split over the mesh's devices."""
  return NamedSharding(mesh, P("data"))


def replicate(tree, mesh: Mesh):
  """`tree` (any pytree) copied to every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def check_divisible(batch_size: int, mesh: Mesh, flag: str = "--batch_size") -> None:
  ndev = mesh.devices.size
  if batch_size % ndev:
    raise InputError(f"{flag}={batch_size} must be divisible by the {ndev} devices")


def map_user_batches(fn: Callable, arrays: Sequence[np.ndarray], *, batch_size: int,
                     mesh: Mesh) -> np.ndarray:
  """`fn(*batch_arrays)` over fixed-size row batches of `arrays` (all with the same number of
  rows U), each sharded over the mesh's data axis; the last batch is padded with -1 rows, so
  one compilation serves all. Returns the results' rows [U, ...] concatenated on the host.
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
    out.append(jax.tree.map(lambda r: np.asarray(r)[:batch_size - pad], result))
  if not out:
    return np.zeros((0,), np.int32)
  return jax.tree.map(lambda *rs: np.concatenate(rs), *out)
