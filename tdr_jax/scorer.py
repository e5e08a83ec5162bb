"""The scorer protocol: what losses, samplers, beam search, OTM, tree learning and the forest
call, and the DIN adapter that implements it.

A scorer is a pure function `score_fn(params, tree, history, nodes, level=None) -> scores`:

  params: the model's parameters (any pytree; an `nnx.State` for the DIN).
  tree: the `tdr_jax.tree.Tree` index (a pytree; its arrays are ordinary arguments, so a new
    tree of the same shape does not recompile).
  history: int32[U, L] item ids, left-padded with -1.
  nodes: int32[U, M] global node ids to score for each user (any level, or `level`'s only).
  level: optional: the level all `nodes` lie on (a Python int or a traced int32 scalar; lets
    a scorer share per-level work); None = the nodes may lie on mixed levels.
  returns float32[U, M], higher = more preferred.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tdr_jax import tree as tree_lib
from tdr_jax.models import din as din_lib


class ScoreFn(Protocol):
  def __call__(self, params: Any, tree: tree_lib.Tree, history: jax.Array, nodes: jax.Array,
               level: int | jax.Array | None = None) -> jax.Array:
    ...


def din_score_fn(graphdef: nnx.GraphDef) -> ScoreFn:
  """The DIN of `graphdef` (`tdr_jax.models.din`) as a `ScoreFn`: the tree supplies the
  items' paths and the level offsets the model needs to embed nodes."""
  din_score = din_lib.make_score_fn(graphdef)

  def score_fn(params, tree, history, nodes, level=None):
    return din_score(params, history, nodes, jnp.asarray(tree.item_paths),
                     jnp.asarray(tree.level_offsets), level=level)

  return score_fn


def init_din(key: jax.Array, tree: tree_lib.Tree, *, embed_dim: int, windows: Sequence[int],
             attention_hidden: Sequence[int], mlp_hidden: Sequence[int],
             hierarchical: bool = True) -> tuple[ScoreFn, Any]:
  """A freshly initialised DIN over the nodes of `tree`: (score_fn, params)."""
  model = din_lib.init_din(key, num_nodes=tree.num_nodes, embed_dim=embed_dim, windows=windows,
                           attention_hidden=attention_hidden, mlp_hidden=mlp_hidden,
                           hierarchical=hierarchical)
  graphdef, params = nnx.split(model)
  return din_score_fn(graphdef), params
