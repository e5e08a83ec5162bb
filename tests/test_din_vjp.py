"""The fused activation unit of the DIN (tdr_jax.models.din._attention_weights, its custom VJP
and the per-window matmuls): same outputs and gradients as the plain layers under autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdr_jax.models import din as din_lib

from test_din import HISTORY, NUM_NODES, OFFSETS, PATHS, SMALL_WINDOWS


def rel_err(got, want):
  """max |got - want| / max |want| (0 when both are 0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.max(np.abs(want))
  return float(np.max(np.abs(got - want)) / scale) if scale > 0 else float(np.max(np.abs(got)))


def assert_trees_close(got, want, tol=1e-5):
  paths_want = jax.tree_util.tree_leaves_with_path(want)
  leaves_got = jax.tree_util.tree_leaves(got)
  assert len(paths_want) == len(leaves_got)
  for (path, w), g in zip(paths_want, leaves_got):
    assert g.shape == w.shape, jax.tree_util.keystr(path)
    err = rel_err(g, w)
    assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.3g}"


def plain_weights(n, e, k_p, ue, nt, slope, k2, b2, valid):
  """The activation unit as the plain layers compute it ([B, M, L, A] under autodiff)."""
  pre = jnp.einsum("bmd,blda->bmla", n, e[:, :, :, None] * k_p) + ue[:, None] + nt[:, :, None]
  h = jnp.where(pre >= 0, pre, slope * pre)
  return (h @ k2 + b2)[..., 0] * valid[:, None, :]


def random_inputs(seed, b=5, m=4, length=7, d=3, a=6):
  ks = jax.random.split(jax.random.key(seed), 9)
  valid = np.ones((b, length), np.float32)
  valid[0, :3] = 0.0  # padded (masked) history positions
  valid[min(2, b - 1), :] = 0.0  # a user with an empty history
  return (jax.random.normal(ks[0], (b, m, d)), jax.random.normal(ks[1], (b, length, d)),
          jax.random.normal(ks[2], (d, a)), jax.random.normal(ks[3], (b, length, a)),
          jax.random.normal(ks[4], (b, m, a)), jnp.float32(0.3),
          jax.random.normal(ks[5], (a, 1)), jax.random.normal(ks[6], (1,)), jnp.asarray(valid))


# chunk sizes: whole batch (vmap), 2 users per chunk with a remainder (B = 5), 1 user (scan).
@pytest.mark.parametrize("chunk", [0, 2, 1])
def test_attention_weights_forward_and_vjp(monkeypatch, chunk):
  args = random_inputs(0)
  b, m, length = args[0].shape[0], args[0].shape[1], args[1].shape[1]
  monkeypatch.setattr(din_lib, "_chunk_users", lambda *_: chunk)
  got = jax.jit(din_lib._attention_weights)(*args)
  want = plain_weights(*args)
  assert got.shape == (b, m, length)
  assert rel_err(got, want) <= 1e-5
  assert np.all(np.asarray(got)[2] == 0.0) and np.all(np.asarray(got)[0, :, :3] == 0.0)

  cot = jax.random.normal(jax.random.key(1), (b, m, length))
  diff = tuple(range(8))  # every float input; `valid` is a 0/1 mask
  g_got = jax.jit(jax.grad(lambda *x: jnp.sum(din_lib._attention_weights(*x) * cot),
                           argnums=diff))(*args)
  g_want = jax.grad(lambda *x: jnp.sum(plain_weights(*x) * cot), argnums=diff)(*args)
  assert_trees_close(g_got, g_want)


def test_attention_weights_slope_sign_cases():
  """Pre-activations of both signs (and the slope's own gradient) with a slope != 0.25."""
  args = list(random_inputs(3, b=3, m=3, length=5, d=2, a=4))
  args[5] = jnp.float32(-0.7)
  g_got = jax.grad(lambda *x: jnp.sum(din_lib._attention_weights(*x) ** 2), argnums=(5, 6, 7))(
      *args)
  g_want = jax.grad(lambda *x: jnp.sum(plain_weights(*x) ** 2), argnums=(5, 6, 7))(*args)
  assert_trees_close(g_got, g_want)


def level_nodes(level, seed):
  """int32[3, 5] node ids all on `level` of the tiny tree, with -1 padding."""
  rng = np.random.default_rng(seed)
  nodes = rng.integers(OFFSETS[level], OFFSETS[level + 1], (HISTORY.shape[0], 5)).astype(np.int32)
  nodes[1, 1] = -1
  nodes[2, [0, 4]] = -1
  return nodes


def pair(seed=0, **kw):
  """(fused score_fn, plain score_fn, shared params): the same weights in both models."""
  kw.setdefault("windows", SMALL_WINDOWS)
  fused = din_lib.init_din(jax.random.key(seed), num_nodes=NUM_NODES, **kw)
  plain = din_lib.init_din(jax.random.key(seed), num_nodes=NUM_NODES, fused_attention=False,
                           **kw)
  gd_f, params = nnx.split(fused)
  gd_p, params_p = nnx.split(plain)
  assert_trees_close(params_p, params, tol=0.0)
  # Non-default PReLU slopes / biases so that every gradient term is exercised.
  params = jax.tree_util.tree_map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape, x.dtype), params)
  return din_lib.make_score_fn(gd_f), din_lib.make_score_fn(gd_p), params


@pytest.mark.parametrize("hierarchical,level", [(True, 1), (True, 3), (False, 2), (False, None)])
def test_model_fused_equals_plain(hierarchical, level):
  fused, plain, params = pair(hierarchical=hierarchical)
  nodes = jnp.asarray(level_nodes(2 if level is None else level, seed=level or 0))
  args = (jnp.asarray(HISTORY), nodes, jnp.asarray(PATHS), jnp.asarray(OFFSETS))
  cot = jax.random.normal(jax.random.key(2), nodes.shape)

  def loss(score):
    return lambda p: jnp.sum(score(p, *args, level=level) * cot)

  s_f = jax.jit(lambda p: fused(p, *args, level=level))(params)
  s_p = plain(params, *args, level=level)
  assert rel_err(s_f, s_p) <= 1e-5
  g_f = jax.jit(jax.grad(loss(fused)))(params)
  g_p = jax.grad(loss(plain))(params)
  assert_trees_close(g_f, g_p)
  # Every parameter (node table included) gets a non-zero gradient through the fused path.
  for path, g in jax.tree_util.tree_leaves_with_path(g_f):
    assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)


def test_model_fused_other_widths_fall_back():
  """Activation units with 0 or 2 hidden layers use the plain layers (same results)."""
  for hidden in ((), (4, 3)):
    fused, plain, params = pair(attention_hidden=hidden, hierarchical=True)
    nodes = jnp.asarray(level_nodes(2, seed=1))
    args = (jnp.asarray(HISTORY), nodes, jnp.asarray(PATHS), jnp.asarray(OFFSETS))
    assert rel_err(fused(params, *args, level=2), plain(params, *args, level=2)) <= 1e-5
