"""Train-and-evaluate driver behind `experiments/run.py`.

`train_and_evaluate(config, workdir)` loads the dataset, runs every method named by
`config.method` (the registry `tdr_jax.methods.METHODS`), adds the reference rows (oracle on
synthetic data, popularity, heuristic, random), flags rows within a few percent of popularity
and writes `config.json`, `results.json`, `results.md` and the plots to the workdir. Each
method checkpoints under its workdir; rerunning with the same workdir resumes and ends with the
same metrics as an uninterrupted run.

With several processes (multi-host data parallel) every process runs all of this on the global
mesh and computes the same results; the writer (process 0) loads the data first (filling the
cache the others read) and alone writes the config, vocabulary, results and plots.
"""

from __future__ import annotations

import json
import os

from tdr_jax import parallel, report, serving
from tdr_jax.config import Config, make_config
from tdr_jax.data import datasets
from tdr_jax.evaluation import evaluation_set, synthetic_eta
from tdr_jax.methods import METHODS, Context, load_data, parse_methods, reference
from tdr_jax.training import SimulatedCrash

__all__ = ["Config", "SimulatedCrash", "evaluation_set", "load_data", "make_config",
           "make_context", "parse_methods", "train_and_evaluate"]


def make_context(cfg: Config, workdir: str) -> Context:
  """Loads the dataset (printing its summary), checks it is usable and builds what the methods
  of a run share: the test users, their exact eta on synthetic data, the device mesh. The
  warm start, when a method asks for it, is kept under `workdir`."""
  ds, world = parallel.writer_first(lambda: load_data(cfg), "tdr_jax load_data")
  print(datasets.describe(ds, cfg.data.dataset))
  datasets.check_usable(ds)
  ev = evaluation_set(cfg, ds)
  eta = synthetic_eta(world, ds, ev) if world is not None else None
  return Context(cfg=cfg, ds=ds, world=world, ev=ev, eta=eta, mesh=parallel.make_mesh(),
                 workdir=workdir)


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Runs every method of `config.method` on one dataset; writes and returns the results.

  `config.method` is one name or a comma-separated list (or `all`) of `tdr_jax.methods`
  names. With one method its outputs go to `workdir` itself, else to `workdir/<method>/`; the
  combined table goes to workdir/results.{json,md}.
  """
  cfg = config
  names = parse_methods(cfg.method)
  os.makedirs(workdir, exist_ok=True)
  if parallel.is_writer():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_json(), f, indent=1)
  ctx = make_context(cfg, workdir)
  if parallel.is_writer():  # raw item ids, for tdr_jax.serving.Retriever
    serving.write_vocabulary(workdir, ctx.ds)
  if any(METHODS[n].warm_start for n in names):
    ctx.warm_start()  # one warm start (and initial-tree choice) shared by the whole table
  rows, estimator_rows, per_method = [], [], {}
  for name in names:
    method = METHODS[name]
    out = method.run(ctx, cfg.replace(**method.settings),
                     workdir if len(names) == 1 else os.path.join(workdir, name))
    rows += out["rows"]
    if not estimator_rows:
      estimator_rows = out.get("estimator_rows", [])
    if "rounds" in out:
      per_method[out["label"]] = out
  rows += estimator_rows + reference.reference_rows(ctx, have=[r["method"] for r in rows])
  k0 = cfg.eval.topk[0]
  warnings = report.flag_near_popularity(rows, k0)
  popularity = [r for r in rows if r["method"] == "popularity"]
  for out in per_method.values():
    for row in out["rounds"]:
      row.setdefault("train_seconds", 0.0)
    report.flag_near_popularity(out["rounds"] + popularity, k0)
  return report.write_results(cfg, workdir, rows=rows, warnings=warnings,
                              per_method=per_method, data_summary=datasets.summary(ctx.ds),
                              num_users=len(ctx.ev.users))
