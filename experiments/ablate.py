"""Ablation sweeps over real trainings, with one results table and plot per sweep.

  python experiments/ablate.py --sweep=negatives               # TDR(T), TDR(U), JTM over m
  python experiments/ablate.py --sweep=sampler                 # uniform / top-down / full softmax
  python experiments/ablate.py --sweep=beam --values=20,60,150 # F@K and queries/s vs beam size
  python experiments/ablate.py --sweep=rounds --tree_rounds=4  # F@K per tree-learning round

Every config flag of run.py applies (`--preset`, `--data_dir`, `--dataset`, `--epochs`, ...);
`--methods` restricts the sweep's methods and `--values` sets its values. Each point (method x
value) trains in its own folder `<workdir>/<sweep>/<point>/` (beam: `<method>/beam-<b>/`) and
writes its `results.json` there when done; a rerun skips the points with a results file and
resumes an interrupted one from its checkpoints. A point records the settings and the corpus
(its fingerprint) it ran with, in `<point>/settings.json` when it starts and in its results:
a rerun under other settings or on another corpus is refused with one line naming what
differs, for a finished point as for a started one. The sweep writes `<workdir>/results.json`,
`<workdir>/results.md` and `<workdir>/<sweep>.png`; every table of retrieval metrics carries
the popularity row (and on synthetic data the oracle row), computed once per sweep.

* negatives: m = --values (default 5,10,20,40,70) negatives per level: `--num_negatives` of
  TDR, `--binary_negatives` of TDM/JTM (TDR paper Fig. 4).
* sampler: TDR with uniform negatives, top-down negatives and the full softmax over every level
  (`--full_softmax_nodes` = B^H; only when B^H <= --max_full_softmax_nodes, else the point is
  skipped with its reason), at equal steps and at equal wall-clock: a short timing of each
  sampler's training step (--timing_steps, kept in <workdir>/sampler/timing.json with the
  settings it was measured under, timed again when they change) scales the epochs of the
  slower ones to the fastest one's time. Each equal-steps model also gets the bias of the
  samplers (`tdr_jax.sampler_bias`): the KL divergence, on test users, of the negatives a
  sampler draws at a sampled level (below the --full_softmax_nodes levels) from the trained
  model's softmax over that level; other --bias_* flags measure a finished point again on
  its restored model, without training.
* beam: every tree method trained once (at the preset's beam; OTM's training beam is fixed to
  it) and its final tree evaluated at each beam of --values (default 20,40,60,100,150), with
  queries/s of the compiled search; brute-force DIN is the ceiling.
* rounds: F@K after each of --tree_rounds (default 4) rounds of joint learning (TDR paper
  Fig. 3), plus the control: the first method with --tree_learning=none (same rounds, the
  initial tree kept).

Bad input ends with one line `error: <message>` and status 2, as in run.py. Several hosts run a
sweep as run.py does (--coordinator_address, --num_processes, --process_id or --distributed,
one process per host, the same --workdir; README "From one machine to many"); process 0
writes the files.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import matplotlib
import numpy as np
from absl import app, flags, logging

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments import cli  # noqa: E402
from experiments.cli import (FLAGS, check_no_arguments, config_from_flags,  # noqa: E402
                             exit_on_input_error, parse_flags)
from tdr_jax import experiment, parallel, report, sampler_bias, sampling, train  # noqa: E402
from tdr_jax import training  # noqa: E402
from tdr_jax import config as config_lib  # noqa: E402
from tdr_jax import tree as tree_lib  # noqa: E402
from tdr_jax.config import Config  # noqa: E402
from tdr_jax.data import batches as batches_lib  # noqa: E402
from tdr_jax.data.preprocess import corpus_fingerprint  # noqa: E402
from tdr_jax.errors import InputError  # noqa: E402
from tdr_jax.evaluation import retrieve_at_beams  # noqa: E402
from tdr_jax.methods import METHODS, Context, reference, run_samples, tree_family  # noqa: E402

cli.define_distributed_flags()  # multi-host: --coordinator_address, --num_processes, ...
flags.adopt_module_key_flags(cli)  # --help lists the shared flags (config, --workdir, ...)
SWEEPS = ("negatives", "sampler", "beam", "rounds")
SAMPLERS = ("uniform", "top_down", "full_softmax")
DEFAULT_METHODS = {"negatives": ("tdr_t", "tdr_u", "jtm"), "sampler": SAMPLERS,
                   "beam": ("tdr_t", "tdr_u", "tdm", "jtm", "otm", "plt"),
                   "rounds": ("tdr_t", "tdr_u", "jtm")}
DEFAULT_VALUES = {"negatives": (5, 10, 20, 40, 70), "beam": (20, 40, 60, 100, 150)}
DEFAULT_ROUNDS = 4
# The sampler sweep's points: the registry method and the row label of each sampler.
SAMPLER_METHOD = {"uniform": "tdr_u", "top_down": "tdr_t", "full_softmax": "tdr_t"}
SAMPLER_LABEL = {"uniform": "uniform", "top_down": "top-down", "full_softmax": "full softmax"}

flags.DEFINE_enum("sweep", None, SWEEPS, "The ablation to run.")
flags.DEFINE_list("values", None, "The swept values: m for --sweep=negatives (default "
                  "5,10,20,40,70), beam sizes for --sweep=beam (default 20,40,60,100,150).")
flags.DEFINE_list("methods", None, "The sweep's methods (default: negatives tdr_t,tdr_u,jtm; "
                  "beam tdr_t,tdr_u,tdm,jtm,otm,plt; rounds tdr_t,tdr_u,jtm) or, for "
                  "--sweep=sampler, samplers (uniform,top_down,full_softmax).")
flags.DEFINE_integer("max_full_softmax_nodes", 8192, "Sampler sweep: the full softmax runs "
                     "only on trees whose leaf level has at most this many node slots (B^H).")
flags.DEFINE_integer("timing_steps", 20, "Sampler sweep: timed training steps per sampler "
                     "(after one compiled step) for the equal wall-clock points.")
flags.DEFINE_integer("bias_users", 64, "Sampler sweep: test users of the bias measurement.")
flags.DEFINE_integer("bias_samples", 4096, "Sampler sweep: negatives drawn per user and level "
                     "by each sampler for the bias measurement.")
flags.DEFINE_integer("bias_max_nodes", 1024, "Sampler sweep: the bias is measured at the "
                     "sampled levels (those with more than --full_softmax_nodes slots) with at "
                     "most this many valid nodes.")


@dataclasses.dataclass(frozen=True)
class Options:
  """What a sweep runs beyond the config (from the flags above)."""
  methods: tuple[str, ...]
  values: tuple[int, ...] = ()
  max_full_softmax_nodes: int = 8192
  timing_steps: int = 20
  bias_users: int = 64
  bias_samples: int = 4096
  bias_max_nodes: int = 1024


def allowed_methods(sweep: str, cfg: Config) -> tuple[str, ...]:
  """The method names `--methods` may list for `sweep`."""
  if sweep == "sampler":
    return SAMPLERS
  tree = tuple(tree_family.METHODS)
  if sweep == "negatives":  # the losses with sampled negatives
    return tuple(n for n in tree
                 if cfg.replace(**METHODS[n].settings).train.loss in ("softmax", "bce"))
  return tree


def parse_options(sweep: str, cfg: Config, *, values=None, methods=None, **ints) -> Options:
  """Options of `sweep` from the flags' values (lists of strings or None); InputError naming
  the flag for a value the sweep cannot take."""
  allowed = allowed_methods(sweep, cfg)
  names = tuple(dict.fromkeys(m.strip() for m in methods or () if m.strip()))
  names = names or DEFAULT_METHODS[sweep]
  bad = [m for m in names if m not in allowed]
  if bad:
    raise InputError(f"--methods={','.join(names)}: {bad} cannot run in the {sweep} sweep; "
                     f"choose from {', '.join(allowed)}")
  if sweep in ("sampler", "rounds"):
    if values:
      raise InputError(f"--values: the {sweep} sweep takes no values (" + (
          "its samplers come from --methods)" if sweep == "sampler" else
          "its rounds come from --tree_rounds)"))
    parsed = ()
  else:
    try:
      parsed = tuple(dict.fromkeys(int(v) for v in values)) if values else DEFAULT_VALUES[sweep]
    except ValueError:
      raise InputError(f"--values={','.join(values)}: expected comma-separated integers")
    low = cfg.eval.topk[0] if sweep == "beam" else 1
    if min(parsed) < low:
      raise InputError(f"--values={','.join(map(str, parsed))}: " + (
          f"a beam size must be at least the first --topk ({low})" if sweep == "beam" else
          "m must be at least 1"))
  if sweep == "rounds" and cfg.tree.tree_rounds < 2:
    raise InputError(f"--tree_rounds={cfg.tree.tree_rounds}: the rounds sweep needs at least 2 "
                     f"rounds")
  for name, value in ints.items():
    if value < 1:
      raise InputError(f"--{name}={value} must be at least 1")
  return Options(methods=names, values=parsed, **ints)


# ---- points -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
  """One trained configuration of a sweep.

  name: its folder under <workdir>/<sweep>/; method: the registry name; label: its row label;
  value: the swept value (JSON-able); overrides: config fields (flat names) over the method's
  settings; describe: its text in the progress line."""
  name: str
  method: str
  label: str
  value: Any
  overrides: dict
  describe: str


def point_config(cfg: Config, point: Point) -> Config:
  """The config `point` trains with: the run's, the method's settings over it, the point's
  overrides over those (an override may replace a method setting, e.g. the rounds control's
  --tree_learning=none)."""
  return cfg.replace(**{**METHODS[point.method].settings, **point.overrides})


@dataclasses.dataclass
class Runner:
  """The state of one sweep: its config, context (data, test users, warm start), folder, the
  corpus fingerprint every record carries and the progress counter."""
  sweep: str
  cfg: Config
  ctx: Context
  root: str
  corpus: str = ""
  total: int = 0
  count: int = 0

  @property
  def k0(self) -> int:
    return self.cfg.eval.topk[0]

  def head(self, describe: str) -> str:
    self.count += 1
    return f"[{self.count}/{self.total}] {self.sweep} {describe}"

  def f(self, row: dict) -> float:
    return row[f"f_measure@{self.k0}"]


def _jsonable(o):
  if hasattr(o, "item"):
    return o.item()
  if hasattr(o, "tolist"):
    return o.tolist()
  raise TypeError(f"not JSON-able: {type(o).__name__}")


def write_json(path: str, obj) -> None:
  """obj as JSON at path, atomically (a crash never leaves a half-written results file); only
  the writer process (process 0) writes."""
  if not parallel.is_writer():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_jsonable)
  os.replace(tmp, path)


def results_path(run: Runner, name: str) -> str:
  return os.path.join(run.root, name, "results.json")


# Settings a finished point's results do not depend on (folders, logging, checkpoint period).
# The data folder is left out because the corpus it holds is recorded instead (its
# fingerprint, `corpus_fingerprint`): a moved folder with the same data is the same point.
UNRECORDED = ("data_dir", "log_every", "checkpoint_every", "stop_after_step")


def point_settings(cfg: Config) -> dict:
  """The settings a point's results depend on, by flat field name (JSON values)."""
  return json.loads(json.dumps({name: value for name, value, _ in config_lib.leaves(cfg)
                                if name not in UNRECORDED}, default=list))


