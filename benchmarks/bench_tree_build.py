"""Wall-clock time of the tree builders in tdr_jax.tree.

Times ``build_random``, ``build_from_categories`` and ``build_kmeans`` (plus
``validate`` on the k-means tree) for several corpus sizes, prints a table and
writes a JSON record.

    .venv/bin/python benchmarks/bench_tree_build.py                  # 1e4, 1e5, 1e6
    .venv/bin/python benchmarks/bench_tree_build.py --sizes 10000 100000
    .venv/bin/python benchmarks/bench_tree_build.py --branching 4 --dim 64

Synthetic inputs: categories are uniform over ``N // --items-per-category``
ids with 2 % unknown (-1); k-means vectors are a mixture of 256 Gaussians in
``--dim`` dimensions (float32), so Lloyd has real structure to find.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdr_jax import tree as T  # noqa: E402


def _time(fn, repeats: int) -> tuple[float, object]:
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6])
  ap.add_argument("--branching", type=int, default=2)
  ap.add_argument("--dim", type=int, default=24)
  ap.add_argument("--iters", type=int, default=8, help="max Lloyd iterations per level")
  ap.add_argument("--items-per-category", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=3, help="best of R runs for N <= 1e5")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="benchmarks/results/tree_build.json")
  args = ap.parse_args(argv)

  b = args.branching
  records = []
  header = f"{'N':>9} {'H':>3} {'random s':>9} {'categ. s':>9} {'kmeans s':>9} {'valid. s':>9}"
  print(f"branching={b} dim={args.dim} iters={args.iters} cpus={os.cpu_count()}")
  print(header)
  print("-" * len(header))
  for n in args.sizes:
    rng = np.random.default_rng(args.seed)
    reps = args.repeats if n <= 100_000 else 1
    ncat = max(1, n // args.items_per_category)
    cats = rng.integers(0, ncat, size=n)
    cats[rng.random(n) < 0.02] = -1
    centers = rng.normal(size=(256, args.dim)).astype(np.float32) * 3.0
    vecs = centers[rng.integers(0, 256, size=n)]
    vecs += rng.normal(size=vecs.shape).astype(np.float32)

    t_rand, _ = _time(lambda: T.build_random(np.random.default_rng(1), n, branching=b), reps)
    t_cat, _ = _time(
        lambda: T.build_from_categories(np.random.default_rng(1), cats, branching=b), reps
    )
    t_km, tree = _time(
        lambda: T.build_kmeans(np.random.default_rng(1), vecs, branching=b, iters=args.iters),
        reps,
    )
    t_val, _ = _time(lambda: T.validate(tree), reps)
    print(f"{n:>9} {tree.height:>3} {t_rand:>9.3f} {t_cat:>9.3f} {t_km:>9.3f} {t_val:>9.3f}")
    records.append(
        {
            "num_items": n,
            "branching": b,
            "height": tree.height,
            "num_nodes": tree.num_nodes,
            "dim": args.dim,
            "kmeans_iters": args.iters,
            "num_categories": ncat,
            "repeats": reps,
            "build_random_s": t_rand,
            "build_from_categories_s": t_cat,
            "build_kmeans_s": t_km,
            "validate_s": t_val,
        }
    )

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  payload = {
      "benchmark": "tree_build",
      "command": " ".join([Path(sys.executable).name, *sys.argv]),
      "python": platform.python_version(),
      "numpy": np.__version__,
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "seed": args.seed,
      "results": records,
  }
  out.write_text(json.dumps(payload, indent=2) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
