"""Deep Retrieval: how much do the learned paths alone retrieve, and why (BUILD_NOTES, DR).

    python benchmarks/dr_path_diagnostics.py --workdir=/tmp/drdiag --data_dir=/tmp/data \
        init_paths=kmeans prefix_bias=True

Trains (or resumes) DR on the default preset's synthetic data with the `synthetic` DR preset
and the given `field=value` overrides of `deep_retrieval.DRConfig` (Python literals), then
prints the structure loss at the end of every E-step, what each M-step changed, and F@20 of
the test users three ways: exhaustive (every item ranked by log sum_j p(pi_j(v) | x) over all
K^D paths), beam path-only (the run row's `path_only`) and reranked (the row's F@20).
"""

from __future__ import annotations

import ast
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tdr_jax import deep_retrieval, experiment, metrics, warm_start  # noqa: E402
from tdr_jax.evaluation import evaluation_set  # noqa: E402
from tdr_jax.models import structure_net  # noqa: E402

flags.DEFINE_string("workdir", None, "DR checkpoints go here (a rerun resumes).", required=True)
flags.DEFINE_string("data_dir", "data/synthetic", "Synthetic data folder (created if missing).")
FLAGS = flags.FLAGS


def main(argv):
  overrides = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in argv[1:])}
  cfg = experiment.make_config("default", data_dir=FLAGS.data_dir, method="dr")
  ds, _ = experiment.load_data(cfg)
  ev = evaluation_set(cfg, ds)
  dcfg = deep_retrieval.dr_config("synthetic", **overrides)
  vectors = None
  if dcfg.init_paths == "kmeans":
    vectors, _ = warm_start.item_vectors(
        ds, warm_start.WarmStartConfig(model="svd", embed_dim=cfg.model.embed_dim),
        seed=cfg.seed, batch_size=cfg.train.batch_size, history_len=cfg.data.history_len,
        max_train_samples=cfg.data.max_train_samples,
        workdir=os.path.join(FLAGS.workdir, "warm_start"))
  t0 = time.time()
  model = deep_retrieval.fit(ds, dcfg, seed=cfg.seed, history_len=cfg.data.history_len,
                             batch_size=cfg.train.batch_size,
                             max_train_samples=cfg.data.max_train_samples,
                             workdir=FLAGS.workdir, item_vectors=vectors)
  losses = model.info["losses"]
  ends = np.cumsum(model.info["steps_per_estep"])
  print(f"overrides {overrides}: {model.info['steps']} steps, {time.time() - t0:.1f} s")
  if len(losses) == model.info["steps"]:
    print("structure loss at the end of each E-step:",
          [round(float(losses[e - 1, 1]), 3) for e in ends])
  for m in model.info["msteps_run"]:
    print(f"  M-step: {m['changed_paths']:.3f} of the path slots changed, "
          f"{m['nonempty_paths']} non-empty paths, largest {m['max_path_size']}")
  net, pid = model.module(), model.path_ids()

  @jax.jit
  def path_logp(h):
    return structure_net.all_path_log_probs(net, structure_net.encode_users(net, h))

  def f20(items):
    return metrics.retrieval_metrics(np.asarray(items, np.int32), ev.label_offsets,
                                     ev.label_items, num_items=ds.num_items,
                                     ks=(20,))["f_measure@20"]

  history = ev.history.astype(np.int32)
  top = []
  for i in range(0, len(history), 50):
    lp = np.asarray(path_logp(jnp.asarray(history[i:i + 50])))[:, pid]  # [b, N, J]
    top.append(np.argsort(-np.logaddexp.reduce(lp, axis=2), axis=1, kind="stable")[:, :20])
  print(f"F@20 exhaustive {f20(np.concatenate(top)):.4f}, beam path-only "
        f"{f20(deep_retrieval.retrieve(model, history, topk=20, use_reranker=False)[0]):.4f}"
        + (f", reranked {f20(deep_retrieval.retrieve(model, history, topk=20)[0]):.4f}"
           if dcfg.reranker else ""))
  print("paths:", deep_retrieval.path_statistics(
      pid, num_structure_paths=dcfg.num_structure_paths))


if __name__ == "__main__":
  app.run(main)
