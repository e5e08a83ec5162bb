"""How much room a synthetic world leaves between the reference rows and the Bayes optimum.

  python benchmarks/headroom.py                        # world v2 (the default)
  python benchmarks/headroom.py --synthetic_world=v1   # the earlier default

Rows (test users of the default preset, same training subset and visible history as the
learned methods): the oracle (top K of the exact posterior predictive), the oracle given an
empty history (the generator's own popularity), `popularity` and `heuristic` (the reference
rows of every table), Item-CF, and beam search whose node scores are the *exact* expected
labels of each user: plain labels (a node's score = the summed eta of its subtree) or
rectified labels (the max eta of its subtree, TDR Eq. 15), at several beams, on the tree of
published categories and on a random tree. Rectified labels make the tree a max-heap, so their
beam search returns the oracle's top K whenever beam >= K; how far plain labels fall below
them is what label rectification can win on the world. Writes a JSON file and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tdr_jax import beam_search as bs  # noqa: E402
from tdr_jax import experiment  # noqa: E402
from tdr_jax import methods
from tdr_jax import evaluation
from tdr_jax import tree as tree_lib  # noqa: E402
from tdr_jax.baselines import itemcf  # noqa: E402
from tdr_jax.baselines import popularity as pop_lib  # noqa: E402

flags.DEFINE_string("synthetic_world", "v2", "Generator (tdr_jax.data.synthetic.WORLDS).")
flags.DEFINE_bool("synthetic_categories", True, "Publish a category column.")
flags.DEFINE_integer("synthetic_users", None, "Users (default: the preset's).")
flags.DEFINE_integer("synthetic_items", None, "Items (default: the preset's).")
flags.DEFINE_list("beams", ["20", "60", "150"], "Beam sizes of the exact-label beam searches.")
flags.DEFINE_string("data_dir", "data/synthetic", "Where the synthetic csv is written.")
flags.DEFINE_string("out", None, "JSON output (default benchmarks/results/headroom-<world>.json).")
FLAGS = flags.FLAGS


def _table_score(params, tree, history, nodes, level=None):
  """Scorer reading params[user, node]; the user's row index is history[:, -1]."""
  del tree, level
  return params[history[:, -1][:, None], nodes]


def exact_label_tables(tree: tree_lib.Tree, eta: np.ndarray, how: str) -> np.ndarray:
  """float32[U, num_nodes]: expected plain ('sum') or rectified ('max') label of every node."""
  table = np.zeros((eta.shape[0], tree.num_nodes), np.float32)
  table[:, np.asarray(tree.item_paths)[:, tree.height]] = eta
  children = np.asarray(tree.children)
  offsets = np.asarray(tree.level_offsets)
  reduce = np.sum if how == "sum" else np.max
  for lvl in range(tree.height - 1, -1, -1):
    ids = np.arange(offsets[lvl], offsets[lvl + 1])
    table[:, ids] = reduce(table[:, children[ids]], axis=-1)
  return table


def exact_label_beam(tree: tree_lib.Tree, eta: np.ndarray, how: str, *, beam: int, topk: int,
                     users_per_call: int = 200) -> np.ndarray:
  """int32[U, topk]: beam search over the exact expected labels of each user."""
  out = []
  for lo in range(0, eta.shape[0], users_per_call):
    table = exact_label_tables(tree, eta[lo:lo + users_per_call], how)
    rows = np.arange(table.shape[0], dtype=np.int32)[:, None]
    items, _ = bs.beam_search(_table_score, jnp.asarray(table), tree, jnp.asarray(rows),
                              beam_size=beam, topk=topk)
    out.append(np.asarray(items))
  return np.concatenate(out)


def main(argv):
  del argv
  cfg = experiment.make_config("default", synthetic_world=FLAGS.synthetic_world,
                               synthetic_categories=FLAGS.synthetic_categories,
                               synthetic_users=FLAGS.synthetic_users,
                               synthetic_items=FLAGS.synthetic_items, data_dir=FLAGS.data_dir)
  t0 = time.perf_counter()
  ds, world = experiment.load_data(cfg)
  ev = experiment.evaluation_set(cfg, ds)
  eta = evaluation.synthetic_eta(world, ds, ev)
  print(f"world {cfg.data.synthetic_world}: {ds.num_users} users, {ds.num_items} items, "
        f"{len(ev.users)} test users; eta in {time.perf_counter() - t0:.1f}s")
  kmax = max(cfg.eval.topk)
  rows = []

  def add(name, retrieved, **extra):
    row = evaluation.result_row(name, retrieved, ev, ds, cfg, eta, train_seconds=0.0,
                                settings=extra)
    rows.append(row)

  add("oracle", np.argsort(-eta, axis=1, kind="stable")[:, :kmax])
  gen_ids = np.asarray([int(x) for x in ds.item_raw_ids])
  prior = world.prior_item_probs()[gen_ids]
  add("oracle (empty history)", np.tile(np.argsort(-prior, kind="stable")[:kmax],
                                        (len(ev.users), 1)))
  samples = methods.run_samples(cfg, ds)
  counts = pop_lib.target_counts(ds, samples)
  add("popularity", pop_lib.popularity(counts, len(ev.users), kmax))
  valid = ds.eval_split("valid", cfg.data.history_len)
  params, info = pop_lib.tune_heuristic(valid, counts, ds.item_category, k=cfg.eval.topk[0],
                                        num_items=ds.num_items)
  add("heuristic", pop_lib.heuristic(ev.history, counts, ds.item_category, params, kmax),
      params=dataclasses.asdict(params), **info)
  model = itemcf.fit(ds, samples=samples)
  add("Item-CF", itemcf.retrieve(model, ev, topk=kmax, history="window"))
  trees = {"category tree": tree_lib.build_from_categories(
               np.random.default_rng([cfg.seed, 3]), ds.item_category, branching=cfg.tree.branching),
           "random tree": tree_lib.build_random(np.random.default_rng([cfg.seed, 5]),
                                                ds.num_items, branching=cfg.tree.branching)}
  for tname, tree in trees.items():
    for beam in (int(b) for b in FLAGS.beams):
      for how, label in (("sum", "plain"), ("max", "rectified")):
        # A beam of k returns at most k items: the columns past k are -1 (metrics@K > k
        # of these rows are not comparable; read them at K <= beam).
        got = np.full((len(ev.users), kmax), -1, np.int32)
        got[:, :min(beam, kmax)] = exact_label_beam(tree, eta, how, beam=beam,
                                                    topk=min(beam, kmax))
        add(f"{label} labels, beam {beam}, {tname}", got)
  k0 = cfg.eval.topk[0]
  f_or = rows[0][f"f_measure@{k0}"]
  lines = [f"| row | F@{k0} | x oracle | oracle ratio@{k0} |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r[f'f_measure@{k0}']:.4f} | "
                 f"{r[f'f_measure@{k0}'] / f_or:.2f} | {r[f'oracle_ratio@{k0}']:.3f} |")
  print("\n".join(lines))
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"headroom-{cfg.data.synthetic_world}"
                                  f"{'' if cfg.data.synthetic_categories else '-nocat'}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"world": cfg.data.synthetic_world, "categories": cfg.data.synthetic_categories,
               "test_users": int(len(ev.users)), "rows": rows}, f, indent=1, default=str)
  print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  app.run(main)
