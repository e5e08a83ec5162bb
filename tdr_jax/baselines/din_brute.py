"""DIN trained directly on items, retrieved by brute force: the no-index reference row.

The scorer is the project's `tdr_jax.models.din.DIN`, which scores tree *nodes* given a tree's
`item_paths`. Here the tree is only a container: a balanced binary tree over a seeded random
leaf order (`tree.build_random`), of which only the leaf level H is ever scored, so each item
is represented by the embedding of its own leaf and the internal nodes' embeddings stay
unused. The user representation is the item-level one (`hierarchical=False`; at level H the
hierarchical representation is the same thing).

Training: sampled softmax with the logQ correction over items (`losses.sampled_softmax_loss`):
for every sample, `num_negatives` leaves drawn uniformly with replacement among the N - 1
items other than its target (`sampling.uniform_negatives` on level H, q = 1/(N-1)); the
positive and its negatives are scored in one DIN call with `level=H` (the DIN as a
`tdr_jax.scorer.ScoreFn`, `scorer.din_score_fn`). Batches, learning rate, decay and checkpoints
are those of every trained method (`tdr_jax.training.fit`, see `fitting.fit_params`).

Retrieval: `beam_search.brute_force` scores every item's leaf for every user (running top-K
merge over item chunks), users in fixed-size padded batches (one compilation) split over the
devices of a mesh (`parallel.map_user_batches`). The DIN call materialises
[users, items, L, A] activations, so the item chunk is sized from `max_elements`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tdr_jax import beam_search as bs
from tdr_jax import losses, parallel, sampling, scorer, warm_start
from tdr_jax import tree as tree_lib
from tdr_jax.baselines.fitting import FitConfig, fit_params
from tdr_jax.models import din as din_lib

__all__ = ["DINBrute", "default_windows", "fit", "retrieve", "make_loss_fn"]


def default_windows(history_len: int) -> tuple[int, ...]:
  """Time windows summing to `history_len`: the paper's (1,1,1,2,2,2,10,10,20,20) pattern cut
  where it would overshoot, plus one window for the remainder."""
  out: list[int] = []
  for w in din_lib.DEFAULT_WINDOWS:
    if sum(out) + w > history_len:
      break
    out.append(w)
  if sum(out) < history_len:
    out.append(history_len - sum(out))
  return tuple(out)


@dataclasses.dataclass
class DINBrute:
  """A trained item-level DIN with its container tree."""
  tree: tree_lib.Tree
  graphdef: Any
  params: Any
  score_fn: scorer.ScoreFn  # (params, tree, history, nodes, level=None) -> float32[U, M]
  settings: dict
  info: dict


def make_loss_fn(score_fn: scorer.ScoreFn, tree: tree_lib.Tree, *, num_negatives: int):
  """`loss_fn(params, batch, key)`: mean sampled-softmax loss over leaves (items)."""
  m = int(num_negatives)
  h = tree.height
  index = sampling.level_index(tree)
  levels = jnp.asarray([h], jnp.int32)

  def loss_fn(params, batch, key):
    bsz = batch.target.shape[0]
    leaves = jnp.asarray(tree.item_paths)[jnp.maximum(batch.target, 0), h]  # [B]
    keys = jax.random.split(key, bsz)
    neg, log_q, neg_mask = jax.vmap(lambda k, p: sampling.uniform_negatives(
        k, p[None], levels, index, num_samples=m))(keys, leaves)  # [B, 1, m] each
    ids = jnp.concatenate([leaves[:, None], neg[:, 0]], axis=1)  # [B, 1 + m]
    sc = score_fn(params, tree, batch.history, ids, level=h).astype(jnp.float32)
    per_sample = jax.vmap(lambda p, n, q, k: losses.sampled_softmax_loss(
        p, n, q, k, num_samples=m))(sc[:, 0], sc[:, 1:], log_q[:, 0], neg_mask[:, 0])
    mask = batch.mask.astype(jnp.float32)
    return jnp.sum(per_sample * mask) / jnp.maximum(mask.sum(), 1.0)

  return loss_fn


def fit(ds, *, seed: int = 0, epochs: float = 1.0, batch_size: int = 256, history_len: int = 69,
        max_train_samples: int = 0, learning_rate: float = 1e-3, decay_rate: float = 0.9,
        windows: Sequence[int] | None = None, embed_dim: int = 24,
        attention_hidden: Sequence[int] = (36,), mlp_hidden: Sequence[int] = (128, 64),
        num_negatives: int = 100, workdir: str | None = None, checkpoint_every: int = 500,
        log_every: int = 50, verbose: bool = False,
        item_vectors: np.ndarray | None = None, mesh: Mesh | None = None) -> DINBrute:
  """Trains the DIN on items (see the module docstring). `item_vectors` (float[N, D]):
  warm-start item vectors for the initial item embeddings (`tdr_jax.warm_start.node_rows`),
  as the tree methods of the run get them. The steps run data-parallel over `mesh` (default:
  all devices)."""
  windows = tuple(int(w) for w in windows) if windows else default_windows(history_len)
  if sum(windows) != history_len:
    raise ValueError(f"windows {windows} sum to {sum(windows)}, not history_len={history_len}")
  if ds.num_items < 2:
    raise ValueError("the DIN baseline needs at least 2 items")
  fc = FitConfig(seed=seed, epochs=epochs, batch_size=batch_size, history_len=history_len,
                 max_train_samples=max_train_samples, learning_rate=learning_rate,
                 decay_rate=decay_rate, checkpoint_every=checkpoint_every, log_every=log_every)
  tree = tree_lib.build_random(np.random.default_rng([seed, 5]), ds.num_items, branching=2)
  model = din_lib.init_din(jax.random.fold_in(jax.random.key(seed), 2), num_nodes=tree.num_nodes,
                           embed_dim=embed_dim, windows=windows,
                           attention_hidden=attention_hidden, mlp_hidden=mlp_hidden,
                           hierarchical=False)
  graphdef, params = nnx.split(model)
  if item_vectors is not None:
    table = np.asarray(params["embed"]["embedding"][...])
    rows = warm_start.node_rows(item_vectors, tree, width=table.shape[1],
                                rms=float(np.sqrt(np.mean(table.astype(np.float64) ** 2))),
                                seed=seed)
    params["embed"]["embedding"] = nnx.Param(jnp.asarray(rows))
  score_fn = scorer.din_score_fn(graphdef)
  settings = {"windows": list(windows), "embed_dim": int(embed_dim),
              "warm_start": item_vectors is not None,
              "attention_hidden": [int(a) for a in attention_hidden],
              "mlp_hidden": [int(h) for h in mlp_hidden], "num_negatives": int(num_negatives),
              "negatives": "uniform over the other items, per sample",
              "learning_rate": float(learning_rate), "decay_rate": float(decay_rate),
              "tree_height": int(tree.height)}
  loss_fn = make_loss_fn(score_fn, tree, num_negatives=num_negatives)
  params, info = fit_params("din", loss_fn, params, fc, ds, workdir=workdir,
                            identity=settings, verbose=verbose, mesh=mesh)
  return DINBrute(tree=tree, graphdef=graphdef, params=params, score_fn=score_fn,
                  settings=settings, info=info)


def retrieve(model: DINBrute, eval_set, *, topk: int, batch_size: int = 64,
             max_elements: int = 1 << 25, mesh: Mesh | None = None) -> np.ndarray:
  """Exact top-K items per evaluation user (`eval_set.history`: int32[U, L]) by scoring every
  item. int32[U, K].

  Users go in fixed-size batches (the last one padded), each split over the devices of `mesh`
  (default: all devices). `max_elements` bounds users x items x L x A of one batch's DIN call
  (the item chunk is derived from it).
  """
  history = np.asarray(eval_set.history, np.int32)
  num_users, hist_len = history.shape
  if num_users == 0:
    return np.zeros((0, topk), np.int32)
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = max(1, min(batch_size, num_users))
  att = (model.settings["attention_hidden"] or [1])[0]
  chunk = max(1, min(model.tree.num_items, max_elements // (batch_size * hist_len * att)))
  params = parallel.replicate(model.params, mesh)
  tree = parallel.replicate(model.tree, mesh)

  def batch_topk(h):
    return bs.brute_force(model.score_fn, params, tree, h, topk=topk, chunk_size=chunk)[0]

  items = parallel.map_user_batches(batch_topk, [history], batch_size=batch_size, mesh=mesh)
  return np.asarray(items, np.int32)
