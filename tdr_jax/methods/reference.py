"""The rows every table shows for scale: the generator's oracle (synthetic data), popularity,
the category heuristic and a random retriever. `pop` and `heuristic` are also `--method` names.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import numpy as np

from tdr_jax.baselines import popularity as pop_lib
from tdr_jax.config import Config
from tdr_jax.evaluation import result_row
from tdr_jax.methods.base import Context, Method, run_samples

LABELS = {"pop": "popularity", "heuristic": "heuristic"}


def reference_method_row(name: str, ctx: Context, cfg: Config) -> dict:
  """The `popularity` or `heuristic` row (`name` a key of LABELS): non-learned rankers
  counting the training targets of the run's training samples."""
  ds, ev = ctx.ds, ctx.ev
  kmax = max(cfg.eval.topk)
  t0 = time.perf_counter()
  samples = run_samples(cfg, ds)
  counts = pop_lib.target_counts(ds, samples)
  settings = {"training_samples": int(len(samples)), "counts": "training-sample targets"}
  if name == "pop":
    retrieved = pop_lib.popularity(counts, len(ev.users), kmax)
  else:
    valid = ds.eval_split("valid", cfg.data.history_len)
    params, info = pop_lib.tune_heuristic(valid, counts, ds.item_category, k=cfg.eval.topk[0],
                                          num_items=ds.num_items)
    retrieved = pop_lib.heuristic(ev.history, counts, ds.item_category, params, kmax)
    settings.update(dataclasses.asdict(params), **info,
                    categories=int(len(np.unique(ds.item_category))))
  return result_row(LABELS[name], retrieved, ev, ds, cfg, ctx.eta,
                    train_seconds=time.perf_counter() - t0, settings=settings)


def reference_rows(ctx: Context, *, have: Sequence[str] = ()) -> list[dict]:
  """The oracle (synthetic only), popularity, the heuristic and a random retriever, for scale
  (those named in `have` are already in the table and skipped)."""
  cfg, ds, ev, eta = ctx.cfg, ctx.ds, ctx.ev, ctx.eta
  kmax = max(cfg.eval.topk)
  rows = []
  if eta is not None:
    oracle = np.argsort(-eta, axis=1, kind="stable")[:, :kmax]
    rows.append(result_row("oracle", oracle, ev, ds, cfg, eta, train_seconds=0.0,
                           settings={"what": "top-K of the generator's posterior predictive"}))
  for name, label in LABELS.items():
    if label not in have:
      rows.append(reference_method_row(name, ctx, cfg))
  rng = np.random.default_rng([cfg.seed, 99])
  rand = np.stack([rng.choice(ds.num_items, kmax, replace=False) for _ in range(len(ev.users))])
  rows.append(result_row("random", rand, ev, ds, cfg, eta, train_seconds=0.0,
                         settings={"what": "K items uniformly at random"}))
  return rows


def _run(name: str, ctx: Context, cfg: Config, workdir: str) -> dict:
  return {"rows": [reference_method_row(name, ctx, cfg)]}


METHODS = {name: Method(label=label, run=functools.partial(_run, name))
           for name, label in LABELS.items()}
