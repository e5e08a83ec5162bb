"""OTM and PLT baselines: pseudo targets, beam-search training nodes, PLT targets, loss and
path-product beam search on tiny trees with table scorers; a few DIN train steps of each."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdr_jax import beam_search as bs
from tdr_jax import label_tree as plt
from tdr_jax import config as config_lib
from tdr_jax import otm, sampling, train
from tdr_jax import tree as tree_lib
from tdr_jax.data import batches as batches_lib
from tdr_jax.methods import tree_family
from tdr_jax.models import din as din_lib


def table_score(params, tree, history, nodes, level=None):
  """Scorer reading a table: params[user, node]; the user id is history[:, -1]. Nodes off
  `level` (including -1 padding) score NaN, so any leak of a masked entry shows."""
  user = history[:, -1]
  scores = params[user[:, None], jnp.maximum(nodes, 0)]
  if level is not None:
    lv = tree_lib.node_level(nodes, branching=tree.branching)
    scores = jnp.where(lv == level, scores, jnp.nan)
  return scores


def user_history(num_users):
  return jnp.broadcast_to(jnp.arange(num_users)[:, None], (num_users, 2)).astype(jnp.int32)


# Five users' positives on the 8-item tree (-1 padding): 2, 1, 3, 2 and 3 of them.
MULTI_LABELS = np.array([[0, 3, -1], [1, -1, -1], [2, 5, 7], [4, 0, -1], [6, 1, 2]], np.int32)


def multi_label_case(t, seed, *, labels=True):
  """A random table scorer's scores (rows: users) and a batch of MULTI_LABELS on tree `t`
  (targets = column 0; batch.labels = MULTI_LABELS, or None with labels=False)."""
  num_users = MULTI_LABELS.shape[0]
  table = np.random.default_rng(seed).normal(size=(num_users, t.parent.shape[0]))
  batch = train.Batch(user_history(num_users), jnp.asarray(MULTI_LABELS[:, 0]),
                      jnp.ones((num_users, t.height), jnp.float32), jnp.ones(num_users, bool),
                      jnp.asarray(MULTI_LABELS) if labels else None)
  return table.astype(np.float32), MULTI_LABELS, batch


@pytest.fixture(scope="module")
def tree5():
  # 5 items, B = 2 -> H = 3: 8 leaves, 3 of them empty (masked siblings / children).
  return tree_lib.build_random(np.random.default_rng(3), 5, branching=2)


@pytest.fixture(scope="module")
def tree8():
  return tree_lib.build_random(np.random.default_rng(4), 8, branching=2)


# ---- OTM pseudo targets --------------------------------------------------------------------

def brute_force_targets(t, scores, item):
  """Bottom-up recursion over the whole tree: float[num_nodes] OTM targets for positive item."""
  num_nodes = t.parent.shape[0]
  target = np.zeros(num_nodes)
  leaf0 = int(t.level_offsets[t.height])
  for leaf in range(leaf0, num_nodes):
    target[leaf] = float(t.leaf_to_item[leaf - leaf0] == item)
  for n in range(leaf0 - 1, -1, -1):
    kids = t.children[n]
    ok = t.node_valid[kids]
    if ok.any():
      best = kids[np.argmax(np.where(ok, scores[kids], -np.inf))]
      target[n] = target[best]
  return target


@functools.partial(jax.jit, static_argnums=0)
def otm_all_node_targets(t, table_row, path):
  """float32[num_nodes] of otm's targets, node by node (level-wise `node_targets`)."""
  nodes, mask = plt.path_children(t, path)
  anc = otm.pseudo_targets(table_row[nodes], nodes, mask, path)
  out = []
  for j in range(t.height + 1):
    ids = jnp.arange(t.level_offsets[j], t.level_offsets[j + 1], dtype=jnp.int32)
    out.append(otm.node_targets(ids, path[j], anc[j]))
  return jnp.concatenate(out), anc


def test_otm_pseudo_targets_equal_brute_force(tree5):
  t = tree5
  rng = np.random.default_rng(0)
  saw_zero_ancestor = saw_full_path = False
  for trial in range(12):
    table = rng.normal(size=t.parent.shape[0]).astype(np.float32)
    for item in range(t.num_items):
      got, anc = otm_all_node_targets(t, jnp.asarray(table), jnp.asarray(t.item_paths[item]))
      want = brute_force_targets(t, table, item)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"trial {trial} item {item}")
      saw_zero_ancestor |= bool(np.asarray(anc)[0] == 0)
      saw_full_path |= bool(np.all(np.asarray(anc) == 1))
  assert saw_zero_ancestor and saw_full_path


