"""Tests for the DIN preference model (tdr_jax.models.din)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdr_jax.models import DIN, init_din, make_score_fn, node_levels, window_matrix

ARITY = 2
HEIGHT = 3  # 8 leaves, 15 nodes, levels 0..3
NUM_ITEMS = ARITY**HEIGHT


def tiny_tree():
  """Complete binary tree in heap layout; item i sits on leaf i."""
  offsets = np.array([(ARITY**j - 1) // (ARITY - 1) for j in range(HEIGHT + 2)], np.int32)
  items = np.arange(NUM_ITEMS)
  paths = np.stack(
      [items // ARITY ** (HEIGHT - j) + offsets[j] for j in range(HEIGHT + 1)], axis=1
  ).astype(np.int32)
  return paths, offsets


PATHS, OFFSETS = tiny_tree()  # [8, 4], [5] = [0, 1, 3, 7, 15]
NUM_NODES = int(OFFSETS[-1])
SMALL_WINDOWS = (1, 1, 2, 3)  # L = 7
L_SMALL = sum(SMALL_WINDOWS)

# B=3 users, -1 left padding, user 2 has an empty history.
HISTORY = np.array(
    [
        [-1, -1, 0, 3, 5, 2, 6],
        [1, 2, 3, 4, 5, 6, 0],
        [-1] * L_SMALL,
    ],
    np.int32,
)
# M=5 nodes per user at mixed levels, with -1 padding.
NODES = np.array(
    [
        [0, 1, 4, 9, 14],
        [3, -1, 7, 13, 2],
        [-1, 5, 6, 11, -1],
    ],
    np.int32,
)


def level_of(node):
  return int(np.searchsorted(OFFSETS, node, side="right") - 1)


def make_model(seed=0, **kw):
  kw.setdefault("windows", SMALL_WINDOWS)
  return init_din(jax.random.key(seed), num_nodes=NUM_NODES, **kw)


def call(model, history=HISTORY, nodes=NODES, paths=PATHS, offsets=OFFSETS):
  return np.asarray(
      model(jnp.asarray(history), jnp.asarray(nodes), jnp.asarray(paths), jnp.asarray(offsets))
  )


# ----------------------------------------------------------------- reference
def np_params(model):
  """All parameters / batch stats as float64 numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.state(model))


def prelu(x, slope):
  return np.where(x >= 0, x, slope * x)


