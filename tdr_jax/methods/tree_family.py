"""The tree-index methods: TDR (U / T / T-RL), TDM, JTM, OTM and PLT on one DIN scorer.

One run of a tree method is joint learning (JTM Algorithm 1): round r trains the scorer on
tree r (continuing from the previous round's parameters, a fresh optimizer, the batch stream
continuing where round r-1 stopped), evaluates it by beam search, and (except after the last
round) learns tree r+1 with the model fixed and moves the scorer's node rows to the new tree.
With `--forest`, every round's (tree, model) retrieves together (union of candidates,
reranked). The variants differ only in settings (`METHODS[name].settings`).
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tdr_jax import beam_diagnostics
from tdr_jax import beam_search as bs
from tdr_jax import forest as forest_lib
from tdr_jax import label_tree
from tdr_jax import rectification, sampling, scorer, train, training, tree_learning, warm_start
from tdr_jax import tree as tree_lib
from tdr_jax.config import OTM_DEFAULT_WARMUP, Config
from tdr_jax.data import batches as batches_lib
from tdr_jax.data import synthetic
from tdr_jax.data.preprocess import corpus_fingerprint, train_batch
from tdr_jax.errors import InputError
from tdr_jax.evaluation import rerank_all, result_row, retrieve
from tdr_jax.methods.base import Context, Method, run_samples
from tdr_jax.models import sasrec
from tdr_jax.report import fmt_or_dash


def method_label(cfg: Config) -> str:
  if cfg.train.loss in ("otm", "plt"):
    return cfg.train.loss.upper()
  if cfg.train.loss == "bce":
    return {"tdm": "TDM", "jtm": "JTM"}.get(cfg.tree.tree_learning, "binary")
  base = {"uniform": "U", "top_down": "T"}[cfg.train.sampler]
  return f"TDR({base}-RL)" if cfg.train.rectify else f"TDR({base})"


def otm_training_beam(cfg: Config) -> int:
  """The beam size of OTM's training beam search: --otm_beam_size when set, else the retrieval
  --beam_size (OTM's pseudo targets make the search Bayes-optimal only for the beam it trains
  with)."""
  k = cfg.train.otm_beam_size
  return cfg.eval.beam_size if k is None else k


def otm_warmup_steps(cfg: Config, round_steps: int) -> int:
  """Steps of an OTM round trained with plain ancestor targets before the pseudo targets
  (`train.StepConfig.plain_target_steps`): --otm_warmup (default `OTM_DEFAULT_WARMUP`) of the
  round's steps; 0 for the other losses."""
  if cfg.train.loss != "otm":
    return 0
  share = OTM_DEFAULT_WARMUP if cfg.train.otm_warmup is None else cfg.train.otm_warmup
  return int(round(share * round_steps))


def otm_first_level(cfg: Config, tree: tree_lib.Tree) -> int:
  """First level OTM trains (`train.StepConfig.first_level`): 1 with --otm_all_levels, else
  the training beam's start level (the levels above it hold at most k nodes each, so beam
  search keeps them whole and their scores rank nothing)."""
  if cfg.train.loss != "otm" or cfg.train.otm_all_levels:
    return 1
  return bs.start_level(branching=tree.branching, height=tree.height,
                        beam_size=otm_training_beam(cfg))


def build_model(cfg: Config, tree: tree_lib.Tree):
  """The DIN scorer over the nodes of `tree` (seeded by the run): (score_fn, params)."""
  return scorer.init_din(jax.random.key(cfg.seed), tree, embed_dim=cfg.model.embed_dim,
                         windows=cfg.model.windows, attention_hidden=cfg.model.attention_hidden,
                         mlp_hidden=cfg.model.mlp_hidden, hierarchical=cfg.model.hierarchical)


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
  return _map_node_table(params, lambda x: warm_start.node_rows(
      vectors, tree, width=x.shape[1], rms=float(np.sqrt(np.mean(x.astype(np.float64) ** 2))),
      seed=cfg.seed))


def remap_params(params, old: tree_lib.Tree, new: tree_lib.Tree):
  """The scorer's parameters with its per-node rows (the node-embedding table) moved from tree
  `old` to tree `new` (`tree.remap_node_rows`); every other parameter is unchanged."""
  return _map_node_table(params, lambda x: tree_lib.remap_node_rows(x, old, new))


