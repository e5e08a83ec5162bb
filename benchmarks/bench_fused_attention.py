"""DIN's fused activation unit, before/after in one process, against the step's FLOP bound.

For `bench_train_retrieval`'s fixture (the preset's scorer, a random tree, one batch), with
`fused_attention=False` (the plain layers, main before the fused unit) and `True` (the
default), in `--order`:

  * the uniform-sampler train step and the plain jitted forward over the same pairs (seconds,
    samples/s, step / forward);
  * the FLOPs of one step and one forward by XLA's cost analysis of the *plain* programs (the
    maths both versions compute: the fused one recomputes the activation unit in its backward,
    and XLA counts a `lax.map` body once, so its own count would be wrong twice over);
  * the machine's f32 matmul peak, measured in the same run (an n x n x n matmul, best of
    `--matmul_repeats`), and the step's achieved FLOP/s as a share of it.

  python benchmarks/bench_fused_attention.py --preset=paper --repeats=1 --order=0,1
  python benchmarks/bench_fused_attention.py --preset=default --num_items=5000 --repeats=5 \
      --order=0,1,0,1

Writes JSON (`--out`, default benchmarks/results/fused_attention-<preset>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import bench_train_retrieval as btr  # noqa: E402
from tdr_jax import scorer  # noqa: E402
from tdr_jax.models import din as din_lib  # noqa: E402


def xla_flops(fn, *args) -> float:
  """FLOPs of `jax.jit(fn)(*args)` by XLA's cost analysis of the compiled program."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def matmul_peak(n: int, repeats: int) -> float:
  """Best f32 FLOP/s of an n x n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def set_model(ctx: dict, fused: bool) -> None:
  cfg, tree = ctx["cfg"], ctx["tree"]
  model = din_lib.init_din(jax.random.key(cfg.seed), num_nodes=tree.num_nodes,
                           embed_dim=cfg.model.embed_dim, windows=cfg.model.windows,
                           attention_hidden=cfg.model.attention_hidden,
                           mlp_hidden=cfg.model.mlp_hidden, hierarchical=cfg.model.hierarchical,
                           fused_attention=fused)
  graphdef, ctx["params"] = nnx.split(model)
  ctx["score_fn"] = scorer.din_score_fn(graphdef)


def step_flops(ctx: dict) -> float:
  return xla_flops(*btr.train_step(ctx, "uniform"))


def forward_flops(ctx: dict) -> float:
  forward, args = btr.loss_pairs_forward(ctx)
  return xla_flops(forward, *args)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="paper")
  ap.add_argument("--num_items", type=int, default=2 ** 17)
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--order", default="0,1", help="comma list of 0 (plain) / 1 (fused)")
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--matmul_repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  t0 = time.perf_counter()
  ctx = btr.setup(a.preset, a.num_items)
  res = dict(ctx["res"], command="python " + " ".join(sys.argv), runs=[])
  bsz = ctx["cfg"].train.batch_size
  set_model(ctx, fused=False)
  res["step_flops"] = step_flops(ctx)
  res["forward_flops"] = forward_flops(ctx)
  res["step_flops_per_sample"] = res["step_flops"] / bsz
  res["matmul_peak_flops_f32"] = matmul_peak(a.matmul_n, a.matmul_repeats)
  print(f"{a.preset}: XLA counts {res['step_flops'] / 1e9:.2f} GFLOP per step "
        f"({res['step_flops_per_sample'] / 1e6:.2f} MFLOP per sample), forward "
        f"{res['forward_flops'] / 1e9:.2f} GFLOP; f32 matmul peak "
        f"{res['matmul_peak_flops_f32'] / 1e9:.1f} GFLOP/s", flush=True)
  for fused in [bool(int(x)) for x in a.order.split(",")]:
    set_model(ctx, fused)
    step = btr.train_step_seconds(ctx, "uniform", a.repeats)["step_seconds_uniform"]
    fwd = btr.forward_seconds(ctx, a.repeats)
    achieved = res["step_flops"] / step
    run = {"fused": fused, "step_seconds": step, "forward_seconds": fwd,
           "step_over_forward": step / fwd, "samples_per_s": bsz / step,
           "step_flops_per_s": achieved,
           "share_of_matmul_peak": achieved / res["matmul_peak_flops_f32"],
           "flop_bound_samples_per_s": bsz * res["matmul_peak_flops_f32"] / res["step_flops"]}
    res["runs"].append(run)
    print(f"fused={fused}: step {step:.3f} s  {bsz / step:.1f} samples/s  forward {fwd:.3f} s  "
          f"step/forward {step / fwd:.2f}  {achieved / 1e9:.1f} GFLOP/s = "
          f"{100 * run['share_of_matmul_peak']:.1f}% of the matmul peak (FLOP bound "
          f"{run['flop_bound_samples_per_s']:.0f} samples/s)  (t={time.perf_counter() - t0:.0f}s)",
          flush=True)
  out = a.out or f"benchmarks/results/fused_attention-{a.preset}.json"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
