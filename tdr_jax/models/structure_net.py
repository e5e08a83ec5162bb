"""Deep Retrieval (DR) structure network and the pure functions over it (Flax NNX).

Structure
---------
A path is a code c = (c_1, ..., c_D) with c_d in {0..K-1}; there are K^D paths. Layer d
(d = 1..D) maps [user embedding, path embeddings of c_1..c_{d-1}] through its own MLP to K
logits, and p(c | x) = prod_d softmax_d(c_d | x, c_<d). Layer d has its own path-embedding
table for the code chosen at that layer (tables 1..D-1; the last layer's code feeds nothing).

Implementation choice: every layer's MLP takes an input of the *same* width
user_dim + (D-1) * path_dim, where the slots of the codes not chosen yet are zeros. Zero
inputs contribute nothing to the output and receive no gradient, so this is the paper's
model with input sizes user_dim + (d-1) * path_dim, but the D layers' weights stack into
arrays [D, ...]: all layers of a batch of paths run as one einsum (training) and the D-step
beam search is a `lax.scan` over the layer index.

User embedding (the input x): the history (item ids, left-padded with -1) goes through an
item embedding table and either a GRU (`user_encoder="gru"`, the paper's public-data setup;
padded positions leave the state unchanged, an empty history gives the zero state) or a
masked mean followed by a Linear + tanh (`"mean"`).

Reranker (optional, `rerank_dim > 0`): a softmax model over all N items sharing the user
encoder (multi-task, Q = Q_pen + Q_softmax): user vector = Linear(user embedding), item score
= <user vector, output item embedding> + item bias.

Path ids: `path_ids` flattens codes to ints in [0, K^D) (c_1 most significant);
`path_codes` inverts it. -1 stays -1 both ways.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["StructureNet", "encode_users", "path_log_probs", "multi_path_log_likelihood",
           "all_path_log_probs", "beam_search_paths", "rerank_user_vectors", "rerank_logits",
           "path_ids", "path_codes", "all_paths"]

USER_ENCODERS = ("gru", "mean")


class StructureNet(nnx.Module):
  """D layers of K nodes over a user embedding, plus an optional softmax reranker."""

  def __init__(self, *, num_items: int, width: int, depth: int, embed_dim: int = 32,
               user_dim: int = 64, path_dim: int = 16, hidden: Sequence[int] = (128,),
               user_encoder: str = "gru", rerank_dim: int = 0, prefix_bias: bool = False,
               rngs: nnx.Rngs):
    if user_encoder not in USER_ENCODERS:
      raise ValueError(f"user_encoder={user_encoder!r}: choose one of {USER_ENCODERS}")
    if min(num_items, width, depth, embed_dim, user_dim, path_dim) < 1 or rerank_dim < 0:
      raise ValueError("num_items, width, depth and the dimensions must be positive")
    self.num_items, self.width, self.depth = int(num_items), int(width), int(depth)
    self.user_encoder = user_encoder
    self.path_dim = int(path_dim)
    self.item_embed = nnx.Embed(self.num_items, embed_dim, rngs=rngs)
    if user_encoder == "gru":
      self.gru = nnx.GRUCell(embed_dim, user_dim, rngs=rngs)
    else:
      self.pool = nnx.Linear(embed_dim, user_dim, rngs=rngs)
    self.user_dim = int(user_dim)
    # Path embeddings of layers 1..D-1 (at least one table so D = 1 keeps a valid shape).
    self.path_embed = nnx.Param(jax.random.normal(
        rngs.params(), (max(self.depth - 1, 1), self.width, self.path_dim)) * 0.1)
    widths = (self.user_dim + (self.depth - 1) * self.path_dim,) + tuple(
        int(h) for h in hidden) + (self.width,)
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.kernels = nnx.List([nnx.Param(init(rngs.params(), (self.depth, a, b)))
                             for a, b in zip(widths[:-1], widths[1:])])
    self.biases = nnx.List([nnx.Param(jnp.zeros((self.depth, b))) for b in widths[1:]])
    # Optional logit bias per (path prefix, code): layer d adds a learned row indexed by
    # c_1..c_{d-1}, so the marginal p(c_d | c_<d) is one table entry instead of a function the
    # MLP has to memorise (an addition to the paper's layer; zero-initialised).
    self.use_prefix_bias = bool(prefix_bias)
    if self.use_prefix_bias:
      self.prefix_bias = nnx.Param(jnp.zeros((num_prefixes(self.width, self.depth), self.width)))
    self.rerank_dim = int(rerank_dim)
    if self.rerank_dim:
      self.rerank_proj = nnx.Linear(self.user_dim, self.rerank_dim, rngs=rngs)
      self.rerank_items = nnx.Embed(self.num_items, self.rerank_dim, rngs=rngs)
      self.rerank_bias = nnx.Param(jnp.zeros((self.num_items,)))

  @property
  def num_paths(self) -> int:
    return self.width ** self.depth


def num_prefixes(width: int, depth: int) -> int:
  """Prefixes of the D layers: K^0 + K^1 + ... + K^(D-1) (layer d's are K^(d-1))."""
  return sum(width ** d for d in range(depth))


def _prefix_offsets(width: int, depth: int) -> np.ndarray:
  """int32[D]: row of layer d's first prefix in the prefix-bias table."""
  return np.cumsum([0] + [width ** d for d in range(depth - 1)]).astype(np.int32)


def _prefix_rows(model: StructureNet, codes: jax.Array) -> jax.Array:
  """int32[..., D]: the prefix-bias row of every layer of the paths codes int[..., D]."""
  prefix, rows = jnp.zeros(codes.shape[:-1], jnp.int32), []
  for d in range(model.depth):
    rows.append(prefix)
    prefix = prefix * model.width + codes[..., d]
  return jnp.stack(rows, axis=-1) + jnp.asarray(_prefix_offsets(model.width, model.depth))


# ---- user embedding ------------------------------------------------------------------------

def encode_users(model: StructureNet, history: jax.Array) -> jax.Array:
  """User embeddings float32[B, U] from histories int32[B, L] (-1 = padding)."""
  valid = history >= 0
  e = model.item_embed.embedding[...][jnp.where(valid, history, 0)]  # [B, L, E]
  if model.user_encoder == "mean":
    w = valid.astype(e.dtype)[..., None]
    pooled = jnp.sum(e * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return jnp.tanh(model.pool(pooled))
  cell = model.gru

  def step(h, xs):
    x, ok = xs
    h_new, _ = cell(h, x)
    return jnp.where(ok[:, None], h_new, h), None

  h0 = jnp.zeros((history.shape[0], model.user_dim), e.dtype)
  h, _ = jax.lax.scan(step, h0, (jnp.swapaxes(e, 0, 1), jnp.swapaxes(valid, 0, 1)))
  return h


# ---- structure layers ----------------------------------------------------------------------

def _layer_stack(model: StructureNet):
  return ([k[...] for k in model.kernels], [b[...] for b in model.biases])


def _mlp_all_layers(model: StructureNet, x: jax.Array) -> jax.Array:
  """Logits float[..., D, K] of every layer d from its input x: float[..., D, F]."""
  kernels, biases = _layer_stack(model)
  for i, (w, b) in enumerate(zip(kernels, biases)):
    x = jnp.einsum("...di,dio->...do", x, w) + b
    if i + 1 < len(kernels):
      x = jax.nn.relu(x)
  return x


def _mlp_one_layer(model: StructureNet, d, x: jax.Array) -> jax.Array:
  """Logits float[..., K] of layer d (int, may be traced) from x: float[..., F]."""
  kernels, biases = _layer_stack(model)
  for i, (w, b) in enumerate(zip(kernels, biases)):
    x = x @ w[d] + b[d]
    if i + 1 < len(kernels):
      x = jax.nn.relu(x)
  return x


def _prefix_features(model: StructureNet, codes: jax.Array) -> jax.Array:
  """Layer inputs from the path prefix: float[..., D, (D-1)*P] for codes int[..., D].

  Row d holds the path embeddings of c_1..c_d-1 (in slots 0..d-1) and zeros after.
  """
  dm1 = model.depth - 1
  table = model.path_embed[...]  # [max(D-1,1), K, P]
  if dm1 == 0:
    return jnp.zeros(codes.shape[:-1] + (1, 0), table.dtype)
  emb = table[jnp.arange(dm1), codes[..., :dm1]]  # [..., D-1, P]
  visible = jnp.arange(dm1)[None, :] < jnp.arange(model.depth)[:, None]  # [D, D-1]
  feats = jnp.where(visible[..., None], emb[..., None, :, :], 0.0)  # [..., D, D-1, P]
  return feats.reshape(codes.shape[:-1] + (model.depth, dm1 * model.path_dim))


def path_log_probs(model: StructureNet, user: jax.Array, codes: jax.Array) -> jax.Array:
  """log p(c | x) = sum_d log softmax_d(c_d | x, c_<d) for given paths.

  Args:
    model: the structure network.
    user: float[B, U] user embeddings.
    codes: int32[B, P, D] paths (every code in [0, K); mask invalid paths yourself).
  Returns:
    float32[B, P].
  """
  feats = _prefix_features(model, codes)  # [B, P, D, F]
  u = jnp.broadcast_to(user[:, None, None, :], feats.shape[:-1] + (user.shape[-1],))
  logits = _mlp_all_layers(model, jnp.concatenate([u, feats], axis=-1))  # [B, P, D, K]
  if model.use_prefix_bias:
    logits = logits + model.prefix_bias[...][_prefix_rows(model, codes)]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0], axis=-1)


