"""The training step of the tree models: per-level losses over the nodes of a tree.

`make_train_step` returns a pure function `step(state, batch, tree, index, base_key) ->
(state, metrics)` for any scorer `score_fn(params, tree, history, nodes)`. The step draws its
randomness from `fold_in(base_key, state.step)`, so a resumed run continues the same random
stream without saving a key. Jit it once (`jax.jit(step, donate_argnums=0)`); under a
`jax.sharding.Mesh` with the batch sharded along its first axis and the state replicated, the
same function runs data-parallel (XLA inserts the gradient all-reduce).

Levels 1..H are trained (the root is trivial):
* TDR (`loss="softmax"`): levels with at most `full_softmax_nodes` nodes use the full softmax
  over the level (Eq. 5-7); deeper levels the sampled softmax with logQ correction (Eq. 17-18)
  over `num_negatives` uniform or top-down negatives. Optional per-sample, per-level label
  weights (Eq. 15) come with the batch.
* TDM/JTM (`loss="bce"`): binary cross-entropy (Eq. 2), the positive path against uniform
  negatives at every level.
* OTM (`loss="otm"`, `tdr_jax.otm`): binary cross-entropy against beam-search-aware pseudo
  targets over the nodes a beam search of size `beam_size` (current model, no gradient; the
  run passes the retrieval beam) scores at each level (plus the positives' ancestors there with
  `ancestor_nodes`). Multi-label instances: `batch.labels` int32[B, W] (-1 padding), a node's
  target is 1 when the argmax chain below it reaches a positive; without labels the positive
  is `batch.target`. Optional warm-up (`plain_target_steps`): plain ancestor targets over the
  candidates + ancestors first (a model far from the optimum gives pseudo targets that are
  almost all 0 and a beam that loses the positives' ancestors, so the paper's algorithm alone
  cannot start from it; BUILD_NOTES, OTM).
* PLT (`loss="plt"`, `tdr_jax.label_tree`): binary cross-entropy of the per-node conditional
  classifiers over the positive's path nodes (target 1) and their siblings (target 0). Retrieve
  with `beam_search(..., path_scores=True)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tdr_jax import label_tree, losses, otm, sampling
from tdr_jax import tree as tree_lib
from tdr_jax.data.batches import Batch
from tdr_jax.training import TrainState, init_state


@dataclasses.dataclass(frozen=True)
class StepConfig:
  loss: str = "softmax"  # "softmax" (TDR), "bce" (TDM/JTM), "otm" or "plt"
  sampler: str = "top_down"  # "uniform" or "top_down"
  num_negatives: int = 70
  full_softmax_nodes: int = 128  # levels with at most this many nodes use the full softmax
  beam_size: int = 20  # OTM: size of the training beam search that picks each level's nodes
  ancestor_nodes: bool = False  # OTM: also train on the positives' ancestors at every level
  # OTM warm-up: steps < this train on plain ancestor targets (1 on every positive's ancestor,
  # as TDM/PLT label nodes) over the beam candidates + the positives' ancestors; from this step
  # on, the pseudo targets over the configured nodes (0: the paper's algorithm throughout).
  plain_target_steps: int = 0
  # What the OTM warm-up trains: "beam" = plain targets over the beam candidates + the
  # positives' ancestors (above); "bce" = JTM's loss (the positive against `num_negatives`
  # uniform negatives per level, binary cross-entropy, every level), so the pseudo targets
  # start from a JTM-trained model.
  warmup_loss: str = "beam"
  # OTM: levels 1..first_level-1 are not trained (loss 0, no scorer call): the driver sets the
  # training beam's start level s (`beam_search.start_level`), above which beam search ranks
  # nothing, as the OTM authors' code trains only the levels its beam chooses among.
  first_level: int = 1


def num_full_levels(config: StepConfig, *, branching: int, height: int) -> int:
  """Number of levels 1..F trained with the full softmax (0 for the binary loss)."""
  if config.loss != "softmax":
    return 0
  f = 0
  while f < height and branching ** (f + 1) <= config.full_softmax_nodes:
    f += 1
  return f


def make_optimizer(*, learning_rate: float = 1e-3, decay_steps: int = 1000,
                   decay_rate: float = 0.9) -> optax.GradientTransformation:
  """Adam with an exponentially decaying learning rate (TDR sec. 8.4)."""
  schedule = optax.exponential_decay(learning_rate, transition_steps=max(decay_steps, 1),
                                     decay_rate=decay_rate)
  return optax.adam(schedule)


def make_loss_fn(score_fn: Callable, config: StepConfig, *, branching: int, height: int):
  """Returns `loss_fn(params, batch, tree, index, key) -> (loss, metrics)` (mean over batch)."""
  if config.loss not in ("softmax", "bce", "otm", "plt"):
    raise ValueError(f"unknown loss {config.loss!r}; expected 'softmax', 'bce', 'otm' or 'plt'")
  if config.loss == "otm" and config.beam_size < 1:
    raise ValueError(f"beam_size={config.beam_size} must be at least 1")
  if config.warmup_loss not in ("beam", "bce"):
    raise ValueError(f"unknown warmup_loss {config.warmup_loss!r}; expected 'beam' or 'bce'")
  if config.sampler not in ("uniform", "top_down"):
    raise ValueError(f"unknown sampler {config.sampler!r}; expected 'uniform' or 'top_down'")
  full = num_full_levels(config, branching=branching, height=height)
  sampled_levels = tuple(range(full + 1, height + 1))
  m = config.num_negatives

  def tree_level_losses(params, batch: Batch, tree: tree_lib.Tree, paths: jax.Array, step):
    """OTM / PLT losses float32[H, B] (no sampled negatives, so no key or level index) and
    extra per-sample metrics {name: float[H, B]}."""
    if config.loss == "plt":
      # [B, H, Bt]: the children of the positive's path nodes (path node + siblings per level).
      kids, kids_mask = jax.vmap(lambda p: label_tree.path_children(tree, p))(paths)
      logits = jnp.stack([score_fn(params, tree, batch.history, kids[:, j - 1], level=j)
                          for j in range(1, height + 1)], axis=1)  # [B, H, Bt]
      per_sample = jax.vmap(label_tree.plt_loss)(logits.astype(jnp.float32), kids, kids_mask, paths,
                                          batch.weight)  # [B, H]
      return per_sample.T, {}  # [B, H] -> [H, B], levels first like the other losses
    # OTM: the positives (batch.labels, else the target) and their ancestors [B, W, H+1].
    labels = batch.target[:, None] if batch.labels is None else batch.labels
    pos_paths = jax.vmap(lambda y: otm.positive_paths(tree, y))(labels)
    # [B, W, H, Bt]: the children of every positive's path nodes.
    pkids, pkids_mask = jax.vmap(jax.vmap(lambda p: label_tree.path_children(tree, p)))(pos_paths)
    num_pos, width_kids = pkids.shape[1], pkids.shape[3]
    cands = otm.beam_candidates(score_fn, params, tree, batch.history, beam_size=config.beam_size)
    # Warm-up (plain ancestor targets, ancestors among the training nodes) while step < N.
    warm = (jnp.asarray(step) < config.plain_target_steps) if (
        config.plain_target_steps and config.warmup_loss == "beam") else None
    train_nodes, train_mask, train_logits, kid_scores = [], [], [], []
    first = max(1, config.first_level)
    for j in range(1, height + 1):
      nodes, mask = cands[j - 1]  # [B, C_j]
      if j < first:  # untrained level: nothing scored; its targets (and its children's
        # scores, which decide only the targets of level j-1) are never used
        train_nodes.append(jnp.full_like(nodes, -1))
        train_mask.append(jnp.zeros_like(mask))
        train_logits.append(jnp.zeros(nodes.shape, jnp.float32))
        kid_scores.append(jnp.zeros((nodes.shape[0], num_pos, width_kids), jnp.float32))
        continue
      num_cands = nodes.shape[1]
      if config.ancestor_nodes or warm is not None:
        nodes, mask = jax.vmap(otm.multi_training_nodes)(nodes, mask, pos_paths[:, :, j])
        if not config.ancestor_nodes:  # ancestors only during the warm-up
          mask = mask.at[:, num_cands:].set(mask[:, num_cands:] & warm)
      width = nodes.shape[1]
      # One scorer call per level: the training nodes, then the positives' path nodes' children
      # (whose stop-gradient scores decide the pseudo targets).
      kids = pkids[:, :, j - 1].reshape(-1, num_pos * width_kids)  # [B, W*Bt]
      ids = jnp.concatenate([nodes, kids], axis=1)
      sc = score_fn(params, tree, batch.history, ids, level=j).astype(jnp.float32)
      train_nodes.append(nodes)
      train_mask.append(mask)
      train_logits.append(sc[:, :width])
      kid_scores.append(sc[:, width:].reshape(-1, num_pos, width_kids))
    targets = jax.vmap(otm.multi_label_pseudo_targets)(
        jnp.stack(kid_scores, axis=2), pkids, pkids_mask, pos_paths)  # [B, W, H+1]
    if warm is not None:
      plain = (pos_paths >= 0).astype(jnp.float32)  # 1 on every positive's ancestor
      targets = jnp.where(warm, plain, targets)
    node_targets = [jax.vmap(otm.multi_node_targets)(train_nodes[j - 1], pos_paths[:, :, j],
                                                     targets[:, :, j])
                    for j in range(1, height + 1)]  # [B, M_j] per level
    level_losses = jnp.stack([
        jax.vmap(label_tree.binary_cross_entropy)(train_logits[j - 1], node_targets[j - 1],
                                                  train_mask[j - 1], batch.weight[:, j - 1])
        for j in range(1, height + 1)])
    # Diagnostics per level: the share of samples with a target-1 node among their training
    # nodes (near 0: the level learns only "everything low").
    positive = jnp.stack([jnp.any((t > 0) & m, axis=1)
                          for t, m in zip(node_targets, train_mask)])  # [H, B]
    return level_losses, {"otm_positive_share": positive}

  def loss_fn(params, batch: Batch, tree: tree_lib.Tree, index: sampling.LevelIndex, key,
              step=0):
    paths = jnp.asarray(tree.item_paths)[jnp.maximum(batch.target, 0)]  # [B, H+1]
    if config.loss in ("otm", "plt"):
      if config.loss == "otm" and config.plain_target_steps and config.warmup_loss == "bce":
        def jtm_branch():  # the warm-up: JTM's loss; every sample has its positive
          per_level = sampled_level_losses(params, batch, tree, index, key, paths, binary=True)
          return per_level, {"otm_positive_share": jnp.ones(per_level.shape, bool)}
        level_losses, extra = jax.lax.cond(
            jnp.asarray(step) < config.plain_target_steps, jtm_branch,
            lambda: tree_level_losses(params, batch, tree, paths, step))
      else:
        level_losses, extra = tree_level_losses(params, batch, tree, paths, step)
      loss, metrics = batch_mean(level_losses, batch)
      for k, v in extra.items():  # float[H, B] per-sample values -> masked batch means [H]
        metrics[k] = batch_level_mean(v, batch)
      return loss, metrics
    return batch_mean(sampled_level_losses(params, batch, tree, index, key, paths,
                                           binary=config.loss == "bce"), batch)

  def sampled_level_losses(params, batch: Batch, tree: tree_lib.Tree,
                           index: sampling.LevelIndex, key, paths: jax.Array, *, binary: bool):
    """TDR's (softmax) or TDM/JTM's (binary) losses float32[H, B]: levels 1..F full softmax,
    the rest against `num_negatives` sampled negatives."""
    bsz = batch.target.shape[0]
    node_valid = jnp.asarray(tree.node_valid)
    num_s = len(sampled_levels)
    per_level = []
    # One scorer call per level, each told its level: a level-aware scorer (DIN with the
    # hierarchical user representation) then shares the history's per-level work across the
    # level's nodes.
    for j in range(1, full + 1):
      first = tree_lib.level_start(branching, j)
      width = branching ** j
      ids = jnp.broadcast_to(jnp.arange(first, first + width, dtype=jnp.int32), (bsz, width))
      logits = score_fn(params, tree, batch.history, ids, level=j).astype(jnp.float32)
      mask = node_valid[first:first + width]
      per_level.append(jax.vmap(losses.full_softmax_loss, in_axes=(0, 0, None, 0))(
          logits, paths[:, j] - first, mask, batch.weight[:, j - 1]))
    if num_s:
      pos = paths[:, full + 1:]  # [B, S] positives of the sampled levels
      if config.sampler == "top_down" and not binary:
        neg, log_q = sampling.top_down_negatives(key, score_fn, params, tree, batch.history,
                                                 num_samples=m, start_level=full)
        neg_mask = neg != pos[:, :, None]  # accidental hits of the positive
      else:
        levels = jnp.asarray(sampled_levels, jnp.int32)
        keys = jax.random.split(key, bsz)
        neg, log_q, neg_mask = jax.vmap(
            lambda k, p: sampling.uniform_negatives(k, p, levels, index, num_samples=m))(keys, pos)
      for i, j in enumerate(sampled_levels):
        # Column 0: the positive; columns 1..m: the negatives of level j.
        ids = jnp.concatenate([pos[:, i:i + 1], neg[:, i]], axis=1)
        sc = score_fn(params, tree, batch.history, ids, level=j).astype(jnp.float32)
        w = batch.weight[:, j - 1]
        if not binary:
          per_level.append(jax.vmap(lambda p, n, q, k, wt: losses.sampled_softmax_loss(
              p, n, q, k, wt, num_samples=m))(sc[:, 0], sc[:, 1:], log_q[:, i], neg_mask[:, i], w))
        else:
          per_level.append(jax.vmap(losses.binary_cross_entropy_loss)(
              sc[:, 0], sc[:, 1:], neg_mask[:, i], w))
    return jnp.stack(per_level)  # [H, B]

  def batch_mean(level_losses: jax.Array, batch: Batch):
    """Masked batch mean of the per-sample sum over levels of `level_losses` float32[H, B]."""
    sample_mask = batch.mask.astype(jnp.float32)
    denom = jnp.maximum(sample_mask.sum(), 1.0)
    per_sample = level_losses.sum(0)
    loss = jnp.sum(per_sample * sample_mask) / denom
    metrics = {"loss": loss,
               "level_loss": jnp.sum(level_losses * sample_mask[None], axis=1) / denom}
    return loss, metrics

  def batch_level_mean(values: jax.Array, batch: Batch) -> jax.Array:
    """Masked batch mean per level of `values` float[H, B] -> float32[H]."""
    sample_mask = batch.mask.astype(jnp.float32)
    return (jnp.sum(values.astype(jnp.float32) * sample_mask[None], axis=1)
            / jnp.maximum(sample_mask.sum(), 1.0))

  return loss_fn


def make_train_step(score_fn: Callable, optimizer: optax.GradientTransformation,
                    config: StepConfig, *, branching: int, height: int):
  """Returns the pure step `(state, batch, tree, index, base_key) -> (state, metrics)`."""
  loss_fn = make_loss_fn(score_fn, config, branching=branching, height=height)

  def step(state: TrainState, batch: Batch, tree: tree_lib.Tree, index: sampling.LevelIndex,
           base_key: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, tree, index, key,
                                                     state.step)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(state.step + 1, params, opt_state), metrics

  return step
