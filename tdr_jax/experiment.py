"""Train-and-evaluate driver behind `experiments/run.py`.

`train_and_evaluate(config, workdir)` loads the dataset, builds the initial tree from item
categories, trains the DIN scorer over the tree with per-level (sampled) softmax, retrieves for
the test users by beam search and writes `config.json`, `results.json` and `results.md` to the
workdir. Training checkpoints (Orbax) go to `workdir/checkpoints`; rerunning with the same
workdir resumes from the latest one and ends with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tdr_jax import beam_search as bs
from tdr_jax import metrics as metrics_lib
from tdr_jax import forest as forest_lib
from tdr_jax import sampling, train, tree_learning
from tdr_jax import tree as tree_lib
from tdr_jax.data import datasets, synthetic
from tdr_jax.data.preprocess import corpus_fingerprint, eval_split, train_batch
from tdr_jax.data.preprocess import training_samples as _training_samples
from tdr_jax.errors import InputError
from tdr_jax.models import din as din_lib

log = logging.getLogger("tdr_jax")

PAPER_WINDOWS = (1, 1, 1, 2, 2, 2, 10, 10, 20, 20)


class SimulatedCrash(RuntimeError):
  """Raised by `Config.stop_after_step` to test resumption from checkpoints."""


@dataclasses.dataclass
class Config:
  """Every setting of a run. Presets fill these; flags override single fields."""
  preset: str = "default"
  dataset: str = "synthetic"
  data_dir: str = "data"
  method: str = "tdr"
  sampler: str = "top_down"
  num_negatives: int = 70
  beam_size: int = 150
  topk: tuple[int, ...] = (20, 40, 60)
  branching: int = 2
  epochs: float = 1.0
  batch_size: int = 256
  history_len: int = 69
  windows: tuple[int, ...] = PAPER_WINDOWS
  embed_dim: int = 24
  attention_hidden: tuple[int, ...] = (36,)
  mlp_hidden: tuple[int, ...] = (128, 64)
  hierarchical: bool = True
  full_softmax_nodes: int = 128
  learning_rate: float = 1e-3
  decay_rate: float = 0.9  # learning rate multiplied by this once per epoch
  seed: int = 0
  min_user_interactions: int = 15
  max_train_samples: int = 0  # 0 = all; else a seeded subset of the training samples
  eval_batch_size: int = 256
  max_eval_users: int = 0  # 0 = all test users
  checkpoint_every: int = 500  # steps
  log_every: int = 50  # steps between host syncs (loss checks, progress)
  stop_after_step: int = 0  # testing: SimulatedCrash after this global step, all rounds (0 = off)
  tree_rounds: int = 1  # trees learned in turn with the model (JTM Algorithm 1); 1 = no learning
  tree_learning: str = "tdr"  # "tdr" (Eq. 24), "jtm" (binary log-likelihood), "tdm" (k-means)
  # or "none" (keep the initial tree: the control for what tree learning adds over rounds)
  tree_gap: int = 7  # layer gap d
  tree_users_per_item: int = 20  # cap on A_i per item (seeded subsample)
  tree_assignment: str = "priced"  # "greedy" (paper's rule on Eq. 24) or "priced" (same rule
  # on Eq. 24 minus the capacities' Sinkhorn prices; see tree_learning.capacity_prices)
  forest: bool = True  # also retrieve with the forest of every round's (tree, model)
  rectify: bool = False  # TDR(T-RL): label weights of Eq. 15 from a SASRec estimator
  loss: str = "softmax"  # "softmax" (TDR), "bce" (TDM/JTM: binary loss, uniform negatives),
  # "otm" (binary loss on beam-search nodes with pseudo targets) or "plt" (per-node binary
  # classifiers on the positive paths and their siblings; path-product beam search)
  binary_negatives: int = 6  # negatives per level of TDM/JTM (paper sec. 8.4: 3-6)
  otm_beam_size: int = 20  # OTM: beam of the no-gradient search that picks training nodes
  sasrec_epochs: float = 1.0
  sasrec_dim: int = 64
  dr_preset: str = ""  # Deep Retrieval settings (tdr_jax.dr.PRESETS); "" = by dataset/preset
  dr_alpha: float = -1.0  # DR path-size penalty; < 0 = the DR preset's
  dr_beam_size: int = 0  # DR paths kept by the inference beam; 0 = the DR preset's
  dr_em_rounds: int = -1  # DR M-steps; < 0 = the DR preset's
  synthetic_users: int = 8000
  synthetic_items: int = 5000
  synthetic_world: str = "v2"  # generator version (data.synthetic.WORLDS); v1 = the old default
  synthetic_categories: bool = True  # False: the csv has no category column
  warm_start: bool = True  # node embeddings (tree methods, DIN) from warm-start item vectors
  warm_start_model: str = "svd"  # svd (of the user-item matrix) or two_tower (YouTubeDNN)
  warm_start_epochs: float = 3.0  # epochs of the warm-start two-tower model
  initial_tree: str = "auto"  # auto, category, kmeans (over warm-start vectors) or random
  loader_options: tuple = ()  # sorted ((key, value), ...) of the loader (typed by parse_options)
  skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping

  def fingerprint(self) -> str:
    """Hash of the settings that determine the trained model (not eval or run length)."""
    skip = {"epochs", "beam_size", "topk", "eval_batch_size", "max_eval_users",
            "checkpoint_every", "log_every", "data_dir", "preset", "stop_after_step"}
    d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


# Presets: `paper` = TDR sec. 8.4 (category tree, no warm start); `default` = what `make run`
# finishes in < 10 min on a 2-core CPU (one tree: at this budget three learned trees end below
# the unchanged initial tree, see BUILD_NOTES.md; `--tree_rounds=3 --epochs=0.35` runs the
# joint-learning loop in about the same time); `smoke` = seconds, for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(num_negatives=70, beam_size=150, history_len=69, windows=PAPER_WINDOWS,
                  embed_dim=24, attention_hidden=(36,), mlp_hidden=(128, 64), batch_size=256,
                  epochs=1.0, tree_rounds=12, tree_gap=7, initial_tree="category",
                  warm_start=False),
    "default": dict(num_negatives=16, beam_size=60, history_len=20,
                    windows=(1, 1, 1, 2, 2, 2, 5, 6), attention_hidden=(16,),
                    mlp_hidden=(64, 32), batch_size=256, epochs=1.0, full_softmax_nodes=64,
                    max_train_samples=200_000, tree_rounds=1, tree_gap=7),
    "smoke": dict(num_negatives=4, beam_size=20, topk=(5, 10, 20), history_len=6,
                  windows=(1, 2, 3), attention_hidden=(8,), mlp_hidden=(16, 8), batch_size=32,
                  epochs=1.0, full_softmax_nodes=8, synthetic_users=300, synthetic_items=400,
                  max_train_samples=800, checkpoint_every=10, log_every=5, eval_batch_size=32,
                  tree_rounds=2, tree_gap=3, tree_users_per_item=5),
}


INITIAL_TREES = ("auto", "category", "kmeans", "random")


def make_config(preset: str = "default", **overrides) -> Config:
  if preset not in PRESETS:
    raise InputError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(Config)}
  bad = set(overrides) - fields
  if bad:
    raise InputError(f"unknown config fields {sorted(bad)}")
  values = dict(PRESETS[preset])
  values.update({k: v for k, v in overrides.items() if v is not None})
  cfg = Config(preset=preset, **values)
  if sum(cfg.windows) != cfg.history_len:
    raise InputError(f"windows {cfg.windows} sum to {sum(cfg.windows)} but history_len is "
                     f"{cfg.history_len}; pass --windows that sum to --history_len")
  if cfg.tree_rounds < 1:
    raise InputError(f"--tree_rounds={cfg.tree_rounds} must be at least 1")
  if cfg.loss not in ("softmax", "bce", "otm", "plt"):
    raise InputError(f"loss={cfg.loss!r}: choose softmax, bce, otm or plt")
  if cfg.otm_beam_size < 1:
    raise InputError(f"--otm_beam_size={cfg.otm_beam_size} must be at least 1")
  if cfg.dr_preset:
    from tdr_jax import dr as dr_lib
    if cfg.dr_preset not in dr_lib.PRESETS:
      raise InputError(f"--dr_preset={cfg.dr_preset!r}: choose from {sorted(dr_lib.PRESETS)}")
  if cfg.tree_assignment not in ("greedy", "priced"):
    raise InputError(f"--tree_assignment={cfg.tree_assignment!r}: choose greedy or priced")
  if cfg.initial_tree not in INITIAL_TREES:
    raise InputError(f"--initial_tree={cfg.initial_tree!r}: choose from {', '.join(INITIAL_TREES)}")
  if cfg.warm_start_model not in ("svd", "two_tower"):
    raise InputError(f"--warm_start_model={cfg.warm_start_model!r}: choose svd or two_tower")
  if cfg.warm_start_epochs <= 0:
    raise InputError(f"--warm_start_epochs={cfg.warm_start_epochs} must be positive")
  if cfg.tree_learning not in ("tdr", "jtm", "tdm", "none"):
    raise InputError(f"--tree_learning={cfg.tree_learning!r}: choose tdr, jtm, tdm or none")
  if cfg.beam_size < max(cfg.topk):
    raise InputError(f"--beam_size={cfg.beam_size} must be at least max(--topk)={max(cfg.topk)}")
  return cfg


def method_label(cfg: Config) -> str:
  if cfg.loss in ("otm", "plt"):
    return cfg.loss.upper()
  if cfg.loss == "bce":
    return {"tdm": "TDM", "jtm": "JTM"}.get(cfg.tree_learning, "binary")
  base = {"uniform": "U", "top_down": "T"}[cfg.sampler]
  return f"TDR({base}-RL)" if cfg.rectify else f"TDR({base})"


# ---- data ----------------------------------------------------------------------------------

def load_data(cfg: Config):
  """Returns (dataset, synthetic world or None)."""
  if cfg.dataset == "synthetic":
    scfg = synthetic.world_config(cfg.synthetic_world, num_users=cfg.synthetic_users,
                                  num_items=cfg.synthetic_items, seed=cfg.seed,
                                  categories=cfg.synthetic_categories)
    folder, world = synthetic.materialize(cfg.data_dir, scfg)
    ds = datasets.load_dataset("csv", folder, min_user_interactions=cfg.min_user_interactions,
                               seed=cfg.seed)
    return ds, world
  ds = datasets.load_dataset(cfg.dataset, cfg.data_dir,
                             min_user_interactions=cfg.min_user_interactions, seed=cfg.seed,
                             skip_bad_rows=cfg.skip_bad_rows, **dict(cfg.loader_options))
  return ds, None


def training_samples(cfg: Config, ds) -> np.ndarray:
  """Indices of the training samples used (all, or a seeded subset)."""
  return _training_samples(ds, max_train_samples=cfg.max_train_samples, seed=cfg.seed)


def batch_for_step(cfg: Config, ds, samples: np.ndarray, step: int, steps_per_epoch: int,
                   height: int) -> train.Batch:
  """The batch of a global step: a seeded permutation per epoch, last batch padded+masked."""
  epoch, i = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([cfg.seed, 11, epoch]).permutation(len(samples))
  idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
  mask = np.ones(cfg.batch_size, bool)
  if len(idx) < cfg.batch_size:
    mask[len(idx):] = False
    idx = np.concatenate([idx, np.zeros(cfg.batch_size - len(idx), idx.dtype)])
  hist, target = train_batch(ds, samples[idx], cfg.history_len)
  weight = np.ones((cfg.batch_size, height), np.float32)
  return train.Batch(hist.astype(np.int32), target.astype(np.int32), weight, mask)


# ---- model ---------------------------------------------------------------------------------

def build_model(cfg: Config, tree: tree_lib.Tree):
  model = din_lib.init_din(jax.random.key(cfg.seed), num_nodes=tree.num_nodes,
                           embed_dim=cfg.embed_dim, windows=cfg.windows,
                           attention_hidden=cfg.attention_hidden, mlp_hidden=cfg.mlp_hidden,
                           hierarchical=cfg.hierarchical)
  graphdef, params = nnx.split(model)
  din_score = din_lib.make_score_fn(graphdef)

  def score_fn(params, tree, history, nodes, level=None):
    return din_score(params, history, nodes, jnp.asarray(tree.item_paths),
                     jnp.asarray(tree.level_offsets), level=level)

  return score_fn, params


def _map_node_table(params, fn):
  """params with the scorer's node-embedding table (its only per-node parameter) replaced by
  fn(float[num_nodes, D] as numpy); every other parameter unchanged."""
  def apply(path, x):
    if jax.tree_util.keystr(path).startswith("['embed']['embedding']"):
      return jnp.asarray(fn(np.asarray(x)))
    return x
  return jax.tree_util.tree_map_with_path(apply, params)


def warm_params(cfg: Config, params, tree: tree_lib.Tree, vectors: np.ndarray):
  """The scorer's node-embedding table set from warm-start item vectors
  (`warm_start.node_rows`, at the RMS of the table it replaces); other parameters unchanged."""
  from tdr_jax import warm_start
  return _map_node_table(params, lambda x: warm_start.node_rows(
      vectors, tree, width=x.shape[1], rms=float(np.sqrt(np.mean(x.astype(np.float64) ** 2))),
      seed=cfg.seed))


def resolve_initial_tree(cfg: Config, ds) -> tuple[str, str]:
  """(category | kmeans | random, why) for `cfg.initial_tree` on this dataset."""
  if cfg.initial_tree != "auto":
    return cfg.initial_tree, f"--initial_tree={cfg.initial_tree}"
  from tdr_jax import warm_start
  ok, info = warm_start.informative_categories(ds, training_samples(cfg, ds),
                                               history_len=cfg.history_len)
  return ("category" if ok else "kmeans"), "auto: " + info["reason"]


def build_initial_tree(cfg: Config, ds, kind: str, vectors) -> tree_lib.Tree:
  rng = np.random.default_rng([cfg.seed, 3])
  if kind == "category":
    return tree_lib.build_from_categories(rng, ds.item_category, branching=cfg.branching)
  if kind == "kmeans":
    return tree_lib.build_kmeans(rng, np.asarray(vectors, np.float32), branching=cfg.branching)
  return tree_lib.build_random(rng, ds.num_items, branching=cfg.branching)


def remap_params(params, old: tree_lib.Tree, new: tree_lib.Tree):
  """The scorer's parameters with its per-node rows (the node-embedding table) moved from tree
  `old` to tree `new` (`tree.remap_node_rows`); every other parameter is unchanged."""
  return _map_node_table(params, lambda x: tree_lib.remap_node_rows(x, old, new))


# ---- checkpoints ---------------------------------------------------------------------------

class Checkpointer:
  """Orbax CheckpointManager holding the train state, item_to_leaf and the run's identity."""

  def __init__(self, workdir: str, *, config_fp: str, corpus_fp: str, config: Config):
    self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))
    self.meta = {"config_fingerprint": config_fp, "corpus_fingerprint": corpus_fp,
                 "config": json.loads(json.dumps(dataclasses.asdict(config), default=list))}

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state: train.TrainState, tree: tree_lib.Tree, *, force=False):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        tree=ocp.args.StandardSave({"item_to_leaf": np.asarray(tree.item_to_leaf)}),
        meta=ocp.args.JsonSave(self.meta)), force=force)

  def restore(self, step: int, abstract_state):
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    for key, what in (("config_fingerprint", "configuration"), ("corpus_fingerprint", "corpus")):
      if meta.get(key) != self.meta[key]:
        raise InputError(
            f"checkpoint {self.dir} (step {step}) was written for another {what} "
            f"({key} {meta.get(key)} != {self.meta[key]}); use a new --workdir or the "
            f"original settings")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), tree=ocp.args.StandardRestore()))
    return restored.state, np.asarray(restored.tree["item_to_leaf"])

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ---- training ------------------------------------------------------------------------------

