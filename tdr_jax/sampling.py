"""Negative samplers over tree levels (TDR sec. 5).

A scorer is any function `score_fn(params, tree, history, nodes, level=None) -> float[U, M]`
scoring the global node ids `nodes: int32[U, M]` for the users whose histories are
`history: int32[U, L]`. When the caller knows that all `nodes` lie on one level it passes that
level (a Python int or a traced int32 scalar) so a level-aware scorer can share per-level work;
`level=None` means the nodes may be on mixed levels. The samplers never look inside the scorer,
so DIN, two-tower or any other model plugs in.

* `uniform_negatives`: per level, m nodes drawn uniformly with replacement among the valid nodes
  of the level other than the positive, so q = 1 / (c(j) - 1) (unbatched; vmap over samples).
* `top_down_negatives`: m root-to-leaf paths per user drawn with `lax.scan`; at each level one
  child of the current node is drawn from the softmax of the (stop-gradient) scores of its valid
  children. A node's q is the product of the edge probabilities on its path; the nodes the
  paths visit at level j are that level's negatives. Empty subtrees are never drawn.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tdr_jax import tree as tree_lib
from tdr_jax.scorer import ScoreFn


class LevelIndex(NamedTuple):
  """Valid nodes grouped by level, for uniform sampling inside jit.

  Attributes:
    valid_nodes: int32[V] ids of all valid nodes, ascending (so grouped by level).
    level_start: int32[H+2] valid_nodes[level_start[j]:level_start[j+1]] are level j's.
  """
  valid_nodes: jax.Array
  level_start: jax.Array


def level_index(tree: tree_lib.Tree) -> LevelIndex:
  """Builds the LevelIndex of a tree on the host."""
  valid_nodes = np.flatnonzero(np.asarray(tree.node_valid)).astype(np.int32)
  level_start = np.searchsorted(valid_nodes, np.asarray(tree.level_offsets)).astype(np.int32)
  return LevelIndex(valid_nodes, level_start)


def uniform_negatives(key: jax.Array, positives: jax.Array, levels: jax.Array, index: LevelIndex,
                      *, num_samples: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Uniform negatives for one sample at several levels.

  Args:
    key: PRNG key.
    positives: int32[J] the positive node at each of the J levels.
    levels: int32[J] the level of each positive.
    index: LevelIndex of the tree.
    num_samples: m negatives per level.
  Returns:
    nodes: int32[J, m] sampled node ids (a valid node id even where masked).
    log_q: float32[J, m] log of the per-draw probability 1 / (c(j) - 1).
    mask: bool[J, m] False where the level has no other valid node.
  """
  valid_nodes = jnp.asarray(index.valid_nodes)
  level_start = jnp.asarray(index.level_start)
  start = level_start[levels]  # [J]
  count = level_start[levels + 1] - start  # c(j), [J]
  num_others = jnp.maximum(count - 1, 1)
  rank = jnp.searchsorted(valid_nodes, positives) - start  # positive's rank in its level
  r = jax.random.randint(key, (positives.shape[0], num_samples), 0, num_others[:, None])
  r = r + (r >= rank[:, None])  # skip the positive
  nodes = valid_nodes[start[:, None] + jnp.minimum(r, count[:, None] - 1)]
  log_q = jnp.broadcast_to(-jnp.log(num_others.astype(jnp.float32))[:, None], nodes.shape)
  mask = jnp.broadcast_to((count > 1)[:, None], nodes.shape)
  return nodes, log_q, mask


