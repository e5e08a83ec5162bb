"""Tree updates carry the scorer's node rows over to the new tree (issue [G])."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from tdr_jax import experiment
from tdr_jax.methods import tree_family
from tdr_jax import tree as tree_lib


def test_remap_node_rows_by_hand():
  # 4 items, B = 2, H = 2: nodes 0 (root), 1-2, leaves 3-6.
  old = tree_lib.from_leaf_order(np.array([0, 1, 2, 3]), branching=2)
  new = tree_lib.from_leaf_order(np.array([2, 0, 3, 1]), branching=2)
  rows = np.arange(7, dtype=np.float32)[:, None] * np.array([[1.0, 10.0]], np.float32)
  got = tree_lib.remap_node_rows(rows, old, new)
  # Leaves: new leaf k holds item order[k], whose old leaf is 3 + item.
  np.testing.assert_array_equal(got[3:, 0], [3 + 2, 3 + 0, 3 + 3, 3 + 1])
  # Node 1 holds items {2, 0}: old level-1 ancestors 2 and 1 -> mean 1.5; node 2 holds {3, 1}:
  # ancestors 2 and 1 -> 1.5. The root is the root.
  np.testing.assert_allclose(got[:3, 0], [0.0, 1.5, 1.5])
  np.testing.assert_allclose(got[:, 1], 10 * got[:, 0])
  # The identity update changes nothing.
  np.testing.assert_array_equal(tree_lib.remap_node_rows(rows, old, old), rows)
  with pytest.raises(ValueError, match="entries"):
    tree_lib.remap_node_rows(rows[:5], old, new)


def test_empty_nodes_keep_their_rows():
  old = tree_lib.from_leaf_order(np.array([0, 1, 2]), branching=2)  # leaf 3 empty
  new = tree_lib.from_item_to_leaf(np.array([3, 0, 1]), branching=2, num_items=3)
  rows = np.arange(7, dtype=np.float32)[:, None]
  got = tree_lib.remap_node_rows(rows, old, new)
  empty = np.flatnonzero(~np.asarray(new.node_valid))
  np.testing.assert_array_equal(got[empty], rows[empty])
  np.testing.assert_array_equal(got[np.asarray(new.item_paths)[:, 2], 0],
                                rows[np.asarray(old.item_paths)[:, 2], 0])


@pytest.mark.parametrize("hierarchical", [False, True])
def test_leaf_scores_survive_a_tree_update(hierarchical):
  """Brute-force scores of every (user, item) are unchanged by a tree update once the node
  rows are remapped (at the leaf level the hierarchical representation uses leaves too);
  without the remap they are not. Internal-node scores change: measured, not pinned."""
  n = 60
  cfg = experiment.make_config("smoke").replace(hierarchical=hierarchical)
  rng = np.random.default_rng(0)
  old = tree_lib.build_random(rng, n, branching=2)
  new = tree_lib.build_random(np.random.default_rng(1), n, branching=2)
  score_fn, params = tree_family.build_model(cfg, old)
  history = rng.integers(-1, n, size=(5, cfg.data.history_len)).astype(np.int32)

  def leaf_scores(p, t):
    leaves = np.broadcast_to(np.asarray(t.item_paths)[:, t.height], (len(history), n))
    return np.asarray(score_fn(p, t, jnp.asarray(history), jnp.asarray(leaves), level=t.height))

  before = leaf_scores(params, old)
  moved = tree_family.remap_params(params, old, new)
  np.testing.assert_allclose(leaf_scores(moved, new), before, rtol=1e-5, atol=1e-6)
  assert not np.allclose(leaf_scores(params, new), before, atol=1e-3)
  # Every parameter other than the node table is untouched.
  assert np.array_equal(np.asarray(moved["mlp_out"]["kernel"][...]),
                        np.asarray(params["mlp_out"]["kernel"][...]))
