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
from tdr_jax import sampling, train
from tdr_jax import tree as tree_lib
from tdr_jax.data import datasets, synthetic
from tdr_jax.data.preprocess import eval_split, train_batch
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
  stop_after_step: int = 0  # testing: raise SimulatedCrash after this step (0 = off)
  synthetic_users: int = 8000
  synthetic_items: int = 5000

  def fingerprint(self) -> str:
    """Hash of the settings that determine the trained model (not eval or run length)."""
    skip = {"epochs", "beam_size", "topk", "eval_batch_size", "max_eval_users",
            "checkpoint_every", "log_every", "data_dir", "preset", "stop_after_step"}
    d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


# Presets: `paper` = TDR sec. 8.4; `default` = what `make run` finishes in < 10 min on a
# 2-core CPU; `smoke` = seconds, for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(num_negatives=70, beam_size=150, history_len=69, windows=PAPER_WINDOWS,
                  embed_dim=24, attention_hidden=(36,), mlp_hidden=(128, 64), batch_size=256,
                  epochs=1.0),
    "default": dict(num_negatives=16, beam_size=60, history_len=20,
                    windows=(1, 1, 1, 2, 2, 2, 5, 6), attention_hidden=(16,),
                    mlp_hidden=(64, 32), batch_size=256, epochs=1.0, full_softmax_nodes=64,
                    max_train_samples=200_000),
    "smoke": dict(num_negatives=4, beam_size=20, topk=(5, 10, 20), history_len=6,
                  windows=(1, 2, 3), attention_hidden=(8,), mlp_hidden=(16, 8), batch_size=32,
                  epochs=1.0, full_softmax_nodes=8, synthetic_users=300, synthetic_items=400,
                  max_train_samples=800, checkpoint_every=10, log_every=5, eval_batch_size=32),
}


def make_config(preset: str = "default", **overrides) -> Config:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(Config)}
  bad = set(overrides) - fields
  if bad:
    raise ValueError(f"unknown config fields {sorted(bad)}")
  values = dict(PRESETS[preset])
  values.update({k: v for k, v in overrides.items() if v is not None})
  cfg = Config(preset=preset, **values)
  if sum(cfg.windows) != cfg.history_len:
    raise ValueError(f"windows {cfg.windows} sum to {sum(cfg.windows)} but history_len is "
                     f"{cfg.history_len}; pass --windows that sum to --history_len")
  if cfg.beam_size < max(cfg.topk):
    raise ValueError(f"--beam_size={cfg.beam_size} must be at least max(--topk)={max(cfg.topk)}")
  return cfg


def method_label(cfg: Config) -> str:
  return {"uniform": "TDR(U)", "top_down": "TDR(T)"}[cfg.sampler]


# ---- data ----------------------------------------------------------------------------------

def load_data(cfg: Config):
  """Returns (dataset, synthetic world or None)."""
  if cfg.dataset == "synthetic":
    scfg = synthetic.SyntheticConfig(num_users=cfg.synthetic_users,
                                     num_items=cfg.synthetic_items, seed=cfg.seed)
    folder, world = synthetic.materialize(cfg.data_dir, scfg)
    ds = datasets.load_dataset("csv", folder, min_user_interactions=cfg.min_user_interactions,
                                 seed=cfg.seed)
    return ds, world
  ds = datasets.load_dataset(cfg.dataset, cfg.data_dir,
                               min_user_interactions=cfg.min_user_interactions, seed=cfg.seed)
  return ds, None


def corpus_fingerprint(ds) -> str:
  h = hashlib.sha256()
  h.update(np.asarray([ds.num_users, ds.num_items], np.int64).tobytes())
  h.update(np.ascontiguousarray(ds.seq_items).tobytes())
  h.update(np.ascontiguousarray(ds.user_split).tobytes())
  return h.hexdigest()[:16]


