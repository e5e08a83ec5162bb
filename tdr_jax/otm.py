"""Optimal tree model (OTM) training under beam search (pure functions).

OTM trains the per-node binary classifiers on the nodes a beam search actually meets, against
targets that make the search Bayes-optimal for the current model:

* Pseudo targets, bottom-up: a leaf's target is 1 iff its item is the sample's positive y; an
  internal node's target is the target of its best valid child under the current model (argmax
  of the stop-gradient scores, ties to the lowest child id). Only y's ancestors a_0..a_H can get
  1: t(a_H) = 1 and t(a_j) = t(a_{j+1}) * [argmax child of a_j is a_{j+1}]. So the targets need
  only the scores of the children of y's path nodes (`plt.path_children`).
* Beam-search negatives: at level j the training nodes are the ones a beam search of size k
  (current model, no gradient) scores there, i.e. the children of its level-(j-1) beam (all
  nodes of level j while B^(j-1) <= k), plus a_j, so that every level holds its path node. The
  loss is the binary cross-entropy against the pseudo targets, masked for invalid nodes, for
  children of dead beam slots and for a_j when the beam already contains it.

Shapes are static: level j's candidate set has width B^j while B^(j-1) <= k and k*B below, padded
with -1 (masked). `beam_candidates` is batched (beam search is); the rest is unbatched (vmap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdr_jax import beam_search as bs
from tdr_jax import tree as tree_lib
from tdr_jax.label_tree import binary_cross_entropy
from tdr_jax.scorer import ScoreFn


def pseudo_targets(child_scores: jax.Array, child_nodes: jax.Array, child_mask: jax.Array,
                   path: jax.Array) -> jax.Array:
  """OTM targets of one positive item's ancestors (every other node's target is 0).

  Args:
    child_scores: float[H, B] scores of the children of path[0..H-1] (row j-1: level j nodes);
      they are taken under stop_gradient.
    child_nodes: int32[H, B] those children (`plt.path_children`).
    child_mask: bool[H, B] the valid ones.
    path: int32[H+1] the positive item's ancestors at levels 0..H.
  Returns:
    float32[H+1] target of path[j] for j = 0..H (path[H], the positive's leaf, always has 1).
  """
  scores = jnp.where(child_mask, jax.lax.stop_gradient(child_scores).astype(jnp.float32),
                     -jnp.inf)
  best = jnp.argmax(scores, axis=1)  # [H] first maximum = lowest child id on ties
  best_node = jnp.take_along_axis(child_nodes, best[:, None], axis=1)[:, 0]  # [H]
  on_path = (best_node == path[1:]).astype(jnp.float32)  # [H] argmax child of a_j is a_{j+1}
  # t(a_j) = prod_{j' >= j} on_path[j']: a reversed cumulative product, then t(a_H) = 1.
  suffix = jnp.cumprod(on_path[::-1])[::-1]
  return jnp.concatenate([suffix, jnp.ones((1,), jnp.float32)])


def positive_paths(tree: tree_lib.Tree, positives: jax.Array) -> jax.Array:
  """The ancestors of one instance's positives, one row per positive.

  Args:
    tree: the tree index.
    positives: int32[W] item ids, -1 padding.
  Returns:
    int32[W, H+1] row w: the ancestors of positives[w] at levels 0..H; all -1 for padding.
  """
  paths = jnp.asarray(tree.item_paths)[jnp.maximum(positives, 0)]
  return jnp.where((positives >= 0)[:, None], paths, -1)


def multi_label_pseudo_targets(child_scores: jax.Array, child_nodes: jax.Array,
                               child_mask: jax.Array, paths: jax.Array) -> jax.Array:
  """OTM targets (paper Algorithm 1) of the union of a multi-label instance's ancestors.

  Bottom-up: a positive's leaf has target 1; a node n on some positive's path has the target
  of its argmax child c under the current model (stop-gradient scores, ties to the lowest
  child id), which is t(c) when c is itself an ancestor of some positive and 0 otherwise (no
  positive below c). Every node off the union has target 0. With one positive (W = 1) this is
  `pseudo_targets`.

  Args:
    child_scores: float[W, H, B] scores of the children of paths[w, 0..H-1] (row [w, j-1]:
      level j nodes; `plt.path_children` per positive); taken under stop_gradient.
    child_nodes: int32[W, H, B] those children.
    child_mask: bool[W, H, B] the valid ones (all False for a padding positive).
    paths: int32[W, H+1] the positives' ancestors (`positive_paths`; -1 rows = padding).
  Returns:
    float32[W, H+1] target of paths[w, j] (equal for rows that share the node; 0 for padding).
  """
  valid = paths[:, 0] >= 0  # [W]
  scores = jnp.where(child_mask, jax.lax.stop_gradient(child_scores).astype(jnp.float32),
                     -jnp.inf)
  best = jnp.argmax(scores, axis=2)  # [W, H]
  best_node = jnp.take_along_axis(child_nodes, best[:, :, None], axis=2)[:, :, 0]  # [W, H]
  height = paths.shape[1] - 1
  level_t = valid.astype(jnp.float32)  # [W] level H: every positive's leaf has target 1
  out = [level_t]
  for j in range(height - 1, -1, -1):
    # t(paths[w, j]) = max over positives w' whose level-(j+1) ancestor is the argmax child.
    hit = (best_node[:, j][:, None] == paths[None, :, j + 1]) & valid[None, :]  # [W, W']
    level_t = jnp.max(jnp.where(hit, level_t[None, :], 0.0), axis=1) * valid
    out.append(level_t)
  return jnp.stack(out[::-1], axis=1)


def multi_node_targets(nodes: jax.Array, ancestors: jax.Array, ancestor_targets: jax.Array
                       ) -> jax.Array:
  """Pseudo targets of arbitrary nodes of one level with several positives: the target of the
  positives' ancestor the node equals, 0 for every other node (and for -1 padding).

  Args:
    nodes: int32[M] node ids of level j (-1 allowed).
    ancestors: int32[W] the positives' level-j ancestors (-1 for padding positives).
    ancestor_targets: float[W] their targets (from `multi_label_pseudo_targets`).
  Returns:
    float32[M].
  """
  hit = (nodes[:, None] == ancestors[None, :]) & (nodes[:, None] >= 0)  # [M, W]
  return jnp.max(jnp.where(hit, ancestor_targets.astype(jnp.float32)[None, :], 0.0), axis=1)


def node_targets(nodes: jax.Array, ancestor: jax.Array, ancestor_target: jax.Array
                 ) -> jax.Array:
  """Pseudo targets of arbitrary nodes of one level: the ancestor's target for the positive's
  ancestor at that level, 0 for every other node (and for -1 padding).

  Args:
    nodes: int32[M] node ids of level j (-1 allowed).
    ancestor: int32[] the positive's level-j ancestor.
    ancestor_target: float[] its target (from `pseudo_targets`).
  Returns:
    float32[M].
  """
  hit = (nodes == ancestor) & (nodes >= 0)
  return jnp.where(hit, ancestor_target.astype(jnp.float32), 0.0)


def beam_candidates(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array, *,
                    beam_size: int) -> list[tuple[jax.Array, jax.Array]]:
  """The nodes a beam search of size k scores at every level 1..H (no gradient).

  Levels below the beam search's first whole-scored level s (and s itself) contribute all their
  nodes (a beam of size k keeps every node of a level with at most k nodes); deeper levels the
  children of the previous level's beam.

  Args:
    score_fn: scorer (see `tdr_jax.sampling`).
    params: its parameters (stop_gradient is applied here).
    tree: the tree index.
    history: int32[U, L] user histories.
    beam_size: k (static).
  Returns:
    H pairs (nodes int32[U, W_j], mask bool[U, W_j]) for levels j = 1..H, with W_j = B^j for
    j <= s and k*B for j > s; masked entries are invalid nodes or -1 padding.
  """
  num_users = history.shape[0]
  b, height = tree.branching, tree.height
  node_valid = jnp.asarray(tree.node_valid)
  s = bs.start_level(branching=b, height=height, beam_size=beam_size)
  trace = bs.beam_trace(score_fn, jax.lax.stop_gradient(params), tree, history,
                        beam_size=beam_size)
  out = []
  for j in range(1, s):
    first = tree_lib.level_start(b, j)
    nodes = jnp.broadcast_to(jnp.arange(first, first + b ** j, dtype=jnp.int32),
                             (num_users, b ** j))
    out.append((nodes, node_valid[nodes]))
  if s >= 1:
    out.append((trace.first_nodes, node_valid[trace.first_nodes]))
  for i in range(height - s):
    nodes = trace.nodes[i]  # [U, k*B], -1 where masked
    out.append((nodes, nodes >= 0))
  return out


def training_nodes(candidates: jax.Array, mask: jax.Array, ancestor: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """One level's training set: the beam candidates plus the positive's ancestor.

  Args:
    candidates: int32[W] the level's beam candidates (-1 padding allowed).
    mask: bool[W] the valid candidates.
    ancestor: int32[] the positive's ancestor at the level.
  Returns:
    nodes: int32[W+1] candidates, then the ancestor.
    mask: bool[W+1] the candidates' mask, then True unless the ancestor is already a valid
      candidate (no node is trained twice).
  """
  present = jnp.any(mask & (candidates == ancestor))
  nodes = jnp.concatenate([jnp.where(mask, candidates, -1), ancestor[None]])
  return nodes, jnp.concatenate([mask, (~present & (ancestor >= 0))[None]])


def multi_training_nodes(candidates: jax.Array, mask: jax.Array, ancestors: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """One level's training set with several positives: the beam candidates plus the positives'
  ancestors at the level (the option `StepConfig.ancestor_nodes`).

  Args:
    candidates: int32[C] the level's beam candidates (-1 padding allowed).
    mask: bool[C] the valid candidates.
    ancestors: int32[W] the positives' ancestors at the level (-1 for padding positives).
  Returns:
    nodes: int32[C+W] candidates (-1 where masked), then the ancestors.
    mask: bool[C+W] the candidates' mask, then True for an ancestor that is neither a valid
      candidate nor equal to an earlier ancestor (no node is trained twice).
  """
  width = ancestors.shape[0]
  present = jnp.any(mask[None, :] & (candidates[None, :] == ancestors[:, None]), axis=1)
  earlier = jnp.any((ancestors[:, None] == ancestors[None, :])
                    & jnp.tri(width, k=-1, dtype=bool), axis=1)
  nodes = jnp.concatenate([jnp.where(mask, candidates, -1), ancestors])
  return nodes, jnp.concatenate([mask, ~present & ~earlier & (ancestors >= 0)])


def multi_level_loss(logits: jax.Array, nodes: jax.Array, mask: jax.Array, ancestors: jax.Array,
                     ancestor_targets: jax.Array, weight: jax.Array | float = 1.0) -> jax.Array:
  """OTM binary cross-entropy of one (multi-label sample, level) over its training nodes.

  Args:
    logits: float[M] scorer outputs for `nodes`.
    nodes, mask: int32[M], bool[M] the training nodes (`multi_training_nodes`, or the beam
      candidates alone).
    ancestors: int32[W] the positives' ancestors at the level (-1 padding).
    ancestor_targets: float[W] their pseudo targets (`multi_label_pseudo_targets`).
    weight: scalar weight of the positive terms.
  Returns:
    float[] loss.
  """
  targets = multi_node_targets(nodes, ancestors, ancestor_targets)
  return binary_cross_entropy(logits, targets, mask, weight)


def level_loss(logits: jax.Array, nodes: jax.Array, mask: jax.Array, ancestor: jax.Array,
               ancestor_target: jax.Array, weight: jax.Array | float = 1.0) -> jax.Array:
  """OTM binary cross-entropy of one (sample, level) over its training nodes.

  Args:
    logits: float[M] scorer outputs for `nodes`.
    nodes, mask: int32[M], bool[M] from `training_nodes`.
    ancestor: int32[] the positive's ancestor at the level.
    ancestor_target: float[] its pseudo target.
    weight: scalar weight of the positive terms.
  Returns:
    float[] loss.
  """
  targets = node_targets(nodes, ancestor, ancestor_target)
  return binary_cross_entropy(logits, targets, mask, weight)