def test_otm_ancestor_target_zero_when_argmax_leads_away():
  t = tree_lib.from_leaf_order(np.arange(8), branching=2)  # item i on leaf node 7 + i
  path = jnp.asarray(t.item_paths[0])
  assert np.asarray(path).tolist() == [0, 1, 3, 7]
  table = np.zeros(15, np.float32)
  table[[2, 3, 7]] = 1.0  # root prefers 2 (away from item 0); 1 prefers 3; 3 prefers 7
  got, anc = otm_all_node_targets(t, jnp.asarray(table), path)
  np.testing.assert_array_equal(np.asarray(anc), [0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(got), brute_force_targets(t, table, 0))
  table[[3, 4]] = [0.0, 1.0]  # now node 1 prefers 4: levels 0 and 1 lose the target
  _, anc = otm_all_node_targets(t, jnp.asarray(table), path)
  np.testing.assert_array_equal(np.asarray(anc), [0, 0, 1, 1])


# ---- OTM multi-label pseudo targets ---------------------------------------------------------

def brute_force_multi_targets(t, scores, items):
  """Paper's recursion over the whole tree for a set of positives: a leaf's target is 1 iff
  its item is one of `items`; a node's is its argmax valid child's (first maximum)."""
  num_nodes = t.parent.shape[0]
  leaf0 = int(t.level_offsets[t.height])
  positives = {int(i) for i in items if i >= 0}
  target = np.zeros(num_nodes)

  def value(n):
    if n >= leaf0:
      item = int(t.leaf_to_item[n - leaf0])
      return float(item >= 0 and item in positives)
    kids = [int(c) for c in t.children[n] if c >= 0 and t.node_valid[c]]
    if not kids:
      return 0.0
    best = kids[0]
    for c in kids[1:]:
      if scores[c] > scores[best]:
        best = c
    return value(best)

  for n in range(num_nodes):
    target[n] = value(n)
  return target


@functools.partial(jax.jit, static_argnums=0)
def otm_all_node_multi_targets(t, table_row, positives):
  """float32[num_nodes] of the multi-label targets (level-wise `multi_node_targets`), the
  per-positive ancestor targets and the positives' paths."""
  paths = otm.positive_paths(t, positives)
  nodes, mask = jax.vmap(lambda p: plt.path_children(t, p))(paths)
  anc = otm.multi_label_pseudo_targets(table_row[nodes], nodes, mask, paths)
  out = []
  for j in range(t.height + 1):
    ids = jnp.arange(t.level_offsets[j], t.level_offsets[j + 1], dtype=jnp.int32)
    out.append(otm.multi_node_targets(ids, paths[:, j], anc[:, j]))
  return jnp.concatenate(out), anc, paths


@pytest.mark.parametrize("tree_name", ["tree5", "tree8"])
def test_otm_multi_label_targets_equal_brute_force(tree_name, request):
  t = request.getfixturevalue(tree_name)
  rng = np.random.default_rng(11)
  saw_one = saw_zero = False
  for trial in range(10):
    # Ties too: half the trials draw scores from a few values.
    table = rng.normal(size=t.parent.shape[0]).astype(np.float32)
    if trial % 2:
      table = rng.integers(0, 3, size=t.parent.shape[0]).astype(np.float32)
    for w in (1, 2, 3):
      items = rng.choice(t.num_items, size=w, replace=False)
      positives = np.full(4, -1, np.int32)  # W = 4 slots, -1 padding
      positives[rng.choice(4, size=w, replace=False)] = items
      got, anc, paths = otm_all_node_multi_targets(t, jnp.asarray(table), jnp.asarray(positives))
      want = brute_force_multi_targets(t, table, items)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"trial {trial} {positives}")
      anc, paths = np.asarray(anc), np.asarray(paths)
      # Per-positive rows: the brute-force target of each ancestor; padding rows are 0 / -1.
      for row, p in enumerate(positives):
        if p < 0:
          assert np.all(paths[row] == -1) and np.all(anc[row] == 0)
        else:
          np.testing.assert_array_equal(anc[row], want[paths[row]])
      # Nodes off the union of the ancestors have target 0 in the brute force too.
      union = set(paths[paths >= 0].tolist())
      assert all(want[n] == 0 for n in range(len(want)) if n not in union)
      saw_one |= bool(anc[positives >= 0, 0].max() == 1)
      saw_zero |= bool(anc[positives >= 0, 0].max() == 0)
  assert saw_one and saw_zero