def check_recorded(path: str, record: dict, cfg: Config, corpus: str) -> None:
  """InputError (one line naming what differs) when `record` (a point's results.json or
  settings.json at `path`) was written for another corpus or with other settings than
  `cfg`."""
  if record.get("corpus") != corpus:
    raise InputError(f"{path} was written for another corpus (corpus fingerprint "
                     f"{record.get('corpus')} not {corpus}: other data under --data_dir or "
                     f"another --dataset); use another --workdir or the same data")
  now, then = point_settings(cfg), record.get("settings", {})
  differ = [name for name in now if then.get(name) != now[name]]
  if differ:
    raise InputError(f"{path} was written with other settings (" + ", ".join(
        f"--{n}={then.get(n)} not {now[n]}" for n in differ[:4]) + "); use another --workdir "
        "or the same flags")


def load_done(path: str, cfg: Config, corpus: str) -> dict | None:
  """The record of a finished point (None if it has no results file yet); InputError when it
  was written for another corpus or with other settings than `cfg` (`check_recorded`)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  check_recorded(path, record, cfg, corpus)
  return record


def start_point(run: Runner, folder: str, cfg: Config) -> None:
  """Before a point trains in `folder` (or resumes there): refuses a folder whose
  settings.json records another corpus or other settings (the checkpoints' own identity
  leaves out e.g. --epochs), else writes it."""
  path = os.path.join(folder, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      check_recorded(path, json.load(f), cfg, run.corpus)
  else:
    write_json(path, {"settings": point_settings(cfg), "corpus": run.corpus})


def skip_if_done(run: Runner, head: str, path: str, cfg: Config) -> dict | None:
  """The record at `path` of a finished point, with its `skipped (done)` line; None if the
  point is not finished."""
  record = load_done(path, cfg, run.corpus)
  if record is not None:
    print(f"{head}: skipped (done)", flush=True)
  return record


def point_record(point: Point) -> dict:
  """The fields of a point's record that name it."""
  return {"point": point.name, "method": point.method, "label": point.label,
          "value": point.value, "overrides": point.overrides}


