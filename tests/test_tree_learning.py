"""Tree learning (TDR sec. 6, JTM Alg. 2, TDM k-means) and category purity."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tdr_jax import experiment
from tdr_jax.methods import tree_family
from tdr_jax import tree as tree_lib
from tdr_jax import tree_learning as tl


# ---------------------------------------------------------------- helpers


def table_score_fn(params, tree, history, nodes, level=None):
  """Scorer reading a fixed table: the user id sits in the last history column."""
  del tree, level
  return params[history[:, -1][:, None], nodes]


def pairs_from_users(users_of_item):
  """(histories [P, 2], pair_item [P]) with one pair per (item, user)."""
  hist, items = [], []
  for i, users in enumerate(users_of_item):
    for u in users:
      hist.append([-1, u])
      items.append(i)
  return np.asarray(hist, np.int32).reshape(-1, 2), np.asarray(items, np.int32)


def log_norm(x, matching):
  x = np.asarray(x, np.float64)
  if matching == "softmax":
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))
  return -np.logaddexp(0.0, -x)


def reference_learn(table, users_of_item, tree, gap, matching="softmax"):
  """The documented rule, one node and one item at a time, in plain Python."""
  n, b, h = tree.num_items, tree.branching, tree.height
  caps = tl.balanced_capacities(n, branching=b)
  old_leaf = np.asarray(tree.item_to_leaf)
  pos = [0] * n
  level = 0
  while level < h:
    nxt = min(h, level + gap)
    c_num = b ** (nxt - level)
    first = (b**nxt - 1) // (b - 1)
    new = [None] * n
    for g in range(b**level):
      members = [i for i in range(n) if pos[i] == g]
      cap = [int(caps[nxt][g * c_num + c]) for c in range(c_num)]
      valid = [c for c in range(c_num) if cap[c] > 0]
      score = {}
      for i in members:
        if not users_of_item[i]:
          continue
        tot = np.zeros(len(valid))
        for u in users_of_item[i]:
          o = [table[u, first + g * c_num + c] for c in valid]
          tot += log_norm(np.float32(o), matching)
        score[i] = dict(zip(valid, tot))

      def margin(i):
        v = sorted(score[i].values(), reverse=True)
        return v[0] - v[1] if len(v) > 1 else np.inf

      for i in sorted(score, key=lambda i: (-margin(i), i)):
        open_ = [c for c in valid if cap[c] > 0]
        best = max(open_, key=lambda c: (score[i][c], -c))
        cap[best] -= 1
        new[i] = best
      rest = sorted((i for i in members if i not in score), key=lambda i: old_leaf[i])
      free = [c for c in range(c_num) for _ in range(cap[c])]
      for i, c in zip(rest, free):
        new[i] = c
    pos = [pos[i] * c_num + new[i] for i in range(n)]
    level = nxt
  return np.asarray(pos)


# ---------------------------------------------------------------- TDR sec. 6 / Fig. 2


def test_fig2_example_next_best_and_capacities():
  """8 items a..h, B=2, H=3, d=2: f's best level-2 node is full on its turn."""
  a, b_, c, d, e, f, g, h = range(8)
  tree = tree_lib.from_leaf_order(np.asarray([7, 3, 5, 0, 6, 2, 4, 1]), branching=2)
  table = np.zeros((8, tree.num_nodes), np.float32)  # user u targets item u
  # Level 2 = global nodes 3, 4, 5, 6.
  for item, node in [(a, 3), (b_, 3), (c, 4), (d, 4), (e, 5), (g, 6), (h, 6)]:
    table[item, node] = 5.0  # margin 5
  table[f, 3], table[f, 5] = 2.0, 1.0  # f: best node 3, next 5, margin 1 -> goes last
  # Leaves: global 7..14 = leaf index 0..7.
  table[a, 8] = 3.0  # a prefers leaf 1, b leaf 0
  table[b_, 7] = 3.0
  table[c, 10], table[d, 10] = 1.0, 4.0  # both want leaf 3; d (margin 4) first
  table[e, 11], table[f, 11] = 2.0, 3.0  # both want leaf 4; f (margin 3) first
  table[g, 14], table[h, 13] = 2.0, 2.0
  hist, items = pairs_from_users([[u] for u in range(8)])
  new = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), tree, hist, items, gap=2,
                          assignment="greedy")
  tree_lib.validate(new)
  np.testing.assert_array_equal(new.item_to_leaf, [1, 0, 2, 3, 5, 4, 7, 6])
  # f's ranking of the level-2 nodes is 3 > 5 > ...; it ended under its second choice.
  ranking = 3 + np.argsort(-table[f, 3:7], kind="stable")
  assert ranking[0] == 3 and new.item_paths[f, 2] == ranking[1] == 5
  # Every level-2 node holds its capacity (2 items) and every leaf one item.
  np.testing.assert_array_equal(np.bincount(new.item_paths[:, 2] - 3, minlength=4), [2] * 4)
  np.testing.assert_array_equal(np.sort(new.item_to_leaf), np.arange(8))
  # The plain-Python rule agrees.
  np.testing.assert_array_equal(
      reference_learn(table, [[u] for u in range(8)], tree, 2), new.item_to_leaf)


