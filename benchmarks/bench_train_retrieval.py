"""Training and retrieval throughput of TDR with the DIN scorer, in one run on the current device.

Measures, on a random tree over `--num_items` items (default 2^17) with the paper's model
settings (sec. 8.4: 69-item history in 10 windows, D=24, activation unit 36, MLP [128, 64],
70 negatives per level, beam 150):

  (a) train-step samples/s and scored (user, node) pairs/s with uniform and top-down sampling;
  (b) train-step time divided by the time of a plain jitted scorer forward over the same pairs;
  (c) beam-search queries/s vs brute-force queries/s with the same model, and the recall@K of
      beam search relative to brute force (the overlap of the two top-K lists).

Writes JSON (`--out`) and prints a table. Not a test: figures go to BUILD_NOTES.md.

  python benchmarks/bench_train_retrieval.py                 # paper settings, 2^17 items
  python benchmarks/bench_train_retrieval.py --preset=default --num_items=5000
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

from tdr_jax import beam_search as bs  # noqa: E402
from tdr_jax import evaluation, experiment, methods, parallel, sampling, train  # noqa: E402
from tdr_jax.methods import tree_family  # noqa: E402
from tdr_jax import tree as tree_lib  # noqa: E402


def timed(fn, *args, repeats: int, min_seconds: float = 0.0):
  """Seconds per call after one warm-up (compile) call; returns (seconds, last output).

  Runs `repeats` calls, then more rounds of `repeats` until `min_seconds` have passed (fast
  devices: enough calls for a stable mean)."""
  out = fn(*args)
  jax.block_until_ready(out)
  calls = 0
  t = time.perf_counter()
  while True:
    for _ in range(repeats):
      out = fn(*args)
    calls += repeats
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t
    if elapsed >= min_seconds:
      return elapsed / calls, out


def setup(preset: str = "paper", num_items: int = 2 ** 17, batch_size: int | None = None,
          beam_size: int = 150, seed: int = 0) -> dict:
  """The benchmark's fixture: the preset's config, a random tree over `num_items` items, a fresh
  scorer, one random batch, the level index, the optimizer and the pair counts. Returns a dict
  (`ctx`) for `train_step_seconds`, `forward_seconds` and `beam_vs_brute`; `ctx["res"]` holds
  the settings (the JSON header)."""
  over = {"batch_size": batch_size} if batch_size else {}
  cfg = experiment.make_config(preset, beam_size=beam_size, **over)
  rng = np.random.default_rng(seed)
  tree = tree_lib.build_random(rng, num_items, branching=cfg.tree.branching)
  score_fn, params = tree_family.build_model(cfg, tree)
  bsz, L, m = cfg.train.batch_size, cfg.data.history_len, cfg.train.num_negatives
  hist = rng.integers(0, num_items, (bsz, L)).astype(np.int32)
  hist[: bsz // 4, : L // 2] = -1  # some short histories
  batch = train.Batch(jnp.asarray(hist), jnp.asarray(rng.integers(0, num_items, bsz),
                                                    jnp.int32),
                      jnp.ones((bsz, tree.height), jnp.float32), jnp.ones(bsz, bool))
  full = train.num_full_levels(train.StepConfig(full_softmax_nodes=cfg.train.full_softmax_nodes),
                               branching=tree.branching, height=tree.height)
  full_nodes = sum(tree.branching ** j for j in range(1, full + 1))
  sampled_levels = tree.height - full
  loss_pairs = full_nodes + sampled_levels * (m + 1)  # scored pairs per sample in the loss
  top_down_pairs = full_nodes + sampled_levels * m * tree.branching  # sampler's forward pairs
  res = {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
         "platform": platform.platform(),
         "jax": jax.__version__, "preset": preset, "num_items": num_items,
         "height": tree.height, "batch_size": bsz, "history_len": L, "num_negatives": m,
         "full_softmax_levels": full, "loss_pairs_per_sample": loss_pairs}
  return {"cfg": cfg, "rng": rng, "tree": tree, "score_fn": score_fn, "params": params,
          "batch": batch, "index": sampling.level_index(tree), "opt": train.make_optimizer(),
          "key": jax.random.key(0), "full": full, "sampled_levels": sampled_levels,
          "loss_pairs": loss_pairs, "top_down_pairs": top_down_pairs, "res": res}


def train_step(ctx: dict, sampler: str):
  """The fixture's train step with `sampler` as `(fn(state) -> (state, metrics), state)`
  (not jitted)."""
  cfg, tree = ctx["cfg"], ctx["tree"]
  step = train.make_train_step(
      ctx["score_fn"], ctx["opt"],
      train.StepConfig(sampler=sampler, num_negatives=cfg.train.num_negatives,
                       full_softmax_nodes=cfg.train.full_softmax_nodes),
      branching=tree.branching, height=tree.height)
  return (lambda s: step(s, ctx["batch"], tree, ctx["index"], ctx["key"]),
          train.init_state(ctx["params"], ctx["opt"]))


def train_step_seconds(ctx: dict, sampler: str, repeats: int, min_seconds: float = 0.0) -> dict:
  """(a) Seconds per jitted train step with `sampler` ("uniform" or "top_down") after a compile
  step: {"step_seconds_<s>", "samples_per_s_<s>", "pairs_per_s_<s>"}."""
  bsz = ctx["cfg"].train.batch_size
  fn, state = train_step(ctx, sampler)
  sec, _ = timed(jax.jit(fn), state, repeats=repeats, min_seconds=min_seconds)
  pairs = ctx["loss_pairs"] + (ctx["top_down_pairs"] if sampler == "top_down" else 0)
  return {f"step_seconds_{sampler}": sec, f"samples_per_s_{sampler}": bsz / sec,
          f"pairs_per_s_{sampler}": bsz * pairs / sec}


def loss_pairs_forward(ctx: dict):
  """The scorer forward over the loss's pairs of one batch as `(fn(params, history, neg),
  args)` (not jitted; uniform negatives drawn here, outside any timing)."""
  tree, score_fn, params, batch = ctx["tree"], ctx["score_fn"], ctx["params"], ctx["batch"]
  full, sampled_levels = ctx["full"], ctx["sampled_levels"]
  bsz, m = ctx["cfg"].train.batch_size, ctx["cfg"].train.num_negatives
  levels = jnp.arange(full + 1, tree.height + 1, dtype=jnp.int32)
  paths = jnp.asarray(tree.item_paths)[batch.target]
  neg, _, _ = jax.vmap(lambda k, p: sampling.uniform_negatives(k, p, levels, ctx["index"],
                                                               num_samples=m))(
      jax.random.split(ctx["key"], bsz), paths[:, full + 1:])

  def forward(params, history, neg):
    out = []
    for j in range(1, full + 1):
      first = (tree.branching ** j - 1) // (tree.branching - 1)
      ids = jnp.broadcast_to(jnp.arange(first, first + tree.branching ** j, dtype=jnp.int32),
                             (bsz, tree.branching ** j))
      out.append(score_fn(params, tree, history, ids, level=j).sum())
    for i in range(sampled_levels):
      ids = jnp.concatenate([paths[:, full + 1 + i:full + 2 + i], neg[:, i]], axis=1)
      out.append(score_fn(params, tree, history, ids, level=full + 1 + i).sum())
    return sum(out)

  return forward, (params, batch.history, neg)


def forward_seconds(ctx: dict, repeats: int, min_seconds: float = 0.0) -> float:
  """(b) Seconds of a plain jitted scorer forward over the loss's pairs of one batch."""
  forward, args = loss_pairs_forward(ctx)
  sec, _ = timed(jax.jit(forward), *args, repeats=repeats, min_seconds=min_seconds)
  return sec


def beam_vs_brute(ctx: dict, *, beam_queries: int, brute_queries: int, topk, repeats: int,
                  beam_size: int = 150) -> dict:
  """(c) Beam-search queries/s (`beam_queries` users per call) vs brute-force queries/s with
  the same (randomly initialised) model, and the overlap of their top-K lists."""
  tree, score_fn, params, rng = ctx["tree"], ctx["score_fn"], ctx["params"], ctx["rng"]
  num_items, L = tree.num_items, ctx["cfg"].data.history_len
  ks = list(topk)
  kmax = max(ks)
  res = {}
  q_hist = jnp.asarray(rng.integers(0, num_items, (beam_queries, L)).astype(np.int32))
  beam_fn = lambda h: bs.beam_search(score_fn, params, tree, h, beam_size=beam_size, topk=kmax)  # noqa
  beam_sec, (beam_items, _) = timed(beam_fn, q_hist, repeats=repeats)
  bq = q_hist[:brute_queries]
  bf_fn = lambda h: bs.brute_force(score_fn, params, tree, h, topk=kmax, chunk_size=8192)  # noqa
  bf_sec, (bf_items, _) = timed(bf_fn, bq, repeats=1)
  res["beam_queries_per_s"] = beam_queries / beam_sec
  res["brute_force_queries_per_s"] = brute_queries / bf_sec
  res["beam_speedup"] = res["beam_queries_per_s"] / res["brute_force_queries_per_s"]
  beam_items = np.asarray(beam_items)[:brute_queries]
  bf_items = np.asarray(bf_items)
  for k in ks:
    overlap = [len(set(beam_items[i, :k]) & set(bf_items[i, :k])) / k
               for i in range(brute_queries)]
    res[f"beam_recall_vs_brute@{k}"] = float(np.mean(overlap))
  res["note_c"] = ("(c) uses a randomly initialised model: speed does not depend on the weights; "
                   "the overlap with brute force of an untrained scorer is not meaningful, see (d)")
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="paper")
  ap.add_argument("--num_items", type=int, default=2 ** 17)
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--beam_queries", type=int, default=256)
  ap.add_argument("--brute_queries", type=int, default=16)
  ap.add_argument("--topk", default="20,60,150")
  ap.add_argument("--out", default="benchmarks/results/train_retrieval.json")
  ap.add_argument("--recall_train_samples", type=int, default=100_000,
                  help="(d): train the default preset on this many synthetic samples, then "
                  "compare beam search and brute-force recall on the test users (0 = skip)")
  ap.add_argument("--data_dir", default="data/synthetic")
  args = ap.parse_args()

  ctx = setup(args.preset, args.num_items, args.batch_size)
  res = ctx["res"]

  # (a) train steps.
  for sampler in ("uniform", "top_down"):
    res.update(train_step_seconds(ctx, sampler, args.repeats))
    sec = res[f"step_seconds_{sampler}"]
    print(f"{sampler}: {sec:.3f} s/step, {res[f'samples_per_s_{sampler}']:.0f} samples/s",
          flush=True)

  # (b) a plain forward over the loss's pairs (uniform negatives drawn outside the timing).
  fwd_sec = forward_seconds(ctx, args.repeats)
  res["forward_seconds"] = fwd_sec
  res["step_over_forward_uniform"] = res["step_seconds_uniform"] / fwd_sec
  res["step_over_forward_top_down"] = res["step_seconds_top_down"] / fwd_sec
  res["top_down_over_uniform_step"] = res["step_seconds_top_down"] / res["step_seconds_uniform"]

  # (c) beam search vs brute force with the same (randomly initialised) model.
  res.update(beam_vs_brute(ctx, beam_queries=args.beam_queries,
                           brute_queries=args.brute_queries,
                           topk=[int(k) for k in args.topk.split(",")], repeats=args.repeats))

  # (d) recall of beam search vs brute force for a TRAINED model on the synthetic default.
  if args.recall_train_samples:
    import tempfile
    from tdr_jax.metrics import retrieval_metrics
    rcfg = experiment.make_config("default", data_dir=args.data_dir,
                                  max_train_samples=args.recall_train_samples)
    ds, _ = experiment.load_data(rcfg)
    rtree = tree_lib.build_from_categories(np.random.default_rng([rcfg.seed, 3]),
                                           ds.item_category, branching=rcfg.tree.branching)
    rscore, rparams = tree_family.build_model(rcfg, rtree)
    mesh = parallel.make_mesh()
    with tempfile.TemporaryDirectory() as wd:
      rparams, _, _ = tree_family.train_round(rcfg, ds, methods.run_samples(rcfg, ds), rtree,
                                              rscore, rparams, wd, corpus_fp="bench", mesh=mesh)
    ev = experiment.evaluation_set(rcfg, ds)
    beam_k = 150
    t = time.perf_counter()
    b_items = evaluation.retrieve(rscore, rparams, rtree, ev.history, beam_size=beam_k,
                                  topk=max(rcfg.eval.topk), batch_size=256, mesh=mesh)
    beam_t = time.perf_counter() - t
    bf = []
    t = time.perf_counter()
    for lo in range(0, len(ev.history), 128):
      h = jnp.asarray(ev.history[lo:lo + 128])
      bf.append(np.asarray(bs.brute_force(rscore, rparams, rtree, h, topk=max(rcfg.eval.topk))[0]))
    bf_t = time.perf_counter() - t
    bf = np.concatenate(bf)
    mb = retrieval_metrics(b_items, ev.label_offsets, ev.label_items, num_items=ds.num_items,
                           ks=rcfg.eval.topk)
    mf = retrieval_metrics(bf, ev.label_offsets, ev.label_items, num_items=ds.num_items,
                           ks=rcfg.eval.topk)
    res["trained_num_items"] = int(ds.num_items)
    res["trained_train_samples"] = int(args.recall_train_samples)
    res["trained_beam_seconds"] = beam_t
    res["trained_brute_seconds"] = bf_t
    for k in rcfg.eval.topk:
      res[f"trained_beam_recall@{k}"] = mb[f"recall@{k}"]
      res[f"trained_brute_recall@{k}"] = mf[f"recall@{k}"]
      res[f"trained_beam_over_brute_recall@{k}"] = mb[f"recall@{k}"] / mf[f"recall@{k}"]

  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
  print("\n| measure | value |\n|---|---|")
  for k, v in res.items():
    print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
  main()
