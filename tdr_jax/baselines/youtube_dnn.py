"""Two-tower YouTubeDNN baseline: pooled-history user tower, sampled softmax, exact MIPS top-K.

Model (TDR sec. 8.4: item dimension 24, MLP [128, 64, 24], 1000 negatives, Adam 1e-3 with
exponential decay)
-----
* User tower: the history's item ids (left-padded with -1) are embedded with an *input* item
  table (D = 24), averaged over the real positions (padding masked; an empty history gives the
  zero vector), and passed through Linear-ReLU layers of widths `hidden` = (128, 64) and a
  final Linear to D = 24 (no activation).
* Item tower: a separate *output* item table (D = 24), as in the original model where the
  watched-item embeddings and the softmax weights are different parameters
  (`tie_embeddings=True` uses one table for both). No item bias: the score is the plain inner
  product <user, item>, so retrieval is maximum inner product search.

Training
--------
Sampled softmax with the logQ correction (`losses.sampled_softmax_loss`): per batch,
`num_negatives` item ids are drawn uniformly *with replacement* over all N items and *shared
by every sample of the batch* (one [B, D] x [D, m] product, the usual way this model is
trained); q = 1/N per draw, so each negative logit is lowered by ln(m/N); a negative equal to a
sample's own target (accidental hit) is masked out for that sample. Batches, learning rate,
decay and checkpoints are those of every trained method (`tdr_jax.training.fit`, see
`fitting.fit_params`).

Retrieval
---------
Exact top-K by inner product over all items: users in fixed-size batches split over the
devices of a mesh (`parallel.map_user_batches`), items in chunks of `chunk_size` with a running
`lax.top_k` merge (ties: lower item id), all in one jitted call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tdr_jax import losses, parallel
from tdr_jax.baselines.fitting import FitConfig, fit_params

__all__ = ["YouTubeDNN", "YouTubeDNNModel", "fit", "retrieve", "mips_topk", "make_loss_fn"]


class YouTubeDNN(nnx.Module):
  """Two-tower model: mean-pooled history -> MLP user vector; item embedding table."""

  def __init__(self, *, num_items: int, embed_dim: int = 24, hidden: Sequence[int] = (128, 64),
               tie_embeddings: bool = False, rngs: nnx.Rngs):
    if num_items <= 0 or embed_dim <= 0:
      raise ValueError("num_items and embed_dim must be positive")
    self.num_items = int(num_items)
    self.embed_dim = d = int(embed_dim)
    self.tie_embeddings = bool(tie_embeddings)
    self.item_embed = nnx.Embed(self.num_items, d, rngs=rngs)
    self.history_embed = None if tie_embeddings else nnx.Embed(self.num_items, d, rngs=rngs)
    widths = (d,) + tuple(int(h) for h in hidden) + (d,)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1],
                                                                          widths[1:])])

  def user_vectors(self, history: jax.Array) -> jax.Array:
    """float32[B, D] from int32[B, L] histories (-1 = padding)."""
    valid = history >= 0
    table = (self.item_embed if self.tie_embeddings else self.history_embed).embedding[...]
    e = table[jnp.where(valid, history, 0)]  # [B, L, D]; -1 never reaches the gather
    w = valid.astype(e.dtype)[..., None]  # [B, L, 1]
    x = jnp.sum(e * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)  # [B, D]
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers):
        x = jax.nn.relu(x)
    return x

  def item_vectors(self) -> jax.Array:
    """float32[N, D]: the output item embeddings."""
    return self.item_embed.embedding[...]


@dataclasses.dataclass
class YouTubeDNNModel:
  """A trained two-tower model: `nnx.merge(graphdef, params)` rebuilds the module."""
  graphdef: Any
  params: Any
  settings: dict
  info: dict

  def module(self) -> YouTubeDNN:
    return nnx.merge(self.graphdef, self.params)


def make_loss_fn(graphdef, *, num_items: int, num_negatives: int):
  """`loss_fn(params, batch, key)`: mean sampled-softmax loss (shared uniform negatives)."""
  m = int(num_negatives)
  log_q = -float(np.log(num_items))

  def loss_fn(params, batch, key):
    model = nnx.merge(graphdef, params)
    u = model.user_vectors(batch.history)  # [B, D]
    items = model.item_vectors()  # [N, D]
    target = jnp.maximum(batch.target, 0)
    pos = jnp.sum(u * items[target], axis=-1)  # [B]
    neg = jax.random.randint(key, (m,), 0, num_items)  # shared by the batch
    neg_logits = u @ items[neg].T  # [B, m]
    neg_mask = neg[None, :] != target[:, None]  # accidental hits
    per_sample = jax.vmap(lambda p, n, k: losses.sampled_softmax_loss(
        p, n, jnp.full((m,), log_q), k, num_samples=m))(pos, neg_logits, neg_mask)
    mask = batch.mask.astype(jnp.float32)
    return jnp.sum(per_sample * mask) / jnp.maximum(mask.sum(), 1.0)

  return loss_fn


def fit(ds, *, seed: int = 0, epochs: float = 1.0, batch_size: int = 256, history_len: int = 69,
        max_train_samples: int = 0, learning_rate: float = 1e-3, decay_rate: float = 0.9,
        embed_dim: int = 24, hidden: Sequence[int] = (128, 64), num_negatives: int = 1000,
        tie_embeddings: bool = False, workdir: str | None = None, checkpoint_every: int = 500,
        log_every: int = 50, verbose: bool = False, mesh: Mesh | None = None) -> YouTubeDNNModel:
  """Trains the two-tower model on the training samples (see the module docstring); the
  steps run data-parallel over `mesh` (default: all devices)."""
  fc = FitConfig(seed=seed, epochs=epochs, batch_size=batch_size, history_len=history_len,
                 max_train_samples=max_train_samples, learning_rate=learning_rate,
                 decay_rate=decay_rate, checkpoint_every=checkpoint_every, log_every=log_every)
  model = YouTubeDNN(num_items=ds.num_items, embed_dim=embed_dim, hidden=hidden,
                     tie_embeddings=tie_embeddings,
                     rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1)))
  graphdef, params = nnx.split(model)
  settings = {"embed_dim": int(embed_dim), "mlp": [int(h) for h in hidden] + [int(embed_dim)],
              "num_negatives": int(num_negatives), "negatives": "uniform, shared by the batch",
              "tie_embeddings": bool(tie_embeddings), "learning_rate": float(learning_rate),
              "decay_rate": float(decay_rate)}
  loss_fn = make_loss_fn(graphdef, num_items=ds.num_items, num_negatives=num_negatives)
  params, info = fit_params("youtube_dnn", loss_fn, params, fc, ds, workdir=workdir,
                            identity=settings, verbose=verbose, mesh=mesh)
  return YouTubeDNNModel(graphdef=graphdef, params=params, settings=settings, info=info)


@functools.partial(jax.jit, static_argnames=("topk", "chunk_size"))
def mips_topk(user_vecs: jax.Array, item_vecs: jax.Array, *, topk: int,
              chunk_size: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Exact top-K items by inner product, items processed in chunks (running top-K merge).

  Args:
    user_vecs: float[U, D].
    item_vecs: float[N, D].
    topk: K (if K > N the last columns are -1 / -inf).
    chunk_size: items scored per scan step.
  Returns:
    items int32[U, K] (ties: lower item id first), scores float32[U, K], best first.
  """
  num_users = user_vecs.shape[0]
  n, d = item_vecs.shape
  chunk = max(1, min(chunk_size, n))
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  ids = jnp.concatenate([jnp.arange(n, dtype=jnp.int32), jnp.full((pad,), -1, jnp.int32)])
  vecs = jnp.concatenate([item_vecs, jnp.zeros((pad, d), item_vecs.dtype)])
  ids = ids.reshape(num_chunks, chunk)
  vecs = vecs.reshape(num_chunks, chunk, d)
  k = min(topk, n)

  def body(carry, xs):
    best_items, best_scores = carry
    chunk_ids, chunk_vecs = xs
    sc = (user_vecs @ chunk_vecs.T).astype(jnp.float32)  # [U, chunk]
    sc = jnp.where(chunk_ids[None, :] >= 0, sc, -jnp.inf)
    # Earlier chunks (lower ids) come first, so lax.top_k's tie rule keeps the lower id.
    all_scores = jnp.concatenate([best_scores, sc], axis=1)
    all_items = jnp.concatenate([best_items, jnp.broadcast_to(chunk_ids, (num_users, chunk))],
                                axis=1)
    top, idx = jax.lax.top_k(all_scores, k)
    return (jnp.take_along_axis(all_items, idx, axis=1), top), None

  init = (jnp.full((num_users, k), -1, jnp.int32),
          jnp.full((num_users, k), -jnp.inf, jnp.float32))
  (best_items, best_scores), _ = jax.lax.scan(body, init, (ids, vecs))
  if k < topk:
    best_items = jnp.pad(best_items, ((0, 0), (0, topk - k)), constant_values=-1)
    best_scores = jnp.pad(best_scores, ((0, 0), (0, topk - k)), constant_values=-jnp.inf)
  return best_items, best_scores