# ---------------------------------------------------------------- capacities, N != B**H


@pytest.mark.parametrize("branching", [2, 3])
@pytest.mark.parametrize("gap", [1, 2, 7])
@pytest.mark.parametrize("matching", ["softmax", "binary"])
def test_unbalanced_sizes_match_reference(branching, gap, matching):
  n = 11
  rng = np.random.default_rng([branching, gap])
  tree = tree_lib.build_random(rng, n, branching=branching)
  num_users = 30
  table = (3.0 * rng.standard_normal((num_users, tree.num_nodes))).astype(np.float32)
  # Items 4 and 9 have no pairs; the others 1-3 users each.
  users = [list(rng.choice(num_users, rng.integers(1, 4), replace=False)) for _ in range(n)]
  users[4], users[9] = [], []
  hist, items = pairs_from_users(users)
  new = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), tree, hist, items, gap=gap,
                          matching=matching, batch_size=8, assignment="greedy")
  tree_lib.validate(new)
  np.testing.assert_array_equal(new.item_to_leaf,
                                reference_learn(table, users, tree, gap, matching))
  # Every node holds exactly its balanced capacity.
  caps = tl.balanced_capacities(n, branching=branching)
  for j in range(new.height + 1):
    first = (branching**j - 1) // (branching - 1)
    got = np.bincount(new.item_paths[:, j] - first, minlength=branching**j)
    np.testing.assert_array_equal(got, caps[j])


def test_greedy_assign_chunk_invariant_and_serial():
  rng = np.random.default_rng(0)
  g_num, c_num = 5, 4
  cap = rng.integers(0, 6, (g_num, c_num))
  cap[:, 0] += 1
  rows_per = cap.sum(1) - rng.integers(0, 2, g_num)
  group = np.repeat(np.arange(g_num), rows_per)
  perm = rng.permutation(group.size)
  group = group[perm]
  scores = rng.standard_normal((group.size, c_num))
  scores[:, 1] += 2.0  # a popular slot that fills up early
  results = [tl.greedy_assign(scores, group, cap, chunk=k) for k in (1, 2, 3, 7, None, 1000)]
  for slot, rem in results[1:]:
    np.testing.assert_array_equal(slot, results[0][0])
    np.testing.assert_array_equal(rem, results[0][1])
  # One-by-one reference.
  masked = np.where(cap[group] > 0, scores, -np.inf)
  top2 = -np.sort(-masked, axis=1)[:, :2]
  margin = top2[:, 0] - top2[:, 1]
  rem = cap.copy()
  want = np.empty(group.size, int)
  for i in np.lexsort((np.arange(group.size), -margin, group)):
    s = np.where(rem[group[i]] > 0, scores[i], -np.inf)
    want[i] = int(np.argmax(s))
    rem[group[i], want[i]] -= 1
  np.testing.assert_array_equal(results[0][0], want)
  np.testing.assert_array_equal(results[0][1], rem)


# ---------------------------------------------------------------- planted permutation


def planted_table(target: tree_lib.Tree, users_per_item: int, rng, strength=4.0):
  """Users of item i score every ancestor of i's target leaf high, all else near 0."""
  n = target.num_items
  table = 0.1 * rng.standard_normal((n * users_per_item, target.num_nodes))
  users = []
  for i in range(n):
    us = list(range(i * users_per_item, (i + 1) * users_per_item))
    users.append(us)
    for u in us:
      table[u, target.item_paths[i]] += strength
  return table.astype(np.float32), users


