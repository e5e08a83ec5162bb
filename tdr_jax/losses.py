"""Per-level training losses over tree nodes (pure functions, unbatched; vmap them).

* `full_softmax_loss`: multi-class cross-entropy over every node of a level (TDR Eq. 5-7).
* `sampled_softmax_loss`: the same with m sampled negatives and the logQ correction
  (TDR Eq. 17-18): each negative's logit minus ln(m * q), the positive unchanged, negatives that
  are the positive itself ("accidental hits") masked out.
* `binary_cross_entropy_loss`: TDM/JTM's per-node logistic loss (TDR Eq. 2).

Every loss takes an optional scalar `weight` (Eq. 15's rectified label; 1 for plain labels).
Masked entries enter as -inf logits, never as a gathered -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def full_softmax_loss(logits: jax.Array, label: jax.Array, mask: jax.Array,
                      weight: jax.Array | float = 1.0) -> jax.Array:
  """-weight * log softmax(logits)[label] over the unmasked nodes of one level.

  Args:
    logits: float[C] scores of every node of the level.
    label: int[] index (into logits) of the positive node.
    mask: bool[C] valid nodes (the positive must be valid).
    weight: scalar label weight.
  Returns:
    float[] loss.
  """
  masked = jnp.where(mask, logits, _NEG_INF)
  return weight * (jax.nn.logsumexp(masked) - logits[label])


def sampled_softmax_loss(pos_logit: jax.Array, neg_logits: jax.Array, neg_log_q: jax.Array,
                         neg_mask: jax.Array, weight: jax.Array | float = 1.0, *,
                         num_samples: int) -> jax.Array:
  """Sampled softmax with the logQ correction for one (sample, level).

  Args:
    pos_logit: float[] the positive node's score o_pos.
    neg_logits: float[m] scores of the sampled negatives.
    neg_log_q: float[m] log of each negative's per-draw sampling probability q.
    neg_mask: bool[m] False for padding and accidental hits of the positive.
    weight: scalar label weight.
    num_samples: m, the number of draws (the correction uses ln(m * q)).
  Returns:
    float[] loss  = logsumexp([o_pos, o_neg - ln(m q)]) - o_pos.
  """
  corrected = neg_logits - (jnp.log(float(num_samples)) + neg_log_q)
  corrected = jnp.where(neg_mask, corrected, _NEG_INF)
  all_logits = jnp.concatenate([pos_logit[None], corrected])
  return weight * (jax.nn.logsumexp(all_logits) - pos_logit)


def binary_cross_entropy_loss(pos_logit: jax.Array, neg_logits: jax.Array, neg_mask: jax.Array,
                              weight: jax.Array | float = 1.0) -> jax.Array:
  """TDM/JTM loss for one (sample, level): -log s(o_pos) - sum log(1 - s(o_neg)).

  Args:
    pos_logit: float[] score of the positive node (a logit of P(like)).
    neg_logits: float[m] scores of the sampled negatives.
    neg_mask: bool[m] valid negatives.
    weight: scalar weight of the positive term.
  Returns:
    float[] loss.
  """
  pos = -jax.nn.log_sigmoid(pos_logit)
  neg = -jnp.sum(jnp.where(neg_mask, jax.nn.log_sigmoid(-neg_logits), 0.0))
  return weight * pos + neg