def save_record(run: Runner, head: str, path: str, cfg: Config, record: dict, seconds: float,
                *, more: str = "", after: str = "") -> dict:
  """A finished point's record with its settings, corpus and seconds, written to `path`; prints
  its progress line `<head>: F@K0 <f><more> (<seconds> s<after>)`."""
  record = dict(record, settings=point_settings(cfg), corpus=run.corpus, seconds=seconds)
  write_json(path, record)
  print(f"{head}: F@{run.k0} {run.f(record['row']):.4f}{more} ({seconds:.0f} s{after})",
        flush=True)
  return record


@dataclasses.dataclass(frozen=True)
class Extra:
  """Measurements of a point's trained model beyond its row, kept under `key` in its record
  with the `settings` they were measured with: a finished point whose record holds other
  settings (or none) is measured again on its restored model, without training.
  `measure(out, cfg)`: the measurement (a dict), from the method's run output (`score_fn` and
  `models`, the last one measured)."""
  key: str
  settings: dict
  measure: Callable[[dict, Config], dict]


def restore_final_model(run: Runner, cfg: Config, folder: str) -> dict:
  """The final tree and parameters of a finished tree-family point in `folder`, read from its
  last round's tree and checkpoint (nothing trains): {"score_fn", "models": [(tree, params)]},
  like the method's run output."""
  last = cfg.tree.tree_rounds - 1
  tree = tree_lib.from_item_to_leaf(
      np.load(os.path.join(folder, "trees", f"round_{last}.npy")),
      branching=cfg.tree.branching, num_items=run.ctx.ds.num_items)
  score_fn, params = tree_family.build_model(cfg, tree)
  ckpt = training.Checkpointer(
      os.path.join(folder, f"round_{last}", "checkpoints"),
      identity={"config_fingerprint": cfg.fingerprint(), "corpus_fingerprint": run.corpus,
                "tree_fingerprint": training.fingerprint(np.asarray(tree.item_to_leaf))})
  try:
    step = ckpt.latest_step()
    if step is None:
      raise InputError(f"{folder}: no checkpoint of round {last} to measure; delete the "
                       f"point's results.json to train it again")
    like = {"state": train.init_state(params, train.make_optimizer()),
            "carry": {"carry": None, "phases": np.zeros((), np.int32)}}
    params = ckpt.restore(step, like)["state"].params
  finally:
    ckpt.close()
  return {"score_fn": score_fn, "models": [(tree, jax.device_get(params))]}


