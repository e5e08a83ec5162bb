"""SASRec: a self-attentive sequential recommender, used as the eta_y(u) estimator of TDR(T-RL).

TDR's label rectification (sec. 4.3) needs, for every training sample (u, y), the conditional
probabilities eta_y'(u) of all items y'. The paper (sec. 8.4) estimates them with a small
SASRec model trained on the same training samples: the history is encoded by causal
self-attention, the hidden state of the most recent position is the user vector, and one
matmul against the item embeddings followed by a softmax gives eta for the whole corpus.

Model
-----
* Item embeddings ``[N + 1, D]``; row ``N`` is the padding row (history entries ``-1``), its
  input is zeroed. Input = item embedding * sqrt(D) + learned positional embedding.
* Positions are counted from the RIGHT: the most recent item always gets position
  ``max_len - 1``, the one before ``max_len - 2``, ... (as in SASRec's fixed-length,
  left-padded sequences). A history shorter than ``max_len`` is treated as if it were
  left-padded to ``max_len``, so the output does not depend on how much padding is passed.
* ``num_blocks`` pre-LayerNorm transformer blocks (causal multi-head self-attention, then a
  two-layer ReLU feed-forward, each with a residual connection), then a final LayerNorm.
  Attention mask: query ``t`` sees key ``s`` iff ``s <= t`` and ``s`` is a real item, or
  ``s == t`` (so padding rows are never empty and never leak into real positions). With an
  empty history the output depends on the positional embeddings only (a learned prior).
* Dropout (embeddings and sub-layer outputs) defaults to 0; it is active only when a call is
  given ``rngs``. Results are deterministic otherwise.
* ``eta_logits(history) = user_vector(history) @ item_embeddings[:N].T`` (one matmul).

Training (:func:`train_sasrec`)
-------------------------------
Same samples as the TDR models (``ds.train_sample_pos``, histories from ``train_batch``; the
same seeded subset as ``experiment.training_samples`` when ``max_train_samples`` is set),
Adam at a constant learning rate, steps run by ``tdr_jax.training.fit`` (data-parallel over
a device mesh) on the batch stream of ``tdr_jax.data.batches`` with the estimator's own salt
(``stream=23``), randomness from ``fold_in(key, step)``.
Loss: full softmax cross-entropy over all N items (default up to ``MAX_FULL_SOFTMAX_ITEMS``
items); above that, or with ``sampled=True``, a sampled softmax with ``num_negatives``
uniform negatives shared by the batch and the logQ correction (accidental hits masked).
With ``workdir`` the state is checkpointed with Orbax (``training.Checkpointer``) into
``workdir/sasrec``: a finished checkpoint is restored instead of retraining ("trained once
per dataset"); an unfinished one is resumed and ends with the same parameters as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from tdr_jax import losses, parallel, training
from tdr_jax.data import batches as batches_lib
from tdr_jax.data.preprocess import corpus_fingerprint

__all__ = [
    "SASRec",
    "SASRecEstimator",
    "train_sasrec",
    "MAX_FULL_SOFTMAX_ITEMS",
]

# Above this many items the default (sampled=None) switches to the sampled softmax.
MAX_FULL_SOFTMAX_ITEMS = 100_000
# Refuse an explicit full softmax whose [batch, N] logits exceed this many entries (1 GiB f32).
MAX_FULL_SOFTMAX_ENTRIES = 1 << 28


class _Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a ReLU feed-forward."""

  def __init__(self, dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads, dim, decode=False, keep_rngs=False,
                                       rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.ffn_in = nnx.Linear(dim, dim, rngs=rngs)
    self.ffn_out = nnx.Linear(dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    det = rngs is None
    h = self.attn(self.attn_norm(x), mask=mask, deterministic=True)  # [B, L, D]
    x = x + self.dropout(h, deterministic=det, rngs=rngs)
    h = jax.nn.relu(self.ffn_in(self.ffn_norm(x)))
    h = self.ffn_out(self.dropout(h, deterministic=det, rngs=rngs))
    return x + self.dropout(h, deterministic=det, rngs=rngs)


class SASRec(nnx.Module):
  """Self-attentive sequential recommender over ``num_items`` items.

  Args (keyword-only):
    num_items: N; item ids are ``0..N-1``, ``-1`` is padding.
    max_len: longest history the positional embeddings cover.
    dim: model width D.
    num_blocks: number of transformer blocks.
    num_heads: attention heads (must divide ``dim``).
    dropout: dropout rate, used only by calls that pass ``rngs``.
    rngs: ``nnx.Rngs`` for parameter initialisation.
  """

  def __init__(self, *, num_items: int, max_len: int, dim: int = 64, num_blocks: int = 2,
               num_heads: int = 1, dropout: float = 0.0, rngs: nnx.Rngs):
    if num_items < 1 or max_len < 1 or dim < 1 or num_blocks < 0 or num_heads < 1:
      raise ValueError("num_items, max_len, dim, num_heads must be positive and "
                       "num_blocks non-negative")
    if dim % num_heads:
      raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    self.num_items = int(num_items)
    self.max_len = int(max_len)
    self.dim = int(dim)
    init = nnx.initializers.normal(stddev=1.0 / math.sqrt(dim))
    self.item_embed = nnx.Embed(self.num_items + 1, dim, embedding_init=init, rngs=rngs)
    self.pos_embed = nnx.Embed(self.max_len, dim, embedding_init=init, rngs=rngs)
    self.blocks = nnx.List([_Block(dim, num_heads, dropout, rngs=rngs)
                            for _ in range(num_blocks)])
    self.final_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def sequence_hidden(self, history: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """``float32[B, L, D]`` hidden state of every position of ``history: int[B, L]``.

    ``L <= max_len``; longer histories are cut to their last ``max_len`` items. Hidden
    states of padding positions are meaningless (but finite).
    """
    history = jnp.asarray(history)
    if history.ndim != 2:
      raise ValueError(f"history must be [B, L], got shape {history.shape}")
    if history.shape[1] > self.max_len:
      history = history[:, -self.max_len:]
    length = history.shape[1]
    valid = (history >= 0) & (history < self.num_items)  # [B, L]
    ids = jnp.where(valid, history, self.num_items)  # padding -> row N, never a -1 gather
    x = self.item_embed(ids) * valid[..., None] * math.sqrt(self.dim)  # [B, L, D]
    # Right-aligned positions: the last column is always position max_len - 1.
    x = x + self.pos_embed.embedding[...][self.max_len - length:][None]  # [1, L, D]
    x = self.dropout(x, deterministic=rngs is None, rngs=rngs)
    # mask[b, 0, t, s]: query t may read key s (s <= t and s real, or s == t).
    causal = jnp.tril(jnp.ones((length, length), bool))  # [L, L]
    eye = jnp.eye(length, dtype=bool)
    mask = (causal[None] & valid[:, None, :]) | eye[None]  # [B, L, L]
    mask = mask[:, None]  # [B, 1, L, L]: shared by all heads
    for block in self.blocks:
      x = block(x, mask, rngs)
    return self.final_norm(x)

  def user_vector(self, history: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """``float32[B, D]``: hidden state of the most recent position."""
    return self.sequence_hidden(history, rngs=rngs)[:, -1]

  def item_table(self) -> jax.Array:
    """``float32[N, D]`` item embeddings (the padding row excluded)."""
    return self.item_embed.embedding[...][: self.num_items]

  def eta_logits(self, history: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """``float32[B, N]`` logits of every item; softmax over axis 1 gives eta_y(u)."""
    return self.user_vector(history, rngs=rngs) @ self.item_table().T

  def __call__(self, history: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.eta_logits(history, rngs=rngs)


# --------------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, history: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state).eta_logits(history)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _top_k(graphdef: nnx.GraphDef, state: nnx.State, history: jax.Array, k: int):
  return jax.lax.top_k(nnx.merge(graphdef, state).eta_logits(history), k)


@dataclasses.dataclass
class SASRecEstimator:
  """A trained SASRec, held functionally (``nnx.split``).

  Attributes:
    graphdef, state: the model (``nnx.merge(graphdef, state)`` rebuilds it).
    num_items, max_len: as in :class:`SASRec`.
    losses: ``(step, mean training loss over the last logging interval)`` of this call's
      training (empty when restored from a finished checkpoint).
    steps: total training steps of the model.
    restored_step: checkpoint step training started from (``None`` if none).
    train_seconds: wall time of this call's training loop.
  """

  graphdef: nnx.GraphDef
  state: nnx.State
  num_items: int
  max_len: int
  losses: list = dataclasses.field(default_factory=list)
  steps: int = 0
  restored_step: int | None = None
  train_seconds: float = 0.0

  @property
  def model(self) -> SASRec:
    return nnx.merge(self.graphdef, self.state)

  def logits(self, history) -> jax.Array:
    """``float32[B, N]`` item logits (jitted; a strictly increasing transform of eta)."""
    return _logits(self.graphdef, self.state, jnp.asarray(history, jnp.int32))

  def eta(self, history) -> jax.Array:
    """``float32[B, N]`` softmax probabilities eta_y(u) of every item."""
    return jax.nn.softmax(self.logits(history), axis=-1)

  def retrieve(self, history: np.ndarray, *, topk: int, batch_size: int = 256,
               mesh: Mesh | None = None) -> np.ndarray:
    """``int32[U, topk]`` items with the largest eta per user (``history: int32[U, L]``), best
    first.

    Runs in fixed-size batches (the last one padded), so one compilation serves all; each
    batch is split over the devices of ``mesh`` (default: all devices).
    """
    history = np.asarray(history, np.int32)
    k = min(int(topk), self.num_items)
    if len(history):
      mesh = parallel.make_mesh() if mesh is None else mesh
      state = parallel.replicate(self.state, mesh)
      items = parallel.map_user_batches(
          lambda h: _top_k(self.graphdef, state, h, k)[1], [history], batch_size=batch_size,
          mesh=mesh).astype(np.int32)
    else:
      items = np.zeros((0, k), np.int32)
    if k < topk:
      items = np.pad(items, ((0, 0), (0, topk - k)), constant_values=-1)
    return items


# ---------------------------------------------------------------------------------- training


def _seq_loss(model: SASRec, history, target, mask, key, *, sampled: bool,
              num_negatives: int, train_dropout: bool):
  rngs = nnx.Rngs(dropout=jax.random.fold_in(key, 0)) if train_dropout else None
  user = model.user_vector(history, rngs=rngs)  # [B, D]
  table = model.item_table()  # [N, D]
  if not sampled:
    logits = user @ table.T  # [B, N]
    per = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(
        logits, target[:, None], axis=1)[:, 0]
  else:
    n = model.num_items
    m = num_negatives
    # m uniform negatives shared by the whole batch: q = 1/N per draw.
    neg = jax.random.randint(jax.random.fold_in(key, 1), (m,), 0, n)
    pos_logit = jnp.sum(user * table[target], axis=1)  # [B]
    neg_logits = user @ table[neg].T  # [B, m]
    neg_mask = neg[None, :] != target[:, None]  # accidental hits of the positive
    log_q = jnp.full((m,), -math.log(n), jnp.float32)
    per = jax.vmap(lambda p, s, k: losses.sampled_softmax_loss(
        p, s, log_q, k, num_samples=m))(pos_logit, neg_logits, neg_mask)
  w = mask.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(w.sum(), 1.0)


@functools.lru_cache(maxsize=16)
def _make_step(graphdef: nnx.GraphDef, lr: float, sampled: bool, num_negatives: int,
               train_dropout: bool):
  """(optimizer, train step of `training.fit`) for one model structure / optimizer, cached
  across calls (the same step function reuses its compilation)."""
  optimizer = optax.adam(lr)

  def loss_fn(params, batch: batches_lib.Batch, aux, key):
    return _seq_loss(nnx.merge(graphdef, params), batch.history, batch.target, batch.mask, key,
                     sampled=sampled, num_negatives=num_negatives,
                     train_dropout=train_dropout)

  return optimizer, training.loss_step(loss_fn, optimizer)


def train_sasrec(ds, *, history_len: int, epochs: float, batch_size: int, lr: float = 1e-3,
                 seed: int = 0, max_train_samples: int = 0, workdir: str | None = None,
                 dim: int = 64, num_blocks: int = 2, num_heads: int = 1, dropout: float = 0.0,
                 sampled: bool | None = None, num_negatives: int = 256,
                 checkpoint_every: int = 500, log_every: int = 50) -> SASRecEstimator:
  """Trains (or restores) the SASRec estimator on ``ds``'s training samples.

  Args:
    ds: a preprocessed ``Dataset``.
    history_len: L, history length of the samples (also the model's ``max_len``).
    epochs: passes over the (sub)sampled training samples (may be fractional).
    batch_size: samples per step.
    lr: Adam learning rate (constant).
    seed: parameter init, batch order and sampling stream.
    max_train_samples: 0 = all samples, else the same seeded subset as the TDR runs.
    workdir: if given, Orbax checkpoints go to ``workdir/sasrec``; a finished checkpoint
      of the same settings and corpus is restored without training, an unfinished one is
      resumed. A checkpoint of other settings raises ``ValueError``.
    dim, num_blocks, num_heads, dropout: model hyperparameters.
    sampled: ``False`` full softmax, ``True`` sampled softmax with uniform negatives,
      ``None`` full up to ``MAX_FULL_SOFTMAX_ITEMS`` items.
    num_negatives: negatives per step of the sampled softmax.
    checkpoint_every, log_every: steps between checkpoints / loss logs.
  Returns:
    a :class:`SASRecEstimator`.
  """
  n = int(ds.num_items)
  if sampled is None:
    sampled = n > MAX_FULL_SOFTMAX_ITEMS
  if not sampled and batch_size * n > MAX_FULL_SOFTMAX_ENTRIES:
    raise ValueError(
        f"full softmax over {n} items with batch_size={batch_size} needs "
        f"{batch_size * n} logits per step (limit {MAX_FULL_SOFTMAX_ENTRIES}); pass "
        f"sampled=True (sampled softmax with uniform negatives) or a smaller batch")
  if epochs <= 0 or batch_size < 1 or history_len < 1:
    raise ValueError("epochs, batch_size and history_len must be positive")
  samples = batches_lib.training_samples(ds, max_train_samples=max_train_samples, seed=seed)
  if len(samples) == 0:
    raise ValueError("the dataset has no training samples")
  steps_per_epoch, total_steps = batches_lib.steps_for(len(samples), batch_size=batch_size,
                                                       epochs=epochs)

  model = SASRec(num_items=n, max_len=history_len, dim=dim, num_blocks=num_blocks,
                 num_heads=num_heads, dropout=dropout,
                 rngs=nnx.Rngs(params=jax.random.key(seed)))
  graphdef, params = nnx.split(model)
  optimizer, step_fn = _make_step(graphdef, float(lr), bool(sampled), int(num_negatives),
                                  dropout > 0)

  def batches(step: int) -> batches_lib.Batch:
    return batches_lib.batch_for_step(ds, samples, step, steps_per_epoch=steps_per_epoch,
                                      batch_size=batch_size, history_len=history_len,
                                      seed=seed, levels=1, stream=23)

  checkpointer = None
  if workdir is not None:
    settings = {"history_len": history_len, "batch_size": batch_size, "lr": lr, "seed": seed,
                "max_train_samples": max_train_samples, "dim": dim, "num_blocks": num_blocks,
                "num_heads": num_heads, "dropout": dropout, "sampled": bool(sampled),
                "num_negatives": num_negatives if sampled else 0}
    checkpointer = training.Checkpointer(
        os.path.join(workdir, "sasrec"),
        identity={"settings_fingerprint": training.fingerprint(settings),
                  "corpus_fingerprint": corpus_fingerprint(ds)},
        phrases={"settings_fingerprint": "other SASRec settings",
                 "corpus_fingerprint": "another corpus"},
        record=settings)
  out = training.fit(step_fn, training.init_state(params, optimizer), batches,
                     total_steps=total_steps, base_key=jax.random.fold_in(jax.random.key(seed), 1),
                     checkpointer=checkpointer, checkpoint_every=checkpoint_every,
                     log_every=log_every, name="sasrec")
  # (step, mean loss) per log_every steps of this call, counted from the step it started at.
  per_step = out.metrics.get("loss", np.zeros(0, np.float32))
  start = out.steps - out.steps_run
  chunk_losses = [(start + min(lo + log_every, len(per_step)),
                   float(per_step[lo:lo + log_every].mean()))
                  for lo in range(0, len(per_step), log_every)]
  return SASRecEstimator(graphdef=graphdef, state=jax.tree.map(jnp.asarray, out.state.params),
                         num_items=n, max_len=history_len, losses=chunk_losses,
                         steps=total_steps, restored_step=out.resumed_from,
                         train_seconds=out.seconds)
