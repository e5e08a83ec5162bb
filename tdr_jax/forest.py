"""Forest retrieval (DeFoRec, TDR sec. 1): candidates from every (tree, model) pair, reranked.

Each tree retrieves candidates by beam search with its own model; the union of the candidates
is scored by a discriminator (by default the last round's model scoring each candidate's leaf on
the last tree) and the top K are returned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tdr_jax import tree as tree_lib
from tdr_jax.metrics import repeated_in_row
from tdr_jax.scorer import ScoreFn


def union_candidates(per_tree: list[np.ndarray]) -> np.ndarray:
  """Union of several trees' retrieved items per user.

  Args:
    per_tree: R arrays int[U, k_r] of item ids (-1 padded).
  Returns:
    int32[U, sum k_r]: each user's distinct items (first occurrence kept), -1 elsewhere.
  """
  cand = np.concatenate([np.asarray(p) for p in per_tree], axis=1).astype(np.int32)
  return np.where(repeated_in_row(cand), -1, cand)


@functools.partial(jax.jit, static_argnames=("score_fn", "topk"))
def rerank(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array,
           candidates: jax.Array, *, topk: int) -> tuple[jax.Array, jax.Array]:
  """Top-K of `candidates` by the discriminator's score of each candidate's leaf.

  Args:
    score_fn, params, tree: the discriminator and the tree whose leaves it scores.
    history: int32[U, L].
    candidates: int32[U, C] item ids, -1 for none.
    topk: K <= C.
  Returns:
    items int32[U, K] (-1 where fewer than K candidates), scores float32[U, K].
  """
  ok = candidates >= 0
  leaves = jnp.asarray(tree.item_paths)[jnp.where(ok, candidates, 0), tree.height]
  sc = score_fn(params, tree, history, jnp.where(ok, leaves, -1), level=tree.height)
  sc = jnp.where(ok, sc.astype(jnp.float32), -jnp.inf)
  top, idx = jax.lax.top_k(sc, topk)
  items = jnp.take_along_axis(candidates, idx, axis=1)
  return jnp.where(jnp.isfinite(top), items, -1), top
