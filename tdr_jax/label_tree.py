"""Probabilistic label tree (PLT) training targets and loss (pure functions).

In a PLT every node n carries a binary classifier whose logit is the scorer's output for n: the
model of P(z_n = 1 | z_parent(n) = 1, x), where z_n = 1 means that n's subtree holds a relevant
item. A training sample (history x, positive item y) therefore only informs the classifiers of
nodes whose parent is on y's path: at each level j = 1..H the children of y's level-(j-1)
ancestor, with target 1 for y's level-j ancestor and 0 for its (valid) siblings. No negatives are
sampled.

Retrieval ranks a node by log P(z_n = 1 | x) = sum of log-sigmoid of the logits along its path
from the root: `tdr_jax.beam_search.beam_search(..., path_scores=True)`.

The functions are unbatched (one sample); vmap them over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdr_jax import tree as tree_lib


def path_children(tree: tree_lib.Tree, path: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The children of every non-leaf node on one item's path.

  Args:
    tree: the tree index.
    path: int32[H+1] global ids of the item's ancestors at levels 0..H (a row of item_paths).
  Returns:
    nodes: int32[H, B] row j-1: the children of path[j-1], i.e. path[j] and its siblings at
      level j (heap layout: always real node ids).
    mask: bool[H, B] the valid ones (non-empty subtrees).
  """
  children = jnp.asarray(tree.children)
  node_valid = jnp.asarray(tree.node_valid)
  parents = path[:-1]  # [H] never leaves, never -1 for a real item
  nodes = children[jnp.maximum(parents, 0)]  # [H, B]
  mask = (parents >= 0)[:, None] & (nodes >= 0) & node_valid[jnp.maximum(nodes, 0)]
  return nodes, mask


def level_targets(nodes: jax.Array, mask: jax.Array, path: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """PLT targets of the `path_children` nodes: 1 for the path node, 0 for its siblings.

  Args:
    nodes: int32[H, B] from `path_children`.
    mask: bool[H, B] from `path_children`.
    path: int32[H+1] the item's path.
  Returns:
    targets: float32[H, B] (0 where masked).
    mask: bool[H, B] the nodes that enter the loss (unchanged).
  """
  targets = (nodes == path[1:, None]) & mask
  return targets.astype(jnp.float32), mask


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                         weight: jax.Array | float = 1.0) -> jax.Array:
  """Summed binary cross-entropy over the unmasked nodes of one (sample, level).

  loss = -sum_n mask_n [weight * t_n log s(o_n) + (1 - t_n) log(1 - s(o_n))]; the weight scales
  the positive terms only (as in `losses.binary_cross_entropy_loss`).

  Args:
    logits: float[M] scorer outputs (masked entries may hold anything, NaN included).
    targets: float[M] targets in [0, 1].
    mask: bool[M] the nodes in the loss.
    weight: scalar weight of the positive terms.
  Returns:
    float[] loss.
  """
  # Zero masked logits first, so that a NaN/inf there cannot leak into the gradient.
  logits = jnp.where(mask, logits.astype(jnp.float32), 0.0)
  per_node = -(weight * targets * jax.nn.log_sigmoid(logits)
               + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
  return jnp.sum(jnp.where(mask, per_node, 0.0))


def plt_loss(logits: jax.Array, nodes: jax.Array, mask: jax.Array, path: jax.Array,
             weight: jax.Array | float = 1.0) -> jax.Array:
  """PLT loss of one sample at all levels 1..H.

  Args:
    logits: float[H, B] scorer outputs for `nodes` (row j-1 scored at level j).
    nodes, mask: int32[H, B], bool[H, B] from `path_children`.
    path: int32[H+1] the positive item's path.
    weight: scalar or float[H] weight of the positive term per level.
  Returns:
    float32[H] the loss of each level.
  """
  targets, mask = level_targets(nodes, mask, path)
  weight = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), (nodes.shape[0],))
  return jax.vmap(binary_cross_entropy)(logits, targets, mask, weight)


def path_score_fn(score_fn):
  """Wraps a PLT scorer so a node's score is log P(z_n = 1 | x): the sum of log-sigmoids of
  the classifiers on its path from the root (levels 1..level). Used to rerank candidate leaves
  (the forest) with the same quantity beam search ranks by. `level` (static) is required.

  Returns `fn(params, tree, history, nodes, level) -> float32[U, M]`; -1 nodes get the
  wrapped scorer's output for -1 ancestors (mask them as with the plain scorer)."""

  def fn(params, tree, history, nodes, level=None):
    if level is None:
      raise ValueError("path scores need the nodes' level")
    total = jnp.zeros(nodes.shape, jnp.float32)
    for j in range(1, level + 1):
      anc = tree_lib.ancestor(nodes, j, branching=tree.branching)  # [U, M], -1 stays -1
      total = total + jax.nn.log_sigmoid(
          score_fn(params, tree, history, anc, level=j).astype(jnp.float32))
    return total

  return fn