def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def steps_per_round(cfg: Config, num_samples: int) -> tuple[int, int]:
  """(steps per epoch, training steps per round)."""
  steps_per_epoch = math.ceil(num_samples / cfg.batch_size)
  return steps_per_epoch, max(1, int(round(cfg.epochs * steps_per_epoch)))


def train_model(cfg: Config, ds, tree: tree_lib.Tree, score_fn, params, workdir: str, *,
                corpus_fp: str, mesh: Mesh, crash_after: int = 0, round_index: int = 0,
                weight_fn=None):
  """Trains with checkpoints/resume. Returns (params, seconds of training this call, steps).

  Round r continues the data stream where round r-1 stopped (its batches are those of global
  steps r*T .. (r+1)*T-1) and draws keys from fold_in(key(seed), r).
  `crash_after` > 0 raises SimulatedCrash after that step (testing resumption).
  `weight_fn(history, target, tree) -> float32[B, H]` gives per-level label weights
  (rectification); None = plain labels (ones)."""
  from tqdm import tqdm

  height = tree.height
  samples = training_samples(cfg, ds)
  steps_per_epoch, total_steps = steps_per_round(cfg, len(samples))
  optimizer = train.make_optimizer(learning_rate=cfg.learning_rate, decay_steps=steps_per_epoch,
                                   decay_rate=cfg.decay_rate)
  binary = cfg.loss == "bce"
  step_cfg = train.StepConfig(loss=cfg.loss, sampler="uniform" if binary else cfg.sampler,
                              num_negatives=cfg.binary_negatives if binary else cfg.num_negatives,
                              full_softmax_nodes=cfg.full_softmax_nodes,
                              beam_size=cfg.otm_beam_size)
  step_fn = train.make_train_step(score_fn, optimizer, step_cfg, branching=tree.branching,
                                  height=height)
  ndev = mesh.devices.size
  if cfg.batch_size % ndev:
    raise InputError(f"--batch_size={cfg.batch_size} must be divisible by the {ndev} devices")
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))
  jit_step = jax.jit(step_fn, donate_argnums=0)

  state = train.init_state(params, optimizer)
  ckpt = Checkpointer(workdir, config_fp=cfg.fingerprint(), corpus_fp=corpus_fp, config=cfg)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state, item_to_leaf = ckpt.restore(latest, abstract)
    if not np.array_equal(item_to_leaf, np.asarray(tree.item_to_leaf)):
      raise InputError(f"checkpoint in {ckpt.dir} holds a different item-to-leaf mapping; use a "
                       f"new --workdir")
    start = int(state.step)
    log.info("resuming from checkpoint step %d of %d (%s)", start, total_steps, ckpt.dir)
    print(f"Resuming from checkpoint at step {start} of {total_steps}")
  state = jax.device_put(state, replicated)
  tree_dev = jax.device_put(tree, replicated)
  index = jax.device_put(sampling.level_index(tree), replicated)
  base_key = jax.random.fold_in(jax.random.key(cfg.seed), round_index)
  data_offset = round_index * total_steps

  t0 = time.perf_counter()
  pending = []
  bar = tqdm(total=total_steps, initial=start, desc=f"train {method_label(cfg)}",
             unit="step", mininterval=2.0, disable=None)
  done_samples = 0
  next_print = start

  def check(pending):
    losses = np.asarray(jax.device_get([m for _, m in pending]))
    for (s, _), v in zip(pending, losses):
      if not np.isfinite(v):
        raise FloatingPointError(f"non-finite training loss {v} at step {s}; stopping "
                                 f"(try a lower --learning_rate)")
    return float(losses[-1])

  for step in range(start, total_steps):
    batch = batch_for_step(cfg, ds, samples, data_offset + step, steps_per_epoch, height)
    if weight_fn is not None:
      batch = batch._replace(weight=np.asarray(weight_fn(batch.history, batch.target, tree_dev)))
    batch = jax.device_put(batch, data_sharding)
    state, m = jit_step(state, batch, tree_dev, index, base_key)
    pending.append((step, m["loss"]))
    done_samples += cfg.batch_size
    last = step + 1 == total_steps
    if len(pending) >= cfg.log_every or last:
      loss = check(pending)
      pending = []
      elapsed = time.perf_counter() - t0
      bar.update(step + 1 - bar.n)
      bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{done_samples / elapsed:.0f}")
      if bar.disable and (step + 1 >= next_print or last):
        # No terminal (CI, redirected output): plain progress lines instead of a bar.
        next_print = step + 1 + max(cfg.log_every, total_steps // 10)
        print(f"step {step + 1}/{total_steps}  loss {loss:.4f}  "
              f"{done_samples / elapsed:.0f} samples/s", flush=True)
    if (step + 1) % cfg.checkpoint_every == 0 or last:
      ckpt.save(step + 1, jax.device_get(state), tree, force=last)
    if crash_after and step + 1 == crash_after and not last:
      ckpt.close()
      raise SimulatedCrash(f"simulated crash after step {step + 1}")
  bar.close()
  ckpt.close()
  seconds = time.perf_counter() - t0
  return state.params, seconds, total_steps


# ---- evaluation ----------------------------------------------------------------------------

def map_user_batches(fn, arrays: Sequence[np.ndarray], *, batch_size: int, mesh: Mesh
                     ) -> np.ndarray:
  """Applies `fn(*batch_arrays)` to fixed-size user batches (the last padded with -1), each
  sharded over the mesh's data axis, so one compilation serves all; concatenates the results.
  """
  n = len(arrays[0])
  ndev = mesh.devices.size
  batch_size = max(ndev, batch_size - batch_size % ndev)
  data_sharding = NamedSharding(mesh, P("data"))
  out = []
  for lo in range(0, n, batch_size):
    chunk = [a[lo:lo + batch_size] for a in arrays]
    pad = batch_size - len(chunk[0])
    if pad:
      chunk = [np.concatenate([a, np.full((pad,) + a.shape[1:], -1, a.dtype)]) for a in chunk]
    result = fn(*[jax.device_put(a, data_sharding) for a in chunk])
    out.append(np.asarray(result)[:batch_size - pad])
  return np.concatenate(out)


def retrieve(score_fn, params, tree, history: np.ndarray, *, beam_size: int, topk: int,
             batch_size: int, mesh: Mesh, path_scores: bool = False) -> np.ndarray:
  """Beam search for all users in fixed-size batches (one compilation). int32[U, topk].

  `path_scores`: rank nodes by the sum of log-sigmoids along their path (PLT)."""
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  tree_dev = jax.device_put(tree, replicated)
  return map_user_batches(
      lambda h: bs.beam_search(score_fn, params, tree_dev, h, beam_size=beam_size,
                               topk=topk, path_scores=path_scores)[0], [history],
      batch_size=batch_size, mesh=mesh)


def result_row(method: str, retrieved: np.ndarray, ev, ds, cfg: Config, eta, *,
               train_seconds: float, settings: dict) -> dict:
  row = {"method": method}
  row.update(metrics_lib.retrieval_metrics(retrieved, ev.label_offsets, ev.label_items,
                                           num_items=ds.num_items, ks=cfg.topk))
  if eta is not None:
    row.update(metrics_lib.oracle_ratio(retrieved, eta, ks=cfg.topk))
  row["train_seconds"] = float(train_seconds)
  row["settings"] = settings
  return row


def format_table(rows: Sequence[dict], ks: Sequence[int]) -> str:
  cols = []
  for k in ks:
    cols += [f"precision@{k}", f"recall@{k}", f"f_measure@{k}"]
  has_ratio = any(f"oracle_ratio@{ks[0]}" in r for r in rows)
  if has_ratio:
    cols += [f"oracle_ratio@{k}" for k in ks]
  head = "| method | " + " | ".join(c.replace("f_measure", "F").replace("precision", "P")
                                    .replace("recall", "R").replace("oracle_ratio", "oracle%")
                                    for c in cols) + " | train s |"
  lines = [head, "|" + "---|" * (len(cols) + 2)]
  for r in rows:
    vals = [f"{r[c]:.4f}" if c in r else "-" for c in cols]
    lines.append(f"| {r['method']} | " + " | ".join(vals) + f" | {r['train_seconds']:.1f} |")
  return "\n".join(lines)


def evaluation_set(cfg: Config, ds):
  ev = eval_split(ds, "test", cfg.history_len)
  if cfg.max_eval_users and cfg.max_eval_users < len(ev.users):
    n = cfg.max_eval_users
    lab_end, hist_end = ev.label_offsets[n], ev.full_history_offsets[n]
    ev = dataclasses.replace(
        ev, users=ev.users[:n], history=ev.history[:n], label_offsets=ev.label_offsets[:n + 1],
        label_items=ev.label_items[:lab_end], full_history_offsets=ev.full_history_offsets[:n + 1],
        full_history_items=ev.full_history_items[:hist_end])
  return ev


def synthetic_eta(world, ds, ev) -> np.ndarray:
  hist = [ev.full_history_items[ev.full_history_offsets[i]:ev.full_history_offsets[i + 1]]
          for i in range(len(ev.users))]
  horizons = [int(ds.seq_offsets[u + 1] - ds.seq_offsets[u]) - len(h)
              for u, h in zip(ev.users, hist)]
  return synthetic.dataset_eta(world, ds.item_raw_ids, hist, horizons)


# Rows that are not methods under test: their names, and the `--method` names of the two
# non-learned rankers that every table shows (tdr_jax.baselines.popularity).
REFERENCE_ROWS = ("oracle", "popularity", "heuristic", "random")
REFERENCE_METHODS = {"pop": "popularity", "heuristic": "heuristic"}
POPULARITY_MARGIN = 0.05  # a row within 5% of popularity's F@K0 (or below) is flagged
POPULARITY_WARNING = "learned little beyond item popularity: train longer or check the data"


def reference_method_row(name: str, cfg: Config, ds, ev, eta) -> dict:
  """The `popularity` or `heuristic` row (`name` a key of REFERENCE_METHODS): non-learned
  rankers counting the training targets of the run's training samples."""
  from tdr_jax.baselines import popularity as pop_lib
  kmax = max(cfg.topk)
  t0 = time.perf_counter()
  samples = training_samples(cfg, ds)
  counts = pop_lib.target_counts(ds, samples)
  settings = {"training_samples": int(len(samples)), "counts": "training-sample targets"}
  if name == "pop":
    retrieved = pop_lib.popularity(counts, len(ev.users), kmax)
  else:
    valid = ds.eval_split("valid", cfg.history_len)
    params, info = pop_lib.tune_heuristic(valid, counts, ds.item_category, k=cfg.topk[0],
                                          num_items=ds.num_items)
    retrieved = pop_lib.heuristic(ev.history, counts, ds.item_category, params, kmax)
    settings.update(dataclasses.asdict(params), **info,
                    categories=int(len(np.unique(ds.item_category))))
  return result_row(REFERENCE_METHODS[name], retrieved, ev, ds, cfg, eta,
                    train_seconds=time.perf_counter() - t0, settings=settings)


def reference_rows(cfg: Config, ds, ev, eta, *, have: Sequence[str] = ()) -> list[dict]:
  """The oracle (synthetic only), popularity, the heuristic and a random retriever, for scale
  (those named in `have` are already in the table and skipped)."""
  kmax = max(cfg.topk)
  rows = []
  if eta is not None:
    oracle = np.argsort(-eta, axis=1, kind="stable")[:, :kmax]
    rows.append(result_row("oracle", oracle, ev, ds, cfg, eta, train_seconds=0.0,
                           settings={"what": "top-K of the generator's posterior predictive"}))
  for name, label in REFERENCE_METHODS.items():
    if label not in have:
      rows.append(reference_method_row(name, cfg, ds, ev, eta))
  rng = np.random.default_rng([cfg.seed, 99])
  rand = np.stack([rng.choice(ds.num_items, kmax, replace=False) for _ in range(len(ev.users))])
  rows.append(result_row("random", rand, ev, ds, cfg, eta, train_seconds=0.0,
                         settings={"what": "K items uniformly at random"}))
  return rows


def flag_near_popularity(rows: Sequence[dict], k: int) -> list[str]:
  """Sets row["warning"] of every row: POPULARITY_WARNING for a method row whose F@k is within
  POPULARITY_MARGIN of the popularity row's or below it, else None; returns the printed
  warnings."""
  pop = next((r for r in rows if r["method"] == "popularity"), None)
  key = f"f_measure@{k}"
  out = []
  for r in rows:
    r.setdefault("warning", None)
    if pop is None or r["method"] in REFERENCE_ROWS or key not in r:
      continue
    if r[key] <= (1.0 + POPULARITY_MARGIN) * pop[key]:
      r["warning"] = POPULARITY_WARNING
      out.append(f"warning: {r['method']}: F@{k} {r[key]:.4f} vs popularity {pop[key]:.4f}: "
                 f"{POPULARITY_WARNING}")
  return out


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, arr)
  os.replace(tmp, path)


