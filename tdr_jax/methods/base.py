"""What every method family shares: the `Method` record of the registry, the run `Context`
(dataset, test users, mesh, the warm start shared by the methods of one table) and data loading.

A family module (e.g. `tree_family.py`) defines `METHODS: dict[str, Method]`; the registry
(`tdr_jax.methods.METHODS`) merges the families' dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from jax.sharding import Mesh

from tdr_jax import warm_start
from tdr_jax.config import Config
from tdr_jax.data import batches, datasets, synthetic
from tdr_jax.data.preprocess import EvalSet


@dataclasses.dataclass(frozen=True)
class Method:
  """One `--method` name.

  label: the row label, or a function of the config (TDR's label names its sampler).
  run: `run(ctx, cfg, workdir) -> dict` with "rows" (results rows, see
    `evaluation.result_row`) and optionally "estimator_rows" and "rounds"/"forest_curve"/
    "true_cat"/"label" (tree methods: reported per round) and "score_fn"/"models" (tree
    methods: the scorer and every round's (tree, params), to evaluate them again).
  settings: config fields (flat names) this method sets over the run's config.
  warm_start: whether it uses the shared warm-start item vectors (`Context.warm`).
  """
  label: str | Callable[[Config], str]
  run: Callable[["Context", Config, str], dict]
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  warm_start: bool = False

  def label_for(self, cfg: Config) -> str:
    return self.label(cfg) if callable(self.label) else self.label


@dataclasses.dataclass
class Context:
  """What the methods of one run share."""
  cfg: Config
  ds: Any  # tdr_jax.data.Dataset
  world: Any  # the synthetic world (exact eta) or None
  ev: EvalSet  # the test users
  eta: np.ndarray | None  # float[U, N] exact eta of the test users (synthetic only)
  mesh: Mesh
  workdir: str
  warm: dict | None = None  # warm_start_setup's output, once a method asked for it

  def warm_start(self) -> dict:
    if self.warm is None:
      self.warm = warm_start_setup(self.cfg, self.ds, self.workdir)
    return self.warm


def run_samples(cfg: Config, ds) -> np.ndarray:
  """The run's training samples (every trained method of a run uses the same)."""
  return batches.training_samples(ds, max_train_samples=cfg.data.max_train_samples or 0,
                                  seed=cfg.seed)


def load_data(cfg: Config):
  """Returns (dataset, synthetic world or None)."""
  if cfg.data.dataset == "synthetic":
    scfg = synthetic.world_config(cfg.data.synthetic_world, num_users=cfg.data.synthetic_users,
                                  num_items=cfg.data.synthetic_items, seed=cfg.seed,
                                  categories=cfg.data.synthetic_categories)
    folder, world = synthetic.materialize(cfg.data.data_dir, scfg)
    ds = datasets.load_dataset("csv", folder, min_user_interactions=cfg.data.min_user_interactions,
                               seed=cfg.seed)
    return ds, world
  ds = datasets.load_dataset(cfg.data.dataset, cfg.data.data_dir,
                             min_user_interactions=cfg.data.min_user_interactions, seed=cfg.seed,
                             skip_bad_rows=cfg.data.skip_bad_rows, **dict(cfg.data.loader_options))
  return ds, None


def resolve_initial_tree(cfg: Config, ds) -> tuple[str, str]:
  """(category | kmeans | random, why) for `cfg.tree.initial_tree` on this dataset."""
  if cfg.tree.initial_tree != "auto":
    return cfg.tree.initial_tree, f"--initial_tree={cfg.tree.initial_tree}"
  ok, info = warm_start.informative_categories(ds, run_samples(cfg, ds),
                                               history_len=cfg.data.history_len)
  return ("category" if ok else "kmeans"), "auto: " + info["reason"]


def warm_start_setup(cfg: Config, ds, workdir: str) -> dict:
  """The initial tree's kind (and why) and, when the warm start or a k-means tree needs them,
  the warm-start item vectors (trained once, checkpointed under workdir/warm_start)."""
  kind, why = resolve_initial_tree(cfg, ds)
  vectors, info = None, None
  if cfg.tree.warm_start or kind == "kmeans":
    vectors, info = warm_start.item_vectors(
        ds, warm_start.WarmStartConfig(model=cfg.tree.warm_start_model,
                                       epochs=cfg.tree.warm_start_epochs,
                                       embed_dim=cfg.model.embed_dim), seed=cfg.seed,
        batch_size=cfg.train.batch_size, history_len=cfg.data.history_len,
        max_train_samples=cfg.data.max_train_samples, workdir=workdir)
    print(f"warm start: {info['model']}, {info['train_seconds']:.1f}s")
  print(f"initial tree: {kind} ({why})")
  return {"initial_tree": kind, "why": why, "vectors": vectors, "info": info}