def multi_path_log_likelihood(path_logp: jax.Array) -> jax.Array:
  """log sum_j p(pi_j(y) | x) from the J paths' log-probabilities float[..., J] -> float[...]."""
  return jax.nn.logsumexp(path_logp, axis=-1)


def all_paths(width: int, depth: int) -> np.ndarray:
  """Every path int32[K^D, D], in path-id order."""
  return path_codes(np.arange(width ** depth, dtype=np.int64), width=width,
                    depth=depth).astype(np.int32)


def all_path_log_probs(model: StructureNet, user: jax.Array) -> jax.Array:
  """Exhaustive log p(c | x) over all K^D paths: float32[B, K^D] (path-id order; tiny K^D)."""
  codes = jnp.asarray(all_paths(model.width, model.depth))
  return path_log_probs(model, user, jnp.broadcast_to(codes, (user.shape[0],) + codes.shape))


def beam_search_paths(model: StructureNet, user: jax.Array, *, beam: int
                      ) -> tuple[jax.Array, jax.Array]:
  """Top paths by path probability (sum over layers of log-softmax), layer by layer.

  Each layer expands the `beam` kept prefixes by the K codes of the layer and keeps the best
  `beam` of the beam * K extended prefixes by accumulated log-probability (`lax.scan` over the
  D layers; the beam starts as one empty prefix plus beam-1 padding entries at -inf). Exact
  top-`beam` when beam >= K^(D-1). Ties: lower (prefix slot, code) first.

  Args:
    model: the structure network.
    user: float[B, U] user embeddings.
    beam: number of paths kept per layer and returned.
  Returns:
    (codes int32[B, beam, D], log_probs float32[B, beam]) best first; entries that do not
    exist (beam > K^D) have codes -1 and log-prob -inf.
  """
  if beam < 1:
    raise ValueError(f"beam must be >= 1, got {beam}")
  b, k, depth = user.shape[0], model.width, model.depth
  dm1, pdim = depth - 1, model.path_dim
  table = model.path_embed[...]
  scores0 = jnp.full((b, beam), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
  codes0 = jnp.zeros((b, beam, depth), jnp.int32)
  feats0 = jnp.zeros((b, beam, dm1, pdim), table.dtype)
  u = jnp.broadcast_to(user[:, None, :], (b, beam, user.shape[-1]))
  offsets = jnp.asarray(_prefix_offsets(k, depth))

  def step(carry, d):
    scores, codes, feats = carry
    x = jnp.concatenate([u, feats.reshape(b, beam, dm1 * pdim)], axis=-1)
    logits = _mlp_one_layer(model, d, x)  # [b, beam, K]
    if model.use_prefix_bias:
      # The prefix c_1..c_{d-1} as a number (codes of layers >= d are still 0 here).
      prefix = jnp.sum(jnp.where(jnp.arange(depth) < d, codes, 0)
                       * (k ** jnp.maximum(d - 1 - jnp.arange(depth), 0)), axis=-1)
      logits = logits + model.prefix_bias[...][offsets[d] + prefix]
    logp = jax.nn.log_softmax(logits, axis=-1)  # [b, beam, K]
    top, idx = jax.lax.top_k((scores[..., None] + logp).reshape(b, beam * k), beam)
    parent, code = idx // k, (idx % k).astype(jnp.int32)
    codes = jnp.take_along_axis(codes, parent[..., None], axis=1)
    codes = jnp.where(jnp.arange(depth) == d, code[..., None], codes)
    feats = jnp.take_along_axis(feats, parent[..., None, None], axis=1)
    if dm1:
      emb = table[jnp.minimum(d, dm1 - 1), code]  # [b, beam, P]
      feats = jnp.where((jnp.arange(dm1) == d)[:, None], emb[..., None, :], feats)
    return (top, codes, feats), None

  (scores, codes, _), _ = jax.lax.scan(step, (scores0, codes0, feats0), jnp.arange(depth))
  codes = jnp.where(jnp.isfinite(scores)[..., None], codes, -1)
  return codes, scores


# ---- reranker ------------------------------------------------------------------------------

def rerank_user_vectors(model: StructureNet, user: jax.Array) -> jax.Array:
  """float[B, R] reranker user vectors from user embeddings float[B, U]."""
  return model.rerank_proj(user)


def rerank_logits(model: StructureNet, user_vec: jax.Array, items: jax.Array) -> jax.Array:
  """Reranker logits float[B, M] of items int[B, M] or int[M] (-1 -> -inf, never gathered)."""
  ok = items >= 0
  safe = jnp.where(ok, items, 0)
  emb = model.rerank_items.embedding[...][safe]
  bias = model.rerank_bias[...][safe]
  if items.ndim == 1:
    logits = user_vec @ emb.T + bias[None, :]
    return jnp.where(ok[None, :], logits, -jnp.inf)
  logits = jnp.einsum("br,bmr->bm", user_vec, emb) + bias
  return jnp.where(ok, logits, -jnp.inf)


# ---- path ids ------------------------------------------------------------------------------

def path_ids(codes, *, width: int):
  """Flat path ids int[...] from codes int[..., D] (c_1 most significant; any -1 -> -1).

  Works on numpy (int64) and jax arrays (int32; K^D must stay below 2^31)."""
  xp = jnp if isinstance(codes, jax.Array) else np
  depth = codes.shape[-1]
  weights = xp.asarray([width ** (depth - 1 - d) for d in range(depth)],
                       dtype=xp.int32 if xp is jnp else np.int64)
  ids = xp.sum(codes * weights, axis=-1)
  return xp.where(xp.all(codes >= 0, axis=-1), ids, -1)


def path_codes(ids, *, width: int, depth: int):
  """Codes int[..., D] from flat path ids int[...] (-1 -> all -1)."""
  xp = jnp if isinstance(ids, jax.Array) else np
  div = xp.asarray([width ** (depth - 1 - d) for d in range(depth)],
                   dtype=xp.int32 if xp is jnp else np.int64)
  codes = (ids[..., None] // div) % width
  return xp.where(ids[..., None] >= 0, codes, -1)