def run_point(run: Runner, point: Point, extra: Extra | None = None) -> dict:
  """Trains `point` (or resumes it) and writes its record to its results.json; a point with a
  results file is skipped (its `extra` measured again if its settings changed)."""
  path = results_path(run, point.name)
  folder = os.path.dirname(path)
  head = run.head(point.describe)
  method = METHODS[point.method]
  cfg = point_config(run.cfg, point)
  record = skip_if_done(run, head, path, cfg)
  if record is not None:
    if extra is not None and record.get(extra.key, {}).get("settings") != extra.settings:
      t0 = time.perf_counter()
      record = dict(record, **{extra.key: dict(
          extra.measure(restore_final_model(run, cfg, folder), cfg), settings=extra.settings)})
      write_json(path, record)
      print(f"{head}: {extra.key} measured again with " + ", ".join(
          f"--{k}={v}" for k, v in extra.settings.items()) +
          f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return record
  t0 = time.perf_counter()
  start_point(run, folder, cfg)
  out = method.run(run.ctx, cfg, folder)
  record = dict(point_record(point), row=dict(out["rows"][0], method=point.label))
  if "rounds" in out:
    record["rounds"] = [dict(r) for r in out["rounds"]]
  if extra is not None:
    record[extra.key] = dict(extra.measure(out, cfg), settings=extra.settings)
  return save_record(run, head, path, cfg, record, time.perf_counter() - t0)


# ---- the sweeps -----------------------------------------------------------------------------

def negatives_points(cfg: Config, opts: Options) -> list[Point]:
  """Each method at each m: --num_negatives of TDR, --binary_negatives of TDM/JTM."""
  points = []
  for name in opts.methods:
    method = METHODS[name]
    field = ("binary_negatives" if cfg.replace(**method.settings).train.loss == "bce"
             else "num_negatives")
    label = method.label_for(cfg)
    points += [Point(f"{name}-m{m}", name, f"{label} m={m}", m, {field: m}, f"{name} m={m}")
               for m in opts.values]
  return points


def sweep_negatives(run: Runner, opts: Options) -> dict:
  points = negatives_points(run.cfg, opts)
  run.total = len(points)
  records = [run_point(run, p) for p in points]
  series = {}
  for r in records:
    series.setdefault(METHODS[r["method"]].label_for(run.cfg), []).append(
        (r["value"], run.f(r["row"])))
  return {"records": records, "rows": [r["row"] for r in records], "series": series,
          "xlabel": "negatives per level m", "columns": [f"m={m}" for m in opts.values],
          "notes": ["m is --num_negatives of TDR and --binary_negatives of TDM/JTM."]}


def seconds_per_step(ctx: Context, cfg: Config, steps: int) -> float:
  """Seconds per training step of TDR with `cfg`'s sampler settings on the run's initial tree,
  on the default device: one step compiles, the next `steps` are timed (their host batch
  assembly included, as in training)."""
  ds = ctx.ds
  warm = ctx.warm_start()
  tree = tree_family.build_initial_tree(cfg, ds, warm["initial_tree"], warm["vectors"])
  score_fn, params = tree_family.build_model(cfg, tree)
  samples = run_samples(cfg, ds)
  per_epoch, _ = batches_lib.steps_for(len(samples), batch_size=cfg.train.batch_size,
                                       epochs=cfg.train.epochs)
  optimizer = train.make_optimizer(learning_rate=cfg.train.learning_rate,
                                   decay_steps=per_epoch, decay_rate=cfg.train.decay_rate)
  step_cfg = train.StepConfig(loss="softmax", sampler=cfg.train.sampler,
                              num_negatives=cfg.train.num_negatives,
                              full_softmax_nodes=cfg.train.full_softmax_nodes)
  step = jax.jit(train.make_train_step(score_fn, optimizer, step_cfg, branching=tree.branching,
                                       height=tree.height), donate_argnums=0)
  state = train.init_state(params, optimizer)
  index, key = sampling.level_index(tree), jax.random.key(cfg.seed)

  def batch(s: int) -> batches_lib.Batch:
    return batches_lib.batch_for_step(ds, samples, s, steps_per_epoch=per_epoch,
                                      batch_size=cfg.train.batch_size,
                                      history_len=cfg.data.history_len, seed=cfg.seed,
                                      levels=tree.height)

  state, _ = step(state, batch(0), tree, index, key)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    state, _ = step(state, batch(s), tree, index, key)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / steps


def bias_levels(tree: tree_lib.Tree, full_softmax_nodes: int, max_nodes: int
                ) -> tuple[list[int], int]:
  """(levels, F): the levels where the bias is measured, those a sampler draws negatives at
  (below the F levels with at most `full_softmax_nodes` slots, which every run trains with
  the full softmax: `train.num_full_levels`) with 3..`max_nodes` valid nodes."""
  full = train.num_full_levels(train.StepConfig(loss="softmax",
                                                full_softmax_nodes=full_softmax_nodes),
                               branching=tree.branching, height=tree.height)
  return [j for j in sampler_bias.measurable_levels(tree, max_nodes) if j > full], full


def sampler_bias_of(run: Runner, opts: Options) -> Extra:
  """The `bias` of an equal-steps point: the samplers' bias against its final model, at the
  levels the sampled runs draw negatives at (the run's --full_softmax_nodes, also for the
  full-softmax model, which trains every level with the full softmax)."""
  def measure(out: dict, cfg: Config) -> dict:
    tree, params = out["models"][-1]
    ev = run.ctx.ev
    has_label = np.flatnonzero(np.diff(ev.label_offsets) > 0)[:opts.bias_users]
    positives = ev.label_items[ev.label_offsets[has_label]]  # each user's first test item
    levels, full = bias_levels(tree, run.cfg.train.full_softmax_nodes, opts.bias_max_nodes)
    counts = tree_lib.valid_counts(tree)
    t0 = time.perf_counter()
    if levels:
      kl = sampler_bias.sampler_kl(jax.random.key(cfg.seed + 101), out["score_fn"], params,
                                   tree, ev.history[has_label], positives, levels=levels,
                                   num_samples=opts.bias_samples)
    else:  # no sampled level small enough to enumerate
      kl = {name: np.zeros(0) for name in (*sampler_bias.SAMPLERS, "users")}
    return {"levels": levels, "full_softmax_levels": full,
            "level_nodes": [int(counts[j]) for j in levels],
            "users": int(len(has_label)), "samples": opts.bias_samples,
            "top_down_users": kl["users"].tolist(), "seconds": time.perf_counter() - t0,
            **{name: kl[name].tolist() for name in sampler_bias.SAMPLERS},
            "mean": {name: _nanmean(kl[name]) for name in sampler_bias.SAMPLERS}}
  return Extra("bias", {"bias_users": opts.bias_users, "bias_samples": opts.bias_samples,
                        "bias_max_nodes": opts.bias_max_nodes}, measure)


def _nanmean(x) -> float | None:
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)) if np.isfinite(x).any() else None