@pytest.mark.parametrize("n,branching", [(16, 2), (27, 3), (11, 2)])
@pytest.mark.parametrize("matching", ["softmax", "binary"])
@pytest.mark.parametrize("assignment", ["greedy", "priced"])
def test_recovers_planted_permutation(n, branching, matching, assignment):
  rng = np.random.default_rng(n)
  target = tree_lib.build_random(rng, n, branching=branching)
  start = tree_lib.build_random(rng, n, branching=branching)
  assert not np.array_equal(start.item_to_leaf, target.item_to_leaf)
  table, users = planted_table(target, 2, rng)
  hist, items = pairs_from_users(users)
  for gap in (2, target.height):
    new = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), start, hist, items,
                            gap=gap, matching=matching, assignment=assignment)
    np.testing.assert_array_equal(new.item_to_leaf, target.item_to_leaf)


def test_path_levels_option_recovers_planted():
  rng = np.random.default_rng(5)
  target = tree_lib.build_random(rng, 16, branching=2)
  start = tree_lib.build_random(rng, 16, branching=2)
  table, users = planted_table(target, 1, rng)
  hist, items = pairs_from_users(users)
  for matching in ("softmax", "binary"):
    new = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), start, hist, items,
                            gap=3, matching=matching, path_levels=True)
    np.testing.assert_array_equal(new.item_to_leaf, target.item_to_leaf)


def test_binary_matching_differs_from_softmax():
  """Softmax is blind to a per-user shift of all scores; the binary likelihood is not."""
  tree = tree_lib.from_leaf_order(np.asarray([0, 1]), branching=2)  # leaves = nodes 1, 2
  table = np.zeros((3, 3), np.float32)
  table[0, 1:] = [5.0, 0.0]  # user 0 of item 0: node 1 by far
  table[1, 1:] = [-3.0, 0.0]  # user 1 of item 0: node 2, both scores low
  hist, items = pairs_from_users([[0, 1], [2]])
  soft = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), tree, hist, items, gap=1,
                           assignment="greedy")
  binary = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), tree, hist, items, gap=1,
                             matching="binary", assignment="greedy")
  # softmax: node 1 = -3.05 vs node 2 = -5.05; binary: node 1 = -3.05 vs node 2 = -1.39.
  np.testing.assert_array_equal(soft.item_to_leaf, [0, 1])
  np.testing.assert_array_equal(binary.item_to_leaf, [1, 0])


def test_din_scorer_end_to_end():
  """The real DIN scorer (smoke sizes) runs through every level step; result is valid."""
  cfg = experiment.make_config("smoke")
  rng = np.random.default_rng(0)
  n = 100
  tree = tree_lib.build_random(rng, n, branching=2)
  score_fn, params = tree_family.build_model(cfg, tree)
  targets = rng.integers(0, n - 10, 300)  # the last 10 items are never targets
  pair_item, pair_sample = tl.item_user_pairs(targets, n, max_users_per_item=3, seed=0)
  hist = rng.integers(0, n, (targets.size, cfg.data.history_len)).astype(np.int32)
  hist[::3, :2] = -1
  new, stats = tl.learn_tree_tdr(score_fn, params, tree, hist[pair_sample], pair_item,
                                 gap=3, batch_size=64, return_stats=True)
  tree_lib.validate(new)
  assert [(s["from"], s["to"]) for s in stats["steps"]] == [(0, 3), (3, 6), (6, 7)]
  again = tl.learn_tree_tdr(score_fn, params, tree, hist[pair_sample], pair_item, gap=3,
                            batch_size=32)
  np.testing.assert_array_equal(again.item_to_leaf, new.item_to_leaf)  # batch-size neutral


# ---------------------------------------------------------------- capacity prices


def popular_node_instance(rng, *, groups=3, slots=4, per_slot=3, offset=8.0):
  """Rows with a planted home slot (+2) under a large per-slot offset every row shares.

  Returns (scores [M, C], group [M], capacity [G, C], home [M])."""
  m_per_group = slots * per_slot
  group = np.repeat(np.arange(groups), m_per_group)
  home = np.tile(np.repeat(np.arange(slots), per_slot), groups)
  rng_perm = rng.permutation(group.size)
  group, home = group[rng_perm], home[rng_perm]
  shared = offset * rng.random((groups, slots))  # what every row of a group wants alike
  scores = shared[group] + 0.3 * rng.standard_normal((group.size, slots))
  scores[np.arange(group.size), home] += 2.0
  capacity = np.full((groups, slots), per_slot)
  return scores.astype(np.float32), group, capacity, home


