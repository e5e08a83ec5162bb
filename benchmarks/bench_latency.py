"""Serving latency of beam search: the exported artifact vs in-process jit vs brute force.

On random trees over 2^14 / 2^17 / 2^20 items (one item per leaf, branching 2) with a freshly
initialised DIN at the default preset's scorer sizes (`config.make_config("default")`: D=24,
windows of a 20-item history, activation unit 16, MLP [64, 32]; a trained model is not needed
for latency), for beam 50 and 150 and top-50:

  * batch 1: p50 / p99 milliseconds per request (one user, history in, top-K ids out: the host
    to device copy of the history and the device_get of the result are included);
  * batch 64 / 256: throughput in queries/s;

for three paths:
  exported   `tdr_jax.exporting.export_search` -> write_artifact -> the standalone loader
             (`ExportedRetriever.retrieve_internal`: jax.jit(exported.call), padding to the
             power-of-two bucket, params on the device once);
  in_process `jax.jit` of `beam_search.beam_search` with params and tree as arguments (what
             `tdr_jax.serving.Retriever` runs);
  brute      `beam_search.brute_force`: every leaf scored, chunked as the Retriever's DIN.

Writes JSON (`--out`, default benchmarks/results/latency[_quick].json) and prints a table.

  python benchmarks/bench_latency.py --quick      # 2^14, 2^17; batch 1 and 64; brute at batch 1
  python benchmarks/bench_latency.py              # everything (minutes; brute force is slow)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tdr_jax import beam_search as bs  # noqa: E402
from tdr_jax import config as config_lib  # noqa: E402
from tdr_jax import export_loader, exporting, scorer  # noqa: E402
from tdr_jax import tree as tree_lib  # noqa: E402


def histories(rng, n_users, length, num_items):
  """int32[U, L] random histories, left-padded with -1 (lengths uniform in 1..L)."""
  h = rng.integers(0, num_items, size=(n_users, length)).astype(np.int32)
  lengths = rng.integers(1, length + 1, size=n_users)
  h[np.arange(length)[None, :] < (length - lengths)[:, None]] = -1
  return h


def latency(call, hist, requests):
  """Per-request seconds of `call(history int32[1, L])` (result on the host), one warm-up."""
  call(hist[:1])
  out = []
  for i in range(requests):
    t = time.perf_counter()
    call(hist[i % len(hist)][None])
    out.append(time.perf_counter() - t)
  return np.asarray(out)


def throughput(call, hist, batch, repeats):
  """Queries/s of `call` over batches of `batch` users (one warm-up call)."""
  x = hist[:batch]
  call(x)
  t = time.perf_counter()
  for _ in range(repeats):
    call(x)
  return batch * repeats / (time.perf_counter() - t)


def build_model(rng, num_leaves: int, model_cfg, *, branching: int = 2, seed: int = 0):
  """A random tree over `num_leaves` items and a freshly initialised DIN with `model_cfg`'s sizes
  (a config's `.model`): (tree, score_fn, params, param_bytes, tree_bytes)."""
  m = model_cfg
  tree = tree_lib.build_random(rng, num_leaves, branching=branching)
  score_fn, params = scorer.init_din(jax.random.key(seed), tree, embed_dim=m.embed_dim,
                                     windows=m.windows, attention_hidden=m.attention_hidden,
                                     mlp_hidden=m.mlp_hidden, hierarchical=m.hierarchical)
  param_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))
  tree_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))
  return tree, score_fn, params, param_bytes, tree_bytes


def in_process_search(score_fn, tree, params, *, beam: int, k: int):
  """(search(args, history), call(history int32[U, L]) -> host (items, scores)): the in-process
  path, `jax.jit` of `beam_search.beam_search` with params and tree as arguments placed on the
  device once (what `tdr_jax.serving.Retriever` runs); `call` includes the host-to-device copy
  of the histories and the device_get of the result."""
  args = jax.device_put((tree, params))

  def search(args_, h):
    t_, p_ = args_
    return bs.beam_search(score_fn, p_, t_, h, beam_size=beam, topk=k)

  jitted = jax.jit(search)

  def call(h):
    return jax.device_get(jitted(args, jnp.asarray(h)))

  return search, call