def sampler_points(cfg: Config, opts: Options, num_items: int
                   ) -> tuple[dict[str, Point], dict[str, str]]:
  """The equal-steps point of each sampler of --methods that runs, and the reason of each one
  skipped (the full softmax over more than --max_full_softmax_nodes leaf slots)."""
  b = cfg.tree.branching
  height = tree_lib.tree_height(num_items, branching=b)
  full_nodes = b ** height
  skipped = {}
  if "full_softmax" in opts.methods and full_nodes > opts.max_full_softmax_nodes:
    skipped["full_softmax"] = (f"the leaf level has B^H = {b}^{height} = {full_nodes} node "
                               f"slots > --max_full_softmax_nodes={opts.max_full_softmax_nodes}")
  overrides = {"uniform": {}, "top_down": {}, "full_softmax": {"full_softmax_nodes": full_nodes}}
  points = {s: Point(f"{s}-steps", SAMPLER_METHOD[s], f"TDR {SAMPLER_LABEL[s]} (equal steps)", s,
                     overrides[s], f"{s} equal steps")
            for s in opts.methods if s not in skipped}
  return points, skipped


def clock_point(steps: Point, epochs: float) -> Point:
  """The equal wall-clock point of a sampler: its equal-steps point trained `epochs`."""
  s = steps.value
  return Point(f"{s}-clock", steps.method, f"TDR {SAMPLER_LABEL[s]} (equal wall-clock)", s,
               dict(steps.overrides, epochs=epochs), f"{s} equal wall-clock (epochs {epochs:.3g})")


def timing_of(timing: dict, sampler: str, wanted: dict) -> float | None:
  """The seconds/step of `sampler` kept in timing.json's dict `timing`, if it was measured
  under `wanted` (its point settings, --timing_steps and corpus); None: time it again."""
  entry = timing.get("samplers", {}).get(sampler)
  if entry is None or any(entry.get(k) != v for k, v in wanted.items()):
    return None
  return entry["seconds_per_step"]


def sweep_sampler(run: Runner, opts: Options) -> dict:
  cfg = run.cfg
  steps_points, skipped = sampler_points(cfg, opts, run.ctx.ds.num_items)
  active = list(steps_points)
  # A started sampler point under other settings is refused before anything is timed again.
  for p in steps_points.values():
    pcfg = point_config(cfg, p)
    for name in ("results.json", "settings.json"):
      path = os.path.join(run.root, p.name, name)
      if os.path.exists(path):
        with open(path) as f:
          check_recorded(path, json.load(f), pcfg, run.corpus)
  timing_path = os.path.join(run.root, "timing.json")
  timing = {}
  if os.path.exists(timing_path):
    with open(timing_path) as f:
      timing = json.load(f)
  if "samplers" not in timing:  # none yet, or the layout without settings: time every sampler
    timing = {"samplers": {}}
  sps = {}
  for s in active:
    pcfg = point_config(cfg, steps_points[s])
    wanted = {"settings": point_settings(pcfg), "timing_steps": opts.timing_steps,
              "corpus": run.corpus}
    sps[s] = timing_of(timing, s, wanted)
    if sps[s] is None:
      sps[s] = seconds_per_step(run.ctx, pcfg, opts.timing_steps)
      timing["samplers"][s] = dict(wanted, seconds_per_step=sps[s])
      print(f"timing {s}: {sps[s] * 1000:.1f} ms/step ({opts.timing_steps} steps)", flush=True)
      write_json(timing_path, timing)
  if active and parallel.process_count() > 1:  # multi-host: every process takes the equal
    shared = parallel.same_on_all(np.asarray([sps[s] for s in active], np.float32))  # wall-
    sps = {s: float(v) for s, v in zip(active, shared)}  # clock epochs from the writer's timing
  fastest = min(active, key=lambda s: sps[s]) if active else None
  epochs = {s: cfg.train.epochs * sps[fastest] / sps[s] for s in active}
  run.total = 2 * len(opts.methods)
  steps_records, clock_records, skipped_points = {}, {}, []
  for s in opts.methods:
    if s in skipped:
      print(f"{run.head(f'{s} equal steps')}: skipped ({skipped[s]})", flush=True)
      skipped_points.append({"point": f"{s}-steps", "sampler": s, "reason": skipped[s]})
      continue
    steps_records[s] = run_point(run, steps_points[s], extra=sampler_bias_of(run, opts))
  for s in opts.methods:
    if s in skipped:
      print(f"{run.head(f'{s} equal wall-clock')}: skipped ({skipped[s]})", flush=True)
      skipped_points.append({"point": f"{s}-clock", "sampler": s, "reason": skipped[s]})
      continue
    if s == fastest:
      print(f"{run.head(f'{s} equal wall-clock')}: the equal-steps run (the fastest sampler)",
            flush=True)
      record = dict(steps_records[s], same_as=f"{s}-steps")
    else:
      record = run_point(run, clock_point(steps_points[s], epochs[s]))
    record = dict(record, epochs=epochs[s], row=dict(
        record["row"], method=f"TDR {SAMPLER_LABEL[s]} (equal wall-clock)"))
    clock_records[s] = record
  records = list(steps_records.values()) + list(clock_records.values())
  notes = [f"Equal wall-clock: epochs x (seconds/step of {fastest}) / (seconds/step of the "
           f"sampler), from {opts.timing_steps} timed steps per sampler "
           f"({os.path.basename(timing_path)})." if fastest else "No sampler ran."]
  full = next((r["bias"]["full_softmax_levels"] for r in steps_records.values()), None)
  notes.append("Bias: mean over test users of KL(the sampler's negatives at a level || the "
               "model's softmax over that level without the user's positive), in nats, with "
               "the equal-steps model of each row; 'exact' draws as many negatives from that "
               "softmax itself: the floor of the estimate. The full softmax samples nothing. "
               "Measured at the sampled levels only" + (
                   f" (levels 1-{full} have at most --full_softmax_nodes="
                   f"{cfg.train.full_softmax_nodes} slots and train with the full softmax in "
                   f"every run)" if full else "") + ".")
  return {"records": records, "rows": [r["row"] for r in records],
          "timing": {"timing_steps": opts.timing_steps, "seconds_per_step": sps,
                     "fastest": fastest, "epochs": epochs},
          "skipped": skipped_points, "steps": steps_records, "clock": clock_records,
          "notes": notes}