def naive_scores(model, history, nodes, paths, offsets):
  """Plain per-pair implementation: explicit [e, e*n, n] concat and per-window loops."""
  p = np_params(model)
  table = p["embed"]["embedding"]
  height = paths.shape[1] - 1
  out = np.full(nodes.shape, np.nan)
  for b in range(nodes.shape[0]):
    for m in range(nodes.shape[1]):
      node = nodes[b, m]
      if node < 0:
        continue
      level = int(np.searchsorted(offsets, node, side="right") - 1)
      n = table[node]
      windows_out = []
      end = history.shape[1]
      for size in model.windows:  # most recent window first
        v = np.zeros_like(n)
        for pos in range(end - size, end):
          item = history[b, pos]
          if item < 0:
            continue
          col = level if model.hierarchical else height
          e = table[paths[item, col]]
          h = np.concatenate([e, e * n, n]) @ p["att_in"]["kernel"] + p["att_in"]["bias"]
          for i in range(len(model.att_layers)):
            h = prelu(h, p["att_acts"][i]["negative_slope"])
            h = h @ p["att_layers"][i]["kernel"] + p["att_layers"][i]["bias"]
          v = v + h[0] * e
        windows_out.append(v)
        end -= size
      x = np.concatenate(windows_out + [n])
      for i in range(len(model.mlp_layers)):
        x = x @ p["mlp_layers"][i]["kernel"] + p["mlp_layers"][i]["bias"]
        if model.batch_norm:  # eval mode: running statistics
          bn = p["mlp_norms"][i]
          x = (x - bn["mean"]) / np.sqrt(bn["var"] + model.mlp_norms[i].epsilon)
          x = x * bn["scale"] + bn["bias"]
        x = prelu(x, p["mlp_acts"][i]["negative_slope"])
      out[b, m] = (x @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"])[0]
  return out


# --------------------------------------------------------------------- tests
def test_helpers():
  lv = node_levels(jnp.arange(NUM_NODES), jnp.asarray(OFFSETS))
  np.testing.assert_array_equal(lv, [level_of(i) for i in range(NUM_NODES)])
  # windows most recent first, history most recent last.
  np.testing.assert_array_equal(window_matrix((1, 2)), [[0, 1], [0, 1], [1, 0]])


@pytest.mark.parametrize("hierarchical", [True, False])
def test_shapes_and_finite(hierarchical):
  model = make_model(hierarchical=hierarchical)
  scores = call(model)
  assert scores.shape == (3, 5)
  assert scores.dtype == np.float32
  assert np.all(np.isfinite(scores))  # padded nodes included


@pytest.mark.parametrize(
    "kw",
    [
        dict(hierarchical=True),
        dict(hierarchical=False),
        dict(hierarchical=True, windows=(1, 1, 1, 2, 2, 2, 10, 10, 20, 20)),
        dict(hierarchical=True, attention_hidden=(8, 4), mlp_hidden=(16,)),
        dict(hierarchical=False, attention_hidden=()),
    ],
    ids=["hier", "flat", "hier-default-windows", "deep-att", "linear-att"],
)
def test_matches_naive_reference(kw):
  model = make_model(seed=1, **kw)
  hist = HISTORY
  if sum(model.windows) != L_SMALL:
    rng = np.random.default_rng(0)
    hist = rng.integers(0, NUM_ITEMS, (3, sum(model.windows))).astype(np.int32)
    hist[0, :30] = -1
    hist[2, :] = -1
  with jax.default_matmul_precision("highest"):
    got = call(model, history=hist)
  want = naive_scores(model, hist, NODES, PATHS, OFFSETS)
  valid = NODES >= 0
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_batch_norm_functional_train_and_eval():
  model = make_model(seed=2, batch_norm=True, mlp_hidden=(16, 8))
  model.train()
  graphdef_train, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  graphdef_eval = nnx.graphdef(model)
  train_fn = jax.jit(make_score_fn(graphdef_train, return_batch_stats=True))
  eval_fn = jax.jit(make_score_fn(graphdef_eval))
  args = [jnp.asarray(a) for a in (HISTORY, NODES, PATHS, OFFSETS)]

  _, new_stats = train_fn((params, stats), *args)
  mean0 = new_stats["mlp_norms"][0]["mean"][...]
  assert not np.allclose(mean0, stats["mlp_norms"][0]["mean"][...])
  # Padded nodes are excluded from the batch statistics: appending padding
  # columns leaves the updated statistics unchanged.
  padded_nodes = jnp.concatenate([args[1], -jnp.ones((3, 4), jnp.int32)], axis=1)
  _, stats_pad = train_fn((params, stats), args[0], padded_nodes, *args[2:])
  np.testing.assert_allclose(stats_pad["mlp_norms"][0]["mean"][...], mean0, rtol=1e-5, atol=1e-6)

  # Eval mode uses the running statistics and matches the reference.
  nnx.update(model, new_stats)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(eval_fn((params, new_stats), *args))
  want = naive_scores(model, HISTORY, NODES, PATHS, OFFSETS)
  valid = NODES >= 0
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
  # ... and a user's score does not depend on the rest of the batch.
  alone = np.asarray(eval_fn((params, new_stats), args[0][:1], args[1][:1], *args[2:]))
  np.testing.assert_allclose(alone, got[:1], rtol=1e-5, atol=1e-6)


def test_history_length_must_match_windows():
  model = make_model()
  with pytest.raises(ValueError, match="sum\\(windows\\)"):
    call(model, history=HISTORY[:, 1:])
  with pytest.raises(ValueError, match="sum\\(windows\\)"):
    call(model, history=np.concatenate([-np.ones((3, 1), np.int32), HISTORY], axis=1))


@pytest.mark.parametrize("hierarchical", [True, False])
def test_padding_never_reads_last_row(hierarchical):
  # Item 7 (leaf 14 = the last embedding row) is neither in the history
  # nor among the scored nodes; with -1 padding present it must not matter.
  hist = np.where(HISTORY == NUM_ITEMS - 1, -1, HISTORY)
  nodes = np.where(NODES == NUM_NODES - 1, 0, NODES)
  assert PATHS[-1, -1] == NUM_NODES - 1
  assert NUM_ITEMS - 1 not in hist and NUM_NODES - 1 not in nodes
  assert (hist < 0).any() and (nodes < 0).any()
  model = make_model(hierarchical=hierarchical)
  before = call(model, history=hist, nodes=nodes)
  model.embed.embedding[...] = model.embed.embedding[...].at[-1].add(10.0)
  after = call(model, history=hist, nodes=nodes)
  np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("hierarchical", [True, False])
def test_empty_history_is_node_only_path(hierarchical):
  model = make_model(hierarchical=hierarchical)
  scores = call(model)
  # User 2 has a fully padded history: window vectors are zero.
  n = model.embed.embedding[...][jnp.maximum(jnp.asarray(NODES[2]), 0)]  # [M, D]
  x = jnp.concatenate([jnp.zeros((5, len(SMALL_WINDOWS) * model.embed_dim)), n], axis=-1)
  for layer, act in zip(model.mlp_layers, model.mlp_acts):
    x = act(layer(x))
  want = np.asarray(model.mlp_out(x)[:, 0])
  np.testing.assert_allclose(scores[2], want, rtol=1e-6, atol=1e-6)


def test_hierarchical_swap_of_siblings():
  # Items 0 and 1 share every ancestor except their leaves (levels 0..2).
  assert np.all(PATHS[0, :HEIGHT] == PATHS[1, :HEIGHT])
  hist = np.array([[-1, 5, 0, 3, 1, 2, 6]], np.int32)
  swapped = np.array([[-1, 5, 1, 3, 0, 2, 6]], np.int32)
  nodes = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], np.int32)  # levels 0..3
  inner = np.array([level_of(x) < HEIGHT for x in nodes[0]])

  model = make_model(hierarchical=True)
  a, b = call(model, hist, nodes), call(model, swapped, nodes)
  np.testing.assert_array_equal(a[0, inner], b[0, inner])
  assert not np.allclose(a[0, ~inner], b[0, ~inner])  # leaves do see the swap

  flat = make_model(hierarchical=False)
  a, b = call(flat, hist, nodes), call(flat, swapped, nodes)
  assert not np.allclose(a[0, inner], b[0, inner])


