"""DIN-style preference model p(node | user) used by TDM / JTM / TDR.

The user is described by a behaviour sequence (item ids, most recent last).
For every (user, tree node) pair the model

1. looks up a representation of each history item: with ``hierarchical=True``
   the embedding of the item's ancestor at the level of the node being scored
   (JTM's hierarchical user representation), otherwise the item's leaf
   embedding;
2. scores each history position with a small "activation unit" MLP fed with
   ``[e, e * n, n]`` (history embedding, element-wise product, node
   embedding); padded positions get weight 0;
3. sums the weighted history embeddings inside each time window (a plain
   weighted sum, no softmax), giving one D-vector per window;
4. feeds ``[window_0, ..., window_{W-1}, n]`` through an MLP (PReLU, optional
   BatchNorm) to a single scalar score (a logit).

Efficiency
----------
The per-pair work (users x nodes x history positions) dominates training, so
the first activation-unit layer is never applied to an explicit
``[B, M, L, 3D]`` concatenation. Its kernel is split row-wise into three
``D x A`` blocks::

    concat[e, e*n, n] @ K + b  ==  e @ K_e  +  (e*n) @ K_p  +  (n @ K_n + b)

* ``n @ K_n + b`` only depends on (user, node) and is computed per node;
* ``e @ K_e + (e*n) @ K_p == e @ (K_e + diag(n) K_p)``: with
  ``hierarchical=True`` the history embeddings of each user are looked up once
  for every tree level (``[B, L, H+1, D]``, small), each node gathers the
  level it lives on (``[B, M, L, D]``) and one batched contraction with the
  per-node ``D x A`` matrix ``K_e + diag(n) K_p`` gives the hidden layer;
  with ``hierarchical=False`` the history is shared by all nodes of a user,
  so ``(e*n) @ K_p`` is computed as ``n @ (diag(e) K_p)``, a plain
  ``[M, D] x [D, L*A]`` matmul per user, and ``e @ K_e`` once per user.

Only the hidden activations ``[B, M, L, A]`` are genuinely per
(user, node, position); the weighted window sums are one einsum against a
constant 0/1 position-to-window matrix.

On the shared-history path with one hidden activation-unit layer (the
paper's model; ``fused_attention=True``, the default) the activation unit is
`_attention_weights`: a few users at a time, so that each chunk's
``[c, M, L, A]`` tensor stays in cache and only the ``[B, M, L]`` weights are
written out, with a custom VJP that recomputes the chunk's hidden tensor in
the backward instead of storing ``[B, M, L, A]`` for the whole batch. The
window sums are then one small matmul per (contiguous) window. Same maths;
``fused_attention=False`` keeps the plain layers (the tests' reference).

The tree (``item_paths`` / ``level_offsets``) is an *argument* of the call and
not part of the module, so re-learning the item-to-leaf mapping changes array
values only and never triggers a retrace / recompile.

Functional use
--------------
Training steps and beam search are written functionally::

    model = init_din(key, num_nodes=tree.num_nodes)
    graphdef, state = nnx.split(model)
    score_fn = make_score_fn(graphdef)
    scores = jax.jit(score_fn)(state, history, nodes, item_paths, level_offsets)

BatchNorm (``batch_norm=True``, off by default)
-----------------------------------------------
Whether BatchNorm normalises with the current batch ("train") or with its
running averages ("eval") is a static attribute of the BatchNorm layers, so it
lives in the *graphdef*, not in the state. Build one graphdef per mode; both
accept the same state::

    model = init_din(key, num_nodes=n, batch_norm=True)   # train mode
    model.train(); graphdef_train, params, stats = nnx.split(
        model, nnx.Param, nnx.BatchStat)
    model.eval();  graphdef_eval = nnx.graphdef(model)

    train_score = make_score_fn(graphdef_train, return_batch_stats=True)
    eval_score = make_score_fn(graphdef_eval)

    def loss_fn(params, stats, ...):
        scores, new_stats = train_score((params, stats), ...)
        return loss(scores), new_stats          # use has_aux=True in grad

    scores = eval_score((params, stats), ...)  # beam search / evaluation

In train mode the batch statistics are computed over all valid
(``nodes >= 0``) (user, node) pairs of the call; padded nodes are excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["DIN", "init_din", "make_score_fn", "node_levels", "window_matrix"]

DEFAULT_WINDOWS = (1, 1, 1, 2, 2, 2, 10, 10, 20, 20)

# Initial negative slope of every PReLU (He et al.'s usual choice).
_PRELU_INIT = 0.25


def node_levels(nodes: jax.Array, level_offsets: jax.Array) -> jax.Array:
  """Level of each (non-negative) global node id in the heap layout.

  ``level_offsets[j]`` is the first id of level ``j`` (``H + 2`` entries,
  the last one being the total node count). The level of ``node`` is the
  number of level starts ``level_offsets[1:H+1]`` that are ``<= node``;
  the result is therefore always in ``[0, H]`` (ids beyond the tree are
  clamped to the leaf level). Comparing against all ``H`` boundaries is
  cheaper than a binary search for such tiny arrays and is vectorised.
  """
  starts = level_offsets[1:-1].astype(nodes.dtype)  # [H]
  return jnp.sum(nodes[..., None] >= starts, axis=-1).astype(jnp.int32)


def window_matrix(windows: Sequence[int]) -> np.ndarray:
  """0/1 matrix ``S[L, W]``: ``S[l, w] = 1`` iff history position ``l``
  belongs to window ``w``.

  Windows are listed most recent first while the history is ordered most
  recent last, so window 0 covers the last ``windows[0]`` positions,
  window 1 the ``windows[1]`` positions before them, and so on.
  """
  windows = tuple(int(w) for w in windows)
  length = sum(windows)
  s = np.zeros((length, len(windows)), np.float32)
  end = length
  for w, size in enumerate(windows):
    s[end - size : end, w] = 1.0
    end -= size
  return s


# ------------------------------------------------- fused activation unit
# Target bytes of one chunk's [c, M, L, A] float32 activation-unit tensor in
# `_attention_weights` (about an L2 cache: the tensor never goes to memory).
_CHUNK_BYTES = 2 << 20


def _chunk_users(num_nodes: int, hist_len: int, width: int) -> int:
  """Users per chunk of the fused activation unit (see `_attention_weights`).

  On CPU: enough users that one chunk's ``[c, M, L, A]`` float32 tensor is
  about `_CHUNK_BYTES`, at least 2 (a chunk of 1 measured slower in the
  backward on XLA:CPU). On other backends 0 = no chunking (one chunk of the
  whole batch: a sequential loop of small kernels would starve a GPU).
  """
  if jax.default_backend() != "cpu":
    return 0
  per_user = max(1, num_nodes * hist_len * width * 4)
  return max(2, _CHUNK_BYTES // per_user)


def _attention_pre(n, e, k_p, ue, nt):
  """First activation-unit layer of the shared-history path (pre-PReLU).

  ``n [..., M, D]``, ``e [..., L, D]``, ``k_p [D, A]``, ``ue [..., L, A]``,
  ``nt [..., M, A]`` -> ``[..., M, L, A]``: ``(e * n) @ K_p + e @ K_e + n @
  K_n + b`` with ``(e * n) @ K_p == n @ (diag(e) K_p)`` as one
  ``[M, D] x [D, L*A]`` matmul per user (module docstring).
  """
  hist_kernel = jnp.swapaxes(e, -1, -2)[..., :, :, None] * k_p[:, None, :]  # [..., D, L, A]
  return (
      jnp.einsum("...md,...dla->...mla", n, hist_kernel)
      + ue[..., None, :, :]
      + nt[..., :, None, :]
  )


def _map_users(fn, xs, chunk: int):
  """`fn` over the leading (user) axis of `xs`, `chunk` users at a time
  (`jax.lax.map`); ``chunk=0``, or a symbolic batch size (`jax.export` with a
  polymorphic batch, whose chunking would need a divisibility it cannot
  decide): one call on the whole batch."""
  users = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if chunk <= 0 or not isinstance(users, int) or chunk >= users:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=chunk)


@jax.custom_vjp
def _attention_weights(n, e, k_p, ue, nt, slope, k2, b2, valid):
  """Activation-unit weights of the shared-history path, ``float32[B, M, L]``.

  ``PReLU(_attention_pre(n, e, k_p, ue, nt)) @ k2 + b2``, times the history
  mask ``valid`` (``[B, L]``, float 0/1), for a one-hidden-layer activation
  unit (``k2 [A, 1]``, ``b2 [1]``, scalar PReLU ``slope``).

  Exactly the maths of the plain layers; only the evaluation order differs.
  The forward runs a few users at a time (`_chunk_users`) so that each
  chunk's ``[c, M, L, A]`` hidden tensor stays in cache and only the
  ``[B, M, L]`` weights are written out; the backward (custom VJP) recomputes
  each chunk's hidden tensor instead of storing ``[B, M, L, A]`` and
  produces every input cotangent from it in the same pass: three
  ``[M, D] x [D, L*A]``-sized matmuls per user (recompute, d n, and the
  ``[D, L, A]`` sum over nodes that gives d e and d K_p).
  """
  chunk = _chunk_users(n.shape[1], e.shape[1], k_p.shape[1])

  def one(x):
    n1, e1, ue1, nt1, v1 = x
    pre = _attention_pre(n1, e1, k_p, ue1, nt1)  # [M, L, A]
    h = jnp.where(pre >= 0, pre, slope * pre)
    return (h @ k2[:, 0] + b2[0]) * v1[None, :]  # [M, L]

  return _map_users(one, (n, e, ue, nt, valid), chunk)


def _attention_weights_fwd(n, e, k_p, ue, nt, slope, k2, b2, valid):
  out = _attention_weights(n, e, k_p, ue, nt, slope, k2, b2, valid)
  return out, (n, e, k_p, ue, nt, slope, k2, valid)


def _attention_weights_bwd(res, g):
  n, e, k_p, ue, nt, slope, k2, valid = res
  chunk = _chunk_users(n.shape[1], e.shape[1], k_p.shape[1])
  k2v = k2[:, 0]  # [A]

  def one(x):
    n1, e1, ue1, nt1, v1, g1 = x  # [M, D], [L, D], [L, A], [M, A], [L], [M, L]
    hist_kernel = e1.T[:, :, None] * k_p[:, None, :]  # [D, L, A]
    pre = jnp.einsum("md,dla->mla", n1, hist_kernel) + ue1[None] + nt1[:, None]
    pos = pre >= 0
    gw = g1 * v1[None, :]  # d weights before the mask  [M, L]
    dh = jnp.where(pos, 1.0, slope).astype(pre.dtype)  # d PReLU / d pre
    g_pre = gw[:, :, None] * k2v * dh  # [M, L, A]
    g_k2 = jnp.einsum("ml,mla->a", gw, pre * dh)  # h = pre * dh
    g_slope = jnp.sum(gw * jnp.sum(jnp.where(pos, 0.0, pre) * k2v, axis=-1))
    g_b2 = jnp.sum(gw)
    g_nt = jnp.sum(g_pre, axis=1)  # [M, A]
    g_ue = jnp.sum(g_pre, axis=0)  # [L, A]
    # d n as a plain [M, L*A] x [L*A, D] matmul (hist_kernel laid out
    # [L, A, D]; contracting the [D, L, A] layout measured ~25% slower).
    hist_kernel_t = (e1[:, None, :] * k_p.T[None]).reshape(-1, k_p.shape[0])  # [L*A, D]
    g_n = g_pre.reshape(g_pre.shape[0], -1) @ hist_kernel_t  # [M, D]
    g_hk = jnp.einsum("md,mla->dla", n1, g_pre)  # d hist_kernel  [D, L, A]
    g_e = jnp.einsum("dla,da->ld", g_hk, k_p)  # [L, D]
    g_kp = jnp.einsum("dla,ld->da", g_hk, e1)  # [D, A]
    return g_n, g_e, g_ue, g_nt, g_kp, g_slope, g_k2, g_b2

  g_n, g_e, g_ue, g_nt, g_kp, g_slope, g_k2, g_b2 = _map_users(
      one, (n, e, ue, nt, valid, g), chunk)
  return (g_n, g_e, g_kp.sum(0), g_ue, g_nt,
          g_slope.sum(0).astype(slope.dtype).reshape(slope.shape),
          g_k2.sum(0)[:, None], g_b2.sum(0)[None], jnp.zeros_like(valid))


_attention_weights.defvjp(_attention_weights_fwd, _attention_weights_bwd)


class DIN(nnx.Module):
  """Deep-interest-network preference model over tree nodes.

  Args (all keyword-only):
    num_nodes: number of tree nodes (rows of the node-embedding table; every
      node, internal or leaf, has its own embedding).
    embed_dim: node embedding size ``D``.
    windows: time-window sizes, MOST RECENT FIRST. The history passed to the
      call must have length ``sum(windows)``.
    attention_hidden: hidden widths of the activation unit (``A`` is the
      first one). May be empty (then the activation unit is linear).
    mlp_hidden: hidden widths of the scoring MLP.
    hierarchical: represent history items by their ancestor at the level of
      the scored node (JTM) instead of by their leaf.
    batch_norm: BatchNorm after every hidden linear layer of the scoring
      MLP (see module docstring for train/eval handling).
    fused_attention: evaluate the one-hidden-layer activation unit of the
      shared-history path (``level`` given, or ``hierarchical=False``) with
      `_attention_weights` (chunked forward, recomputing custom VJP) and its
      window sums as one small matmul per window: same maths as the plain
      layers, less memory traffic. ``False`` = the plain layers and the
      window einsum under autodiff (the reference the tests compare against).
    rngs: ``nnx.Rngs`` for parameter initialisation.
  """

  def __init__(
      self,
      *,
      num_nodes: int,
      embed_dim: int = 24,
      windows: Sequence[int] = DEFAULT_WINDOWS,
      attention_hidden: Sequence[int] = (36,),
      mlp_hidden: Sequence[int] = (128, 64),
      hierarchical: bool = True,
      batch_norm: bool = False,
      fused_attention: bool = True,
      rngs: nnx.Rngs,
  ):
    windows = tuple(int(w) for w in windows)
    if not windows or any(w <= 0 for w in windows):
      raise ValueError(f"windows must be non-empty positive sizes, got {windows}")
    if num_nodes <= 0 or embed_dim <= 0:
      raise ValueError("num_nodes and embed_dim must be positive")
    attention_hidden = tuple(int(a) for a in attention_hidden)
    mlp_hidden = tuple(int(h) for h in mlp_hidden)

    self.num_nodes = int(num_nodes)
    self.embed_dim = d = int(embed_dim)
    self.windows = windows
    self.history_length = sum(windows)
    self.attention_hidden = attention_hidden
    self.mlp_hidden = mlp_hidden
    self.hierarchical = bool(hierarchical)
    self.batch_norm = bool(batch_norm)
    self.fused_attention = bool(fused_attention)

    self.embed = nnx.Embed(self.num_nodes, d, rngs=rngs)

    # Activation unit: [e, e*n, n] (3D) -> attention_hidden -> 1.
    att_widths = attention_hidden + (1,)
    # One Linear over the 3D concatenation; its kernel is sliced into the
    # three D x A blocks at call time (see module docstring).
    self.att_in = nnx.Linear(3 * d, att_widths[0], rngs=rngs)
    self.att_layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(att_widths[:-1], att_widths[1:])]
    )
    self.att_acts = nnx.List([nnx.PReLU(_PRELU_INIT) for _ in attention_hidden])

    # Scoring MLP: [W window vectors, node embedding] -> mlp_hidden -> 1.
    widths = ((len(windows) + 1) * d,) + mlp_hidden
    self.mlp_layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
    )
    self.mlp_norms = nnx.List(
        [nnx.BatchNorm(h, rngs=rngs) for h in mlp_hidden] if batch_norm else []
    )
    self.mlp_acts = nnx.List([nnx.PReLU(_PRELU_INIT) for _ in mlp_hidden])
    self.mlp_out = nnx.Linear(widths[-1], 1, rngs=rngs)

  # ------------------------------------------------------------------ call
  def __call__(
      self,
      history: jax.Array,
      nodes: jax.Array,
      item_paths: jax.Array,
      level_offsets: jax.Array,
      level: jax.Array | int | None = None,
  ) -> jax.Array:
    """Scores ``float32[B, M]`` for every (user, node) pair.

    ``level`` (optional, a Python int or a traced int scalar) promises that
    every node of the call lies on that tree level. Then the hierarchical
    history representation is the same for all of a user's nodes and the
    cheaper shared-history path is used (the same maths; about 2x faster
    on CPU). Callers that score one level at a time (training per level,
    beam search, top-down sampling) pass it; without it nodes may mix
    levels.

    Args:
      history: ``int32[B, L]`` item ids, left-padded with -1, most recent
        last; ``L`` must equal ``sum(windows)``.
      nodes: ``int32[B, M]`` global node ids to score; -1 entries are
        padding (they get a finite, meaningless score).
      item_paths: ``int32[N, H+1]`` ancestor node id of every item at every
        level (column ``H`` = leaf).
      level_offsets: ``int32[H+2]`` first node id of every level, plus the
        total node count.
    """
    if history.ndim != 2 or nodes.ndim != 2 or history.shape[0] != nodes.shape[0]:
      raise ValueError(
          f"expected history [B, L] and nodes [B, M], got {history.shape} and {nodes.shape}"
      )
    bsz, hist_len = history.shape
    if hist_len != self.history_length:
      raise ValueError(
          f"history length {hist_len} != sum(windows) = {self.history_length} "
          f"(windows={self.windows})"
      )
    if item_paths.ndim != 2 or level_offsets.shape != (item_paths.shape[1] + 1,):
      raise ValueError(
          "expected item_paths [N, H+1] and level_offsets [H+2], got "
          f"{item_paths.shape} and {level_offsets.shape}"
      )
    d = self.embed_dim
    table = self.embed.embedding[...]  # [num_nodes, D]

    # Explicit masking: -1 must never reach a gather (it would silently
    # read the last row). Padded entries are redirected to id 0 and their
    # contribution is removed with the masks below.
    hist_valid = history >= 0  # [B, L]
    hist_items = jnp.where(hist_valid, history, 0)  # [B, L]
    node_valid = nodes >= 0  # [B, M]
    node_ids = jnp.where(node_valid, nodes, 0)  # [B, M]

    n = table[node_ids]  # [B, M, D]

    # First activation-unit layer split into its three D x A blocks.
    kernel = self.att_in.kernel[...]  # [3D, A]
    k_e, k_p, k_n = kernel[:d], kernel[d : 2 * d], kernel[2 * d :]  # [D, A] each
    node_term = n @ k_n + self.att_in.bias[...]  # [B, M, A]

    shared_history = (not self.hierarchical) or level is not None
    if not shared_history:
      num_levels = item_paths.shape[1]  # H + 1
      level = node_levels(node_ids, level_offsets)  # [B, M]
      hist_nodes = item_paths[hist_items]  # [B, L, H+1]
      e_lv = table[hist_nodes]  # [B, L, H+1, D]  every item at every level
      # Reshape: flatten (user, position, level) into one row axis so
      # that selecting each node's level is a single row gather.
      rows = e_lv.reshape(bsz * hist_len * num_levels, d)  # [B*L*(H+1), D]
      # Row of (b, l, level[b, m]) in `rows`: (b * L + l) * (H+1) + level.
      row_idx = (
          (jnp.arange(bsz)[:, None, None] * hist_len + jnp.arange(hist_len)[None, None, :])
          * num_levels
          + level[:, :, None]
      )  # [B, M, L]
      e = rows[row_idx]  # [B, M, L, D]  history as seen from each node's level
      # e @ K_e + (e * n) @ K_p == e @ (K_e + diag(n) K_p): fold the
      # node into one D x A matrix per (user, node) and contract once.
      # (Gathering a precomputed per-(user, level) e @ K_e instead costs
      # an extra A-wide gather and was not faster, forward + backward.)
      node_kernel = k_e + n[:, :, :, None] * k_p  # [B, M, D, A]
      pre = (
          jnp.einsum("bmld,bmda->bmla", e, node_kernel) + node_term[:, :, None, :]
      )  # [B, M, L, A]
    else:
      if self.hierarchical:  # all nodes on `level`: the history seen from it
        hist_nodes = jnp.take(item_paths, jnp.asarray(level), axis=1)[hist_items]
      else:
        hist_nodes = item_paths[hist_items, -1]  # leaves
      e = table[hist_nodes]  # [B, L, D]  shared by all nodes of a user
      ue = e @ k_e  # [B, L, A]  once per (user, position)

    if shared_history and self.fused_attention and len(self.attention_hidden) == 1:
      # Same maths as the branch below, chunked over users with a
      # recomputing custom VJP (see `_attention_weights`).
      weights = _attention_weights(
          n, e, k_p, ue, node_term, self.att_acts[0].negative_slope[...],
          self.att_layers[0].kernel[...], self.att_layers[0].bias[...],
          hist_valid.astype(n.dtype))  # [B, M, L]
    else:
      if shared_history:
        # (e * n) @ K_p == n @ (diag(e) K_p): one D x (L*A) matrix per user,
        # so the per-pair term is a plain [M, D] x [D, L*A] matmul per user
        # and [B, M, L, D] is never built.
        hist_kernel = e[:, :, :, None] * k_p  # [B, L, D, A]
        pre = (
            jnp.einsum("bmd,blda->bmla", n, hist_kernel)
            + ue[:, None, :, :]
            + node_term[:, :, None, :]
        )  # [B, M, L, A]
      # Rest of the activation unit: PReLU then Linear, ..., down to 1.
      h = pre
      for act, layer in zip(self.att_acts, self.att_layers):
        h = layer(act(h))  # [B, M, L, next width]
      weights = h[..., 0] * hist_valid[:, None, :].astype(h.dtype)  # [B, M, L]

    # Weighted sum inside each window: S[l, w] assigns positions to windows.
    s = jnp.asarray(window_matrix(self.windows))  # [L, W]
    if not shared_history:
      win = jnp.einsum("bml,lw,bmld->bmwd", weights, s, e)  # [B, M, W, D]
    elif not self.fused_attention:
      win = jnp.einsum("bml,lw,bld->bmwd", weights, s, e)  # [B, M, W, D]
    else:
      # Windows are contiguous position ranges, so each window is one small
      # [M, len_w] x [len_w, D] matmul per user instead of a contraction
      # against the 0/1 matrix S (W times fewer flops; same sums).
      ends = np.cumsum((0,) + self.windows[::-1])  # oldest window first
      win = jnp.stack(
          [jnp.einsum("bml,bld->bmd", weights[:, :, lo:hi], e[:, lo:hi])
           for lo, hi in zip(ends[:-1], ends[1:])][::-1],
          axis=2,
      )  # [B, M, W, D]  window 0 = most recent
    # Reshape: concatenate the W window vectors along the feature axis.
    win = win.reshape(bsz, nodes.shape[1], len(self.windows) * d)  # [B, M, W*D]

    x = jnp.concatenate([win, n], axis=-1)  # [B, M, (W+1)*D]
    mask = node_valid[:, :, None]  # [B, M, 1] for BatchNorm statistics
    for i, (layer, act) in enumerate(zip(self.mlp_layers, self.mlp_acts)):
      x = layer(x)  # [B, M, hidden_i]
      if self.batch_norm:
        x = self.mlp_norms[i](x, mask=mask)
      x = act(x)
    return self.mlp_out(x)[..., 0]  # [B, M]


def init_din(key: jax.Array, *, num_nodes: int, **hparams: Any) -> DIN:
  """Builds a :class:`DIN` with parameters initialised from ``key``."""
  return DIN(num_nodes=num_nodes, rngs=nnx.Rngs(params=key), **hparams)


def make_score_fn(
    graphdef: nnx.GraphDef, *, return_batch_stats: bool = False
) -> Callable[..., Any]:
  """Functional wrapper around :class:`DIN`.

  Returns ``score_fn(state, history, nodes, item_paths, level_offsets)``
  computing ``nnx.merge(graphdef, state)(history, nodes, item_paths,
  level_offsets)``. ``state`` is either one ``nnx.State`` (e.g. from
  ``graphdef, state = nnx.split(model)``) or a tuple/list of states from a
  filtered split (e.g. ``(params, batch_stats)``). The function is pure and
  can be used inside ``jax.jit`` / ``jax.grad``; the tree arrays are regular
  arguments, so new values do not cause recompilation.

  With ``return_batch_stats=True`` it returns ``(scores, batch_stats)`` where
  ``batch_stats = nnx.state(model, nnx.BatchStat)`` after the call (updated
  running averages when the graphdef is in train mode; an empty State when
  ``batch_norm=False``).
  """

  def score_fn(state, history, nodes, item_paths, level_offsets, level=None):
    states = tuple(state) if isinstance(state, (tuple, list)) else (state,)
    model = nnx.merge(graphdef, *states)
    scores = model(history, nodes, item_paths, level_offsets, level=level)
    if return_batch_stats:
      return scores, nnx.state(model, nnx.BatchStat)
    return scores

  return score_fn