def summary(seconds):
  ms = np.asarray(seconds) * 1e3
  return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
          "p99_ms": round(float(np.percentile(ms, 99)), 3),
          "mean_ms": round(float(ms.mean()), 3), "requests": int(len(ms))}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="2^14 and 2^17 leaves, batch 1 and 64, brute force at batch 1 only")
  ap.add_argument("--log2_leaves", default=None, help="comma-separated (default 14,17,20)")
  ap.add_argument("--beams", default="50,150")
  ap.add_argument("--batches", default=None, help="throughput batch sizes (default 64,256)")
  ap.add_argument("--k", type=int, default=50)
  ap.add_argument("--requests", type=int, default=None, help="batch-1 requests (default 200)")
  ap.add_argument("--repeats", type=int, default=None, help="calls per throughput figure")
  ap.add_argument("--brute_requests", type=int, default=None)
  ap.add_argument("--no_brute", action="store_true")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  q = a.quick
  log2s = [int(x) for x in (a.log2_leaves or ("14,17" if q else "14,17,20")).split(",")]
  beams = [int(x) for x in a.beams.split(",")]
  batches = [int(x) for x in (a.batches or ("64" if q else "64,256")).split(",")]
  requests = a.requests or (40 if q else 200)
  repeats = a.repeats or (3 if q else 10)
  brute_requests = a.brute_requests or (3 if q else 10)
  out_path = a.out or f"benchmarks/results/latency{'_quick' if q else ''}.json"

  cfg = config_lib.make_config("default")
  m, L, k = cfg.model, cfg.data.history_len, a.k
  res = {"command": "python " + " ".join(sys.argv), "quick": q,
         "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                     "jax": jax.__version__, "backend": jax.default_backend(),
                     "load_avg_at_start": os.getloadavg()},
         "scorer": {"embed_dim": m.embed_dim, "windows": list(m.windows),
                    "attention_hidden": list(m.attention_hidden),
                    "mlp_hidden": list(m.mlp_hidden), "history_len": L}, "k": k, "rows": []}
  rng = np.random.default_rng(0)
  tmp = tempfile.mkdtemp(prefix="bench_latency_")
  try:
    for log2 in log2s:
      n = 1 << log2
      t0 = time.perf_counter()
      tree, score_fn, params, param_bytes, tree_bytes = build_model(rng, n, m)
      hist = histories(rng, max(batches + [requests]), L, n)
      print(f"2^{log2} leaves: DIN params {param_bytes / 2**20:.1f} MiB, tree arrays "
            f"{tree_bytes / 2**20:.1f} MiB (built in {time.perf_counter() - t0:.1f} s)",
            flush=True)
      for beam in beams:
        row = {"log2_leaves": log2, "leaves": n, "beam": beam, "param_bytes": param_bytes,
               "tree_bytes": tree_bytes}
        search, in_process = in_process_search(score_fn, tree, params, beam=beam, k=k)

        t = time.perf_counter()
        exported, arrays, plats, note = exporting.export_search(search, (tree, params),
                                                                history_len=L)
        folder = os.path.join(tmp, f"{log2}_{beam}")
        manifest = exporting.write_artifact(folder, exported, arrays,
                                            [str(i) for i in range(n)], k=k, history_len=L,
                                            platforms=plats, note=note)
        row["export_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        loaded = export_loader.ExportedRetriever.load(folder, verify=False)
        row["load_s"] = round(time.perf_counter() - t, 2)
        row["artifact_bytes"] = {name: r["bytes"] for name, r in manifest["files"].items()}
        row["platforms"] = plats

        def exported_call(h):
          return loaded.retrieve_internal(h)

        same = np.array_equal(exported_call(hist[:8])[0], in_process(hist[:8])[0])
        row["exported_equals_in_process"] = bool(same)
        for name, call in (("exported", exported_call), ("in_process", in_process)):
          row[name] = {"batch1": summary(latency(call, hist, requests))}
          for b in batches:
            row[name][f"batch{b}_qps"] = round(throughput(call, hist, b, repeats), 1)
        print(f"  beam {beam}: exported p50 {row['exported']['batch1']['p50_ms']} ms "
              f"p99 {row['exported']['batch1']['p99_ms']} ms | in-process p50 "
              f"{row['in_process']['batch1']['p50_ms']} ms | "
              + " ".join(f"b{b} {row['exported'][f'batch{b}_qps']}/{row['in_process'][f'batch{b}_qps']} q/s"
                         for b in batches), flush=True)
        res["rows"].append(row)
        shutil.rmtree(folder)
      if not a.no_brute:
        att = (m.attention_hidden or (1,))[0]

        def brute(h):
          chunk = max(1, min(n, (1 << 25) // (h.shape[0] * L * att)))
          return jax.device_get(bs.brute_force(score_fn, params, tree, jnp.asarray(h), topk=k,
                                               chunk_size=chunk))

        brow = {"log2_leaves": log2, "leaves": n, "method": "brute_force",
                "batch1": summary(latency(brute, hist, brute_requests))}
        if not q:
          brow["batch64_qps"] = round(throughput(brute, hist, 64, 1), 2)
        print(f"  brute force: p50 {brow['batch1']['p50_ms']} ms", flush=True)
        res["rows"].append(brow)
      del params, tree
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  res["machine"]["load_avg_at_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
  print(f"-> {out_path}")


if __name__ == "__main__":
  main()