def exact_assignment(scores, group, capacity):
  """Optimal capacity-constrained assignment by expanding slots (scipy)."""
  from scipy.optimize import linear_sum_assignment
  slot = np.full(len(group), -1)
  for g in range(capacity.shape[0]):
    rows = np.flatnonzero(group == g)
    cols = np.repeat(np.arange(capacity.shape[1]), capacity[g])
    r, c = linear_sum_assignment(-scores[rows][:, cols])
    slot[rows[r]] = cols[c]
  return slot


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_priced_assignment_removes_shared_popularity(seed):
  """Every row wants the same popular slot; prices cancel it and the priced greedy pass
  finds the optimal assignment (each row at home), where the plain greedy pass does not."""
  rng = np.random.default_rng(seed)
  scores, group, capacity, home = popular_node_instance(rng)
  exact = exact_assignment(scores, group, capacity)
  np.testing.assert_array_equal(exact, home)
  prices, iters = tl.capacity_prices(scores, group, capacity)  # converges (tol) at tau=1
  assert 0 < iters < 100 and (prices >= 0).all()
  priced, _ = tl.greedy_assign(scores - prices[group], group, capacity)
  np.testing.assert_array_equal(priced, home)
  plain, _ = tl.greedy_assign(scores, group, capacity)
  assert np.mean(plain == home) < 0.8
  obj = lambda slot: scores[np.arange(len(slot)), slot].sum()  # noqa: E731
  assert obj(plain) < obj(priced) - 1.0


def test_prices_zero_without_contention():
  """When the rows' favourite slots never exceed capacity, nothing gets a price."""
  scores = np.array([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0], [-5.0, 0.0, 1.0]], np.float32)
  group = np.zeros(3, int)
  capacity = np.array([[1, 1, 2]])
  prices, _ = tl.capacity_prices(scores, group, capacity, temperature=0.05)
  np.testing.assert_allclose(prices, 0.0, atol=1e-3)
  # A closed slot (capacity 0) is never chosen and carries no price.
  capacity0 = np.array([[2, 0, 2]])
  prices0, _ = tl.capacity_prices(scores, group, capacity0, temperature=0.05)
  assert prices0[0, 1] == 0.0
  slot, _ = tl.greedy_assign(np.where(capacity0[0] > 0, scores, -np.inf) - prices0[group],
                             group, capacity0)
  assert 1 not in slot


def test_priced_tree_learning_on_popular_nodes():
  """learn_tree_tdr end to end: users of every item also favour one popular path; the
  priced pass still recovers the planted tree."""
  rng = np.random.default_rng(3)
  target = tree_lib.build_random(rng, 16, branching=2)
  start = tree_lib.build_random(rng, 16, branching=2)
  table, users = planted_table(target, 2, rng, strength=2.0)
  table[:, target.item_paths[0]] += 3.0  # item 0's path is popular with every user
  hist, items = pairs_from_users(users)
  new = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), start, hist, items, gap=4,
                          assignment="priced")
  np.testing.assert_array_equal(new.item_to_leaf, target.item_to_leaf)


# ---------------------------------------------------------------- pairs, TDM, purity


def test_item_user_pairs_cap_and_seed():
  rng = np.random.default_rng(1)
  targets = rng.integers(0, 20, 500)
  items, samples = tl.item_user_pairs(targets, 25, max_users_per_item=4, seed=3)
  assert items.dtype == np.int32 and samples.dtype == np.int64
  np.testing.assert_array_equal(targets[samples], items)
  assert np.all(np.diff(items) >= 0)
  np.testing.assert_array_equal(np.bincount(items, minlength=25),
                                np.minimum(np.bincount(targets, minlength=25), 4))
  again = tl.item_user_pairs(targets, 25, max_users_per_item=4, seed=3)
  np.testing.assert_array_equal(again[1], samples)
  other = tl.item_user_pairs(targets, 25, max_users_per_item=4, seed=4)
  assert not np.array_equal(other[1], samples)
  all_items, all_samples = tl.item_user_pairs(targets, 25)
  assert all_samples.size == 500 and np.array_equal(np.sort(all_samples), np.arange(500))
  with pytest.raises(ValueError):
    tl.item_user_pairs(np.asarray([0, 30]), 25)