def beam_points(cfg: Config, opts: Options) -> list[tuple[Point, list[Point]]]:
  """(training point, [its point at each beam of --values]) of each method: trained once in
  <method>/ at the run's beam (OTM's training beam fixed to it), searched at every beam."""
  out = []
  for name in opts.methods:
    method = METHODS[name]
    overrides = {}
    if cfg.replace(**method.settings).train.loss == "otm":
      overrides["otm_beam_size"] = cfg.eval.beam_size
    label = method.label_for(cfg)
    out.append((Point(name, name, label, None, overrides, name),
                [Point(os.path.join(name, f"beam-{b}"), name, f"{label} beam={b}", b, overrides,
                       f"{name} beam={b}") for b in opts.values]))
  return out


def sweep_beam(run: Runner, opts: Options) -> dict:
  cfg, ctx = run.cfg, run.ctx
  run.total = len(opts.methods) * len(opts.values) + 1
  records, series, qps = [], {}, {}
  notes = [f"Each tree method is trained once at the run's --beam_size={cfg.eval.beam_size} "
           f"and its final tree evaluated at every beam; queries/s times a second, compiled "
           f"search of the {len(ctx.ev.users)} test users in batches of "
           f"{cfg.eval.eval_batch_size}. Beams below a --topk cut-off report the cut-offs up "
           f"to the beam only."]
  for trained, points in beam_points(cfg, opts):
    mcfg = point_config(cfg, trained)
    if "otm_beam_size" in trained.overrides:
      notes.append(f"OTM trains its beam search and pseudo targets with --otm_beam_size="
                   f"{cfg.eval.beam_size} (the run's retrieval beam) once; at the other "
                   f"beams it searches with a beam it was not calibrated for (retraining it "
                   f"per beam would be OTM's own setting, at one training per beam).")
    done = {p.value: load_done(results_path(run, p.name), mcfg, run.corpus) for p in points}
    out, train_seconds = None, 0.0
    if any(r is None for r in done.values()):
      t0 = time.perf_counter()
      folder = os.path.join(run.root, trained.name)
      start_point(run, folder, mcfg)
      out = METHODS[trained.method].run(ctx, mcfg, folder)
      train_seconds = time.perf_counter() - t0
    for p in points:
      b = p.value
      head = run.head(p.describe)
      record = done[b]
      if record is not None:
        print(f"{head}: skipped (done)", flush=True)
      else:
        tree, params = out["models"][-1]
        t0 = time.perf_counter()
        (row,) = retrieve_at_beams(
            out["score_fn"], params, tree, ctx.ev, ctx.ds,
            mcfg.replace(topk=tuple(k for k in cfg.eval.topk if k <= b)), ctx.eta,
            label=p.label, beams=[b], mesh=ctx.mesh, path_scores=mcfg.train.loss == "plt")
        row["train_seconds"] = out["rows"][0]["train_seconds"]
        record = dict(point_record(p), row=row, queries_per_second=row["queries_per_second"],
                      train_and_restore_seconds=train_seconds)
        trained_note = (f", after {train_seconds:.0f} s training or restoring"
                        if train_seconds else "")
        record = save_record(run, head, results_path(run, p.name), mcfg, record,
                             time.perf_counter() - t0,
                             more=f", {row['queries_per_second']:.0f} queries/s",
                             after=trained_note)
        train_seconds = 0.0
      records.append(record)
      series.setdefault(trained.label, []).append((b, run.f(record["row"])))
      qps.setdefault(trained.label, []).append((b, record["queries_per_second"]))
  din = run_point(run, Point("din", "din", "DIN (brute force)", None, {}, "din (brute force)"))
  notes.append("DIN scores every item (the ceiling); its retrieval time "
               f"{din['row']['settings'].get('retrieve_seconds', float('nan')):.2f} s includes "
               "compilation.")
  return {"records": records + [din], "rows": [r["row"] for r in records] + [din["row"]],
          "series": series, "queries_per_second": qps, "ceiling": din["row"],
          "xlabel": "beam size", "columns": [f"beam={b}" for b in opts.values], "notes": notes}


def rounds_points(cfg: Config, opts: Options) -> list[Point]:
  """Each method's joint learning over --tree_rounds rounds, then the control: the first
  method with --tree_learning=none (the initial tree kept)."""
  rounds = cfg.tree.tree_rounds
  points = [Point(name, name, METHODS[name].label_for(cfg), rounds, {},
                  f"{name} ({rounds} rounds)") for name in opts.methods]
  first = opts.methods[0]
  points.append(Point(f"{first}-control", first,
                      f"{METHODS[first].label_for(cfg)} tree kept (control)", rounds,
                      {"tree_learning": "none"}, f"{first} tree_learning=none (control)"))
  return points


