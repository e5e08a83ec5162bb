"""A retrieval function serialized with `jax.export`, and the artifact folder around it.

`export_search(search, args, history_len=L)` exports `history int32[b, L] -> (items int32[b, k],
scores float32[b, k])` with a symbolic batch dimension `b` (one artifact for every batch size);
`args` (the tree arrays and scorer parameters, any pytree) become the exported function's
trailing *arguments* (flattened, in `jax.tree.leaves` order), not constants baked into the
module:

* the serialized module stays ~23 KB whatever the catalogue; baked in as constants, the same
  2^17-leaf default-preset model made a 38.9 MB module whose load + compile took 1.9 s instead
  of 1.2 s, for no measurable latency gain (beam 150, batch 1: p50 8.6 vs 7.9 ms, under load;
  BUILD_NOTES "Exported artifact");
* the arrays are stored once, as a plain `.npz` (inspectable, checksummed), and put on the
  device once by the loader; a call passes device buffers, so passing them costs nothing per
  request, and new arrays of the same shapes (a retrained model on the same tree shape) need no
  new export;
* the pytree structure (nnx.State, the Tree dataclass) is closed over at export time, so the
  serialized signature is a flat tuple of arrays, and the loader needs neither flax nor tdr_jax.

Platforms: lowering for `("cpu", "cuda")` works without a GPU on jax 0.10 (no custom calls in
the search); if it fails, `export_search` falls back to `("cpu",)` and says why.

`write_artifact` writes the folder that `tdr_jax.export_loader` (copied into it as
`retriever_loader.py`) reads: search.jaxexport, params.npz, item_vocab.json, manifest.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdr_jax import export_loader

__all__ = ["FORMAT", "PLATFORMS", "export_search", "write_artifact", "file_digest"]

PLATFORMS = ("cpu", "cuda")
# The artifact's format, file names and digest are the loader's (it runs without tdr_jax).
FORMAT, FUNCTION_FILE = export_loader.FORMAT, export_loader.FUNCTION_FILE
ARRAYS_FILE, VOCAB_FILE = export_loader.ARRAYS_FILE, export_loader.VOCAB_FILE
MANIFEST_FILE = export_loader.MANIFEST_FILE
file_digest = export_loader.file_digest
LOADER_FILE = "retriever_loader.py"
_LOADER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_loader.py")


def export_search(search: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]], args: Any,
                  *, history_len: int, platforms: Sequence[str] = PLATFORMS):
  """Exports `search(args, history) -> (items, scores)` batch-polymorphically.

  Returns (exported: jax.export.Exported, arrays: list of numpy arrays to pass after the
  history, platforms: the tuple lowered for, note: why platforms were reduced, or "")."""
  leaves, treedef = jax.tree.flatten(args)
  arrays = [np.asarray(x) for x in leaves]

  def fn(history, *flat):
    return search(jax.tree.unflatten(treedef, flat), history)

  history = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {int(history_len)}"), jnp.int32)
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  tried, note = tuple(platforms), ""
  while True:
    try:
      exported = jax.export.export(jax.jit(fn), platforms=tried)(history, *specs)
      return exported, arrays, tried, note
    except Exception as e:  # lowering for an extra platform failed: keep cpu alone
      if tried == ("cpu",):
        raise
      note = (f"lowering for {','.join(tried)} failed ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); exported for cpu only")
      tried = ("cpu",)


def write_artifact(out: str, exported, arrays: Sequence[np.ndarray], item_raw_ids: Sequence[str],
                   *, k: int, history_len: int, platforms: Sequence[str], note: str = "",
                   info: dict | None = None) -> dict:
  """Writes the artifact folder `out` (created; files replaced) and returns its manifest.

  info: extra manifest entries (method, beam, fingerprints, ...)."""
  os.makedirs(out, exist_ok=True)
  files = {
      FUNCTION_FILE: lambda p: open(p, "wb").write(exported.serialize()),
      ARRAYS_FILE: lambda p: np.savez(p, **{f"a{i:03d}": a for i, a in enumerate(arrays)}),
      VOCAB_FILE: lambda p: open(p, "w").write(json.dumps(
          {"item_raw_ids": [str(x) for x in item_raw_ids]})),
      LOADER_FILE: lambda p: shutil.copyfile(_LOADER_SOURCE, p),
  }
  record = {}
  for name, write in files.items():
    path = os.path.join(out, name)
    tmp = path + ".tmp"
    if name == ARRAYS_FILE:
      tmp += ".npz"  # np.savez appends .npz to other names
    write(tmp)
    os.replace(tmp, path)
    record[name] = {"bytes": os.path.getsize(path), "sha256": file_digest(path)}
  manifest = {
      "format": FORMAT,
      **(info or {}),
      "k": int(k), "history_len": int(history_len), "num_items": len(item_raw_ids),
      "platforms": list(platforms), "platforms_note": note,
      "inputs": {"history": f"int32[b, {int(history_len)}] internal item ids, oldest first, "
                            f"left-padded with -1",
                 "arrays": f"{len(arrays)} arrays of {ARRAYS_FILE} (a000, a001, ...) in order"},
      "outputs": {"items": f"int32[b, {int(k)}] internal item ids, best first, -1 = none",
                  "scores": f"float32[b, {int(k)}]"},
      "array_shapes": [[list(a.shape), str(a.dtype)] for a in arrays],
      "array_bytes": int(sum(a.nbytes for a in arrays)),
      "files": record,
      "jax_version": jax.__version__,
      "calling_convention_version": int(exported.calling_convention_version),
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  path = os.path.join(out, MANIFEST_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(path + ".tmp", path)
  return manifest
