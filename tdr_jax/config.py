"""Run configuration: nested dataclasses, presets as data, absl flags generated from fields.

    cfg = make_config("smoke", num_negatives=8, topk=(5, 10))   # flat names are unique
    cfg.train.num_negatives, cfg.eval.topk, cfg.fingerprint()

Every leaf field is a flag of `experiments/run.py` under its own name (`--num_negatives`,
`--topk=5,10`); a flag left unset keeps the preset's value. A field's metadata carries its help
text, its choices (an enum flag) and whether it enters the checkpoint fingerprint (settings
that change the trained model do; evaluation, logging and run length do not). "Unset" is None.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Iterator

from absl import flags

from tdr_jax import deep_retrieval
from tdr_jax.errors import InputError
from tdr_jax.training import fingerprint as fingerprint_of

OTM_DEFAULT_WARMUP = 0.5  # --otm_warmup when unset (BUILD_NOTES, OTM)
PAPER_WINDOWS = (1, 1, 1, 2, 2, 2, 10, 10, 20, 20)
INITIAL_TREES = ("auto", "category", "kmeans", "random")


def field(default, help: str, *, choices=None, fingerprint: bool | str = True,
          flag: bool = True):
  """A config field: its default, help text, enum choices, whether the checkpoint fingerprint
  includes it (True, False, or "if_set": only when not None, so that adding an optional
  setting leaves the fingerprints of every run that does not set it unchanged) and whether it
  is a command-line flag."""
  meta = {"help": help, "choices": choices, "fingerprint": fingerprint, "flag": flag}
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class DataConfig:
  dataset: str = field("synthetic", "synthetic, movielens, tmall, taobao, amazon_books, mind or "
                       "csv.")
  data_dir: str = field("data", "Folder of the raw files (and the preprocessing cache); default "
                        "data/<dataset>.", fingerprint=False)
  min_user_interactions: int = field(15, "Users with fewer interactions are dropped.")
  history_len: int = field(69, "History length L (--windows must sum to it).")
  max_train_samples: int | None = field(None, "Use a seeded subset of this many training "
                                        "samples (unset or 0: all).")
  loader_options: tuple = field((), "Sorted (key, value) options of the loader (from "
                                "--loader_option).", flag=False)
  skip_bad_rows: bool = field(False, "Skip (and count) malformed rows of the raw files instead "
                              "of stopping at the first.")
  synthetic_users: int = field(8000, "Users of the synthetic dataset.")
  synthetic_items: int = field(5000, "Items of the synthetic dataset.")
  synthetic_world: str = field("v2", "Generator version of the synthetic dataset (v1 = the old "
                               "default).", choices=("v1", "v2"))
  synthetic_categories: bool = field(True, "Synthetic dataset: write the (noisy) item "
                                     "categories; false: the items have none.")


@dataclasses.dataclass
class ModelConfig:
  embed_dim: int = field(24, "Node/item embedding width.")
  windows: tuple[int, ...] = field(PAPER_WINDOWS, "Time-window sizes, most recent first.")
  attention_hidden: tuple[int, ...] = field((36,), "Hidden sizes of the attention unit.")
  mlp_hidden: tuple[int, ...] = field((128, 64), "Hidden sizes of the scorer's MLP.")
  hierarchical: bool = field(True, "Per-level attention queries (TDR's scorer).")


@dataclasses.dataclass
class TrainConfig:
  epochs: float = field(1.0, "Training epochs per round (fractions allowed).", fingerprint=False)
  batch_size: int = field(256, "Training batch size (divisible by the device count).")
  learning_rate: float = field(1e-3, "Adam learning rate.")
  decay_rate: float = field(0.9, "Learning rate multiplied by this once per epoch.")
  loss: str = field("softmax", "softmax (TDR), bce (TDM/JTM: binary loss, uniform negatives), "
                    "otm (binary loss on beam-search nodes with pseudo targets) or plt "
                    "(per-node classifiers, path-product beam search).",
                    choices=("softmax", "bce", "otm", "plt"))
  sampler: str = field("top_down", "Negative sampler of the softmax loss.",
                       choices=("uniform", "top_down"))
  num_negatives: int = field(70, "Negatives per level (paper: 70).")
  full_softmax_nodes: int = field(128, "Levels with at most this many nodes use the full "
                                  "softmax.")
  binary_negatives: int = field(6, "Negatives per level of TDM/JTM (paper sec. 8.4: 3-6).")
  otm_beam_size: int | None = field(None, "OTM: beam size of the training beam search (unset: "
                                    "the retrieval --beam_size, the beam OTM's targets are "
                                    "calibrated for; set only to train with another beam).")
  otm_ancestor_nodes: bool = field(False, "OTM: also train on the positives' ancestors at "
                                   "every level (off: the training beam's candidates only, as "
                                   "OTM Algorithm 1).")
  otm_warmup: float | None = field(None, "OTM: share of each round's steps trained first with "
                                   "plain ancestor targets over the beam candidates + the "
                                   "positives' ancestors, before the pseudo targets (0: the "
                                   "paper's algorithm from the first step; default "
                                   f"{OTM_DEFAULT_WARMUP}).", fingerprint="if_set")
  otm_warmup_loss: str | None = field(
      None, "OTM: what the warm-up trains: beam (plain targets over the beam candidates + the "
      "positives' ancestors) or jtm (JTM's loss: the positive against --binary_negatives "
      "uniform negatives per level, so the pseudo targets start from a JTM-trained model); "
      "default beam.", choices=("beam", "jtm"), fingerprint="if_set")
  otm_all_levels: bool | None = field(
      None, "OTM: train every level 1..H (default off: only the levels from the training "
      "beam's start level down, the ones beam search ranks, as the OTM authors' code).",
      fingerprint="if_set")
  label_window: int = field(1, "OTM: multi-label training instances, labels = the distinct "
                            "items of the next W interactions (1: the next item only).")
  rectify: bool = field(False, "TDR(T-RL): rectified labels (Eq. 15) at the levels from the "
                        "retrieval beam search's start level down (the levels above keep "
                        "plain labels).")
  rectify_estimator: str = field("sasrec", "Estimator of eta for --rectify: a SASRec model "
                                 "trained once per workdir, or exact (the synthetic "
                                 "generator's true next-item probabilities; synthetic data "
                                 "only). Recorded in the round checkpoints of rectified runs.",
                                 choices=("sasrec", "exact"), fingerprint=False)
  checkpoint_every: int = field(500, "Checkpoint period in steps.", fingerprint=False)
  log_every: int = field(50, "Steps between host syncs (loss checks, progress).",
                         fingerprint=False)
  stop_after_step: int | None = field(None, "Testing: stop with SimulatedCrash after this "
                                      "global step (all rounds).", fingerprint=False)


@dataclasses.dataclass
class TreeConfig:
  branching: int = field(2, "Tree branching factor B.")
  tree_rounds: int = field(1, "Trees learned in turn with the model (JTM Alg. 1); 1 = keep the "
                           "initial tree.")
  tree_learning: str = field("tdr", "Tree update between rounds: tdr (Eq. 24), jtm (binary "
                             "log-likelihood), tdm (k-means) or none (keep the initial tree: "
                             "the control).", choices=("tdr", "jtm", "tdm", "none"))
  tree_gap: int = field(7, "Layer gap d of tree learning (paper: 7).")
  tree_users_per_item: int = field(20, "Cap on the samples per item in tree learning.")
  tree_path_levels: bool | None = field(None, "Score a candidate node by the sum over every "
                                        "level of the gap (JTM Algorithm 2) instead of the "
                                        "gap's last level (TDR Eq. 24); unset: on for "
                                        "--tree_learning=jtm, off for tdr.")
  tree_assignment: str = field("priced", "Capacity rule of tree learning: the paper's greedy "
                               "pass on the matching scores, or the same pass on scores minus "
                               "Sinkhorn capacity prices.", choices=("greedy", "priced"))
  forest: bool = field(True, "Also retrieve with the forest of every round's tree+model.")
  initial_tree: str = field("auto", "Initial tree: categories, balanced k-means over "
                            "warm-start item vectors, random, or auto (categories when present "
                            "and informative, else k-means).", choices=INITIAL_TREES)
  warm_start: bool = field(True, "Initialise the node embeddings of the tree methods and of "
                           "brute-force DIN from warm-start item vectors.")
  warm_start_model: str = field("svd", "Warm-start item vectors: truncated SVD of the training "
                                "user-item matrix or a two-tower model (YouTubeDNN).",
                                choices=("svd", "two_tower"))
  warm_start_epochs: float = field(3.0, "Epochs of the warm-start two-tower model.")


@dataclasses.dataclass
class EvalConfig:
  beam_size: int = field(150, "Beam size k (paper: 150).", fingerprint=False)
  topk: tuple[int, ...] = field((20, 40, 60), "Cut-offs K, e.g. 20,40,60.", fingerprint=False)
  eval_batch_size: int = field(256, "Test users per retrieval batch.", fingerprint=False)
  max_eval_users: int | None = field(None, "Evaluate on the first N test users only.",
                                     fingerprint=False)
  beam_diagnostics: bool = field(True, "Tree methods: per-level beam recall of the final tree "
                                 "vs brute force on the test users (results.json, "
                                 "beam_levels*.png).", fingerprint=False)


@dataclasses.dataclass
class SASRecConfig:
  sasrec_epochs: float = field(1.0, "Epochs of the SASRec estimator of --rectify.")
  sasrec_dim: int = field(64, "Width of the SASRec estimator of --rectify.")


@dataclasses.dataclass
class DRSection:
  dr_preset: str | None = field(None, "Deep Retrieval settings (default: by dataset).",
                                choices=tuple(sorted(deep_retrieval.PRESETS)))
  dr_alpha: float | None = field(None, "Deep Retrieval path-size penalty alpha (default: the "
                                 "DR preset's).")
  dr_beam_size: int | None = field(None, "Deep Retrieval inference beam (paths).")
  dr_em_rounds: int | None = field(None, "Deep Retrieval M-steps.")
  dr_init_paths: str | None = field(None, "Deep Retrieval initial paths: random, or kmeans "
                                    "(hierarchical k-means of the warm-start item vectors; "
                                    "default: the DR preset's).",
                                    choices=deep_retrieval.INIT_PATHS)
  dr_epochs_per_estep: float | None = field(None, "Deep Retrieval epochs per E-step (default: "
                                            "the DR preset's).", fingerprint="if_set")
  dr_first_estep_epochs: float | None = field(None, "Deep Retrieval epochs of the first E-step, "
                                              "before the first M-step (default: "
                                              "--dr_epochs_per_estep).", fingerprint="if_set")
  dr_rerank_esteps: int | None = field(None, "Deep Retrieval: the reranker trains in the first "
                                       "N E-steps only, then is frozen (paper's schedule: 2 of "
                                       "4); default: in every E-step.", fingerprint="if_set")
  dr_prefix_bias: bool | None = field(None, "Deep Retrieval: a learned logit bias per (path "
                                      "prefix, code) in every structure layer (an addition "
                                      "to the paper; default: the DR preset's).",
                                      fingerprint="if_set")
  dr_prefix_bias_init: str | None = field(None, "Deep Retrieval: initial prefix bias, zeros or "
                                          "prior (log path-code frequencies of the training "
                                          "targets' initial paths; needs --dr_prefix_bias); "
                                          "default: the DR preset's.",
                                          choices=("zeros", "prior"), fingerprint="if_set")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "tree": TreeConfig,
            "eval": EvalConfig, "sasrec": SASRecConfig, "dr": DRSection}


@dataclasses.dataclass
class Config:
  """Every setting of a run, by section. Presets fill these; flags override single fields."""
  preset: str = field("default", "paper: TDR sec. 8.4 settings; default: fits `make run` on a "
                      "2-core CPU; smoke: seconds, for tests.", fingerprint=False,
                      choices=("paper", "default", "smoke"))
  method: str = field("tdr", "Retrieval method(s), comma-separated, or 'all' (see "
                      "tdr_jax.methods.METHODS).")
  seed: int = field(0, "Seed of data split, tree, init and sampling.")
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  tree: TreeConfig = dataclasses.field(default_factory=TreeConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  sasrec: SASRecConfig = dataclasses.field(default_factory=SASRecConfig)
  dr: DRSection = dataclasses.field(default_factory=DRSection)

  def fingerprint(self) -> str:
    """Hash of the settings that determine the trained model (not eval or run length)."""
    return fingerprint_of({name: value for name, value, f in leaves(self)
                           if f.metadata.get("fingerprint", True) is True
                           or (f.metadata.get("fingerprint") == "if_set" and value is not None)})

  def replace(self, **flat) -> "Config":
    """A copy with leaf fields (by their unique names) replaced."""
    out = dataclasses.replace(self)
    for section in SECTIONS:
      setattr(out, section, dataclasses.replace(getattr(self, section)))
    for name, value in flat.items():
      section = _SECTION_OF.get(name)
      if section is None and name not in _TOP:
        raise InputError(f"unknown config field {name!r}")
      setattr(getattr(out, section) if section else out, name, value)
    return out

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def leaves(cfg: Config) -> Iterator[tuple[str, Any, dataclasses.Field]]:
  """(name, value, field) of every leaf setting, top-level ones first."""
  for f in dataclasses.fields(cfg):
    if f.name not in SECTIONS:
      yield f.name, getattr(cfg, f.name), f
  for section in SECTIONS:
    sub = getattr(cfg, section)
    for f in dataclasses.fields(sub):
      yield f.name, getattr(sub, f.name), f


_TOP = {f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS}
_SECTION_OF = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
assert not set(_SECTION_OF) & _TOP and len(_SECTION_OF) == sum(
    len(dataclasses.fields(c)) for c in SECTIONS.values()), "leaf names must be unique"


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


def make_config(preset: str = "default", **overrides) -> Config:
  """The preset's config with `overrides` (leaf fields by name; None = keep the preset's)."""
  if preset not in PRESETS:
    raise InputError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  bad = set(overrides) - set(_SECTION_OF) - _TOP
  if bad:
    raise InputError(f"unknown config fields {sorted(bad)}")
  values = dict(PRESETS[preset])
  values.update({k: v for k, v in overrides.items() if v is not None})
  cfg = Config(preset=preset).replace(**values)
  validate(cfg)
  return cfg


def validate(cfg: Config) -> None:
  """InputError naming the flag for a setting or combination that cannot run."""
  for name, value, f in leaves(cfg):
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
      raise InputError(f"--{name}={value!r}: choose from {', '.join(choices)}")
  if sum(cfg.model.windows) != cfg.data.history_len:
    raise InputError(f"windows {cfg.model.windows} sum to {sum(cfg.model.windows)} but "
                     f"history_len is {cfg.data.history_len}; pass --windows that sum to "
                     f"--history_len")
  values = {n: v for n, v, _ in leaves(cfg)}
  for name in ("tree_rounds", "otm_beam_size", "label_window", "batch_size", "branching",
               "eval_batch_size"):
    value = values[name]
    if value is not None and value < (2 if name == "branching" else 1):  # otm_beam_size: unset
      raise InputError(f"--{name}={value} is too small")
  if values["otm_warmup"] is not None and not 0 <= values["otm_warmup"] <= 1:
    raise InputError(f"--otm_warmup={values['otm_warmup']} must be in [0, 1]")
  for name in ("dr_epochs_per_estep", "dr_first_estep_epochs"):
    if values[name] is not None and values[name] <= 0:
      raise InputError(f"--{name}={values[name]} must be positive")
  if values["dr_rerank_esteps"] is not None and values["dr_rerank_esteps"] < 1:
    raise InputError(f"--dr_rerank_esteps={values['dr_rerank_esteps']} must be at least 1")
  if cfg.tree.warm_start_epochs <= 0:
    raise InputError(f"--warm_start_epochs={cfg.tree.warm_start_epochs} must be positive")
  if cfg.train.rectify_estimator == "exact" and cfg.data.dataset != "synthetic":
    raise InputError(f"--rectify_estimator=exact needs the synthetic generator's eta; "
                     f"--dataset={cfg.data.dataset} has none (use --rectify_estimator=sasrec)")
  if cfg.eval.beam_size < max(cfg.eval.topk):
    raise InputError(f"--beam_size={cfg.eval.beam_size} must be at least "
                     f"max(--topk)={max(cfg.eval.topk)}")


# ---- flags ---------------------------------------------------------------------------------

def _flag_type(f: dataclasses.Field, hints: dict) -> str:
  t = hints[f.name]
  args = [a for a in typing.get_args(t) if a is not type(None)]
  base = args[0] if typing.get_origin(t) in (typing.Union, types.UnionType) else t
  if typing.get_origin(base) is tuple:
    return "list"
  return {int: "integer", float: "float", str: "string", bool: "bool"}[base]


def define_flags(flag_values) -> None:
  """One absl flag per leaf field (same name, help from the field; default None = unset)."""
  for cls in (Config, *SECTIONS.values()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if f.name in SECTIONS or not f.metadata.get("flag", True):
        continue
      kind, help_ = _flag_type(f, hints), f.metadata["help"]
      choices = f.metadata.get("choices")
      if choices:
        flags.DEFINE_enum(f.name, None, list(choices), help_, flag_values=flag_values)
      else:
        getattr(flags, f"DEFINE_{kind}")(f.name, None, help_, flag_values=flag_values)


def overrides_from_flags(flag_values) -> dict:
  """The leaf fields set on the command line, converted to their field types."""
  out = {}
  for cls in (Config, *SECTIONS.values()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if f.name in SECTIONS or f.name not in flag_values:
        continue
      value = flag_values[f.name].value
      if value is None:
        continue
      if _flag_type(f, hints) == "list":
        try:
          value = tuple(int(x) for x in value)
        except ValueError:
          raise InputError(f"--{f.name}={','.join(value)}: expected comma-separated integers")
      out[f.name] = value
  return out