def next_tree(cfg: Config, ds, samples: np.ndarray, tree: tree_lib.Tree, score_fn, params,
              round_index: int) -> tuple[tree_lib.Tree, float]:
  """One tree update with the model fixed (TDR sec. 6 / JTM / TDM). Returns (tree, seconds)."""
  t0 = time.perf_counter()
  if cfg.tree_learning == "none":  # the control: rounds only continue training
    return tree, 0.0
  if cfg.tree_learning == "tdm":
    emb = np.asarray(params["embed"]["embedding"][...])
    new = tree_learning.learn_tree_tdm(np.random.default_rng([cfg.seed, 17, round_index]), emb,
                                       tree)
  else:
    targets = ds.seq_items[ds.train_sample_pos[samples]]
    pair_item, pair_sample = tree_learning.item_user_pairs(
        targets, ds.num_items, max_users_per_item=cfg.tree_users_per_item,
        seed=cfg.seed * 1000 + round_index)
    hist, _ = train_batch(ds, samples[pair_sample], cfg.history_len)
    new = tree_learning.learn_tree_tdr(
        score_fn, params, tree, hist.astype(np.int32), pair_item, gap=cfg.tree_gap,
        matching="binary" if cfg.tree_learning == "jtm" else "softmax",
        assignment=cfg.tree_assignment)
  return new, time.perf_counter() - t0


