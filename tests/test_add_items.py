"""New items without a rebuild: the pure tree pieces (tree.free_leaves, lca_level,
nearest_free_leaves, insert_items, grow_level, grow_node_rows, validate(balanced=False)) by
hand, and Retriever.add_items on a finished smoke run of TDR(T): a copy of an item is
retrieved next to it, a full tree grows by a level without changing what old items retrieve,
bad calls are refused and change nothing."""

import numpy as np
import pytest

from tdr_jax import experiment, serving
from tdr_jax import tree as tree_lib
from tdr_jax.errors import InputError

# ---- (a) the tree pieces, by hand --------------------------------------------------------------


def five_items():
  """B=2, N=5: H=3; balanced counts root 5 -> 3, 2 -> 2, 1, 1, 1 -> leaves 0, 1, 2, 4, 6 hold
  items 0..4 (from_leaf_order puts order[k] on the k-th occupied leaf); 3, 5, 7 are free."""
  t = tree_lib.from_leaf_order(np.arange(5), branching=2)
  assert t.item_to_leaf.tolist() == [0, 1, 2, 4, 6]
  return t


def test_free_leaves_and_lca_level():
  t = five_items()
  assert tree_lib.free_leaves(t).tolist() == [3, 5, 7]
  # Leaves 2 and 3 share their parent (level 2); 0 and 3 the level-1 node; 3 and 4 the root.
  got = tree_lib.lca_level([2, 0, 3, 5, 6], [3, 3, 4, 5, 7], branching=2, height=3)
  assert got.tolist() == [2, 1, 0, 3, 2]
  # B=3, H=2: leaves 0..8; 1 and 2 share node 1 (level 1), 2 and 3 only the root.
  assert tree_lib.lca_level([1, 2], [2, 3], branching=3, height=2).tolist() == [1, 0]


def test_nearest_free_leaves_takes_the_deepest_common_ancestor_in_order():
  t = five_items()
  # Item on leaf 4: free 3 (LCA root) and 5 (LCA its parent, level 2) -> 5.
  assert [x.tolist() for x in tree_lib.nearest_free_leaves(t, [4])] == [[5], [2]]
  # Leaf 0: only the successor 3 (LCA level 1) -> 3.
  assert [x.tolist() for x in tree_lib.nearest_free_leaves(t, [0])] == [[3], [1]]
  # Two items near leaf 2: the first takes the sibling 3; the second the next free leaf 5,
  # which shares only the root with 2 (7 does too but is farther by index).
  leaves, lca = tree_lib.nearest_free_leaves(t, [2, 2])
  assert leaves.tolist() == [3, 5] and lca.tolist() == [2, 0]
  with pytest.raises(ValueError, match="only 3 free leaves"):
    tree_lib.nearest_free_leaves(t, [0, 1, 2, 4])


def test_insert_items_keeps_old_items_and_validates_unbalanced():
  t = five_items()
  new = tree_lib.insert_items(t, [3, 7])
  assert new.num_items == 7 and new.height == 3
  assert new.item_to_leaf.tolist() == [0, 1, 2, 4, 6, 3, 7]
  assert np.array_equal(new.item_paths[:5], t.item_paths)
  assert new.item_paths[5].tolist() == [0, 1, 4, 10]  # leaf 3 = node 7 + 3
  assert new.node_valid[[10, 14]].all() and not t.node_valid[[10, 14]].any()  # the leaves
  tree_lib.validate(new, balanced=False)
  tree_lib.validate(new)  # level 1 holds 4 and 3 items, level 2 2, 2, 1, 2: still balanced
  unbalanced = tree_lib.insert_items(t, [3])  # level 1: 4 vs 2 items
  tree_lib.validate(unbalanced, balanced=False)
  with pytest.raises(ValueError, match="unbalanced"):
    tree_lib.validate(unbalanced)
  with pytest.raises(ValueError, match="already holds item 3"):
    tree_lib.insert_items(t, [4])
  with pytest.raises(ValueError, match="one leaf"):
    tree_lib.insert_items(t, [3, 3])
  # validate(balanced=False) still checks everything else.
  bad = tree_lib.insert_items(t, [3])
  object.__setattr__(bad, "node_valid", np.zeros_like(bad.node_valid))
  with pytest.raises(ValueError, match="node_valid"):
    tree_lib.validate(bad, balanced=False)