@functools.partial(jax.jit, static_argnames=("graphdef", "topk", "chunk_size"))
def _retrieve_batch(graphdef, params, history, *, topk: int, chunk_size: int):
  model = nnx.merge(graphdef, params)
  return mips_topk(model.user_vectors(history), model.item_vectors(), topk=topk,
                   chunk_size=chunk_size)[0]


def retrieve(model: YouTubeDNNModel, eval_set, *, topk: int, batch_size: int = 256,
             chunk_size: int = 8192, mesh: Mesh | None = None) -> np.ndarray:
  """Exact inner-product top-K for every evaluation user (`eval_set.history`: int32[U, L]).

  Users go in fixed-size batches (the last one padded), each split over the devices of `mesh`
  (default: all devices). Returns int32[U, K].
  """
  history = np.asarray(eval_set.history, np.int32)
  if not len(history):
    return np.zeros((0, topk), np.int32)
  mesh = parallel.make_mesh() if mesh is None else mesh
  params = parallel.replicate(model.params, mesh)

  def batch_topk(h):
    return _retrieve_batch(model.graphdef, params, h, topk=topk, chunk_size=chunk_size)

  items = parallel.map_user_batches(batch_topk, [history],
                                    batch_size=max(1, min(batch_size, len(history))), mesh=mesh)
  return np.asarray(items, np.int32)