def plot_curves(path: str, rounds: list[dict], forest_curve: list[dict], ks: Sequence[int],
                title: str) -> None:
  """PNG: metrics@K0 over tree-learning rounds (TDR Fig. 3 shape) and forest vs last tree."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  k = ks[0]
  ncols = 2 if forest_curve else 1
  fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
  ax = axes[0, 0]
  x = [r["round"] + 1 for r in rounds]
  for m, name in (("precision", "Precision"), ("recall", "Recall"), ("f_measure", "F-measure")):
    ax.plot(x, [r[f"{m}@{k}"] for r in rounds], marker="o", label=f"{name}@{k}")
  ax.set_xlabel("tree (round of joint learning)")
  ax.set_title(f"{title}: tree learning")
  ax.legend()
  ax.grid(alpha=0.3)
  if forest_curve:
    ax = axes[0, 1]
    x = [c["num_trees"] for c in forest_curve]
    ax.plot(x, [c[f"last_tree_f_measure@{k}"] for c in forest_curve], marker="o",
            label=f"last tree F@{k}")
    ax.plot(x, [c[f"forest_f_measure@{k}"] for c in forest_curve], marker="s",
            label=f"forest F@{k}")
    ax.set_xlabel("number of trees")
    ax.set_title("forest vs last tree")
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _run_tdr(cfg: Config, workdir: str, ds, world, ev, eta, mesh: Mesh,
             warm: dict | None = None) -> dict:
  """Joint learning (JTM Algorithm 1) of one TDR variant.

  Round r trains the model on tree r (continuing from the previous round's parameters),
  evaluates it, and (except after the last round) learns tree r+1 with the model fixed. Every
  round's (tree, model) is checkpointed under workdir/round_<r>/ and workdir/trees/; a rerun
  resumes inside the unfinished round. Returns rows (final tree, forest), estimator rows,
  per-round rows and the forest curve. `warm` (from `warm_start_setup`): the initial tree's
  kind and the warm-start item vectors.
  """
  os.makedirs(workdir, exist_ok=True)
  warm = warm or warm_start_setup(cfg, ds, workdir)
  tree = build_initial_tree(cfg, ds, warm["initial_tree"], warm["vectors"])
  tree_lib.validate(tree)
  score_fn, params = build_model(cfg, tree)
  if cfg.warm_start:
    params = warm_params(cfg, params, tree, warm["vectors"])
  corpus_fp = corpus_fingerprint(ds)
  samples = training_samples(cfg, ds)
  _, round_steps = steps_per_round(cfg, len(samples))
  true_cat = mislabelled = None
  if world is not None:
    raw = np.asarray([int(x) for x in ds.item_raw_ids])
    true_cat = world.item_category[raw]
    mislabelled = world.observed_category[raw] != true_cat  # the initial tree's noisy labels
  tree_dir = os.path.join(workdir, "trees")
  os.makedirs(tree_dir, exist_ok=True)
  weight_fn, estimator_rows = None, []
  if cfg.rectify:
    weight_fn, estimator_rows = rectification_setup(cfg, ds, ev, eta, workdir)
  label = method_label(cfg)
  kmax = max(cfg.topk)
  rounds, per_tree, models = [], [], []
  total_train = 0.0
  for r in range(cfg.tree_rounds):
    tree_path = os.path.join(tree_dir, f"round_{r}.npy")
    if r > 0:
      old_tree = tree
      if os.path.exists(tree_path):
        tree = tree_lib.from_item_to_leaf(np.load(tree_path), branching=cfg.branching,
                                          num_items=ds.num_items)
        tree_seconds = 0.0
        print(f"round {r}: tree restored from {tree_path}")
      else:
        tree, tree_seconds = next_tree(cfg, ds, samples, tree, score_fn, params, r)
        print(f"round {r}: tree learned ({cfg.tree_learning}, gap {cfg.tree_gap}) in "
              f"{tree_seconds:.1f}s")
      # The scorer looks nodes up by position: carry its node rows over to the new tree (a
      # leaf's row follows its item). A round checkpoint, when there is one, replaces them.
      params = remap_params(params, old_tree, tree)
    else:
      tree_seconds = 0.0
    if not os.path.exists(tree_path):
      _atomic_save_npy(tree_path, np.asarray(tree.item_to_leaf))
    crash_after = cfg.stop_after_step - r * round_steps if cfg.stop_after_step else 0
    params, seconds, steps = train_model(cfg, ds, tree, score_fn, params,
                                         os.path.join(workdir, f"round_{r}"),
                                         corpus_fp=corpus_fp, mesh=mesh,
                                         crash_after=crash_after if crash_after > 0 else 0,
                                         round_index=r, weight_fn=weight_fn)
    total_train += seconds + tree_seconds
    t0 = time.perf_counter()
    retrieved = retrieve(score_fn, params, tree, ev.history, beam_size=cfg.beam_size,
                         topk=kmax, batch_size=cfg.eval_batch_size, mesh=mesh,
                         path_scores=cfg.loss == "plt")
    eval_seconds = time.perf_counter() - t0
    per_tree.append(retrieved)
    models.append((tree, jax.device_get(params)))  # host copy: the next round donates params
    row = result_row(f"{label} tree {r + 1}", retrieved, ev, ds, cfg, eta,
                     train_seconds=seconds, settings={"tree_seconds": tree_seconds,
                                                      "eval_seconds": eval_seconds,
                                                      "steps": steps})
    row["round"] = r
    extra = ""
    if true_cat is not None:
      # Items whose node (at the first level with more nodes than categories) has their true
      # category as majority: all items, the mislabelled ones, the correctly labelled ones.
      row["category_purity"] = tree_learning.category_purity(tree, true_cat)
      for what, sel in (("purity_mislabelled", mislabelled), ("purity_labelled", ~mislabelled)):
        v = tree_learning.category_purity(tree, true_cat, items=sel)
        row[what] = None if math.isnan(v) else v  # None: no such items (no label noise)
      extra = (f", purity {row['category_purity']:.3f} (mislabelled "
               f"{_fmt(row['purity_mislabelled'])}, correctly labelled "
               f"{_fmt(row['purity_labelled'])})")
    rounds.append(row)
    k0 = cfg.topk[0]
    print(f"round {r}: P@{k0} {row[f'precision@{k0}']:.4f} R@{k0} {row[f'recall@{k0}']:.4f} "
          f"F@{k0} {row[f'f_measure@{k0}']:.4f}{extra}")

  settings = {"sampler": cfg.sampler, "num_negatives": cfg.num_negatives,
              "initial_tree": warm["initial_tree"], "initial_tree_why": warm["why"],
              "warm_start": warm["info"], "beam_size": cfg.beam_size,
              "tree_rounds": cfg.tree_rounds,
              "tree_learning": cfg.tree_learning, "tree_gap": cfg.tree_gap,
              "tree_height": tree.height, "test_users": int(len(ev.users))}
  final = dict(rounds[-1])
  final["method"] = label
  final["train_seconds"] = total_train + (warm["info"] or {}).get("train_seconds", 0.0)
  final["settings"] = dict(final["settings"], **settings)
  for key in ("round", "category_purity", "purity_mislabelled", "purity_labelled"):
    final.pop(key, None)
  rows = [final]
  forest_curve = []
  if cfg.forest and len(models) > 1:
    # The discriminator ranks candidates by what the method's beam search ranks leaves by.
    disc_fn = score_fn
    if cfg.loss == "plt":
      from tdr_jax import plt as plt_lib
      disc_fn = plt_lib.path_score_fn(score_fn)
    for r in range(1, len(models) + 1):
      cand = forest_lib.union_candidates(per_tree[:r])
      disc_tree, disc_params = models[r - 1]
      items = rerank_all(disc_fn, disc_params, disc_tree, ev.history, cand, topk=kmax,
                         batch_size=cfg.eval_batch_size, mesh=mesh)
      frow = result_row(f"{label} forest", items, ev, ds, cfg, eta, train_seconds=total_train,
                        settings=dict(settings, num_trees=r))
      point = {"num_trees": r, "candidates_per_user": float(np.mean(np.sum(cand >= 0, 1)))}
      for key, v in frow.items():
        if "@" in key:
          point[f"forest_{key}"] = v
          point[f"last_tree_{key}"] = rounds[r - 1][key]
      forest_curve.append(point)
    rows.append(frow)
  return {"rows": rows, "estimator_rows": estimator_rows, "rounds": rounds,
          "forest_curve": forest_curve, "true_cat": true_cat, "label": label}


# Method names of --method: TDR variants and the baselines of tdr_jax.baselines.
TDR_VARIANTS = {"tdr": {}, "tdr_u": dict(sampler="uniform", rectify=False),
                "tdr_t": dict(sampler="top_down", rectify=False),
                "tdr_t_rl": dict(sampler="top_down", rectify=True),
                # TDM/JTM: binary loss (Eq. 2) with uniform negatives per level, on the same
                # scorer, tree learning by k-means (TDM) or by the binary log-likelihood (JTM).
                "tdm": dict(loss="bce", sampler="uniform", rectify=False, tree_learning="tdm"),
                "jtm": dict(loss="bce", sampler="uniform", rectify=False, tree_learning="jtm"),
                # OTM: binary loss on the nodes a beam search visits, with beam-search-aware
                # pseudo targets; trees learned as JTM's (binary matching).
                "otm": dict(loss="otm", sampler="uniform", rectify=False, tree_learning="jtm"),
                # PLT: node classifiers P(z_n | z_parent), trained on the positive paths and
                # their siblings; retrieval by the product of the path's probabilities; trees
                # by balanced k-means over the leaf embeddings (as label trees are built).
                "plt": dict(loss="plt", sampler="uniform", rectify=False, tree_learning="tdm")}
ALL_METHODS = ("tdm", "jtm", "otm", "plt", "tdr_u", "tdr_t", "tdr_t_rl", "dr", "din",
               "youtube_dnn", "itemcf")


def dr_settings(cfg: Config):
  """The DRConfig of a run: `--dr_preset` (default: the dataset's paper preset for MovieLens
  and Amazon Books, `smoke` under the smoke preset, else `synthetic`) with the DR flags."""
  from tdr_jax import dr as dr_lib
  preset = cfg.dr_preset
  if not preset:
    if cfg.preset == "smoke":
      preset = "smoke"
    elif cfg.dataset.startswith("movielens"):
      preset = "movielens"
    elif cfg.dataset == "amazon_books":
      preset = "amazon_books"
    else:
      preset = "synthetic"
  return preset, dr_lib.dr_config(
      preset, alpha=cfg.dr_alpha if cfg.dr_alpha >= 0 else None,
      beam_size=cfg.dr_beam_size or None,
      em_rounds=cfg.dr_em_rounds if cfg.dr_em_rounds >= 0 else None)


def warm_start_setup(cfg: Config, ds, workdir: str) -> dict:
  """The initial tree's kind (and why) and, when the warm start or a k-means tree needs them,
  the warm-start item vectors (trained once, checkpointed under workdir/warm_start)."""
  from tdr_jax import warm_start
  kind, why = resolve_initial_tree(cfg, ds)
  vectors, info = None, None
  if cfg.warm_start or kind == "kmeans":
    vectors, info = warm_start.item_vectors(
        ds, warm_start.WarmStartConfig(model=cfg.warm_start_model, epochs=cfg.warm_start_epochs,
                                       embed_dim=cfg.embed_dim), seed=cfg.seed,
        batch_size=cfg.batch_size, history_len=cfg.history_len,
        max_train_samples=cfg.max_train_samples, workdir=workdir)
    print(f"warm start: {info['model']}, {info['train_seconds']:.1f}s")
  print(f"initial tree: {kind} ({why})")
  return {"initial_tree": kind, "why": why, "vectors": vectors, "info": info}


def _run_dr(cfg: Config, workdir: str, ds, ev, eta) -> dict:
  """Deep Retrieval (tdr_jax.dr) as one results row."""
  from tdr_jax import dr as dr_lib
  preset, dcfg = dr_settings(cfg)
  try:
    retrieved, seconds, settings = dr_lib.run_dr(
        ds, ev, dcfg, topk=max(cfg.topk), seed=cfg.seed, history_len=cfg.history_len,
        batch_size=cfg.batch_size, max_train_samples=cfg.max_train_samples, workdir=workdir,
        stop_after_step=cfg.stop_after_step)
  except dr_lib.SimulatedCrash as e:
    raise SimulatedCrash(str(e)) from e
  settings["dr_preset"] = preset
  row = result_row("DR", retrieved, ev, ds, cfg, eta, train_seconds=seconds, settings=settings)
  ps, cand = settings["path_stats"], settings["candidates_per_user"]
  print(f"DR ({preset}): {ps}; candidates per user {cand}")
  return row


def parse_methods(method: str) -> list[str]:
  names = [m.strip() for m in method.split(",") if m.strip()]
  if names == ["all"]:
    names = list(ALL_METHODS)
  from tdr_jax import baselines
  known = set(TDR_VARIANTS) | set(baselines.BASELINES) | {"dr"} | set(REFERENCE_METHODS)
  bad = [m for m in names if m not in known]
  if bad or not names:
    raise InputError(f"--method={method!r}: unknown {bad}; choose from {sorted(known)} or 'all'")
  return names


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Runs every method of `config.method` on one dataset; writes and returns the results.

  `config.method` is one name or a comma-separated list (or `all`): `tdr` (the variant given
  by `sampler`/`rectify`), `tdr_u`, `tdr_t`, `tdr_t_rl`, and the baselines of
  `tdr_jax.baselines`. With one method its outputs go to `workdir` itself, else to
  `workdir/<method>/`; the combined table goes to workdir/results.{json,md}.
  """
  cfg = config
  methods = parse_methods(cfg.method)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=1, default=list)
  ds, world = load_data(cfg)
  print(datasets.describe(ds, cfg.dataset))
  datasets.check_usable(ds)
  mesh = make_mesh()
  ev = evaluation_set(cfg, ds)
  eta = synthetic_eta(world, ds, ev) if world is not None else None
  rows, estimator_rows, per_method = [], [], {}
  warm = None
  if any(m in TDR_VARIANTS or m == "din" for m in methods):
    warm = warm_start_setup(cfg, ds, workdir)  # shared by every method of the table
  for name in methods:
    wd = workdir if len(methods) == 1 else os.path.join(workdir, name)
    if name in TDR_VARIANTS:
      mcfg = dataclasses.replace(cfg, **TDR_VARIANTS[name])
      out = _run_tdr(mcfg, wd, ds, world, ev, eta, mesh, warm=warm)
      rows += out["rows"]
      if not estimator_rows:
        estimator_rows = out["estimator_rows"]
      per_method[out["label"]] = out
    elif name == "dr":
      rows.append(_run_dr(cfg, wd, ds, ev, eta))
      print(format_table(rows[-1:], cfg.topk))
    elif name in REFERENCE_METHODS:
      rows.append(reference_method_row(name, cfg, ds, ev, eta))
    else:
      from tdr_jax import baselines
      options = {}
      if name == "din":  # the same scorer as TDR's, trained on items
        options = dict(windows=cfg.windows, embed_dim=cfg.embed_dim,
                       attention_hidden=cfg.attention_hidden, mlp_hidden=cfg.mlp_hidden,
                       num_negatives=max(cfg.num_negatives, 1))
        if cfg.warm_start:
          options["item_vectors"] = warm["vectors"]
      retrieved, seconds, settings = baselines.run_baseline(
          name, ds, ev, topk=max(cfg.topk), seed=cfg.seed, history_len=cfg.history_len,
          epochs=cfg.epochs, batch_size=cfg.batch_size,
          max_train_samples=cfg.max_train_samples, workdir=wd, **options)
      if "item_vectors" in options:  # its warm start is part of its training cost
        seconds += warm["info"]["train_seconds"]
        settings["warm_start"] = warm["info"]
      rows.append(result_row(baselines.LABELS[name], retrieved, ev, ds, cfg, eta,
                             train_seconds=seconds, settings=settings))
      print(format_table(rows[-1:], cfg.topk))
  rows += estimator_rows + reference_rows(cfg, ds, ev, eta,
                                         have=[r["method"] for r in rows])
  warnings = flag_near_popularity(rows, cfg.topk[0])
  for out in per_method.values():
    for row in out["rounds"]:
      row.setdefault("train_seconds", 0.0)
    flag_near_popularity(out["rounds"] + [r for r in rows if r["method"] == "popularity"],
                         cfg.topk[0])
  table = format_table(rows, cfg.topk)
  print(table)
  for w in warnings:
    print(w)
  results = {"dataset": cfg.dataset, "results": rows, "warnings": warnings}
  results["data"] = datasets.summary(ds)
  md = [f"# {cfg.dataset}: test users {len(ev.users)}", "", table, ""]
  if warnings:
    md += [f"* {w}" for w in warnings] + [""]
  for label, out in per_method.items():
    rounds, forest_curve, true_cat = out["rounds"], out["forest_curve"], out["true_cat"]
    key = "" if len(per_method) == 1 else f"{label} "
    if len(per_method) == 1:
      results["rounds"] = rounds
      results["forest_curve"] = forest_curve
    else:
      results.setdefault("per_method", {})[label] = {"rounds": rounds,
                                                    "forest_curve": forest_curve}
    if true_cat is not None:
      for what in ("category_purity", "purity_mislabelled", "purity_labelled"):
        results[f"{key}initial_{what}".strip()] = rounds[0].get(what)
        results[f"{key}final_{what}".strip()] = rounds[-1].get(what)
    if len(rounds) > 1:
      round_table = format_table(rounds, cfg.topk)
      md += [f"## {label}: tree learning rounds", "", round_table, ""]
      print("\n" + round_table)
      if true_cat is not None:
        md += ["Items in a node whose majority true category is theirs (first level with more "
               "nodes than categories), per round: all " + ", ".join(
                   f"{r['category_purity']:.3f}" for r in rounds) + "; mislabelled " +
               ", ".join(_fmt(r['purity_mislabelled']) for r in rounds) +
               "; correctly labelled " + ", ".join(
                   _fmt(r['purity_labelled']) for r in rounds), ""]
      plot_name = "rounds.png" if len(per_method) == 1 else f"rounds-{label}.png"
      plot_curves(os.path.join(workdir, plot_name), rounds, forest_curve, cfg.topk,
                  f"{cfg.dataset} {label}")
    if forest_curve:
      md += [f"## {label}: forest vs last tree", "", "| trees | candidates/user | " + " | ".join(
          f"last F@{k} | forest F@{k}" for k in cfg.topk) + " |",
          "|---|---|" + "---|---|" * len(cfg.topk)]
      for c in forest_curve:
        md.append(f"| {c['num_trees']} | {c['candidates_per_user']:.1f} | " + " | ".join(
            f"{c[f'last_tree_f_measure@{k}']:.4f} | {c[f'forest_f_measure@{k}']:.4f}"
            for k in cfg.topk) + " |")
      md.append("")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(md))
  return results


