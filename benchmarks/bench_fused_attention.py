"""DIN fused activation unit, before/after in one process: `bench_train_retrieval`'s uniform
train step and plain jitted forward over the same pairs (same fixture, same weights), with
`fused_attention=False` (the plain layers) and `True` (the default), in `--order`.

  python benchmarks/bench_fused_attention.py --preset=paper --repeats=1 --order=0,1
  python benchmarks/bench_fused_attention.py --preset=default --num_items=5000 --repeats=5 \
      --order=0,1,0,1
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax
from flax import nnx
import bench_train_retrieval as btr
from tdr_jax import scorer
from tdr_jax.models import din as din_lib
ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="paper"); ap.add_argument("--num_items", type=int, default=2**17)
ap.add_argument("--repeats", type=int, default=1); ap.add_argument("--order", default="0,1")
a = ap.parse_args()
t0 = time.perf_counter()
ctx = btr.setup(a.preset, a.num_items)
cfg, tree = ctx["cfg"], ctx["tree"]
print(json.dumps(ctx["res"]), flush=True)
for fused in [bool(int(x)) for x in a.order.split(",")]:
  model = din_lib.init_din(jax.random.key(cfg.seed), num_nodes=tree.num_nodes, embed_dim=cfg.model.embed_dim,
                           windows=cfg.model.windows, attention_hidden=cfg.model.attention_hidden,
                           mlp_hidden=cfg.model.mlp_hidden, hierarchical=cfg.model.hierarchical,
                           fused_attention=fused)
  gd, ctx["params"] = nnx.split(model); ctx["score_fn"] = scorer.din_score_fn(gd)
  r = btr.train_step_seconds(ctx, "uniform", a.repeats)
  f = btr.forward_seconds(ctx, a.repeats)
  print(f"fused={fused}: step {r['step_seconds_uniform']:.3f} s  {r['samples_per_s_uniform']:.1f} samples/s  "
        f"forward {f:.3f} s  step/forward {r['step_seconds_uniform']/f:.2f}  (t={time.perf_counter()-t0:.0f}s)", flush=True)