def test_otm_multi_label_single_positive_equals_single_label(tree5):
  t = tree5
  rng = np.random.default_rng(12)
  for trial in range(8):
    table = rng.normal(size=t.parent.shape[0]).astype(np.float32)
    for item in range(t.num_items):
      positives = jnp.asarray([-1, item, -1], jnp.int32)
      got, anc, _ = otm_all_node_multi_targets(t, jnp.asarray(table), positives)
      single, single_anc = otm_all_node_targets(t, jnp.asarray(table),
                                                jnp.asarray(t.item_paths[item]))
      np.testing.assert_array_equal(np.asarray(anc)[1], np.asarray(single_anc))
      np.testing.assert_array_equal(np.asarray(got), np.asarray(single))


# ---- OTM training nodes --------------------------------------------------------------------

def np_beam_candidates(t, scores, k):
  """Reference: valid nodes a size-k beam search scores at each level 1..H."""
  out, beam = [], [0]
  for j in range(1, t.height + 1):
    if t.branching ** (j - 1) <= k:  # the beam holds the whole previous level
      cands = list(range(t.level_offsets[j], t.level_offsets[j + 1]))
    else:
      cands = [int(c) for n in beam for c in t.children[n]]
    valid = [c for c in cands if t.node_valid[c]]
    out.append(valid)
    beam = sorted(valid, key=lambda c: -scores[c])[:k]
  return out


@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_otm_training_nodes_are_beam_children_plus_ancestor(tree5, beam_size):
  t = tree5
  num_users = 6
  rng = np.random.default_rng(beam_size)
  table = rng.normal(size=(num_users, t.parent.shape[0])).astype(np.float32)
  targets = np.arange(num_users) % t.num_items
  paths = jnp.asarray(t.item_paths[targets])

  @jax.jit
  def run(table, paths):
    cands = otm.beam_candidates(table_score, table, t, user_history(num_users),
                                beam_size=beam_size)
    return [jax.vmap(otm.training_nodes)(c, m, paths[:, j + 1]) + (c, m)
            for j, (c, m) in enumerate(cands)]

  levels = run(jnp.asarray(table), paths)
  s = bs.start_level(branching=2, height=t.height, beam_size=beam_size)
  for j, (nodes, mask, cands, cmask) in enumerate(levels, start=1):
    nodes, mask = np.asarray(nodes), np.asarray(mask)
    width = 2 ** j if j <= s else beam_size * 2
    assert nodes.shape == (num_users, width + 1)
    assert np.all(np.asarray(cands)[~np.asarray(cmask)] < t.level_offsets[j + 1])
    for u in range(num_users):
      want_cands = np_beam_candidates(t, table[u], beam_size)[j - 1]
      anc = int(t.item_paths[targets[u], j])
      kept = nodes[u][mask[u]].tolist()
      assert len(kept) == len(set(kept)), "a node is trained twice"
      assert set(kept) == set(want_cands) | {anc}
      assert nodes[u, -1] == anc and mask[u, -1] == (anc not in want_cands)
      assert np.all(nodes[u, :-1][~mask[u, :-1]] == -1)  # masked candidates are -1 padding