def training_samples(cfg: Config, ds) -> np.ndarray:
  """Indices of the training samples used (all, or a seeded subset)."""
  n = len(ds.train_sample_pos)
  if cfg.max_train_samples and cfg.max_train_samples < n:
    rng = np.random.default_rng([cfg.seed, 7])
    return np.sort(rng.choice(n, cfg.max_train_samples, replace=False))
  return np.arange(n)


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
        raise ValueError(
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


def train_model(cfg: Config, ds, tree: tree_lib.Tree, score_fn, params, workdir: str, *,
                corpus_fp: str, mesh: Mesh):
  """Trains with checkpoints/resume. Returns (params, seconds of training this call, steps)."""
  from tqdm import tqdm

  height = tree.height
  samples = training_samples(cfg, ds)
  steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
  total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
  optimizer = train.make_optimizer(learning_rate=cfg.learning_rate, decay_steps=steps_per_epoch,
                                   decay_rate=cfg.decay_rate)
  step_cfg = train.StepConfig(loss="softmax", sampler=cfg.sampler,
                              num_negatives=cfg.num_negatives,
                              full_softmax_nodes=cfg.full_softmax_nodes)
  step_fn = train.make_train_step(score_fn, optimizer, step_cfg, branching=tree.branching,
                                  height=height)
  ndev = mesh.devices.size
  if cfg.batch_size % ndev:
    raise ValueError(f"--batch_size={cfg.batch_size} must be divisible by the {ndev} devices")
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
      raise ValueError(f"checkpoint in {ckpt.dir} holds a different item-to-leaf mapping")
    start = int(state.step)
    log.info("resuming from checkpoint step %d of %d (%s)", start, total_steps, ckpt.dir)
    print(f"Resuming from checkpoint at step {start} of {total_steps}")
  state = jax.device_put(state, replicated)
  tree_dev = jax.device_put(tree, replicated)
  index = jax.device_put(sampling.level_index(tree), replicated)
  base_key = jax.random.key(cfg.seed)

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
    batch = batch_for_step(cfg, ds, samples, step, steps_per_epoch, height)
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
    if cfg.stop_after_step and step + 1 == cfg.stop_after_step and not last:
      ckpt.close()
      raise SimulatedCrash(f"simulated crash after step {step + 1}")
  bar.close()
  ckpt.close()
  seconds = time.perf_counter() - t0
  return state.params, seconds, total_steps


# ---- evaluation ----------------------------------------------------------------------------

def retrieve(score_fn, params, tree, history: np.ndarray, *, beam_size: int, topk: int,
             batch_size: int, mesh: Mesh) -> np.ndarray:
  """Beam search for all users in fixed-size batches (one compilation). int32[U, topk]."""
  n = len(history)
  ndev = mesh.devices.size
  batch_size = max(ndev, batch_size - batch_size % ndev)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  tree_dev = jax.device_put(tree, replicated)
  out = []
  for lo in range(0, n, batch_size):
    h = history[lo:lo + batch_size]
    pad = batch_size - len(h)
    if pad:
      h = np.concatenate([h, np.full((pad, h.shape[1]), -1, h.dtype)])
    items, _ = bs.beam_search(score_fn, params, tree_dev, jax.device_put(h, data_sharding),
                              beam_size=beam_size, topk=topk)
    out.append(np.asarray(items)[:len(h) - pad])
  return np.concatenate(out)


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


def reference_rows(cfg: Config, ds, ev, eta) -> list[dict]:
  """The oracle (synthetic only) and a random retriever, for scale."""
  kmax = max(cfg.topk)
  rows = []
  if eta is not None:
    oracle = np.argsort(-eta, axis=1, kind="stable")[:, :kmax]
    rows.append(result_row("oracle", oracle, ev, ds, cfg, eta, train_seconds=0.0,
                           settings={"what": "top-K of the generator's posterior predictive"}))
  rng = np.random.default_rng([cfg.seed, 99])
  rand = np.stack([rng.choice(ds.num_items, kmax, replace=False) for _ in range(len(ev.users))])
  rows.append(result_row("random", rand, ev, ds, cfg, eta, train_seconds=0.0,
                         settings={"what": "K items uniformly at random"}))
  return rows


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Runs one experiment; returns the results dict also written to workdir/results.json."""
  cfg = config
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=1, default=list)
  if cfg.method != "tdr":
    raise ValueError(f"--method={cfg.method!r} is not available yet; choose 'tdr'")
  ds, world = load_data(cfg)
  print(f"dataset {cfg.dataset}: {ds.num_users} users, {ds.num_items} items, "
        f"{len(ds.seq_items)} interactions, {len(ds.train_sample_pos)} training samples")
  tree = tree_lib.build_from_categories(np.random.default_rng([cfg.seed, 3]), ds.item_category,
                                        branching=cfg.branching)
  tree_lib.validate(tree)
  mesh = make_mesh()
  score_fn, params = build_model(cfg, tree)
  params, seconds, steps = train_model(cfg, ds, tree, score_fn, params, workdir,
                                       corpus_fp=corpus_fingerprint(ds), mesh=mesh)
  ev = evaluation_set(cfg, ds)
  eta = synthetic_eta(world, ds, ev) if world is not None else None
  t0 = time.perf_counter()
  retrieved = retrieve(score_fn, params, tree, ev.history, beam_size=cfg.beam_size,
                       topk=max(cfg.topk), batch_size=cfg.eval_batch_size, mesh=mesh)
  eval_seconds = time.perf_counter() - t0
  settings = {"sampler": cfg.sampler, "num_negatives": cfg.num_negatives,
              "beam_size": cfg.beam_size, "steps": steps, "tree_height": tree.height,
              "eval_seconds": eval_seconds, "test_users": int(len(ev.users))}
  rows = [result_row(method_label(cfg), retrieved, ev, ds, cfg, eta, train_seconds=seconds,
                     settings=settings)]
  rows += reference_rows(cfg, ds, ev, eta)
  table = format_table(rows, cfg.topk)
  print(table)
  results = {"dataset": cfg.dataset, "results": rows}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"# {cfg.dataset}: test users {len(ev.users)}\n\n{table}\n")
  return results