def build_initial_tree(cfg: Config, ds, kind: str, vectors) -> tree_lib.Tree:
  rng = np.random.default_rng([cfg.seed, 3])
  if kind == "category":
    return tree_lib.build_from_categories(rng, ds.item_category, branching=cfg.tree.branching)
  if kind == "kmeans":
    return tree_lib.build_kmeans(rng, np.asarray(vectors, np.float32),
                                 branching=cfg.tree.branching)
  return tree_lib.build_random(rng, ds.num_items, branching=cfg.tree.branching)


def rectify_from_level(cfg: Config, tree: tree_lib.Tree) -> int:
  """The first tree level with rectified labels: the start level of the retrieval beam search
  (--beam_size), where it first prunes (`rectification.first_rectified_level`); the levels
  above keep plain labels."""
  return rectification.first_rectified_level(branching=tree.branching, height=tree.height,
                                             beam_size=cfg.eval.beam_size)


def rectification_setup(cfg: Config, ds, ev, eta, workdir: str, world=None):
  """The label weights of TDR(T-RL) (Eq. 15 from `rectify_from_level` down) and the rows of
  their estimator of eta (--rectify_estimator).

  sasrec: trains (or restores) the SASRec estimator; rows = [its result row]. exact: the
  synthetic generator's eta of each sample's next interaction given the sample's whole
  prefix (`synthetic.next_item_eta`); rows = [] (the oracle row retrieves with that eta).

  Returns:
    (weight_fn, rows): `weight_fn(history int32[B, L], target int32[B], tree, *,
    sample_ids int[B]) -> float32[B, H]`, where `sample_ids` are the batch's indices into the
    dataset's training samples (`ds.train_sample_pos`).
  """
  weights = jax.jit(rectification.rectified_weights, static_argnames="first_level")
  if cfg.train.rectify_estimator == "exact":
    if world is None:
      raise InputError(f"--rectify_estimator=exact needs the synthetic generator's eta; "
                       f"--dataset={cfg.data.dataset} has none (use --rectify_estimator=sasrec)")

    def exact_weight_fn(history, target, tree, *, sample_ids):
      del history  # the exact eta conditions on the whole prefix, not the last L items
      sample_ids = np.asarray(sample_ids)
      prefixes = [ds.seq_items[a:b] for a, b in zip(ds.train_sample_start[sample_ids],
                                                     ds.train_sample_pos[sample_ids])]
      eta_b = synthetic.next_item_eta(world, ds.item_raw_ids, prefixes)  # [B, N] float64
      return weights(jnp.asarray(eta_b, jnp.float32), jnp.asarray(target), tree,
                     first_level=rectify_from_level(cfg, tree))

    return exact_weight_fn, []
  est = sasrec.train_sasrec(ds, history_len=cfg.data.history_len,
                            epochs=cfg.sasrec.sasrec_epochs,
                            batch_size=cfg.train.batch_size, seed=cfg.seed,
                            max_train_samples=cfg.data.max_train_samples, workdir=workdir,
                            dim=cfg.sasrec.sasrec_dim,
                            checkpoint_every=cfg.train.checkpoint_every,
                            log_every=cfg.train.log_every)
  kmax = max(cfg.eval.topk)
  retrieved = np.asarray(est.retrieve(ev.history, topk=kmax,
                                      batch_size=cfg.eval.eval_batch_size))
  row = result_row("SASRec (estimator)", retrieved, ev, ds, cfg, eta,
                   train_seconds=est.train_seconds,
                   settings={"dim": cfg.sasrec.sasrec_dim, "epochs": cfg.sasrec.sasrec_epochs,
                             "steps": est.steps})

  def weight_fn(history, target, tree, *, sample_ids):
    del sample_ids
    # Only the order of eta matters for Eq. 15, so the logits are passed as they are.
    return weights(est.logits(history), jnp.asarray(target), tree,
                   first_level=rectify_from_level(cfg, tree))

  return weight_fn, [row]


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, arr)
  os.replace(tmp, path)


def tree_learning_options(cfg: Config) -> dict:
  """`tree_learning.learn_tree_tdr`'s options for `--tree_learning` tdr or jtm: TDR's softmax
  matching on the gap's last level (Eq. 24), or JTM's binary likelihood summed over the
  levels of the gap (Algorithm 2); `--tree_path_levels` overrides the level rule."""
  jtm = cfg.tree.tree_learning == "jtm"
  path_levels = cfg.tree.tree_path_levels
  return {"gap": cfg.tree.tree_gap, "matching": "binary" if jtm else "softmax",
          "path_levels": jtm if path_levels is None else bool(path_levels),
          "assignment": cfg.tree.tree_assignment}