@pytest.mark.parametrize("ancestor_nodes", [True, False])
def test_otm_loss_matches_reference(tree5, ancestor_nodes):
  """make_loss_fn(loss="otm") with a table scorer equals the BCE over the reference training
  sets against brute-force targets; its gradient is finite despite NaN at padded entries."""
  t = tree5
  num_users, k = 4, 2
  rng = np.random.default_rng(9)
  table = rng.normal(size=(num_users, t.parent.shape[0])).astype(np.float32)
  targets = np.array([0, 1, 2, 4], np.int32)
  height = t.height
  batch = train.Batch(user_history(num_users), jnp.asarray(targets),
                      jnp.ones((num_users, height), jnp.float32), jnp.ones(num_users, bool))
  loss_fn = train.make_loss_fn(
      table_score, train.StepConfig(loss="otm", beam_size=k, ancestor_nodes=ancestor_nodes),
      branching=2, height=height)
  (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      jnp.asarray(table), batch, t, sampling.level_index(t), jax.random.key(0))
  assert np.all(np.isfinite(np.asarray(grad)))
  want = np.zeros(height)
  for u in range(num_users):
    tgt = brute_force_targets(t, table[u], targets[u])
    for j, cands in enumerate(np_beam_candidates(t, table[u], k), start=1):
      extra = {int(t.item_paths[targets[u], j])} if ancestor_nodes else set()
      for n in set(cands) | extra:
        p = 1 / (1 + np.exp(-float(table[u, n])))
        want[j - 1] -= np.log(p) if tgt[n] else np.log(1 - p)
  np.testing.assert_allclose(np.asarray(metrics["level_loss"]), want / num_users, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want.sum() / num_users, rtol=1e-5)


@pytest.mark.parametrize("ancestor_nodes", [True, False])
def test_otm_multi_label_loss_matches_reference(tree8, ancestor_nodes):
  """With batch.labels (several positives, -1 padding) the OTM loss is the BCE over the beam
  candidates (plus every positive's ancestor) against the multi-label brute-force targets;
  labels = [target] gives the single-label loss."""
  t = tree8
  num_users, k = 5, 2
  table, labels, batch = multi_label_case(t, 10)
  height = t.height
  loss_fn = jax.jit(train.make_loss_fn(
      table_score, train.StepConfig(loss="otm", beam_size=k, ancestor_nodes=ancestor_nodes),
      branching=2, height=height))
  args = (t, sampling.level_index(t), jax.random.key(0))
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(table), batch,
                                                                     *args)
  assert np.all(np.isfinite(np.asarray(grad)))
  want = np.zeros(height)
  for u in range(num_users):
    pos = labels[u][labels[u] >= 0]
    tgt = brute_force_multi_targets(t, table[u], pos)
    for j, cands in enumerate(np_beam_candidates(t, table[u], k), start=1):
      extra = {int(t.item_paths[p, j]) for p in pos} if ancestor_nodes else set()
      for n in set(cands) | extra:
        p = 1 / (1 + np.exp(-float(table[u, n])))
        want[j - 1] -= np.log(p) if tgt[n] else np.log(1 - p)
  np.testing.assert_allclose(np.asarray(metrics["level_loss"]), want / num_users, rtol=1e-5)
  single = batch._replace(labels=None)
  one = batch._replace(labels=jnp.asarray(labels[:, :1]))
  a, _ = loss_fn(jnp.asarray(table), single, *args)
  b, _ = loss_fn(jnp.asarray(table), one, *args)
  assert float(a) == float(b)


@pytest.mark.parametrize("ancestor_nodes", [True, False])
def test_otm_warmup_uses_plain_targets_then_pseudo_targets(tree8, ancestor_nodes):
  """With plain_target_steps=N, steps < N train the BCE over the beam candidates plus every
  positive's ancestor against plain targets (1 on every positive's ancestor); from step N the
  loss is the one without a warm-up. The target-1 share metric is 1 at every level during the
  warm-up and matches the brute-force pseudo targets after it."""
  t = tree8
  num_users, k, n_warm = 5, 2, 3
  table, labels, batch = multi_label_case(t, 11)
  height = t.height
  args = (t, sampling.level_index(t), jax.random.key(0))

  def make(steps):
    return jax.jit(train.make_loss_fn(
        table_score, train.StepConfig(loss="otm", beam_size=k, ancestor_nodes=ancestor_nodes,
                                      plain_target_steps=steps), branching=2, height=height))

  warm_fn, plain_fn = make(n_warm), make(0)
  want = np.zeros(height)
  share_after = np.zeros(height)
  for u in range(num_users):
    pos = labels[u][labels[u] >= 0]
    on_path = {int(t.item_paths[p, j]) for p in pos for j in range(height + 1)}
    tgt = brute_force_multi_targets(t, table[u], pos)
    for j, cands in enumerate(np_beam_candidates(t, table[u], k), start=1):
      ancestors = {int(t.item_paths[p, j]) for p in pos}
      for n in set(cands) | ancestors:
        p = 1 / (1 + np.exp(-float(table[u, n])))
        want[j - 1] -= np.log(p) if n in on_path else np.log(1 - p)
      trained = set(cands) | (ancestors if ancestor_nodes else set())
      share_after[j - 1] += any(tgt[n] for n in trained) / num_users
  for step in (0, n_warm - 1):
    _, m = warm_fn(jnp.asarray(table), batch, *args, step)
    np.testing.assert_allclose(np.asarray(m["level_loss"]), want / num_users, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m["otm_positive_share"]), np.ones(height))
  for step in (n_warm, n_warm + 5):
    a, m = warm_fn(jnp.asarray(table), batch, *args, step)
    b, _ = plain_fn(jnp.asarray(table), batch, *args, step)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["otm_positive_share"]), share_after, atol=1e-6)


