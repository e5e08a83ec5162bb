"""Runs a retriever exported by `experiments/export.py`, with jax and numpy only.

This file is copied into every artifact folder as `retriever_loader.py`, so an artifact runs
where tdr_jax is not installed (it imports nothing of tdr_jax, flax or orbax):

    import sys; sys.path.insert(0, "retriever")
    from retriever_loader import ExportedRetriever
    r = ExportedRetriever.load("retriever")
    items, scores = r.retrieve([["i12", "i7", "i33"], ["i5"]])   # raw ids in, raw ids out
    r.last_stats                                                 # unknown ids dropped, ...

    python retriever/retriever_loader.py --history=i12,i7,i33 [--k=10]
    python retriever/retriever_loader.py --input=histories.csv --output=topk.csv

The folder holds search.jaxexport (the serialized `jax.export` function: beam search + scorer,
batch dimension symbolic), params.npz (its tree arrays and parameters, passed as arguments),
item_vocab.json (internal id -> raw item id) and manifest.json (k, beam, history length,
platforms, fingerprints, file sizes and sha256). Histories are the raw item ids of the training
data, oldest first; unknown ids are dropped and counted (never mapped to another item), longer
histories keep their most recent items. Users go in chunks of `max_batch`, each padded to the
next power of two, so `jax.jit(exported.call)` compiles once per bucket.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys

import jax
import numpy as np

FORMAT = "tdr_jax.export/1"
FUNCTION_FILE = "search.jaxexport"
ARRAYS_FILE = "params.npz"
VOCAB_FILE = "item_vocab.json"
MANIFEST_FILE = "manifest.json"


def file_digest(path: str) -> str:
  """sha256 hex digest of a file (read in 1 MiB blocks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _platform() -> str:
  """The export platform of jax's default backend: cpu, cuda, rocm or tpu (a "gpu" device is
  cuda or rocm, as jax.export names them)."""
  try:
    return jax.export.default_export_platform()
  except AttributeError:  # older jax: tell cuda from rocm by the client's platform version
    d = jax.devices()[0]
    if d.platform != "gpu":
      return d.platform
    return "rocm" if "rocm" in str(getattr(d.client, "platform_version", "")).lower() else "cuda"


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


class ExportedRetriever:
  """An exported retriever folder, ready to call."""

  def __init__(self, folder: str, *, verify: bool = True, max_batch: int = 256):
    self.folder = folder
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
      raise ValueError(f"{folder}: no {MANIFEST_FILE}; not an exported retriever")
    with open(path) as f:
      self.manifest = json.load(f)
    if self.manifest.get("format") != FORMAT:
      raise ValueError(f"{folder}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
    if verify:
      for name, rec in self.manifest["files"].items():
        if name in (FUNCTION_FILE, ARRAYS_FILE, VOCAB_FILE) and file_digest(
            os.path.join(folder, name)) != rec["sha256"]:
          raise ValueError(f"{folder}/{name}: sha256 differs from {MANIFEST_FILE}")
    self.k = int(self.manifest["k"])
    self.history_len = int(self.manifest["history_len"])
    if int(max_batch) < 1:
      raise ValueError(f"max_batch={max_batch} must be at least 1")
    self.max_batch = int(max_batch)
    platform = _platform()
    if platform not in self.manifest["platforms"]:
      raise ValueError(f"{folder}: exported for {self.manifest['platforms']}, running on "
                       f"{platform}; export again with that platform")
    with open(os.path.join(folder, FUNCTION_FILE), "rb") as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    shapes = self.manifest["array_shapes"]  # [[shape, dtype], ...] in argument order
    with np.load(os.path.join(folder, ARRAYS_FILE)) as z:
      names = [f"a{i:03d}" for i in range(len(shapes))]
      if sorted(z.files) != sorted(names):
        raise ValueError(f"{folder}/{ARRAYS_FILE}: holds {len(z.files)} arrays, "
                         f"{MANIFEST_FILE} lists {len(shapes)}")
      host = [z[n] for n in names]
    for n, a, (shape, dtype) in zip(names, host, shapes):
      if list(a.shape) != list(shape) or str(a.dtype) != dtype:
        raise ValueError(f"{folder}/{ARRAYS_FILE}: {n} is {a.dtype}{list(a.shape)}, "
                         f"{MANIFEST_FILE} says {dtype}{list(shape)}")
    self.arrays = [jax.device_put(a) for a in host]  # on the device once
    with open(os.path.join(folder, VOCAB_FILE)) as f:
      self.vocab = np.asarray(json.load(f)["item_raw_ids"], dtype=str)
    self.index = {str(x): i for i, x in enumerate(self.vocab)}
    self.call = jax.jit(self.exported.call)  # one compilation per batch size seen
    self.last_stats: dict = {}

  @classmethod
  def load(cls, folder: str, **kw) -> "ExportedRetriever":
    return cls(folder, **kw)

  def to_internal(self, histories):
    """int32[U, history_len] internal histories (left-padded with -1) and stats."""
    L = self.history_len
    hist = np.full((len(histories), L), -1, np.int32)
    unknown, truncated, empty = [], 0, 0
    for u, h in enumerate(histories):
      if isinstance(h, (str, bytes)):
        raise ValueError("a history must be a list of item ids, not one string")
      ids = [self.index.get(str(x)) for x in h]
      unknown.append(sum(i is None for i in ids))
      ids = [i for i in ids if i is not None]
      truncated += len(ids) > L
      empty += not ids
      ids = ids[-L:] if L else []
      if ids:
        hist[u, L - len(ids):] = ids
    stats = {"users": len(histories), "unknown_ids": int(sum(unknown)),
             "users_with_unknown_ids": int(sum(n > 0 for n in unknown)),
             "unknown_per_user": unknown, "truncated_histories": int(truncated),
             "empty_histories": int(empty)}
    return hist, stats

  def retrieve_internal(self, history: np.ndarray, k: int | None = None):
    """(items int32[U, k], scores float32[U, k]) of internal histories int32[U, L]; k <= the
    exported k (the best k of the exported top-k)."""
    k = self.k if k is None else int(k)
    if not 1 <= k <= self.k:
      raise ValueError(f"k={k}: this artifact was exported with k={self.k}")
    history = np.asarray(history, np.int32)
    if history.ndim != 2 or history.shape[1] != self.history_len:
      raise ValueError(f"history must be int32[U, {self.history_len}], got {history.shape}")
    items = np.full((len(history), k), -1, np.int32)
    scores = np.full((len(history), k), -np.inf, np.float32)
    for lo in range(0, len(history), self.max_batch):
      part = history[lo:lo + self.max_batch]
      bucket = _next_pow2(len(part))
      padded = np.concatenate([part, np.full((bucket - len(part), part.shape[1]), -1, np.int32)])
      it, sc = jax.device_get(self.call(padded, *self.arrays))
      items[lo:lo + len(part)] = np.asarray(it)[:len(part), :k]
      scores[lo:lo + len(part)] = np.asarray(sc, np.float32)[:len(part), :k]
    return items, scores

  def retrieve(self, histories, k: int | None = None):
    """Top-k raw item ids (best first) and scores per history of raw item ids."""
    hist, self.last_stats = self.to_internal(histories)
    items, scores = self.retrieve_internal(hist, k)
    out_items, out_scores = [], []
    for row, sc in zip(items, scores):
      ok = row >= 0
      out_items.append([str(x) for x in self.vocab[row[ok]]])
      out_scores.append([float(s) for s in sc[ok]])
    return out_items, out_scores


def main(argv=None) -> int:
  here = os.path.dirname(os.path.abspath(__file__))
  p = argparse.ArgumentParser(description="Top-K raw item ids of an exported retriever.")
  p.add_argument("--folder", default=here, help="the artifact folder (default: this file's)")
  p.add_argument("--history", help="one user's raw item ids, comma-separated, oldest first")
  p.add_argument("--input", help="CSV `user_id,history` (space-separated ids); optional header")
  p.add_argument("--output", help="CSV `user_id,rank,item_id,score` (default stdout)")
  p.add_argument("--k", type=int, default=None, help="items per user (<= the exported k)")
  p.add_argument("--max_batch", type=int, default=256, help="users per call (>= 1)")
  a = p.parse_args(argv)
  try:
    if (a.history is None) == (a.input is None):
      raise ValueError("pass exactly one of --history=id1,id2,... and --input=histories.csv")
    r = ExportedRetriever.load(a.folder, max_batch=a.max_batch)
    if a.history is not None:
      users, histories = [""], [[x.strip() for x in a.history.split(",") if x.strip()]]
    else:
      users, histories = [], []
      try:
        with open(a.input, newline="", encoding="utf-8") as f:
          rows = list(csv.reader(f))
      except UnicodeDecodeError as e:
        raise ValueError(f"{a.input}: not UTF-8 text (byte {e.start}: {e.reason})") from None
      for line, row in enumerate(rows, start=1):
        if not row or (line == 1 and [c.strip() for c in row] == ["user_id", "history"]):
          continue
        if len(row) != 2:
          raise ValueError(f"{a.input}:{line}: expected 2 columns `user_id,history`")
        users.append(row[0].strip())
        histories.append(row[1].split())
    items, scores = r.retrieve(histories, a.k)
    out = open(a.output, "w", newline="") if a.output else sys.stdout
  except (ValueError, OSError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  if r.last_stats["unknown_ids"]:
    sys.stderr.write(f"dropped {r.last_stats['unknown_ids']} unknown item ids\n")
  if a.history is not None and not a.output:
    for rank, (item, score) in enumerate(zip(items[0], scores[0]), start=1):
      print(f"{rank}\t{item}\t{score:.6g}")
    return 0
  w = csv.writer(out)
  w.writerow(["user_id", "rank", "item_id", "score"])
  for user, row, sc in zip(users, items, scores):
    for rank, (item, score) in enumerate(zip(row, sc), start=1):
      w.writerow([user, rank, item, f"{score:.6g}"])
  if a.output:
    out.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