def next_tree(cfg: Config, ds, samples: np.ndarray, tree: tree_lib.Tree, score_fn, params,
              round_index: int) -> tuple[tree_lib.Tree, float]:
  """One tree update with the model fixed (TDR sec. 6 / JTM / TDM). Returns (tree, seconds)."""
  t0 = time.perf_counter()
  if cfg.tree.tree_learning == "none":  # the control: rounds only continue training
    return tree, 0.0
  if cfg.tree.tree_learning == "tdm":
    emb = np.asarray(params["embed"]["embedding"][...])
    new = tree_learning.learn_tree_tdm(np.random.default_rng([cfg.seed, 17, round_index]), emb,
                                       tree)
  else:
    targets = ds.seq_items[ds.train_sample_pos[samples]]
    pair_item, pair_sample = tree_learning.item_user_pairs(
        targets, ds.num_items, max_users_per_item=cfg.tree.tree_users_per_item,
        seed=cfg.seed * 1000 + round_index)
    hist, _ = train_batch(ds, samples[pair_sample], cfg.data.history_len)
    new = tree_learning.learn_tree_tdr(score_fn, params, tree, hist.astype(np.int32),
                                       pair_item, **tree_learning_options(cfg))
  return new, time.perf_counter() - t0


def train_round(cfg: Config, ds, samples: np.ndarray, tree: tree_lib.Tree, score_fn, params,
                workdir: str, *, corpus_fp: str, mesh: Mesh, crash_after: int = 0,
                round_index: int = 0, weight_fn=None):
  """Trains one round with checkpoints/resume in workdir/checkpoints (`training.fit`).
  Returns (params, seconds of training this call, steps of the round).

  Round r continues the data stream where round r-1 stopped (its batches are those of global
  steps r*T .. (r+1)*T-1) and draws keys from fold_in(key(seed), r).
  `weight_fn(history, target, tree, *, sample_ids) -> float32[B, H]` gives per-level label
  weights (rectification, `rectification_setup`); None = plain labels (ones)."""
  steps_per_epoch, total_steps = batches_lib.steps_for(
      len(samples), batch_size=cfg.train.batch_size, epochs=cfg.train.epochs)
  optimizer = train.make_optimizer(learning_rate=cfg.train.learning_rate,
                                   decay_steps=steps_per_epoch, decay_rate=cfg.train.decay_rate)
  binary = cfg.train.loss == "bce"
  otm_jtm_warmup = cfg.train.loss == "otm" and cfg.train.otm_warmup_loss == "jtm"
  step_cfg = train.StepConfig(
      loss=cfg.train.loss, sampler="uniform" if binary else cfg.train.sampler,
      num_negatives=(cfg.train.binary_negatives if binary or otm_jtm_warmup
                     else cfg.train.num_negatives),
      warmup_loss="bce" if otm_jtm_warmup else "beam",
      full_softmax_nodes=cfg.train.full_softmax_nodes, beam_size=otm_training_beam(cfg),
      ancestor_nodes=cfg.train.otm_ancestor_nodes,
      plain_target_steps=otm_warmup_steps(cfg, total_steps),
      first_level=otm_first_level(cfg, tree))
  step = train.make_train_step(score_fn, optimizer, step_cfg, branching=tree.branching,
                               height=tree.height)
  tree_dev = jax.device_put(tree)
  offset = round_index * total_steps
  otm_loss = cfg.train.loss == "otm"
  identity = {"config_fingerprint": cfg.fingerprint(), "corpus_fingerprint": corpus_fp,
              "tree_fingerprint": training.fingerprint(np.asarray(tree.item_to_leaf))}
  phrases = {"config_fingerprint": "another configuration",
             "corpus_fingerprint": "another corpus",
             "tree_fingerprint": "another tree (item-to-leaf mapping)"}
  if cfg.train.loss == "otm":
    # By default the training beam is the retrieval --beam_size, which the config fingerprint
    # leaves out (an evaluation setting): the checkpoint records the beam it trained with.
    identity["otm_training_beam"] = str(otm_training_beam(cfg))
    phrases["otm_training_beam"] = "another OTM training beam"
    identity["otm_warmup_steps"] = str(step_cfg.plain_target_steps)
    phrases["otm_warmup_steps"] = "another OTM warm-up (--otm_warmup)"
    identity["otm_warmup_loss"] = cfg.train.otm_warmup_loss or "beam"
    phrases["otm_warmup_loss"] = "another --otm_warmup_loss"
    identity["otm_first_level"] = str(step_cfg.first_level)
    phrases["otm_first_level"] = "another first trained OTM level (--otm_all_levels)"
  if weight_fn is not None:
    # The estimator and the first rectified level (it depends on the retrieval --beam_size)
    # change the labels but are outside the config fingerprint: the checkpoint records them.
    identity["rectify_estimator"] = cfg.train.rectify_estimator
    identity["rectify_from_level"] = str(rectify_from_level(cfg, tree))
    phrases["rectify_estimator"] = "another --rectify_estimator"
    phrases["rectify_from_level"] = "another first rectified level (--beam_size)"

  def batches(s: int) -> batches_lib.Batch:
    batch = batches_lib.batch_for_step(
        ds, samples, offset + s, steps_per_epoch=steps_per_epoch,
        batch_size=cfg.train.batch_size, history_len=cfg.data.history_len, seed=cfg.seed,
        levels=tree.height, label_window=cfg.train.label_window if otm_loss else None)
    if weight_fn is not None:
      idx, _ = batches_lib.step_indices(len(samples), offset + s,
                                        steps_per_epoch=steps_per_epoch,
                                        batch_size=cfg.train.batch_size, seed=cfg.seed)
      batch = batch._replace(weight=np.asarray(weight_fn(
          batch.history, batch.target, tree_dev, sample_ids=samples[idx])))
    return batch

  ckpt = training.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      identity=identity, phrases=phrases, record=cfg.to_json())
  out = training.fit(
      lambda state, batch, aux, key: step(state, batch, aux[0], aux[1], key),
      train.init_state(params, optimizer), batches, total_steps=total_steps,
      base_key=jax.random.fold_in(jax.random.key(cfg.seed), round_index),
      aux=(tree, sampling.level_index(tree)), checkpointer=ckpt, mesh=mesh,
      checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every,
      crash_after=crash_after, name=f"train {method_label(cfg)}", progress=True)
  share = out.metrics.get("otm_positive_share")  # [steps run, H]
  if share is not None and len(share):
    tail = share[-max(1, len(share) // 10):].mean(0)
    print("OTM: share of samples with a target-1 training node per level 1..H ('-': not "
          f"trained), last {max(1, len(share) // 10)} steps: " + " ".join(
              "-" if j < step_cfg.first_level else f"{v:.2f}"
              for j, v in enumerate(tail, start=1)))
  return out.state.params, out.seconds, total_steps


def run(ctx: Context, cfg: Config, workdir: str) -> dict:
  """Joint learning (JTM Algorithm 1) of one TDR variant.

  Round r trains the model on tree r (continuing from the previous round's parameters),
  evaluates it, and (except after the last round) learns tree r+1 with the model fixed. Every
  round's (tree, model) is checkpointed under workdir/round_<r>/ and workdir/trees/; a rerun
  resumes inside the unfinished round. Returns rows (final tree, forest), estimator rows,
  per-round rows, the forest curve and the final tree's per-level beam diagnostics
  (`beam_diagnostics.level_recall`; None with --nobeam_diagnostics). The initial tree's kind
  and the warm-start item vectors come from the run's shared warm start (`ctx.warm_start()`).
  """
  ds, world, ev, eta, mesh = ctx.ds, ctx.world, ctx.ev, ctx.eta, ctx.mesh
  os.makedirs(workdir, exist_ok=True)
  warm = ctx.warm_start()
  tree = build_initial_tree(cfg, ds, warm["initial_tree"], warm["vectors"])
  tree_lib.validate(tree)
  score_fn, params = build_model(cfg, tree)
  if cfg.tree.warm_start:
    params = warm_params(cfg, params, tree, warm["vectors"])
  corpus_fp = corpus_fingerprint(ds)
  samples = run_samples(cfg, ds)
  _, round_steps = batches_lib.steps_for(len(samples), batch_size=cfg.train.batch_size,
                                         epochs=cfg.train.epochs)
  true_cat = mislabelled = None
  if world is not None:
    raw = np.asarray([int(x) for x in ds.item_raw_ids])
    true_cat = world.item_category[raw]
    mislabelled = world.observed_category[raw] != true_cat  # the initial tree's noisy labels
  tree_dir = os.path.join(workdir, "trees")
  os.makedirs(tree_dir, exist_ok=True)
  weight_fn, estimator_rows = None, []
  if cfg.train.rectify:
    weight_fn, estimator_rows = rectification_setup(cfg, ds, ev, eta, workdir, world=world)
  label = method_label(cfg)
  kmax = max(cfg.eval.topk)
  rounds, per_tree, models = [], [], []
  total_train = 0.0
  for r in range(cfg.tree.tree_rounds):
    tree_path = os.path.join(tree_dir, f"round_{r}.npy")
    if r > 0:
      old_tree = tree
      if os.path.exists(tree_path):
        tree = tree_lib.from_item_to_leaf(np.load(tree_path), branching=cfg.tree.branching,
                                          num_items=ds.num_items)
        tree_seconds = 0.0
        print(f"round {r}: tree restored from {tree_path}")
      else:
        tree, tree_seconds = next_tree(cfg, ds, samples, tree, score_fn, params, r)
        print(f"round {r}: tree learned ({cfg.tree.tree_learning}, gap "
              f"{cfg.tree.tree_gap}) in {tree_seconds:.1f}s")
      # The scorer looks nodes up by position: carry its node rows over to the new tree (a
      # leaf's row follows its item). A round checkpoint, when there is one, replaces them.
      params = remap_params(params, old_tree, tree)
    else:
      tree_seconds = 0.0
    if not os.path.exists(tree_path):
      _atomic_save_npy(tree_path, np.asarray(tree.item_to_leaf))
    stop = cfg.train.stop_after_step
    crash_after = max(0, stop - r * round_steps) if stop else 0
    params, seconds, steps = train_round(cfg, ds, samples, tree, score_fn, params,
                                         os.path.join(workdir, f"round_{r}"),
                                         corpus_fp=corpus_fp, mesh=mesh,
                                         crash_after=crash_after, round_index=r,
                                         weight_fn=weight_fn)
    total_train += seconds + tree_seconds
    t0 = time.perf_counter()
    retrieved = retrieve(score_fn, params, tree, ev.history, beam_size=cfg.eval.beam_size,
                         topk=kmax, batch_size=cfg.eval.eval_batch_size, mesh=mesh,
                         path_scores=cfg.train.loss == "plt")
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
               f"{fmt_or_dash(row['purity_mislabelled'])}, correctly labelled "
               f"{fmt_or_dash(row['purity_labelled'])})")
    rounds.append(row)
    k0 = cfg.eval.topk[0]
    print(f"round {r}: P@{k0} {row[f'precision@{k0}']:.4f} R@{k0} {row[f'recall@{k0}']:.4f} "
          f"F@{k0} {row[f'f_measure@{k0}']:.4f}{extra}")

  settings = {"sampler": cfg.train.sampler, "num_negatives": cfg.train.num_negatives,
              "initial_tree": warm["initial_tree"], "initial_tree_why": warm["why"],
              "warm_start": warm["info"], "beam_size": cfg.eval.beam_size,
              "tree_rounds": cfg.tree.tree_rounds,
              "tree_learning": cfg.tree.tree_learning, "tree_gap": cfg.tree.tree_gap,
              "tree_path_levels": tree_learning_options(cfg)["path_levels"],
              "tree_height": tree.height, "test_users": int(len(ev.users))}
  if cfg.train.rectify:
    settings["rectify_estimator"] = cfg.train.rectify_estimator
    settings["rectify_from_level"] = rectify_from_level(cfg, tree)
  if cfg.train.loss == "otm":
    settings["otm_training_beam"] = otm_training_beam(cfg)
    settings["otm_training_beam_is_retrieval_beam"] = cfg.train.otm_beam_size in (
        None, cfg.eval.beam_size)
    settings["otm_ancestor_nodes"] = cfg.train.otm_ancestor_nodes
    settings["otm_warmup_steps_per_round"] = otm_warmup_steps(cfg, round_steps)
    settings["otm_first_trained_level"] = otm_first_level(cfg, tree)
    settings["otm_warmup_loss"] = cfg.train.otm_warmup_loss or "beam"
    settings["label_window"] = cfg.train.label_window
  final = dict(rounds[-1])
  final["method"] = label
  final["train_seconds"] = total_train + (warm["info"] or {}).get("train_seconds", 0.0)
  final["settings"] = dict(final["settings"], **settings)
  for key in ("round", "category_purity", "purity_mislabelled", "purity_labelled"):
    final.pop(key, None)
  rows = [final]
  diagnostics = None
  if cfg.eval.beam_diagnostics:
    # Where the final tree's beam loses the test labels: recall per level vs brute force.
    diag_tree, diag_params = models[-1]
    diagnostics = beam_diagnostics.level_recall(
        score_fn, diag_params, diag_tree, ev.history, ev.label_offsets, ev.label_items,
        beam_size=cfg.eval.beam_size, ks=cfg.eval.topk, batch_size=cfg.eval.eval_batch_size,
        mesh=mesh, path_scores=cfg.train.loss == "plt",
        chunk_size=beam_diagnostics.brute_force_chunk(
            num_items=diag_tree.num_items, batch_size=cfg.eval.eval_batch_size,
            history_len=cfg.data.history_len, attention_width=max(cfg.model.attention_hidden),
            levels=diag_tree.height if cfg.train.loss == "plt" else 1))
    diagnostics["round"] = len(models) - 1
    diagnostics["eval_seconds"] = rounds[-1]["settings"]["eval_seconds"]
  forest_curve = []
  if cfg.tree.forest and len(models) > 1:
    # The discriminator ranks candidates by what the method's beam search ranks leaves by.
    disc_fn = score_fn
    if cfg.train.loss == "plt":
      disc_fn = label_tree.path_score_fn(score_fn)
    for r in range(1, len(models) + 1):
      cand = forest_lib.union_candidates(per_tree[:r])
      disc_tree, disc_params = models[r - 1]
      items = rerank_all(disc_fn, disc_params, disc_tree, ev.history, cand, topk=kmax,
                         batch_size=cfg.eval.eval_batch_size, mesh=mesh)
      frow = result_row(f"{label} forest", items, ev, ds, cfg, eta, train_seconds=total_train,
                        settings=dict(settings, num_trees=r))
      point = {"num_trees": r, "candidates_per_user": float(np.mean(np.sum(cand >= 0, 1)))}
      for key, v in frow.items():
        if "@" in key:
          point[f"forest_{key}"] = v
          point[f"last_tree_{key}"] = rounds[r - 1][key]
      forest_curve.append(point)
    rows.append(frow)
  # score_fn and models (every round's (tree, host params)): evaluating the trained model at
  # other settings, e.g. other beam sizes (experiments/ablate.py), without retraining.
  return {"rows": rows, "estimator_rows": estimator_rows, "rounds": rounds,
          "forest_curve": forest_curve, "true_cat": true_cat, "label": label,
          "score_fn": score_fn, "models": models, "beam_diagnostics": diagnostics}


def _variant(**settings) -> Method:
  return Method(label=lambda cfg: method_label(cfg.replace(**settings)), run=run,
                settings=settings, warm_start=True)


# The `--method` names of this family and the settings each fixes.
METHODS = {
    "tdr": _variant(),  # the variant given by --sampler / --rectify
    "tdr_u": _variant(sampler="uniform", rectify=False),
    "tdr_t": _variant(sampler="top_down", rectify=False),
    "tdr_t_rl": _variant(sampler="top_down", rectify=True),
    # TDM/JTM: binary loss (Eq. 2) with uniform negatives per level, on the same scorer, tree
    # learning by k-means (TDM) or by the binary log-likelihood (JTM).
    "tdm": _variant(loss="bce", sampler="uniform", rectify=False, tree_learning="tdm"),
    "jtm": _variant(loss="bce", sampler="uniform", rectify=False, tree_learning="jtm"),
    # OTM: binary loss on the nodes a beam search visits, with beam-search-aware pseudo
    # targets; trees learned as JTM's (binary matching).
    "otm": _variant(loss="otm", sampler="uniform", rectify=False, tree_learning="jtm"),
    # PLT: node classifiers P(z_n | z_parent), trained on the positive paths and their
    # siblings; retrieval by the product of the path's probabilities; trees by balanced
    # k-means over the leaf embeddings (as label trees are built).
    "plt": _variant(loss="plt", sampler="uniform", rectify=False, tree_learning="tdm"),
}