@pytest.mark.parametrize("label_window", [False, True])
def test_otm_first_level_skips_the_levels_above(tree8, label_window):
  """first_level=f: levels 1..f-1 have loss 0 and target-1 share 0; levels f..H (whose
  pseudo targets need only the scores below them) equal the all-levels loss exactly."""
  t = tree8
  num_users, k = 5, 2
  table, labels, batch = multi_label_case(t, 12, labels=label_window)
  height = t.height
  args = (t, sampling.level_index(t), jax.random.key(0))
  first = bs.start_level(branching=2, height=height, beam_size=k)
  assert 1 < first <= height

  def run(first_level):
    fn = jax.jit(jax.value_and_grad(train.make_loss_fn(
        table_score, train.StepConfig(loss="otm", beam_size=k, first_level=first_level),
        branching=2, height=height), has_aux=True))
    (loss, m), grad = fn(jnp.asarray(table), batch, *args)
    return float(loss), np.asarray(m["level_loss"]), np.asarray(m["otm_positive_share"]), grad

  loss_all, lv_all, share_all, _ = run(1)
  loss_cut, lv_cut, share_cut, grad = run(first)
  assert np.all(lv_all[:first - 1] > 0)  # the levels above do train without the cut
  np.testing.assert_array_equal(lv_cut[:first - 1], 0.0)
  np.testing.assert_array_equal(share_cut[:first - 1], 0.0)
  np.testing.assert_allclose(lv_cut[first - 1:], lv_all[first - 1:], rtol=1e-6)
  np.testing.assert_allclose(share_cut[first - 1:], share_all[first - 1:])
  np.testing.assert_allclose(loss_cut, lv_all[first - 1:].sum(), rtol=1e-6)
  # No gradient reaches the untrained levels' nodes.
  g = np.asarray(grad)
  level_nodes = np.arange(t.level_offsets[1], t.level_offsets[first])
  assert np.all(np.isfinite(g)) and np.all(g[:, level_nodes] == 0)


def test_otm_jtm_warmup_is_jtm_loss_then_pseudo_targets(tree8):
  """warmup_loss="bce": steps < N give exactly JTM's loss (binary, uniform negatives, same key)
  with a target-1 share of 1; steps >= N give the OTM loss without a warm-up."""
  t = tree8
  num_users, k, n_warm, m = 5, 2, 3, 2
  table, labels, batch = multi_label_case(t, 13)
  height = t.height
  args = (t, sampling.level_index(t), jax.random.key(5))

  def make(**kw):
    return jax.jit(train.make_loss_fn(table_score, train.StepConfig(**kw), branching=2,
                                      height=height))

  warm_fn = make(loss="otm", beam_size=k, num_negatives=m, plain_target_steps=n_warm,
                 warmup_loss="bce")
  jtm_fn = make(loss="bce", sampler="uniform", num_negatives=m)
  otm_fn = make(loss="otm", beam_size=k)
  table = jnp.asarray(table)
  for step in (0, n_warm - 1):
    a, ma = warm_fn(table, batch, *args, step)
    b, mb = jtm_fn(table, batch._replace(labels=None), *args, step)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ma["level_loss"]), np.asarray(mb["level_loss"]),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ma["otm_positive_share"]), np.ones(height))
  for step in (n_warm, n_warm + 4):
    a, _ = warm_fn(table, batch, *args, step)
    b, _ = otm_fn(table, batch, *args, step)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  assert float(warm_fn(table, batch, *args, 0)[0]) != float(otm_fn(table, batch, *args, 0)[0])
  with pytest.raises(ValueError, match="warmup_loss"):
    train.make_loss_fn(table_score, train.StepConfig(loss="otm", warmup_loss="nope"),
                       branching=2, height=height)


