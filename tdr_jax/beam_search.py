"""Layer-wise beam search over the tree (TDR Algorithm 1) and exact brute-force retrieval.

Both take a scorer `score_fn(params, tree, history, nodes, level=None) -> float[U, M]`
(see `tdr_jax.sampling`) and are batched
over users, jit-compatible, with static shapes: `beam_size`, `topk` and the tree's height and
branching are static; the tree's arrays are traced, so a new tree of the same shape reuses the
compiled search.

`beam_trace` is the search itself and returns every level's candidate set (OTM trains on them);
`beam_search(..., path_scores=True)` ranks nodes by the sum of log-sigmoid of the scorer's outputs
along the path from the root (PLT retrieval).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tdr_jax import tree as tree_lib
from tdr_jax.scorer import ScoreFn


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


class BeamTrace(NamedTuple):
  """Every candidate set a beam search scored, level by level (s = `start_level(...)`).

  Attributes:
    first_nodes: int32[U, B^s] all nodes of level s (scored whole).
    first_scores: float32[U, B^s] their scores, -inf for invalid nodes.
    nodes: int32[H-s, U, k*B] row i: the children of the level-(s+i) beam, i.e. the nodes scored
      at level s+1+i; -1 where masked (child of a dead beam slot, or an empty subtree).
    scores: float32[H-s, U, k*B] their scores, -inf where masked.
    beam: int32[U, min(k, B^H)] the final (leaf-level) beam, best first.
    beam_scores: float32[U, min(k, B^H)] its scores (-inf for dead slots).
  """
  first_nodes: jax.Array
  first_scores: jax.Array
  nodes: jax.Array
  scores: jax.Array
  beam: jax.Array
  beam_scores: jax.Array


def _first_level(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array, s: int, *,
                 path_scores: bool) -> tuple[jax.Array, jax.Array]:
  """All nodes of level s and their scores [U, B^s] (-inf for invalid nodes).

  With `path_scores`, a node's score is the sum of log-sigmoid of the scorer's outputs over its
  ancestors at levels 1..s and itself, so levels 1..s are all scored (one call per level)."""
  num_users = history.shape[0]
  b = tree.branching
  node_valid = jnp.asarray(tree.node_valid)

  def level_nodes(j):
    first = tree_lib.level_start(b, j)
    return jnp.broadcast_to(jnp.arange(first, first + b ** j, dtype=jnp.int32),
                            (num_users, b ** j))

  if not path_scores:
    nodes = level_nodes(s)
    scores = score_fn(params, tree, history, nodes, level=s).astype(jnp.float32)
    return nodes, jnp.where(node_valid[nodes], scores, -jnp.inf)
  acc = jnp.zeros((num_users, 1), jnp.float32)  # the root's log-probability
  nodes = level_nodes(0)
  for j in range(1, s + 1):
    nodes = level_nodes(j)
    sc = jax.nn.log_sigmoid(score_fn(params, tree, history, nodes, level=j).astype(jnp.float32))
    # [U, B^(j-1)] -> [U, B^j]: heap layout puts node p's children at level positions p*B..p*B+B-1.
    acc = jnp.where(node_valid[nodes], jnp.repeat(acc, b, axis=1) + sc, -jnp.inf)
  return nodes, acc


def beam_trace(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array, *,
               beam_size: int, path_scores: bool = False) -> BeamTrace:
  """Runs the layer-wise beam search and returns every level's candidate set (not jitted).

  The first level s with more than `beam_size` nodes is scored whole and its best `beam_size`
  valid nodes kept; then, level by level (one `lax.scan` step each), the children of the beam are
  scored and the best `beam_size` valid ones kept. A node's score is the scorer's output, or with
  `path_scores` the sum of log-sigmoid of the outputs along its path from the root (the log of
  the product of conditional probabilities of a probabilistic label tree).

  Args:
    score_fn: scorer `score_fn(params, tree, history, nodes, level=None) -> float[U, M]`.
    params: scorer parameters (wrap in `jax.lax.stop_gradient` for a search without gradient).
    tree: the tree index.
    history: int32[U, L] user histories.
    beam_size: k (static).
    path_scores: rank by path log-probabilities instead of node scores (static).
  Returns:
    BeamTrace of the search.
  """
  num_users = history.shape[0]
  b, height = tree.branching, tree.height
  node_valid = jnp.asarray(tree.node_valid)
  children = jnp.asarray(tree.children)
  s = start_level(branching=b, height=height, beam_size=beam_size)
  first_nodes, first_scores = _first_level(score_fn, params, tree, history, s,
                                           path_scores=path_scores)
  k0 = min(beam_size, b ** s)
  beam_scores, idx = jax.lax.top_k(first_scores, k0)
  beam = jnp.take_along_axis(first_nodes, idx, axis=1)
  if s == height:
    empty_nodes = jnp.zeros((0, num_users, beam_size * b), jnp.int32)
    return BeamTrace(first_nodes, first_scores, empty_nodes,
                     jnp.zeros(empty_nodes.shape, jnp.float32), beam, beam_scores)

  def expand(carry, level):
    beam, beam_scores = carry  # [U, k] nodes of level - 1 (real ids; dead slots score -inf)
    alive = jnp.isfinite(beam_scores)
    # [U, k, B] -> [U, k*B]: the children of every beam node, as one candidate row per user.
    kids = children[beam].reshape(num_users, beam_size * b)
    ok = jnp.repeat(alive, b, axis=1) & node_valid[kids]
    sc = score_fn(params, tree, history, kids, level=level).astype(jnp.float32)
    if path_scores:
      sc = jax.nn.log_sigmoid(sc) + jnp.repeat(beam_scores, b, axis=1)
    sc = jnp.where(ok, sc, -jnp.inf)
    new_scores, idx = jax.lax.top_k(sc, beam_size)
    new_beam = jnp.take_along_axis(kids, idx, axis=1)
    return (new_beam, new_scores), (jnp.where(ok, kids, -1), sc)

  (beam, beam_scores), (nodes, scores) = jax.lax.scan(
      expand, (beam, beam_scores), jnp.arange(s + 1, height + 1, dtype=jnp.int32))
  return BeamTrace(first_nodes, first_scores, nodes, scores, beam, beam_scores)


@functools.partial(jax.jit, static_argnames=("score_fn", "beam_size", "topk", "path_scores"))
def beam_search(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array, *,
                beam_size: int, topk: int, path_scores: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """Retrieves the top-K items per user by beam search (see `beam_trace`).

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
    path_scores: rank nodes by the sum of log-sigmoid of the scorer's outputs along the path
      from the root (PLT retrieval: log of the product of conditional probabilities) instead of
      by their own score (static).
  Returns:
    items: int32[U, K] retrieved item ids, best first (-1 if fewer than K items exist).
    scores: float32[U, K] their leaf scores (path log-probabilities with `path_scores`).
  """
  if topk > beam_size:
    raise ValueError(f"topk={topk} must not exceed beam_size={beam_size}")
  trace = beam_trace(score_fn, params, tree, history, beam_size=beam_size,
                     path_scores=path_scores)
  return _leaf_items(tree, trace.beam, trace.beam_scores, topk)


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
