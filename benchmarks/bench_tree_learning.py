"""Cost of one TDR tree update (layer gap 7) per item, against one training epoch.

For each corpus size N: a random balanced binary tree, a fixed number of pairs (samples) per
item (`--users_per_item`, default 4) with random histories, and a scorer with random
parameters:

* `--scorer=din` (default): the DIN of `config_lib.PRESETS[--preset]` (default preset sizes);
* `--scorer=free`: a node bias plus the mean bias of the history's leaves, nearly free, so
  the figure shows the cost of everything around the scorer (batching, log-softmax,
  accumulation, transfers, the greedy assignment on the host).

Each size runs `learn_tree_tdr` up to `--repeats` times (default 2; the first run includes
compilation, the last is the figure reported per item); a run that takes longer than
`--rerun_below` seconds is not repeated, compilation being a negligible share of it. With
`--train_steps > 0` (DIN only) it also times the default train step (`train.make_train_step`, the preset's sampler and negatives) on random
batches over the same tree, and reports the ratio of the tree update to one training epoch on
the same pairs (epoch = pairs / batch_size steps). A size whose estimated time (from the
previous size's pair-node throughput) exceeds `--max_seconds` is skipped and reported as such.

  python benchmarks/bench_tree_learning.py                              # DIN, 1e4 1e5 1e6
  python benchmarks/bench_tree_learning.py --scorer=free --out=benchmarks/results/tree_learning_free.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tdr_jax import experiment, sampling, train  # noqa: E402
from tdr_jax.methods import tree_family
from tdr_jax import config as config_lib
from tdr_jax import tree as tree_lib  # noqa: E402
from tdr_jax import tree_learning as tl  # noqa: E402


def free_scorer(num_nodes: int, seed: int):
  """A nearly free scorer: a per-node bias plus the mean bias of the history's leaves."""
  bias = jax.random.normal(jax.random.key(seed), (num_nodes,), jnp.float32)

  def score_fn(params, tree, history, nodes, level=None):
    del level
    leaves = jnp.asarray(tree.item_paths)[jnp.maximum(history, 0), -1]  # [U, L]
    w = (history >= 0).astype(jnp.float32)
    user = (params[leaves] * w).sum(1) / jnp.maximum(w.sum(1), 1.0)  # [U]
    return user[:, None] + params[nodes]

  return score_fn, bias


def pair_nodes(n: int, branching: int, gap: int, users_per_item: int) -> int:
  """(pair, candidate node) scores one tree update computes."""
  h = tree_lib.tree_height(n, branching=branching)
  steps, level = [], 0
  while level < h:
    nxt = min(h, level + gap)
    steps.append(branching ** (nxt - level))
    level = nxt
  return n * users_per_item * sum(steps)