def sweep_rounds(run: Runner, opts: Options) -> dict:
  rounds = run.cfg.tree.tree_rounds
  points = rounds_points(run.cfg, opts)
  run.total = len(points)
  records = [run_point(run, p) for p in points]
  series = {r["label"]: [(i + 1, run.f(row)) for i, row in enumerate(r["rounds"])]
            for r in records}
  rows = []
  for r in records:
    rows += [dict(row, method=f"{r['label']} round {i + 1}") for i, row in enumerate(r["rounds"])]
  return {"records": records, "rows": rows, "series": series, "xlabel": "tree (round)",
          "columns": [f"round {i + 1}" for i in range(rounds)],
          "notes": [f"{rounds} rounds of joint learning; the control ({opts.methods[0]}, "
                    f"--tree_learning=none) trains as many rounds on the initial tree."]}


SWEEP_FNS = {"negatives": sweep_negatives, "sampler": sweep_sampler, "beam": sweep_beam,
             "rounds": sweep_rounds}


# ---- tables and plots -------------------------------------------------------------------

def reference_lines(reference_rows: list[dict]) -> list[dict]:
  """The rows every pivot table and plot shows for scale: oracle (synthetic) and popularity."""
  return [r for r in reference_rows if r["method"] in ("oracle", "popularity")]


def pivot_table(series: dict, columns: list[str], refs: list[dict], k: int,
                ceiling: dict | None = None, extra: dict | None = None) -> str:
  """Markdown: one row per series (F@k at each column), then the ceiling and reference rows
  (their F@k in every column). `extra[label][i]`: text appended to a cell."""
  lines = [f"| F@{k} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
  for label, pts in series.items():
    cells = [f"{v:.4f}" + (f" ({extra[label][i]})" if extra else "")
             for i, (_, v) in enumerate(pts)]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  for r in ([ceiling] if ceiling else []) + refs:
    lines.append(f"| {r['method']} | " + " | ".join([f"{r[f'f_measure@{k}']:.4f}"] *
                                                    len(columns)) + " |")
  return "\n".join(lines)


def sampler_tables(out: dict, refs: list[dict], k: int) -> list[str]:
  timing = out["timing"]
  lines = [f"| sampler | ms/step | F@{k} equal steps | epochs at equal wall-clock | "
           f"F@{k} equal wall-clock | bias: mean KL of its own sampler (exact floor) |",
           "|---|---|---|---|---|---|"]
  for s, rec in out["steps"].items():
    clock = out["clock"][s]
    mean = rec["bias"]["mean"]
    own = "0 (exact loss)" if s == "full_softmax" else (
        f"{mean[s]:.4f} ({mean['exact']:.4f})" if mean[s] is not None else "-")
    lines.append(f"| {SAMPLER_LABEL[s]} | {timing['seconds_per_step'][s] * 1000:.1f} | "
                 f"{rec['row'][f'f_measure@{k}']:.4f} | {clock['epochs']:.3g} | "
                 f"{clock['row'][f'f_measure@{k}']:.4f} | {own} |")
  for r in refs:
    lines.append(f"| {r['method']} | - | {r[f'f_measure@{k}']:.4f} | - | "
                 f"{r[f'f_measure@{k}']:.4f} | - |")
  for p in out["skipped"]:
    lines.append(f"| {SAMPLER_LABEL[p['sampler']]} ({p['point']}) | skipped: {p['reason']} "
                 f"| | | | |")
  bias = ["| model (equal steps) | level | valid nodes | uniform KL | top-down KL | "
          "exact floor |", "|---|---|---|---|---|---|"]
  for s, rec in out["steps"].items():
    b = rec["bias"]
    for i, j in enumerate(b["levels"]):
      bias.append(f"| {SAMPLER_LABEL[s]} | {j} | {b['level_nodes'][i]} | "
                  f"{report.fmt_or_dash(b['uniform'][i])} | "
                  f"{report.fmt_or_dash(b['top_down'][i])} | "
                  f"{report.fmt_or_dash(b['exact'][i])} |")
    bias.append(f"| {SAMPLER_LABEL[s]} | mean | | {report.fmt_or_dash(b['mean']['uniform'])} | "
                f"{report.fmt_or_dash(b['mean']['top_down'])} | "
                f"{report.fmt_or_dash(b['mean']['exact'])} |")
  return ["## Samplers", "", "\n".join(lines), "", "## Sampler bias (KL, nats)", "",
          "\n".join(bias), ""]


def _reference_hlines(ax, refs: list[dict], k: int, ceiling: dict | None = None) -> None:
  styles = {"oracle": ":", "popularity": "--"}
  for r in ([ceiling] if ceiling else []) + refs:
    ax.axhline(r[f"f_measure@{k}"], color="gray" if r is not ceiling else "black",
               linestyle=styles.get(r["method"], "-."), label=r["method"])


def plot_sweep(path: str, sweep: str, out: dict, refs: list[dict], k: int, title: str) -> None:
  """PNG of the sweep: F@k against the swept value (sampler: bars; beam: and queries/s)."""
  ncols = 2 if sweep in ("sampler", "beam") else 1
  fig, axes = plt.subplots(1, ncols, figsize=(5.8 * ncols, 4.2), squeeze=False)
  ax = axes[0, 0]
  if sweep == "sampler":
    names = list(out["steps"])
    x = np.arange(len(names))
    for off, what, recs in ((-0.2, "equal steps", out["steps"]),
                            (0.2, "equal wall-clock", out["clock"])):
      ax.bar(x + off, [recs[s]["row"][f"f_measure@{k}"] for s in names], 0.4, label=what)
    ax.set_xticks(x, [SAMPLER_LABEL[s] for s in names])
    _reference_hlines(ax, refs, k)
    ax2 = axes[0, 1]
    for s in names:
      b = out["steps"][s]["bias"]
      for name, style in (("uniform", "o-"), ("top_down", "s-")):
        ax2.plot(b["levels"], b[name], style, label=f"{SAMPLER_LABEL[name]} | "
                 f"{SAMPLER_LABEL[s]} model")
      ax2.plot(b["levels"], b["exact"], "k:", alpha=0.5)
    levels = sorted({j for s in names for j in out["steps"][s]["bias"]["levels"]})
    ax2.set_xticks(levels, [str(j) for j in levels])
    ax2.set_xlabel("tree level")
    ax2.set_ylabel("KL(sampler || model softmax), nats")
    ax2.set_title("sampler bias (dotted: estimator floor)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
  else:
    for label, pts in out["series"].items():
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
              linestyle="--" if "control" in label else "-")
    _reference_hlines(ax, refs, k, out.get("ceiling"))
    ax.set_xlabel(out["xlabel"])
    if sweep == "negatives":
      ax.set_xscale("log")
      ax.minorticks_off()
    xs = sorted({p[0] for pts in out["series"].values() for p in pts})
    ax.set_xticks(xs, [str(x) for x in xs])
    if sweep == "beam":
      ax2 = axes[0, 1]
      for label, pts in out["queries_per_second"].items():
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
      ax2.set_xticks(xs, [str(x) for x in xs])
      ax2.set_xlabel("beam size")
      ax2.set_ylabel("queries / s")
      ax2.set_yscale("log")
      ax2.legend(fontsize=7)
      ax2.grid(alpha=0.3)
  ax.set_ylabel(f"F@{k}")
  ax.set_title(title)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_sweep(sweep: str, cfg: Config, workdir: str, opts: Options) -> dict:
  """Runs `sweep` (see the module docstring) and writes <workdir>/results.json, results.md and
  <sweep>.png; returns the results dict."""
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), cfg.to_json())
  ctx = experiment.make_context(cfg, os.path.join(workdir, sweep))
  run = Runner(sweep=sweep, cfg=cfg, ctx=ctx, root=os.path.join(workdir, sweep),
               corpus=corpus_fingerprint(ctx.ds))
  out = SWEEP_FNS[sweep](run, opts)
  ref_rows = reference.reference_rows(ctx)  # once per sweep, in every table below
  refs = reference_lines(ref_rows)
  k, ks = run.k0, cfg.eval.topk
  rows = out["rows"] + ref_rows
  warnings = report.flag_near_popularity(rows, k)
  table = report.format_table(rows, ks)
  print(table)
  for w in warnings:
    print(w)
  title = f"{cfg.data.dataset} ({cfg.preset}): {sweep}"
  md = [f"# Ablation {sweep}: {cfg.data.dataset}, preset {cfg.preset}, test users "
        f"{len(ctx.ev.users)}", ""] + [f"* {n}" for n in out["notes"]] + ["", table, ""]
  md += [f"* {w}" for w in warnings] + ([""] if warnings else [])
  if sweep == "sampler":
    md += sampler_tables(out, refs, k)
  else:
    extra = None
    if sweep == "beam":
      extra = {label: [f"{q:.0f} q/s" for _, q in pts]
               for label, pts in out["queries_per_second"].items()}
    md += [f"## F@{k} by {out['xlabel']}" + (" (queries/s)" if extra else ""), "",
           pivot_table(out["series"], out["columns"], refs, k, out.get("ceiling"), extra), ""]
  plot = f"{sweep}.png"
  if parallel.is_writer():
    plot_sweep(os.path.join(workdir, plot), sweep, out, refs, k, title)
  md += [f"![{sweep}]({plot})", ""]
  results = {"sweep": sweep, "dataset": cfg.data.dataset, "preset": cfg.preset, "k": k,
             "topk": list(ks), "methods": list(opts.methods), "values": list(opts.values),
             "points": out["records"], "rows": rows, "reference": ref_rows,
             "warnings": warnings, "notes": out["notes"], "plot": plot}
  for key in ("timing", "skipped", "series", "queries_per_second"):
    if key in out:
      results[key] = out[key]
  write_json(os.path.join(workdir, "results.json"), results)
  if parallel.is_writer():
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write("\n".join(md))
  return json.loads(json.dumps(results, default=_jsonable))


