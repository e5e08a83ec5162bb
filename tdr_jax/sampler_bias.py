"""How far a negative sampler's draws lie from the model's own softmax over a tree level.

A sampled softmax (TDR Eq. 17-18) is exact in expectation for any proposal q once logQ
corrects it, but its variance is smallest when q is the model's softmax itself, so the
distance of a sampler's draws from that softmax measures how biased a proposal it is for the
trained model. For one user and one level j with the positive node n+:

    target(n) = softmax of score(n) over the valid nodes of level j other than n+
    KL_j      = KL(empirical distribution of the sampler's negatives || target)

The negatives exclude n+ as the loss does (uniform never draws it; top-down's accidental hits
are masked). The plug-in KL of a finite sample is positive even for a perfect sampler; `exact`
draws the same number of negatives from the target itself and so gives the estimator's floor.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdr_jax import sampling
from tdr_jax import tree as tree_lib
from tdr_jax.scorer import ScoreFn

SAMPLERS = ("uniform", "top_down", "exact")


def empirical_distribution(draws: jax.Array, keep: jax.Array, num_bins: int
                           ) -> tuple[jax.Array, jax.Array]:
  """Histogram of the kept draws, normalised.

  Args:
    draws: int[U, S] bins in [0, num_bins) (any value where not kept).
    keep: bool[U, S] which draws count.
    num_bins: N.
  Returns:
    p: float32[U, N] the fraction of each user's kept draws in each bin (zeros without any).
    kept: int32[U] kept draws per user.
  """
  safe = jnp.where(keep, draws, 0)
  counts = jax.vmap(lambda d, w: jnp.bincount(d, weights=w, length=num_bins))(
      safe, keep.astype(jnp.float32))
  kept = keep.sum(axis=1)
  return counts / jnp.maximum(kept, 1)[:, None].astype(jnp.float32), kept.astype(jnp.int32)


def kl_divergence(p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) = sum_i p_i (log p_i - log q_i) in nats over the last axis.

  Args:
    p: float[..., N] a distribution (e.g. `empirical_distribution`); terms with p_i = 0 are 0.
    log_q: float[..., N] log of the reference distribution (-inf allowed where p_i = 0).
  Returns:
    float[...] (inf where p puts mass on a bin that q does not).
  """
  p = jnp.asarray(p, jnp.float32)
  log_p = jnp.log(jnp.where(p > 0, p, 1.0))
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def level_log_softmax(score_fn: ScoreFn, params, tree: tree_lib.Tree, history: jax.Array,
                      level: int, exclude: jax.Array) -> jax.Array:
  """log softmax of the scores over the valid nodes of `level`, leaving out one node per user.

  Args:
    history: int32[U, L].
    level: j (a Python int).
    exclude: int32[U] a global node id of level j per user (its positive), left out.
  Returns:
    float32[U, B^j] over the level's node slots in id order, -inf for invalid and excluded
    nodes.
  """
  b = tree.branching
  first, width = tree_lib.level_start(b, level), b ** level
  ids = jnp.broadcast_to(jnp.arange(first, first + width, dtype=jnp.int32),
                         (history.shape[0], width))
  scores = score_fn(params, tree, history, ids, level=level).astype(jnp.float32)
  ok = jnp.asarray(tree.node_valid)[first:first + width][None, :] & (ids != exclude[:, None])
  return jax.nn.log_softmax(jnp.where(ok, scores, -jnp.inf), axis=-1)