def test_flat_uses_leaf_embeddings():
  nodes = np.array([[0, 1, 2, 4, 5, 6, 8, 9, 10]] * 3, np.int32)  # node 3 not scored
  target = 3  # level-2 ancestor of items 0 and 1, both in histories
  for hierarchical, should_change in [(False, False), (True, True)]:
    model = make_model(hierarchical=hierarchical)
    before = call(model, nodes=nodes)
    model.embed.embedding[...] = model.embed.embedding[...].at[target].add(1.0)
    after = call(model, nodes=nodes)
    level2 = np.array([level_of(x) == 2 for x in nodes[0]])
    changed = not np.allclose(before[:2, level2], after[:2, level2])
    assert changed == should_change, hierarchical
  np.testing.assert_array_equal(before[2], after[2])  # empty history: no effect


def test_window_assignment_manual():
  model = make_model(seed=3, windows=(1, 2))
  hist = np.array([[4, -1, 6], [0, 1, 2]], np.int32)  # L = 3; -1 in window 1
  nodes = np.array([[3, 9], [12, 1]], np.int32)
  scores = call(model, hist, nodes)

  table = model.embed.embedding[...]
  kernel, bias = model.att_in.kernel[...], model.att_in.bias[...]

  def weight(e, n):
    h = jnp.concatenate([e, e * n, n]) @ kernel + bias
    for act, layer in zip(model.att_acts, model.att_layers):
      h = layer(act(h))
    return h[0]

  for b in range(2):
    for m in range(2):
      node = int(nodes[b, m])
      n = table[node]
      e = [None if i < 0 else table[PATHS[i, level_of(node)]] for i in hist[b]]
      w = [0.0 if x is None else weight(x, n) for x in e]
      v0 = w[2] * e[2]  # window 0: the most recent item
      v1 = sum(w[i] * e[i] for i in (0, 1) if e[i] is not None)  # window 1
      x = jnp.concatenate([v0, v1, n])
      for layer, act in zip(model.mlp_layers, model.mlp_acts):
        x = act(layer(x))
      np.testing.assert_allclose(scores[b, m], model.mlp_out(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hierarchical", [True, False])
def test_gradients_reach_every_parameter(hierarchical):
  model = make_model(hierarchical=hierarchical)
  graphdef, state = nnx.split(model)
  score_fn = make_score_fn(graphdef)

  def loss(state):
    s = score_fn(state, *(jnp.asarray(a) for a in (HISTORY, NODES, PATHS, OFFSETS)))
    return jnp.sum(jnp.where(jnp.asarray(NODES) >= 0, jnp.sin(s), 0.0))

  grads = jax.grad(loss)(state)
  flat = nnx.to_flat_state(grads)
  assert len(flat) > 10
  for path, g in flat:
    assert np.all(np.isfinite(g[...])), path
    assert float(jnp.abs(g[...]).sum()) > 0, path


def test_jit_does_not_retrace_on_new_tree():
  model = make_model()
  graphdef, state = nnx.split(model)
  score_fn = make_score_fn(graphdef)
  traces = []

  def counted(*args):
    traces.append(1)
    return score_fn(*args)

  fn = jax.jit(counted)
  hist, nodes = jnp.asarray(HISTORY), jnp.asarray(NODES)
  a = fn(state, hist, nodes, jnp.asarray(PATHS), jnp.asarray(OFFSETS))
  # Re-learned tree: a different item -> leaf assignment (same shapes).
  perm = np.random.default_rng(0).permutation(NUM_ITEMS)
  leaf = perm + OFFSETS[HEIGHT] - OFFSETS[HEIGHT]
  new_paths = np.stack(
      [leaf // ARITY ** (HEIGHT - j) + OFFSETS[j] for j in range(HEIGHT + 1)], axis=1
  ).astype(np.int32)
  b = fn(state, hist, nodes, jnp.asarray(new_paths), jnp.asarray(OFFSETS))
  assert len(traces) == 1
  assert not np.allclose(a, b)
  np.testing.assert_allclose(
      np.asarray(b), call(model, paths=new_paths), rtol=1e-5, atol=1e-6
  )


def test_constructor_validation():
  with pytest.raises(ValueError):
    DIN(num_nodes=NUM_NODES, windows=(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError):
    DIN(num_nodes=NUM_NODES, windows=(2, 0), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("hierarchical", [True, False])
def test_level_hint_equals_mixed_level_path(hierarchical):
  """With `level=j` (all nodes on level j) the shared-history path gives the same scores as
  the general path, also when j is a traced value inside jit."""
  model = make_model(seed=2, hierarchical=hierarchical)
  graphdef, state = nnx.split(model)
  score = make_score_fn(graphdef)
  rng = np.random.default_rng(3)
  for j in range(0, HEIGHT + 1):
    nodes = rng.integers(OFFSETS[j], OFFSETS[j + 1], size=(3, 4)).astype(np.int32)
    nodes[1, 0] = -1  # padding stays allowed
    args = (jnp.asarray(HISTORY), jnp.asarray(nodes), jnp.asarray(PATHS), jnp.asarray(OFFSETS))
    with jax.default_matmul_precision("highest"):
      mixed = score(state, *args)
      hinted = score(state, *args, level=j)
      traced = jax.jit(score)(state, *args, level=jnp.int32(j))
    valid = nodes >= 0
    np.testing.assert_allclose(np.asarray(hinted)[valid], np.asarray(mixed)[valid], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(traced)[valid], np.asarray(mixed)[valid], rtol=1e-5,
                               atol=1e-6)