def rectification_setup(cfg: Config, ds, ev, eta, workdir: str):
  """Trains (or restores) the SASRec estimator; returns (weight_fn, [its result row])."""
  from tdr_jax import rectification
  from tdr_jax.models import sasrec

  est = sasrec.train_sasrec(ds, history_len=cfg.history_len, epochs=cfg.sasrec_epochs,
                            batch_size=cfg.batch_size, seed=cfg.seed,
                            max_train_samples=cfg.max_train_samples, workdir=workdir,
                            dim=cfg.sasrec_dim, checkpoint_every=cfg.checkpoint_every,
                            log_every=cfg.log_every)
  kmax = max(cfg.topk)
  retrieved = np.asarray(est.retrieve(ev.history, topk=kmax, batch_size=cfg.eval_batch_size))
  row = result_row("SASRec (estimator)", retrieved, ev, ds, cfg, eta,
                   train_seconds=est.train_seconds,
                   settings={"dim": cfg.sasrec_dim, "epochs": cfg.sasrec_epochs,
                             "steps": est.steps})
  weights = jax.jit(rectification.rectified_weights)

  def weight_fn(history, target, tree):
    # Only the order of eta matters for Eq. 15, so the logits are passed as they are.
    return weights(est.logits(history), jnp.asarray(target), tree)

  return weight_fn, [row]


def rerank_all(score_fn, params, tree, history: np.ndarray, candidates: np.ndarray, *,
               topk: int, batch_size: int, mesh: Mesh) -> np.ndarray:
  """Forest reranking in fixed-size, data-parallel batches. int32[U, topk]."""
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  tree_dev = jax.device_put(tree, replicated)
  return map_user_batches(
      lambda h, c: forest_lib.rerank(score_fn, params, tree_dev, h, c, topk=topk)[0],
      [history, candidates], batch_size=batch_size, mesh=mesh)