@pytest.mark.parametrize("b", [2, 3])
def test_grow_level_keeps_every_item_under_its_ancestors(b):
  n = b**2  # full tree, H = 2
  t = tree_lib.from_leaf_order(np.random.default_rng(0).permutation(n), branching=b)
  assert tree_lib.free_leaves(t).size == 0
  g, node_map = tree_lib.grow_level(t)
  assert g.height == 3 and g.num_items == n and g.num_leaves == b**3
  assert node_map.tolist() == list(range(t.num_nodes))
  # Same ancestors (same ids) at levels 0..2; the item's new leaf is its old leaf's first child.
  assert np.array_equal(g.item_paths[:, :3], node_map[t.item_paths])
  assert np.array_equal(g.item_paths[:, 3], t.item_paths[:, 2] * b + 1)
  assert np.array_equal(g.item_to_leaf, t.item_to_leaf * b)
  assert np.array_equal(g.node_valid[: t.num_nodes], t.node_valid)
  tree_lib.validate(g, balanced=False)
  with pytest.raises(ValueError, match="height 3 != ceil"):
    tree_lib.validate(g)  # taller than ceil(log_B N) until an item is added ...
  tree_lib.validate(tree_lib.insert_items(g, [1]))  # ... then a valid tree again
  assert tree_lib.free_leaves(g).tolist() == [x for x in range(b**3) if x % b]
  # Rows: old nodes keep theirs; a new leaf starts with its parent's (the old leaf's) row.
  rows = np.arange(t.num_nodes, dtype=np.float32)[:, None] * [1.0, -1.0]
  grown = tree_lib.grow_node_rows(rows, t, g)
  assert grown.shape == (g.num_nodes, 2)
  assert np.array_equal(grown[: t.num_nodes], rows)
  new_ids = np.arange(t.num_nodes, g.num_nodes)
  assert np.array_equal(grown[new_ids], rows[(new_ids - 1) // b])
  # Two levels at once: level-4 nodes get their level-2 ancestor's row.
  g2, _ = tree_lib.grow_level(g)
  twice = tree_lib.grow_node_rows(rows, t, g2)
  lvl4 = np.arange(g.num_nodes, g2.num_nodes)
  assert np.array_equal(twice[lvl4], rows[tree_lib.ancestor(lvl4, 2, branching=b)])
  assert np.array_equal(g2.item_paths[:, :3], t.item_paths)


# ---- Retriever.add_items on a smoke run --------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A finished smoke run of TDR(T), one round (the smallest tree-method run): 397 items on a
  B=2 tree of height 9 (512 leaves)."""
  data_dir = str(tmp_path_factory.mktemp("data"))
  wd = str(tmp_path_factory.mktemp("run"))
  cfg = experiment.make_config("smoke", data_dir=data_dir, method="tdr_t",
                               max_train_samples=320, tree_learning="none", tree_rounds=1,
                               forest=False, beam_diagnostics=False)
  experiment.train_and_evaluate(cfg, wd)
  return wd


def histories(r, users=100):
  return [[str(x) for x in r.vocab[i:i + 6]] for i in range(0, 3 * users, 3)]


def test_copy_of_an_item_is_retrieved_next_to_it(workdir):
  """A copy (same leaf row) of an item whose sibling leaf is free lands on that sibling
  (LCA = its parent). Then every node above the leaves, its row and its validity are
  unchanged, so the beams down to level H-1 are the same; at the leaves the copy is one more
  candidate under the same parent with the same score as the original (the scorer sees the
  same node row and the same history rows). So for a user whose top-k held the original,
  the top-(k+1) holds the copy right next to the original, and the other items keep their
  order (k + 1 <= beam, so the beam keeps both)."""
  r = serving.Retriever.load(workdir)
  t = r.tree
  k = 10
  assert k + 1 <= r.cfg.eval.beam_size
  hist = histories(r)
  before, _ = r.retrieve(hist, k=k)
  counts = {}
  for row in before:
    for x in row:
      counts[x] = counts.get(x, 0) + 1
  l2i = np.asarray(t.leaf_to_item)
  sibling_free = [x for x in sorted(counts, key=lambda x: -counts[x])
                  if l2i[t.item_to_leaf[r.index[x]] ^ 1] < 0]  # B = 2: sibling = leaf ^ 1
  orig = sibling_free[0]
  out = r.add_items(["copy"], vectors=r.item_vectors([orig]))
  leaf = int(t.item_to_leaf[r.index[orig]])
  assert out["items"] == [{"id": "copy", "leaf": leaf ^ 1, "nearest": orig,
                           "lca_level": t.height - 1}]
  assert out["grown_levels"] == 0 and r.tree.num_items == t.num_items + 1
  tree_lib.validate(r.tree, balanced=False)
  assert np.array_equal(r.item_vectors(["copy"]), r.item_vectors([orig]))
  after, scores = r.retrieve(hist, k=k + 1)
  users = 0
  for b, a, s in zip(before, after, scores):
    if orig in b:
      users += 1
      assert "copy" in a and abs(a.index("copy") - a.index(orig)) == 1, (b, a)
      assert np.isclose(s[a.index("copy")], s[a.index(orig)], rtol=1e-5, atol=1e-6)
      assert [x for x in a if x != "copy"][:k] == b
    else:
      assert [x for x in a if x != "copy"][:k] == b  # the copy only shifts items down
  assert users == counts[orig] > 0
  # The new id is known now: a history naming it is not "unknown".
  r.retrieve([["copy", orig]], k=k)
  assert r.last_stats["unknown_ids"] == 0
  # A second call without growth reuses the compiled search (only values changed).
  compiles = r.compiles
  x, y = [v for v in r.vocab if v not in (orig, "copy")][:2]
  # Every occurrence counts: x twice, y once -> mean (2 row_x + row_y) / 3; its nearest item
  # (by leaf row) is the one placed next to, and its leaf row is copied from that item.
  rows = r.item_vectors().astype(np.float64)
  mean = (2 * rows[r.index[x]] + rows[r.index[y]]) / 3
  want = str(r.vocab[np.argmin(((rows - mean) ** 2).sum(axis=1))])
  out = r.add_items(["from_history"], histories=[[x, "from_history", "unknown?", y],
                                                 [orig], ["from_history", x]])
  assert out["items"][0]["nearest"] == want
  assert np.array_equal(r.item_vectors(["from_history"]), r.item_vectors([want]))
  r.retrieve(hist, k=k + 1)
  assert r.compiles == compiles
  tree_lib.validate(r.tree, balanced=False)


def test_full_tree_grows_and_old_items_retrieve_the_same(workdir):
  """Fill the free leaves, then add one more item: the tree grows by a level (every item
  moves to the first child of its old leaf, whose row it copies; rows and validity of
  levels 0..H unchanged), so the beams down to the old leaf level are the same, and each
  old item's new leaf scores as its old leaf did. The new item sits under its nearest
  item's old leaf node; it can only enter the final candidates, so the old items keep their
  order (the top-k with the new item removed is a prefix of the old top-k)."""
  r = serving.Retriever.load(workdir)
  t = r.tree
  free = t.num_leaves - t.num_items
  rows = r.item_vectors()
  rng = np.random.default_rng(0)
  fill = rows[rng.integers(0, len(rows), free)] + rng.normal(0, 0.01, (free, rows.shape[1]))
  r.add_items([f"fill{i}" for i in range(free)], vectors=fill)
  assert tree_lib.free_leaves(r.tree).size == 0 and r.tree.height == t.height
  hist = histories(r)
  k = 10
  before, s_before = r.retrieve(hist, k=k)
  near = before[0][0]
  out = r.add_items(["grown"], vectors=r.item_vectors([near]) + 0.05)
  g = r.tree
  assert out["grown_levels"] == 1 and g.height == t.height + 1
  assert out["items"][0]["lca_level"] == t.height  # under its nearest item's old leaf node
  tree_lib.validate(g, balanced=False)
  assert g.num_items == t.num_leaves + 1
  after, s_after = r.retrieve(hist, k=k)
  for b, a, sb, sa in zip(before, after, s_before, s_after):
    kept = [x for x in a if x != "grown"]
    assert kept == b[:len(kept)], (b, a)
    kept_scores = [s for x, s in zip(a, sa) if x != "grown"]
    np.testing.assert_allclose(kept_scores, sb[:len(kept)], rtol=1e-5, atol=1e-6)
  assert any("grown" in a for a in after)


def test_refusals_change_nothing(workdir):
  r = serving.Retriever.load(workdir)
  n, tree = len(r.vocab), r.tree
  existing = str(r.vocab[3])
  cases = [
      (dict(raw_ids=[existing, "new"], vectors=np.zeros((2, 8))), "already in the vocabulary"),
      (dict(raw_ids=["a", "a"], vectors=np.zeros((2, 8))), "repeated"),
      (dict(raw_ids=["a", "b"], histories=[["a", existing], ["b", "zz"]]),
       "neither a vector nor a known co-occurring item.*'b'"),
      (dict(raw_ids=["a"]), "neither a vector"),
      (dict(raw_ids=["a"], vectors=np.zeros((1, 8)), histories=[["a", existing]]), "not both"),
      (dict(raw_ids=["a"], vectors=np.zeros((1, 3))), r"vectors must be float\[1, "),
      (dict(raw_ids=["a"], vectors=np.full((1, r.item_vectors().shape[1]), np.nan)), "NaN"),
      (dict(raw_ids=[]), "non-empty"),
      (dict(raw_ids="abc", vectors=np.zeros((3, 8))), "non-empty list"),
  ]
  for kwargs, msg in cases:
    ids = kwargs.pop("raw_ids")
    with pytest.raises(InputError, match=msg):
      r.add_items(ids, **kwargs)
  assert len(r.vocab) == n and r.tree is tree and "a" not in r.index
  din = serving.Retriever(workdir=workdir, method="din", cfg=r.cfg, vocab=r.vocab,
                          model=r._model, use_forest=False)
  with pytest.raises(InputError, match="tree methods only"):
    din.add_items(["a"], vectors=np.zeros((1, 8)))


def test_growth_refused_under_path_scores(workdir):
  """PLT ranks by path scores (a sum over the path): growth would add the copied leaf row's
  term to every item's score, so it is refused; filling free leaves is fine."""
  r = serving.Retriever.load(workdir)
  r._model.info["path_scores"] = True  # as a plt run loads
  t = r.tree
  free = t.num_leaves - t.num_items
  rows = r.item_vectors()
  r.add_items([f"fill{i}" for i in range(free)], vectors=rows[:free] + 0.01)
  full, n = r.tree, len(r.vocab)
  with pytest.raises(InputError, match=r"path scores.*retrain") as e:
    r.add_items(["one_more"], vectors=rows[:1])
  assert "\n" not in str(e.value)
  assert r.tree is full and len(r.vocab) == n and full.height == t.height