def test_otm_multi_training_nodes_dedupe():
  cands = jnp.asarray([3, 4, -1, 6], jnp.int32)
  mask = jnp.asarray([True, True, False, True])
  nodes, m = otm.multi_training_nodes(cands, mask, jnp.asarray([4, 5, 5, -1, 3], jnp.int32))
  np.testing.assert_array_equal(np.asarray(nodes), [3, 4, -1, 6, 4, 5, 5, -1, 3])
  np.testing.assert_array_equal(np.asarray(m), [1, 1, 0, 1, 0, 1, 0, 0, 0])
  # One ancestor: the single-label `training_nodes`.
  n1, m1 = otm.training_nodes(cands, mask, jnp.int32(5))
  n2, m2 = otm.multi_training_nodes(cands, mask, jnp.asarray([5], jnp.int32))
  np.testing.assert_array_equal(np.asarray(n1), np.asarray(n2))
  np.testing.assert_array_equal(np.asarray(m1), np.asarray(m2))


def test_window_labels_next_items_distinct_within_user():
  ds = types.SimpleNamespace(
      seq_items=np.array([5, 6, 5, 7, 8, 1, 2], np.int32),  # user 0: 0..4, user 1: 5..6
      seq_offsets=np.array([0, 5, 7], np.int64),
      train_sample_pos=np.array([1, 2, 3, 4, 6], np.int64),
      train_sample_start=np.array([0, 0, 0, 0, 5], np.int64))
  got = batches_lib.window_labels(ds, np.arange(5), 3)
  np.testing.assert_array_equal(got, [[6, 5, 7], [5, 7, 8], [7, 8, -1], [8, -1, -1],
                                      [2, -1, -1]])
  np.testing.assert_array_equal(batches_lib.window_labels(ds, np.arange(5), 1)[:, 0],
                                ds.seq_items[ds.train_sample_pos])
  ds.seq_items = np.array([5, 6, 6, 6, 5, 1, 2], np.int32)  # repeats within the window
  np.testing.assert_array_equal(batches_lib.window_labels(ds, np.array([0]), 4), [[6, 5, -1, -1]])


# ---- PLT ----------------------------------------------------------------------------------

def test_plt_targets_and_loss_hand_computed():
  t = tree_lib.from_leaf_order(np.arange(7), branching=2)  # leaf node 14 is empty
  path = jnp.asarray(t.item_paths[6])
  assert np.asarray(path).tolist() == [0, 2, 6, 13] and not t.node_valid[14]
  nodes, mask = plt.path_children(t, path)
  np.testing.assert_array_equal(np.asarray(nodes), [[1, 2], [5, 6], [13, 14]])
  np.testing.assert_array_equal(np.asarray(mask), [[1, 1], [1, 1], [1, 0]])
  targets, _ = plt.level_targets(nodes, mask, path)
  np.testing.assert_array_equal(np.asarray(targets), [[0, 1], [0, 1], [1, 0]])
  logit = {1: 0.5, 2: -1.0, 5: 2.0, 6: 0.3, 13: 1.5, 14: np.nan}  # 14 is masked
  logits = jnp.asarray([[logit[int(n)] for n in row] for row in np.asarray(nodes)], jnp.float32)
  weight = jnp.array([2.0, 1.0, 1.0])
  got = plt.plt_loss(logits, nodes, mask, path, weight)
  softplus = lambda x: np.log1p(np.exp(x))  # -log sigmoid(-x)
  want = [2.0 * softplus(1.0) + softplus(0.5),  # node 2 positive (weighted), node 1 negative
          softplus(-0.3) + softplus(2.0),  # node 6 positive, node 5 negative
          softplus(-1.5)]  # node 13 positive, node 14 empty
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  g = jax.grad(lambda x: plt.plt_loss(x, nodes, mask, path).sum())(logits)
  assert np.all(np.isfinite(np.asarray(g))) and float(g[2, 1]) == 0.0


def path_log_probs(t, table):
  """Brute force: float[U, N] sum over levels 1..H of log sigmoid(logit of the item's ancestor)."""
  anc = t.item_paths[:, 1:]  # [N, H]
  return -np.log1p(np.exp(-table[:, anc].astype(np.float64))).sum(-1)


