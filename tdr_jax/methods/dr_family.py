"""Deep Retrieval (Gao et al.): items on K^D discrete paths learned by EM with a structure
network, plus a softmax reranker (`tdr_jax.deep_retrieval`)."""

from __future__ import annotations

from tdr_jax import deep_retrieval
from tdr_jax.config import Config
from tdr_jax.evaluation import result_row
from tdr_jax.methods.base import Context, Method
from tdr_jax.report import format_table


def dr_settings(cfg: Config) -> tuple[str, deep_retrieval.DRConfig]:
  """The DRConfig of a run: `--dr_preset` (default: the dataset's paper preset for MovieLens
  and Amazon Books, `smoke` under the smoke preset, else `synthetic`) with the DR flags."""
  preset = cfg.dr.dr_preset
  if not preset:
    if cfg.preset == "smoke":
      preset = "smoke"
    elif cfg.data.dataset.startswith("movielens"):
      preset = "movielens"
    elif cfg.data.dataset == "amazon_books":
      preset = "amazon_books"
    else:
      preset = "synthetic"
  return preset, deep_retrieval.dr_config(preset, alpha=cfg.dr.dr_alpha,
                                          beam_size=cfg.dr.dr_beam_size,
                                          em_rounds=cfg.dr.dr_em_rounds)


def run(ctx: Context, cfg: Config, workdir: str) -> dict:
  """Deep Retrieval as one results row."""
  preset, dcfg = dr_settings(cfg)
  retrieved, seconds, settings = deep_retrieval.run_dr(
      ctx.ds, ctx.ev, dcfg, topk=max(cfg.eval.topk), seed=cfg.seed,
      history_len=cfg.data.history_len, batch_size=cfg.train.batch_size,
      max_train_samples=cfg.data.max_train_samples or 0, workdir=workdir,
      stop_after_step=cfg.train.stop_after_step or 0)
  settings["dr_preset"] = preset
  row = result_row("DR", retrieved, ctx.ev, ctx.ds, cfg, ctx.eta, train_seconds=seconds,
                   settings=settings)
  print(f"DR ({preset}): {settings['path_stats']}; candidates per user "
        f"{settings['candidates_per_user']}")
  print(format_table([row], cfg.eval.topk))
  return {"rows": [row]}


METHODS = {"dr": Method(label="DR", run=run)}
