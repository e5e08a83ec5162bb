"""Label rectification under beam search (TDR sec. 4.3, Eq. 15; the TDR(T-RL) variant).

With plain layer-wise softmax labels every ancestor of the target leaf is a positive, so the
expected label of a node is the *sum* of eta over its subtree (Eq. 13) and beam search on
such scores is not Bayes optimal (Proposition 1). Rectification keeps the label of the
ancestor of y at level j only when y is the item with the largest eta_y(u) below that
ancestor; the expected label of a node then becomes the *maximum* of eta over its subtree,
which makes the level scores a max-heap in expectation.

Conventions
-----------
* ``eta: float[U, N]`` holds, per user, a score for every item. Only the ORDER of the items
  inside each subtree matters, so any strictly increasing transform of the conditional
  probabilities gives the same weights: the estimator's logits can be passed directly,
  without a softmax (which also avoids ties created by probabilities underflowing to 0).
* Weights are returned for levels ``1..H`` (column ``j - 1`` = level ``j``), the layout of
  ``tdr_jax.train.Batch.weight``. They are unnormalized (0 or 1): the paper trains with
  Eq. 15 without the per-level normalization of Definition 3.
* Ties: the target y gets weight 1 at level j when ``eta_y >= max(eta over the subtree)``,
  i.e. EVERY item that attains the subtree maximum is a positive there. This is
  deterministic and symmetric (no dependence on leaf positions); with ties the expected
  label of a node is ``(#maximizers) * max`` instead of ``max``. A NaN eta_y gives weight 0
  above the leaf level.
* Level H (the leaf) always gets weight 1: the leaf's subtree is y alone.
* Levels ``j < first_level`` keep the plain label (weight 1). Beam search (node scores)
  never scores the levels above its start level s = ``beam_search.start_level(...)`` (the first
  level with more nodes than the beam) and ranks level s whole before keeping the best k, so
  the first pruning is at level s: the max-heap property matters from s down, and the levels
  above it are trained as plain labels (:func:`first_rectified_level`).
* A target outside ``[0, N)`` (e.g. ``-1`` padding) gets weight 0 at every level.

All functions are pure ``jnp`` and jit-safe: pass the tree as an argument (its
``branching`` / ``height`` / ``num_items`` are static pytree metadata).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdr_jax import beam_search as bs
from tdr_jax import tree as tree_lib

__all__ = [
    "first_rectified_level",
    "eta_in_leaf_order",
    "subtree_max_eta",
    "subtree_max_nodes",
    "rectified_weights",
    "expected_node_labels",
]


def eta_in_leaf_order(eta: jax.Array, tree: tree_lib.Tree) -> jax.Array:
  """``float[U, B**H]``: ``eta[:, item]`` moved to each item's leaf index.

  Empty leaves hold ``-inf`` so they never win a subtree maximum. Implemented as a gather
  through ``leaf_to_item`` (the same result as scattering through ``item_to_leaf``, about
  4x faster on CPU).
  """
  eta = jnp.asarray(eta)
  if eta.ndim != 2 or eta.shape[1] != tree.num_items:
    raise ValueError(f"eta must have shape [U, {tree.num_items}], got {eta.shape}")
  dtype = eta.dtype if jnp.issubdtype(eta.dtype, jnp.floating) else jnp.float32
  l2i = jnp.asarray(tree.leaf_to_item)  # [B**H] item on every leaf, -1 when empty
  vals = jnp.take(eta.astype(dtype), jnp.maximum(l2i, 0), axis=1)  # [U, B**H]
  return jnp.where(l2i >= 0, vals, jnp.asarray(-jnp.inf, dtype))


def subtree_max_eta(eta_leaf: jax.Array, *, branching: int, height: int) -> list[jax.Array]:
  """Per-level subtree maxima of ``eta_leaf: float[U, B**H]`` (leaf order).

  Returns a list of ``H + 1`` arrays; entry ``j`` is ``float[U, B**j]``: for every node of
  level ``j`` (in heap order, i.e. by its position inside the level) the largest eta over
  its subtree. Entry ``H`` is ``eta_leaf`` itself; entry 0 is the per-user maximum.
  Subtrees without items hold ``-inf``.
  """
  b, h = int(branching), int(height)
  if eta_leaf.ndim != 2 or eta_leaf.shape[1] != b**h:
    raise ValueError(f"eta_leaf must have shape [U, {b ** h}], got {eta_leaf.shape}")
  num_users = eta_leaf.shape[0]
  levels = [eta_leaf]
  cur = eta_leaf
  for j in range(h - 1, -1, -1):
    # [U, B**(j+1)] -> [U, B**j, B]: the B children of a level-j node are consecutive
    # at level j+1 (heap layout), so each row of the last axis is one sibling group.
    cur = cur.reshape(num_users, b**j, b).max(axis=-1)
    levels.append(cur)
  return levels[::-1]


def subtree_max_nodes(eta: jax.Array, tree: tree_lib.Tree) -> jax.Array:
  """``float[U, num_nodes]``: subtree maximum of eta for every node, in global-id order.

  This is the expected rectified label ``E[z_n] = max_{y below n} eta_y`` of every node
  (when there are no ties), usable as a table of node scores.
  """
  levels = subtree_max_eta(eta_in_leaf_order(eta, tree), branching=tree.branching,
                           height=tree.height)
  # Heap layout: levels are stored one after the other, so concatenation gives global ids.
  return jnp.concatenate(levels, axis=1)


def first_rectified_level(*, branching: int, height: int, beam_size: int) -> int:
  """The first tree level whose labels need rectification under a beam of ``beam_size``.

  It is the beam search's start level s (``beam_search.start_level``): levels ``j < s`` are
  never scored, level s is scored whole and cut to the best ``beam_size`` nodes, so the first
  pruning (where a summed label can push an ancestor of a top item out of the beam) is at s.
  When no level above the leaves has more than ``beam_size`` nodes, s is the leaf level H,
  whose label is 1 under both schemes: the weights are then the plain ones.
  """
  return bs.start_level(branching=branching, height=height, beam_size=beam_size)


def rectified_weights(eta: jax.Array, targets: jax.Array, tree: tree_lib.Tree, *,
                      first_level: int = 1) -> jax.Array:
  """Rectified label weights (Eq. 15, unnormalized) of a batch of samples.

  Args:
    eta: float[U, N] item scores of each sample's user (probabilities or any strictly
      increasing transform of them, e.g. logits).
    targets: int[U] the target item y of each sample.
    tree: the tree index.
    first_level: levels ``j < first_level`` keep the plain label 1; levels
      ``first_level..H`` are rectified (static; 0 or 1: every level). See
      :func:`first_rectified_level`.
  Returns:
    float32[U, H]: column ``j - 1`` is, for ``j >= first_level``, 1 where y attains the
    maximum of eta over the subtree of its level-``j`` ancestor (ties: every maximizer gets
    1), else 0; for ``j < first_level`` it is 1. Level H is always 1 for a valid target;
    invalid targets (outside [0, N)) get all zeros.
  """
  first_level = int(first_level)
  if first_level < 0:
    raise ValueError(f"first_level must be >= 0, got {first_level}")
  eta = jnp.asarray(eta)
  targets = jnp.asarray(targets).astype(jnp.int32)
  if targets.shape != (eta.shape[0],):
    raise ValueError(f"targets must have shape [{eta.shape[0]}], got {targets.shape}")
  b, h, n = tree.branching, tree.height, tree.num_items
  eta_leaf = eta_in_leaf_order(eta, tree)
  levels = subtree_max_eta(eta_leaf, branching=b, height=h)
  valid = (targets >= 0) & (targets < n)
  y = jnp.where(valid, targets, 0)
  leaf = jnp.asarray(tree.item_to_leaf)[y]  # [U] leaf index of every target
  # eta_y read back from the leaf-ordered array, so it is the same (cast) value the
  # maxima were taken over.
  eta_y = jnp.take_along_axis(eta_leaf, leaf[:, None], axis=1)[:, 0]  # [U]
  cols = []
  for j in range(1, h):
    if j < first_level:
      cols.append(jnp.ones_like(valid))  # above the first pruning: the plain label
      continue
    pos = leaf // (b ** (h - j))  # position of y's level-j ancestor inside level j
    sub_max = jnp.take_along_axis(levels[j], pos[:, None], axis=1)[:, 0]  # [U]
    cols.append(eta_y >= sub_max)
  cols.append(jnp.ones_like(valid))  # level H: the leaf's subtree is y alone
  w = jnp.stack(cols, axis=1) & valid[:, None]
  return w.astype(jnp.float32)


def expected_node_labels(eta: jax.Array, tree: tree_lib.Tree, *,
                         rectified: bool = True, first_level: int = 1) -> jax.Array:
  """``float[U, num_nodes]`` expected label of every node under ``y ~ eta(u)``.

  Computed from the definition: every item y is taken as the target with probability
  ``eta_y`` and adds ``eta_y * weight_j(u, y)`` to its level-``j`` ancestor, for
  ``j = 1..H``; ``weight`` is :func:`rectified_weights` (``rectified=True``, from
  ``first_level`` down) or 1 (plain labels, Eq. 13: the expected label is the subtree sum).
  The root (level 0, never trained) gets the sum of eta. ``eta`` must be probabilities here (it weights the sum).
  Cost ``O(U * N * H)``: an analysis / testing helper, not a training-time function.
  """
  eta = jnp.asarray(eta, jnp.float32)
  num_users, n = eta.shape
  h = tree.height
  items = jnp.arange(n, dtype=jnp.int32)
  if rectified:
    # Every (user, item) pair as one sample: [U*N] rows.
    w = rectified_weights(jnp.repeat(eta, n, axis=0), jnp.tile(items, num_users), tree,
                          first_level=first_level)
    w = w.reshape(num_users, n, h)  # [U*N, H] -> [U, N, H]
  else:
    w = jnp.ones((num_users, n, h), jnp.float32)
  contrib = eta[:, :, None] * w  # [U, N, H]
  paths = jnp.asarray(tree.item_paths)[:, 1:]  # [N, H] ancestors of levels 1..H
  out = jnp.zeros((num_users, tree.num_nodes), jnp.float32)
  out = out.at[:, paths].add(contrib)  # [U, N, H] added at global ids paths[N, H]
  return out.at[:, 0].set(eta.sum(axis=1))
