"""End-to-end benchmark of the dataset layer on a Tmall-format log.

Writes a synthetic ``user_log_format1.csv`` (IJCAI-15 column layout) with
``--rows`` rows and Tmall-like id ranges (~400k users, ~1M items, ~1.5k
categories; item popularity and user activity Zipf-distributed, ~10% empty
brand ids, clicks ~85% of actions), then times, in a fresh child process,

1. ``load_dataset("tmall", ...)`` with an empty cache: read + action filter +
   preprocessing + cache write;
2. the same call again: a cache hit;

and reports wall time and peak resident memory (``ru_maxrss`` of the child)
of each, printed as a table and written as JSON (``--out``).

    python benchmarks/bench_preprocess.py --rows 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _zipf_sampler(rng, n: int, a: float, size: int, chunk: int = 1 << 22) -> np.ndarray:
  """``size`` draws from {0..n-1} with P(k) ∝ 1/(k+1)^a, ids shuffled."""
  w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
  cdf = np.cumsum(w)
  cdf /= cdf[-1]
  perm = rng.permutation(n)
  out = np.empty(size, np.int64)
  for s in range(0, size, chunk):
    e = min(size, s + chunk)
    out[s:e] = perm[np.searchsorted(cdf, rng.random(e - s), side="right").clip(0, n - 1)]
  return out


def make_tmall(path: Path, rows: int, *, users: int, items: int, categories: int, seed: int) -> None:
  import pyarrow as pa
  import pyarrow.csv as pcsv

  rng = np.random.default_rng(seed)
  item_cat = _zipf_sampler(rng, categories, 0.9, items) + 1
  item_seller = rng.integers(1, 5000, items)
  item_brand = rng.integers(1, 8500, items)
  brand_missing = rng.random(items) < 0.1
  cum = np.array([0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334])
  month_of_day = np.searchsorted(cum, np.arange(365), side="right")  # 1..12 for day index 0..364
  chunk = 2_000_000
  writer = None
  try:
    for s in range(0, rows, chunk):
      n = min(rows, s + chunk) - s
      user = _zipf_sampler(rng, users, 0.6, n) + 1
      item = _zipf_sampler(rng, items, 0.9, n)
      day = rng.integers(130, 316, n)  # May 11 .. Nov 12 (0-based day of year)
      month = month_of_day[day]
      mmdd = month * 100 + (day - cum[month - 1] + 1)
      action = rng.choice(4, n, p=[0.85, 0.02, 0.06, 0.07])
      brand = pa.array(item_brand[item], mask=brand_missing[item])
      t = pa.table(
          {
              "user_id": user,
              "item_id": item + 1,
              "cat_id": item_cat[item],
              "seller_id": item_seller[item],
              "brand_id": brand,
              "time_stamp": mmdd,
              "action_type": action,
          }
      )
      if writer is None:
        with open(path, "w") as f:  # unquoted header, as in the real file
          f.write(",".join(t.column_names) + "\n")
        sink = open(path, "ab")
        writer = pcsv.CSVWriter(
            sink, t.schema, write_options=pcsv.WriteOptions(include_header=False, quoting_style="none")
        )
      writer.write_table(t)
  finally:
    if writer is not None:
      writer.close()
      sink.close()


def child(data_dir: str) -> None:
  """Runs in a fresh process: one timed load_dataset call, prints JSON."""
  from tdr_jax.data import load_dataset

  t0 = time.perf_counter()
  ds = load_dataset("tmall", data_dir)
  wall = time.perf_counter() - t0
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  src = ds.source
  print(
      "RESULT "
      + json.dumps(
          {
              "wall_s": round(wall, 3),
              "peak_rss_mb": round(peak_kib / 1024, 1),
              "load_s": src.get("load_seconds"),
              "preprocess_s": src.get("preprocess_seconds"),
              "stats": ds.stats(),
              "rows_out": (src.get("load_report") or {}).get("rows_out"),
          }
      )
  )


def run_child(data_dir: Path) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, __file__, "--child", str(data_dir)],
      capture_output=True,
      text=True,
      env=env,
  )
  if proc.returncode != 0:
    sys.stderr.write(proc.stdout + proc.stderr)
    raise SystemExit(f"child failed with code {proc.returncode}")
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", type=int, default=10_000_000)
  ap.add_argument("--users", type=int, default=400_000)
  ap.add_argument("--items", type=int, default=1_000_000)
  ap.add_argument("--categories", type=int, default=1_500)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--data-dir", default=None, help="where to write the log (default: a temp dir, removed)")
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.child)
    return

  tmp = None
  if args.data_dir:
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
  else:
    tmp = tempfile.mkdtemp(prefix="tdr_bench_tmall_")
    data_dir = Path(tmp)
  try:
    path = data_dir / "user_log_format1.csv"
    t0 = time.perf_counter()
    make_tmall(path, args.rows, users=args.users, items=args.items, categories=args.categories, seed=args.seed)
    gen_s = time.perf_counter() - t0
    size_mb = path.stat().st_size / 2**20
    shutil.rmtree(data_dir / "cache", ignore_errors=True)
    cold = run_child(data_dir)
    warm = run_child(data_dir)
    cold["cache_write_s"] = round(cold["wall_s"] - (cold["load_s"] or 0) - (cold["preprocess_s"] or 0), 3)
    result = {
        "benchmark": "load_dataset('tmall') end to end",
        "rows": args.rows,
        "file_mb": round(size_mb, 1),
        "generate_s": round(gen_s, 2),
        "cold": cold,
        "cache_hit": {k: warm[k] for k in ("wall_s", "peak_rss_mb")},
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    st = cold["stats"]
    print(f"Tmall-format log: {args.rows:,} rows, {size_mb:.0f} MB (generated in {gen_s:.1f}s)")
    print(f"after click filter + >=15 users: {st['users']:,} users, {st['items']:,} items, "
          f"{st['interactions']:,} interactions, {st['samples']:,} train samples")
    print(f"{'stage':<34}{'wall s':>10}{'peak RSS MB':>14}")
    print(f"{'cold: read+filter (loader)':<34}{cold['load_s']:>10.2f}{'':>14}")
    print(f"{'cold: preprocess':<34}{cold['preprocess_s']:>10.2f}{'':>14}")
    print(f"{'cold: cache write + overhead':<34}{cold['cache_write_s']:>10.2f}{'':>14}")
    print(f"{'cold: total load_dataset':<34}{cold['wall_s']:>10.2f}{cold['peak_rss_mb']:>14.0f}")
    print(f"{'cache hit: load_dataset':<34}{warm['wall_s']:>10.2f}{warm['peak_rss_mb']:>14.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
