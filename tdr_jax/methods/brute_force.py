"""Brute-force baselines of the TDR paper (sec. 8.2): Item-CF, YouTubeDNN and DIN scoring every
item (`tdr_jax.baselines`). DIN is the tree methods' scorer trained on items; it shares their
warm start."""

from __future__ import annotations

import functools

from tdr_jax import baselines
from tdr_jax.config import Config
from tdr_jax.evaluation import result_row
from tdr_jax.methods.base import Context, Method
from tdr_jax.report import format_table


def run(name: str, ctx: Context, cfg: Config, workdir: str) -> dict:
  """Baseline `name` of `tdr_jax.baselines` as one results row."""
  options = {}
  warm = None
  if name == "din":  # the same scorer as TDR's, trained on items
    options = dict(windows=cfg.model.windows, embed_dim=cfg.model.embed_dim,
                   attention_hidden=cfg.model.attention_hidden,
                   mlp_hidden=cfg.model.mlp_hidden,
                   num_negatives=max(cfg.train.num_negatives, 1))
    if cfg.tree.warm_start:
      warm = ctx.warm_start()
      options["item_vectors"] = warm["vectors"]
  retrieved, seconds, settings = baselines.run_baseline(
      name, ctx.ds, ctx.ev, topk=max(cfg.eval.topk), seed=cfg.seed,
      history_len=cfg.data.history_len, epochs=cfg.train.epochs,
      batch_size=cfg.train.batch_size, max_train_samples=cfg.data.max_train_samples or 0,
      workdir=workdir, **options)
  if warm is not None:  # its warm start is part of its training cost
    seconds += warm["info"]["train_seconds"]
    settings["warm_start"] = warm["info"]
  row = result_row(baselines.LABELS[name], retrieved, ctx.ev, ctx.ds, cfg, ctx.eta,
                   train_seconds=seconds, settings=settings)
  print(format_table([row], cfg.eval.topk))
  return {"rows": [row]}


METHODS = {name: Method(label=baselines.LABELS[name], run=functools.partial(run, name),
                        warm_start=name == "din")
           for name in ("din", "youtube_dnn", "itemcf")}