def sampler_kl(key: jax.Array, score_fn: ScoreFn, params, tree: tree_lib.Tree,
               history: np.ndarray, positives: np.ndarray, *, levels: Sequence[int],
               num_samples: int, user_batch: int = 8) -> dict[str, np.ndarray]:
  """Mean over users of KL_j (module docstring) of each sampler at each of `levels`.

  Args:
    key: PRNG key.
    history: int32[U, L] the users' histories.
    positives: int32[U] one positive item per user (its node at level j is left out there).
    levels: the tree levels to measure (their nodes are enumerated: keep them small).
    num_samples: negatives drawn per user and level by each sampler.
    user_batch: users per pass (top-down scores num_samples * B nodes per user and level);
      one compilation serves every pass.
  Returns:
    {"uniform", "top_down", "exact"} -> float64[len(levels)] mean KL over the users with at
    least one kept draw (NaN if none); "users" -> int64[len(levels)] the number of those
    users for top-down (the other samplers keep every user).
  """
  levels = tuple(int(j) for j in levels)
  lv = jnp.asarray(levels, jnp.int32)
  index = sampling.level_index(tree)

  @jax.jit
  def batch_kl(key, params, tree, hist, pos):
    """KL float32[3, u, J] of the samplers (SAMPLERS order); NaN where no draw is kept."""
    k_uni, k_td, k_ex = jax.random.split(key, 3)
    uni, _, uni_mask = jax.vmap(lambda k, p: sampling.uniform_negatives(
        k, p, lv, index, num_samples=num_samples))(jax.random.split(k_uni, hist.shape[0]), pos)
    td, _ = sampling.top_down_negatives(k_td, score_fn, params, tree, hist,
                                        num_samples=num_samples)  # [u, H, S]
    out = []
    for i, j in enumerate(levels):
      first, width = tree_lib.level_start(tree.branching, j), tree.branching ** j
      log_q = level_log_softmax(score_fn, params, tree, hist, j, pos[:, i])
      exact = jax.random.categorical(jax.random.fold_in(k_ex, j), log_q[:, None, :], axis=-1,
                                     shape=(hist.shape[0], num_samples))
      draws = {"uniform": (uni[:, i] - first, uni_mask[:, i]),
               "top_down": (td[:, j - 1] - first, td[:, j - 1] != pos[:, i:i + 1]),
               "exact": (exact, jnp.ones(exact.shape, bool))}
      level = []
      for name in SAMPLERS:
        p, kept = empirical_distribution(*draws[name], width)
        level.append(jnp.where(kept > 0, kl_divergence(p, log_q), jnp.nan))
      out.append(jnp.stack(level))  # [3, u]
    return jnp.stack(out, axis=-1)  # [3, u, J]

  params = jax.device_put(params)
  paths = np.asarray(tree.item_paths)[np.asarray(positives)][:, list(levels)]  # [U, J]
  num_users = len(history)
  per_batch = []
  for lo in range(0, num_users, user_batch):
    hist = np.asarray(history[lo:lo + user_batch], np.int32)
    pos = paths[lo:lo + user_batch].astype(np.int32)
    n = len(hist)
    if n < user_batch:  # pad the last pass to the same shape (padding rows dropped below)
      hist = np.concatenate([hist, np.repeat(hist[-1:], user_batch - n, axis=0)])
      pos = np.concatenate([pos, np.repeat(pos[-1:], user_batch - n, axis=0)])
    kl = batch_kl(jax.random.fold_in(key, lo), params, tree, jnp.asarray(hist),
                  jnp.asarray(pos))
    per_batch.append(np.asarray(kl)[:, :n])
  kl = np.concatenate(per_batch, axis=1).astype(np.float64)  # [3, U, J]
  out = {}
  for s, name in enumerate(SAMPLERS):
    with np.errstate(invalid="ignore"):
      out[name] = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan
                            for c in kl[s].T])
  out["users"] = np.isfinite(kl[SAMPLERS.index("top_down")]).sum(axis=0)
  return out


def measurable_levels(tree: tree_lib.Tree, max_nodes: int) -> list[int]:
  """Levels whose valid nodes number at most `max_nodes` and at least 3 (so that, without the
  positive, a sampler has at least two nodes to choose from)."""
  counts = tree_lib.valid_counts(tree)
  return [j for j in range(1, tree.height + 1) if 3 <= counts[j] <= max_nodes]