# ---- the binary -------------------------------------------------------------------------

def options_from_flags(sweep: str, cfg: Config) -> Options:
  return parse_options(sweep, cfg, values=FLAGS.values, methods=FLAGS.methods,
                       max_full_softmax_nodes=FLAGS.max_full_softmax_nodes,
                       timing_steps=FLAGS.timing_steps, bias_users=FLAGS.bias_users,
                       bias_samples=FLAGS.bias_samples, bias_max_nodes=FLAGS.bias_max_nodes)


def run(argv) -> dict:
  check_no_arguments(argv)
  sweep = FLAGS.sweep
  if sweep is None:
    raise InputError(f"--sweep: required; choose from {', '.join(SWEEPS)}")
  if FLAGS["method"].value is not None:
    raise InputError("--method: ablate.py runs the sweep's methods; choose them with --methods")
  cfg = config_from_flags(**({"tree_rounds": DEFAULT_ROUNDS} if sweep == "rounds" else {}))
  opts = options_from_flags(sweep, cfg)  # before the workdir is made
  cli.init_distributed()  # before any JAX call (multi-host: the default workdir is no clock's)
  workdir = FLAGS.workdir or os.path.join("runs", f"ablate-{sweep}-{cfg.data.dataset}-"
                                                  f"{cfg.preset}")
  logging.set_verbosity(logging.WARNING)  # Orbax and XLA are chatty at INFO
  print(f"workdir: {workdir}")
  return run_sweep(sweep, cfg, workdir, opts)


def main(argv):
  exit_on_input_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
