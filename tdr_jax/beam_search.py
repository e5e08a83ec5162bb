"""Layer-wise beam search over the tree (TDR Algorithm 1) and exact brute-force retrieval.

Both take a scorer `score_fn(params, tree, history, nodes, level=None) -> float[U, M]`
(see `tdr_jax.sampling`) and are batched
over users, jit-compatible, with static shapes: `beam_size`, `topk` and the tree's height and
branching are static; the tree's arrays are traced, so a new tree of the same shape reuses the
compiled search.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tdr_jax import tree as tree_lib
from tdr_jax.sampling import ScoreFn


def start_level(*, branching: int, height: int, beam_size: int) -> int:
  """First level with more than `beam_size` nodes (the leaf level if none has)."""
  for j in range(height + 1):
    if branching ** j > beam_size:
      return j
  return height


def _leaf_items(tree: tree_lib.Tree, nodes: jax.Array, scores: jax.Array, topk: int):
  """Top-k leaves of a [U, k] set -> (items int32[U, topk], scores float[U, topk]); -1 where
  the leaf is empty or the score is -inf."""
  top_scores, idx = jax.lax.top_k(scores, topk)
  leaves = jnp.take_along_axis(nodes, idx, axis=1)
  leaf_index = leaves - jnp.asarray(tree.level_offsets)[tree.height]
  ok = (leaves >= 0) & jnp.isfinite(top_scores)
  items = jnp.where(ok, jnp.asarray(tree.leaf_to_item)[jnp.where(ok, leaf_index, 0)], -1)
  return items, top_scores


@functools.partial(jax.jit, static_argnames=("score_fn", "beam_size", "topk"))
def beam_search(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array, *,
                beam_size: int, topk: int) -> tuple[jax.Array, jax.Array]:
  """Retrieves the top-K items per user by beam search.

  The first level with more than `beam_size` nodes is scored whole and its best `beam_size`
  valid nodes kept; then, level by level (one `lax.scan` step each), the children of the beam
  are scored and the best `beam_size` valid ones kept. The K best leaves of the last beam are
  returned.

  Args:
    score_fn: scorer (hashable; static).
    params: scorer parameters.
    tree: the tree index.
    history: int32[U, L] user histories.
    beam_size: k.
    topk: K <= k.
  Returns:
    items: int32[U, K] retrieved item ids, best first (-1 if fewer than K items exist).
    scores: float32[U, K] their leaf scores.
  """
  if topk > beam_size:
    raise ValueError(f"topk={topk} must not exceed beam_size={beam_size}")
  num_users = history.shape[0]
  b, height = tree.branching, tree.height
  level_offsets = jnp.asarray(tree.level_offsets)
  node_valid = jnp.asarray(tree.node_valid)
  children = jnp.asarray(tree.children)
  s = start_level(branching=b, height=height, beam_size=beam_size)
  width = b ** s
  level_nodes = jnp.broadcast_to(level_offsets[s] + jnp.arange(width, dtype=jnp.int32),
                                 (num_users, width))
  scores = score_fn(params, tree, history, level_nodes, level=s).astype(jnp.float32)
  scores = jnp.where(node_valid[level_nodes], scores, -jnp.inf)
  k0 = min(beam_size, width)
  beam_scores, idx = jax.lax.top_k(scores, k0)
  beam = jnp.take_along_axis(level_nodes, idx, axis=1)
  if s == height:
    return _leaf_items(tree, beam, beam_scores, topk)

  def expand(carry, level):
    beam, beam_scores = carry  # [U, k] nodes of level - 1
    alive = jnp.isfinite(beam_scores)
    # [U, k, B] -> [U, k*B]: the children of every beam node, as one candidate row per user.
    kids = children[beam].reshape(num_users, beam_size * b)
    ok = jnp.repeat(alive, b, axis=1) & node_valid[kids]
    sc = score_fn(params, tree, history, kids, level=level).astype(jnp.float32)
    sc = jnp.where(ok, sc, -jnp.inf)
    new_scores, idx = jax.lax.top_k(sc, beam_size)
    return (jnp.take_along_axis(kids, idx, axis=1), new_scores), None

  (beam, beam_scores), _ = jax.lax.scan(expand, (beam, beam_scores),
                                       jnp.arange(s + 1, height + 1, dtype=jnp.int32))
  return _leaf_items(tree, beam, beam_scores, topk)


@functools.partial(jax.jit, static_argnames=("score_fn", "topk", "chunk_size"))
def brute_force(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array, *,
                topk: int, chunk_size: int = 4096) -> tuple[jax.Array, jax.Array]:
  """Exact top-K by scoring every item's leaf, in chunks of items (running top-K merge).

  Args:
    score_fn, params, tree, history: as in `beam_search`.
    topk: K.
    chunk_size: items scored per scorer call.
  Returns:
    items: int32[U, K], scores: float32[U, K], best first.
  """
  num_users = history.shape[0]
  n = tree.num_items
  chunk = min(chunk_size, n)
  num_chunks = -(-n // chunk)
  leaves = jnp.asarray(tree.item_paths)[:, tree.height]
  pad = num_chunks * chunk - n
  items = jnp.concatenate([jnp.arange(n, dtype=jnp.int32), jnp.full((pad,), -1, jnp.int32)])
  nodes = jnp.concatenate([leaves, jnp.zeros((pad,), leaves.dtype)])
  # [num_chunks * chunk] -> [num_chunks, chunk]: one scan step per chunk of items.
  items = items.reshape(num_chunks, chunk)
  nodes = nodes.reshape(num_chunks, chunk)
  k = min(topk, n)

  def body(carry, xs):
    best_items, best_scores = carry
    chunk_items, chunk_nodes = xs
    sc = score_fn(params, tree, history, jnp.broadcast_to(chunk_nodes, (num_users, chunk)),
                  level=tree.height)
    sc = jnp.where(chunk_items[None, :] >= 0, sc.astype(jnp.float32), -jnp.inf)
    all_scores = jnp.concatenate([best_scores, sc], axis=1)
    all_items = jnp.concatenate([best_items, jnp.broadcast_to(chunk_items, (num_users, chunk))],
                                axis=1)
    top, idx = jax.lax.top_k(all_scores, k)
    return (jnp.take_along_axis(all_items, idx, axis=1), top), None

  init = (jnp.full((num_users, k), -1, jnp.int32), jnp.full((num_users, k), -jnp.inf))
  (best_items, best_scores), _ = jax.lax.scan(body, init, (items, nodes))
  if k < topk:
    best_items = jnp.pad(best_items, ((0, 0), (0, topk - k)), constant_values=-1)
    best_scores = jnp.pad(best_scores, ((0, 0), (0, topk - k)), constant_values=-jnp.inf)
  return best_items, best_scores