def top_down_level_log_q(scores: jax.Array, valid: jax.Array, *, branching: int,
                         num_levels: int) -> jax.Array:
  """Exact top-down probabilities of every node of levels 1..F from their scores.

  log q(n) = log q(parent(n)) + log softmax of n's score among its valid siblings.

  Args:
    scores: float[U, W] scores of all nodes of levels 1..F (global ids 1..W, W = sum B^j).
    valid: bool[W] valid-node mask of the same nodes.
    branching: B.
    num_levels: F.
  Returns:
    float32[U, W] log q (-inf for invalid nodes).
  """
  num_users = scores.shape[0]
  out = []
  parent_log_q = jnp.zeros((num_users, 1), jnp.float32)
  lo = 0
  for j in range(1, num_levels + 1):
    width = branching ** j
    logits = jnp.where(valid[lo:lo + width], scores[:, lo:lo + width], -jnp.inf)
    # [U, B^j] -> [U, B^(j-1), B]: heap layout keeps each node's children adjacent.
    groups = logits.reshape(num_users, width // branching, branching)
    any_valid = jnp.any(jnp.isfinite(groups), axis=-1, keepdims=True)
    log_p = jax.nn.log_softmax(jnp.where(any_valid, groups, 0.0), axis=-1)
    log_p = jnp.where(jnp.isfinite(groups), log_p, -jnp.inf)
    # [U, B^(j-1), B] -> [U, B^j] after adding each parent's log q to its children.
    level_log_q = (parent_log_q[:, :, None] + log_p).reshape(num_users, width)
    out.append(level_log_q)
    parent_log_q = level_log_q
    lo += width
  return jnp.concatenate(out, axis=1)


def top_down_negatives(key: jax.Array, score_fn: ScoreFn, params, tree: tree_lib.Tree,
                       history: jax.Array, *, num_samples: int, start_level: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
  """Top-down sampling of m paths per user, scored by the current model (no gradient).

  With `start_level` F > 0, the levels 1..F are scored whole (cheaper than m*B children per
  level when B^F is small) and the m paths' nodes at level F are drawn directly from the exact
  top-down distribution there (the product of the sibling softmaxes along each path, which is
  the same law as walking down from the root); the walk then continues with `lax.scan`.

  Args:
    key: PRNG key.
    score_fn: scorer (see module docstring).
    params: the scorer's parameters.
    tree: the tree index.
    history: int32[U, L] user histories.
    num_samples: m, the number of paths per user.
    start_level: F, the level the scanned walk starts from (0 = root).
  Returns:
    nodes: int32[U, H-F, m] the node each path visits at levels F+1..H.
    log_q: float32[U, H-F, m] log of the probability of drawing that node at its level.
  """
  num_users = history.shape[0]
  b = tree.branching
  params = jax.lax.stop_gradient(params)
  children = jnp.asarray(tree.children)
  node_valid = jnp.asarray(tree.node_valid)
  if not 0 <= start_level < tree.height:
    raise ValueError(f"start_level={start_level} must lie in [0, {tree.height})")
  if start_level == 0:
    current = jnp.zeros((num_users, num_samples), jnp.int32)
    current_log_q = jnp.zeros(current.shape, jnp.float32)
  else:
    key, start_key = jax.random.split(key)
    width = tree_lib.level_start(b, start_level + 1) - 1  # nodes of levels 1..F: ids 1..width
    level_scores = []
    for j in range(1, start_level + 1):
      first = tree_lib.level_start(b, j)
      ids = jnp.arange(first, first + b ** j, dtype=jnp.int32)
      level_scores.append(score_fn(params, tree, history,
                                   jnp.broadcast_to(ids, (num_users, b ** j)), level=j))
    scores = jnp.concatenate(level_scores, axis=1)  # [U, width]
    log_q_all = top_down_level_log_q(jax.lax.stop_gradient(scores).astype(jnp.float32),
                                     node_valid[1:width + 1], branching=b,
                                     num_levels=start_level)
    last = log_q_all[:, width - b ** start_level:]  # [U, B^F] level F
    draw = jax.random.categorical(start_key, last[:, None, :], axis=-1,
                                  shape=(num_users, num_samples))
    current = (draw + tree_lib.level_start(b, start_level)).astype(jnp.int32)
    current_log_q = jnp.take_along_axis(last, draw, axis=1)

  def step(carry, xs):
    level, level_key = xs
    current, log_q = carry  # [U, m] nodes at the previous level and their log q
    kids = children[current]  # [U, m, B]; current is never a leaf here
    valid = node_valid[kids]
    # [U, m, B] -> [U, m*B]: one scorer call for all children of all paths.
    scores = score_fn(params, tree, history, kids.reshape(num_users, num_samples * b),
                      level=level)
    # [U, m*B] -> [U, m, B]: back to one row of children per path.
    scores = jax.lax.stop_gradient(scores).reshape(num_users, num_samples, b)
    logits = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    choice = jax.random.categorical(level_key, logits, axis=-1)  # [U, m]
    nxt = jnp.take_along_axis(kids, choice[..., None], axis=-1)[..., 0]
    log_q = log_q + jnp.take_along_axis(log_p, choice[..., None], axis=-1)[..., 0]
    return (nxt, log_q), (nxt, log_q)

  keys = jax.random.split(key, tree.height - start_level)
  levels = jnp.arange(start_level + 1, tree.height + 1, dtype=jnp.int32)
  _, (nodes, log_q) = jax.lax.scan(step, (current, current_log_q), (levels, keys))
  # scan stacks levels first: [H-F, U, m] -> [U, H-F, m].
  return jnp.transpose(nodes, (1, 0, 2)), jnp.transpose(log_q, (1, 0, 2))
