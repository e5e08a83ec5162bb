"""Deep Retrieval (Gao et al.): items on K^D discrete paths learned by EM with a structure
network, plus a softmax reranker (`tdr_jax.deep_retrieval`)."""

from __future__ import annotations

from tdr_jax import deep_retrieval, warm_start
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
                                          em_rounds=cfg.dr.dr_em_rounds,
                                          init_paths=cfg.dr.dr_init_paths,
                                          epochs_per_estep=cfg.dr.dr_epochs_per_estep,
                                          first_estep_epochs=cfg.dr.dr_first_estep_epochs,
                                          rerank_esteps=cfg.dr.dr_rerank_esteps,
                                          prefix_bias=cfg.dr.dr_prefix_bias,
                                          prefix_bias_init=cfg.dr.dr_prefix_bias_init)


def run(ctx: Context, cfg: Config, workdir: str) -> dict:
  """Deep Retrieval as one results row."""
  preset, dcfg = dr_settings(cfg)
  # The kmeans initial paths cluster the run's shared warm-start vectors (trained/loaded once).
  vectors = ctx.warm_start()["vectors"] if dcfg.init_paths == "kmeans" else None
  if dcfg.init_paths == "kmeans" and vectors is None:  # no warm start in this run: svd vectors
    vectors, _ = warm_start.item_vectors(
        ctx.ds, warm_start.WarmStartConfig(model="svd", embed_dim=cfg.model.embed_dim),
        seed=cfg.seed, batch_size=cfg.train.batch_size, history_len=cfg.data.history_len,
        max_train_samples=cfg.data.max_train_samples, workdir=workdir)
  retrieved, seconds, settings = deep_retrieval.run_dr(
      ctx.ds, ctx.ev, dcfg, topk=max(cfg.eval.topk), seed=cfg.seed,
      history_len=cfg.data.history_len, batch_size=cfg.train.batch_size,
      max_train_samples=cfg.data.max_train_samples or 0, workdir=workdir,
      stop_after_step=cfg.train.stop_after_step or 0, item_vectors=vectors,
      ks=tuple(cfg.eval.topk))
  settings["dr_preset"] = preset
  row = result_row("DR", retrieved, ctx.ev, ctx.ds, cfg, ctx.eta, train_seconds=seconds,
                   settings=settings)
  print(f"DR ({preset}, {dcfg.init_paths} initial paths): {settings['path_stats']} "
        f"({settings['random_nonempty_paths']:.0f} non-empty expected at random); candidates "
        f"per user {settings['candidates_per_user']}; path-only (no reranker) "
        + ", ".join(f"{k} {v:.4f}" for k, v in settings["path_only"].items()
                    if k.startswith("f_measure")))
  print(format_table([row], cfg.eval.topk))
  return {"rows": [row]}


METHODS = {"dr": Method(label="DR", run=run)}