def test_learn_tree_tdm_separates_clusters():
  rng = np.random.default_rng(2)
  n = 16
  tree = tree_lib.build_random(rng, n, branching=2)
  cluster = np.arange(n) >= 8
  emb = rng.standard_normal((tree.num_nodes, 4)) * 0.1
  emb[tree.item_paths[:, tree.height], 0] += np.where(cluster, 5.0, -5.0)
  new = tl.learn_tree_tdm(np.random.default_rng(0), jnp.asarray(emb), tree)
  tree_lib.validate(new)
  top = new.item_paths[:, 1]
  assert len(set(top[~cluster])) == 1 and len(set(top[cluster])) == 1
  assert top[0] != top[8]


def test_category_purity():
  n = 16
  cat = np.arange(n) // 4  # 4 categories of 4 items
  assert tl.purity_level(4, branching=2, height=4) == 3  # 8 nodes > 4 categories
  sorted_tree = tree_lib.from_leaf_order(np.arange(n)[::-1], branching=2)
  assert tl.category_purity(sorted_tree, cat) == 1.0
  # Interleaved: every level-3 node (2 leaves) holds two different categories.
  mixed = tree_lib.from_leaf_order(np.arange(n).reshape(4, 4).T.reshape(-1), branching=2)
  assert tl.category_purity(mixed, cat) == 0.5
  assert tl.category_purity(mixed, cat, level=0) == 0.25
  assert tl.category_purity(mixed, cat, level=4) == 1.0
  # A mostly sorted tree with two items swapped across categories.
  order = np.arange(n)
  order[[0, 15]] = order[[15, 0]]
  swapped = tree_lib.from_leaf_order(order, branching=2)
  assert tl.category_purity(swapped, cat) == 14 / 16
  # Restricted to items, at level 2 (one category's 4 leaves per node): the two swapped
  # items are away from home, the rest at home.
  moved = np.zeros(n, bool)
  moved[[0, 15]] = True
  assert tl.category_purity(swapped, cat, level=2, items=moved) == 0.0
  assert tl.category_purity(swapped, cat, level=2, items=~moved) == 1.0
  assert tl.category_purity(swapped, cat, level=2) == 14 / 16
  assert np.isnan(tl.category_purity(swapped, cat, items=np.zeros(n, bool)))


def test_path_levels_sum_over_the_gap_by_hand():
  """JTM Algorithm 2 sums the binary log-likelihood over the levels of the gap: a leaf under a
  strongly preferred level-1 node wins over a slightly better leaf under a rejected one."""
  tree = tree_lib.from_leaf_order(np.arange(4), branching=2)  # leaves = nodes 3, 4, 5, 6
  table = np.full((1, 7), -10.0, np.float32)
  table[0, 1], table[0, 2] = 5.0, -5.0  # level 1: node 1 preferred
  table[0, 3], table[0, 5] = 0.0, 0.5  # leaves: node 5 slightly better than node 3
  hist, items = pairs_from_users([[0], [], [], []])
  last = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), tree, hist, items, gap=2,
                           matching="binary", assignment="greedy")
  summed = tl.learn_tree_tdr(table_score_fn, jnp.asarray(table), tree, hist, items, gap=2,
                             matching="binary", assignment="greedy", path_levels=True)
  # last level only: log sig(0) = -0.69 (node 3) < log sig(0.5) = -0.47 (node 5);
  # summed: -0.01 - 0.69 = -0.70 (node 3) > -5.01 - 0.47 = -5.48 (node 5).
  assert last.item_to_leaf[0] == 2 and summed.item_to_leaf[0] == 0


def test_jtm_learns_trees_with_the_per_level_sum():
  cfg = experiment.make_config("smoke")
  assert tree_family.tree_learning_options(cfg)["path_levels"] is False
  jtm = cfg.replace(**tree_family.METHODS["jtm"].settings)
  assert tree_family.tree_learning_options(jtm) == {
      "gap": cfg.tree.tree_gap, "matching": "binary", "path_levels": True,
      "assignment": cfg.tree.tree_assignment}
  assert tree_family.tree_learning_options(jtm.replace(tree_path_levels=False))[
      "path_levels"] is False