@pytest.mark.parametrize("beam_size,topk", [(4, 4), (8, 8), (2, 2)])
def test_plt_beam_search_equals_path_products(tree8, beam_size, topk):
  t = tree8
  num_users = 5
  rng = np.random.default_rng(beam_size)
  table = (2 * rng.normal(size=(num_users, t.parent.shape[0]))).astype(np.float32)
  items, scores = bs.beam_search(table_score, jnp.asarray(table), t, user_history(num_users),
                                 beam_size=beam_size, topk=topk, path_scores=True)
  items, scores = np.asarray(items), np.asarray(scores)
  logp = path_log_probs(t, table)
  # The returned score of every item is its path log-probability.
  np.testing.assert_allclose(scores, np.take_along_axis(logp, items, 1), rtol=1e-5, atol=1e-6)
  if bs.start_level(branching=2, height=t.height, beam_size=beam_size) == t.height:
    # The leaf level is scored whole (ancestors accumulated): exact top-K.
    np.testing.assert_array_equal(items, np.argsort(-logp, axis=1, kind="stable")[:, :topk])
  else:
    # Scanned levels: the same beam search over brute-force node path scores.
    for u in range(num_users):
      node_logp = np.zeros(t.parent.shape[0])
      for n in range(1, t.parent.shape[0]):
        node_logp[n] = node_logp[t.parent[n]] - np.log1p(np.exp(-float(table[u, n])))
      leaves = np_beam_candidates(t, node_logp, beam_size)[-1]
      top = sorted(leaves, key=lambda n: -node_logp[n])[:topk]
      want = [t.leaf_to_item[n - t.level_offsets[t.height]] for n in top]
      np.testing.assert_array_equal(items[u], want)


def test_plt_beam_search_differs_from_plain():
  t = tree_lib.from_leaf_order(np.arange(8), branching=2)  # item i on leaf node 7 + i
  table = np.zeros((1, 15), np.float32)
  table[0, [1, 3, 7]] = [-5.0, -5.0, 5.0]  # item 0: best own score, unlikely ancestors
  table[0, [2, 6, 14]] = [4.0, 4.0, 3.0]  # item 7: likely path
  hist = user_history(1)
  plain, _ = bs.beam_search(table_score, jnp.asarray(table), t, hist, beam_size=4, topk=2)
  path, scores = bs.beam_search(table_score, jnp.asarray(table), t, hist, beam_size=4, topk=2,
                                path_scores=True)
  logp = path_log_probs(t, table)[0]
  assert int(plain[0, 0]) == 0
  np.testing.assert_array_equal(np.asarray(path[0]), np.argsort(-logp)[:2])  # items 7, 6
  assert np.asarray(path[0]).tolist() == [7, 6]
  np.testing.assert_allclose(np.asarray(scores[0]), np.sort(logp)[::-1][:2], rtol=1e-5)


# ---- train step with DIN ------------------------------------------------------------------

@pytest.fixture(scope="module")
def din_setup():
  from flax import nnx
  t = tree_lib.build_random(np.random.default_rng(0), 12, branching=2)  # H = 4, 4 empty leaves
  windows = (1, 1, 2)
  model = din_lib.init_din(jax.random.key(0), num_nodes=t.num_nodes, embed_dim=8,
                           windows=windows, attention_hidden=(8,), mlp_hidden=(16,))
  graphdef, params = nnx.split(model)
  din_score = din_lib.make_score_fn(graphdef)

  def score_fn(params, tree, history, nodes, level=None):
    return din_score(params, history, nodes, jnp.asarray(tree.item_paths),
                     jnp.asarray(tree.level_offsets), level=level)

  rng = np.random.default_rng(1)
  bsz = 8
  hist = rng.integers(-1, 12, size=(bsz, sum(windows))).astype(np.int32)
  batch = train.Batch(jnp.asarray(hist), jnp.asarray(rng.integers(0, 12, bsz), jnp.int32),
                      jnp.ones((bsz, t.height), jnp.float32),
                      jnp.asarray(np.arange(bsz) < bsz - 1))  # last row is padding
  return t, score_fn, params, batch