def time_train_step(cfg, tree, score_fn, params, steps: int, rng) -> float:
  """Seconds per train step of the preset's TDR step on random batches (after warm-up)."""
  bsz, hl = cfg.train.batch_size, cfg.data.history_len
  opt = train.make_optimizer(learning_rate=cfg.train.learning_rate)
  step_cfg = train.StepConfig(loss="softmax", sampler=cfg.train.sampler,
                              num_negatives=cfg.train.num_negatives,
                              full_softmax_nodes=cfg.train.full_softmax_nodes)
  step = jax.jit(train.make_train_step(score_fn, opt, step_cfg, branching=tree.branching,
                                       height=tree.height), donate_argnums=0)
  state = train.init_state(params, opt)
  tree_dev = jax.device_put(tree)
  index = jax.device_put(sampling.level_index(tree))
  key = jax.random.key(0)

  def batch():
    hist = rng.integers(0, tree.num_items, (bsz, hl)).astype(np.int32)
    return train.Batch(jnp.asarray(hist),
                       jnp.asarray(rng.integers(0, tree.num_items, bsz).astype(np.int32)),
                       jnp.ones((bsz, tree.height), jnp.float32), jnp.ones(bsz, bool))

  batches = [batch() for _ in range(steps)]
  state, m = step(state, batches[0], tree_dev, index, key)  # compile
  jax.block_until_ready(m)
  t = time.perf_counter()
  for b in batches:
    state, m = step(state, b, tree_dev, index, key)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="10000,100000,1000000")
  ap.add_argument("--users_per_item", type=int, default=4)
  ap.add_argument("--gap", type=int, default=7)
  ap.add_argument("--preset", default="default")
  ap.add_argument("--scorer", choices=("din", "free"), default="din")
  ap.add_argument("--batch_size", type=int, default=None, help="pairs per scorer call")
  ap.add_argument("--train_steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=2,
                  help="runs per size; the last is reported (the first includes compilation)")
  ap.add_argument("--rerun_below", type=float, default=120.0,
                  help="repeat a size only while its runs take less than this many seconds "
                       "(above it, compilation is a negligible share of one run)")
  ap.add_argument("--max_seconds", type=float, default=600.0,
                  help="skip a size whose estimated time (one run) exceeds this")
  ap.add_argument("--out", default="benchmarks/results/tree_learning.json")
  args = ap.parse_args()

  cfg = experiment.make_config(args.preset)
  b = cfg.tree.branching
  rows, throughput = [], None
  for n in [int(float(s)) for s in args.sizes.split(",")]:
    upi = args.users_per_item
    work = pair_nodes(n, b, args.gap, upi)
    row = {"num_items": n, "height": tree_lib.tree_height(n, branching=b),
           "pairs": n * upi, "pair_nodes": work}
    if throughput is not None and work / throughput > args.max_seconds:
      row["skipped"] = (f"estimated {work / throughput:.0f} s per run at "
                        f"{throughput:.3g} pair-nodes/s > --max_seconds={args.max_seconds:.0f}")
      print(f"N={n}: skipped, {row['skipped']}", flush=True)
      rows.append(row)
      continue
    rng = np.random.default_rng(0)
    tree = tree_lib.build_random(rng, n, branching=b)
    if args.scorer == "din":
      score_fn, params = tree_family.build_model(cfg, tree)
    else:
      score_fn, params = free_scorer(tree.num_nodes, 0)
    hist = rng.integers(0, n, (n * upi, cfg.data.history_len)).astype(np.int32)
    hist[: hist.shape[0] // 4, : cfg.data.history_len // 2] = -1  # some short histories
    items = np.repeat(np.arange(n, dtype=np.int32), upi)
    times, stats = [], None
    for _ in range(max(1, args.repeats)):
      if times and times[-1] >= args.rerun_below:
        break
      t = time.perf_counter()
      new, stats = tl.learn_tree_tdr(score_fn, params, tree, hist, items, gap=args.gap,
                                     batch_size=args.batch_size, return_stats=True)
      times.append(time.perf_counter() - t)
    tree_lib.validate(new)
    moved = float(np.mean(new.item_to_leaf != tree.item_to_leaf))
    warm = times[-1]
    throughput = work / warm
    row.update({
        "cold_s": times[0], "warm_s": warm, "runs": len(times),
        "compile_s_est": times[0] - times[-1] if len(times) > 1 else None,
        "us_per_item": 1e6 * warm / n,
        "score_s": sum(s["score_s"] for s in stats["steps"]),
        "assign_s": sum(s["assign_s"] for s in stats["steps"]),
        "steps": [(s["from"], s["to"]) for s in stats["steps"]],
        "pair_nodes_per_s": throughput, "fraction_items_moved": moved})
    if args.scorer == "din" and args.train_steps > 0:
      step_s = time_train_step(cfg, tree, score_fn, params, args.train_steps, rng)
      epoch_s = step_s * (n * upi) / cfg.train.batch_size
      row.update({"train_step_s": step_s, "train_us_per_sample": 1e6 * step_s / cfg.train.batch_size,
                  "epoch_s_same_pairs": epoch_s, "update_over_epoch": warm / epoch_s})
    rows.append(row)
    print(json.dumps(row), flush=True)

  done = [r for r in rows if "skipped" not in r]
  base = done[0]["us_per_item"] if done else None
  print(f"\nTDR tree update, gap {args.gap}, {args.users_per_item} pairs/item, scorer "
        f"{args.scorer} ({args.preset} preset sizes), {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
  head = "| N | H | pairs | warm s | us/item | x vs first | score s | assign s | compile s |"
  extra = " train us/sample | update / epoch |" if args.scorer == "din" else ""
  print(head + extra)
  print("|" + "---|" * (head.count("|") - 1 + extra.count("|")))
  for r in rows:
    if "skipped" in r:
      print(f"| {r['num_items']:,} | {r['height']} | {r['pairs']:,} | skipped: {r['skipped']} |")
      continue
    line = (f"| {r['num_items']:,} | {r['height']} | {r['pairs']:,} | {r['warm_s']:.2f} | "
            f"{r['us_per_item']:.1f} | {r['us_per_item'] / base:.2f} | {r['score_s']:.2f} | "
            f"{r['assign_s']:.3f} | "
            f"{'-' if r['compile_s_est'] is None else format(r['compile_s_est'], '.1f')} |")
    if "train_us_per_sample" in r:
      line += f" {r['train_us_per_sample']:.0f} | {r['update_over_epoch']:.3f} |"
    print(line)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  meta = {"gap": args.gap, "users_per_item": args.users_per_item, "scorer": args.scorer,
          "repeats": args.repeats,
          "preset": args.preset, "batch_size": args.batch_size,
          "device": str(jax.devices()[0]), "platform": jax.devices()[0].platform,
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