@pytest.mark.parametrize("loss", ["otm", "plt"])
def test_train_step_decreases_loss(din_setup, loss):
  t, score_fn, params, batch = din_setup
  opt = train.make_optimizer(learning_rate=1e-2, decay_steps=1000)
  cfg = train.StepConfig(loss=loss, beam_size=3)
  step = jax.jit(train.make_train_step(score_fn, opt, cfg, branching=2, height=t.height))
  state = train.init_state(params, opt)
  index = sampling.level_index(t)
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch, t, index, jax.random.key(0))
    assert metrics["level_loss"].shape == (t.height,)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses


def test_unknown_loss_rejected():
  with pytest.raises(ValueError, match="unknown loss"):
    train.make_loss_fn(table_score, train.StepConfig(loss="nope"), branching=2, height=3)


def test_plt_path_score_fn_reranks_by_path_products(tree8):
  """The PLT forest discriminator scores a leaf by its path log-probability, the quantity
  the path-product beam search ranks by (not the leaf classifier's own logit)."""
  from tdr_jax import forest
  t = tree8
  num_users = 3
  table = (2 * np.random.default_rng(7).normal(size=(num_users, t.parent.shape[0]))
           ).astype(np.float32)
  logp = path_log_probs(t, table)  # [U, items]
  fn = plt.path_score_fn(table_score)
  leaves = jnp.asarray(np.broadcast_to(t.item_paths[:, t.height], (num_users, t.num_items)))
  got = fn(jnp.asarray(table), t, user_history(num_users), leaves, level=t.height)
  np.testing.assert_allclose(np.asarray(got), logp, rtol=1e-5, atol=1e-6)
  cand = jnp.asarray(np.broadcast_to(np.arange(t.num_items), (num_users, t.num_items)))
  items, _ = forest.rerank(fn, jnp.asarray(table), t, user_history(num_users), cand, topk=3)
  np.testing.assert_array_equal(np.asarray(items),
                                np.argsort(-logp, axis=1, kind="stable")[:, :3])
  with pytest.raises(ValueError, match="level"):
    fn(jnp.asarray(table), t, user_history(num_users), leaves)


# ---- OTM training beam = retrieval beam ---------------------------------------------------

def test_otm_training_beam_is_retrieval_beam_by_default(monkeypatch):
  """The OTM step trains with the retrieval --beam_size unless --otm_beam_size asks for
  another; train_round hands the resolved value to the step."""
  cfg = config_lib.make_config("smoke", method="otm", loss="otm")
  assert cfg.train.otm_beam_size is None
  assert tree_family.otm_training_beam(cfg) == cfg.eval.beam_size
  assert tree_family.otm_training_beam(cfg.replace(beam_size=60)) == 60
  assert tree_family.otm_training_beam(cfg.replace(otm_beam_size=7)) == 7
  seen = []

  class Stop(Exception):
    pass

  def fake_step(score_fn, optimizer, step_cfg, **kw):
    seen.append(step_cfg)
    raise Stop

  monkeypatch.setattr(train, "make_train_step", fake_step)
  t = tree_lib.build_random(np.random.default_rng(0), 8, branching=2)
  for c, want in ((cfg, cfg.eval.beam_size), (cfg.replace(otm_beam_size=7), 7)):
    with pytest.raises(Stop):
      tree_family.train_round(c, None, np.arange(64), t, None, None, "/nonexistent",
                              corpus_fp="x", mesh=None)
    assert seen[-1].loss == "otm" and seen[-1].beam_size == want
    # Trained levels: from the training beam's start level down, every level on request.
    assert seen[-1].first_level == bs.start_level(branching=2, height=t.height, beam_size=want)
  with pytest.raises(Stop):
    tree_family.train_round(cfg.replace(otm_all_levels=True), None, np.arange(64), t, None,
                            None, "/nonexistent", corpus_fp="x", mesh=None)
  assert seen[-1].first_level == 1
  assert seen[-1].warmup_loss == "beam"
  with pytest.raises(Stop):  # --otm_warmup_loss=jtm: JTM's loss and negatives in the warm-up
    tree_family.train_round(cfg.replace(otm_warmup_loss="jtm"), None, np.arange(64), t, None,
                            None, "/nonexistent", corpus_fp="x", mesh=None)
  assert seen[-1].warmup_loss == "bce"
  assert seen[-1].num_negatives == cfg.train.binary_negatives
