"""Forest candidate union and reranking."""

import jax.numpy as jnp
import numpy as np

from tdr_jax import forest
from tdr_jax import tree as tree_lib


def test_union_keeps_first_occurrence():
  a = np.array([[3, 1, -1], [0, 2, 5]])
  b = np.array([[1, 4, 3], [5, 6, 0]])
  got = forest.union_candidates([a, b])
  np.testing.assert_array_equal(got, [[3, 1, -1, -1, 4, -1], [0, 2, 5, -1, 6, -1]])


def test_rerank_by_leaf_scores():
  t = tree_lib.build_random(np.random.default_rng(0), 6, branching=2)

  def score(params, tree, history, nodes, level=None):
    assert level == tree.height
    return params[jnp.maximum(nodes, 0)]

  table = np.zeros(t.parent.shape[0], np.float32)
  item_scores = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2], np.float32)
  table[t.item_paths[:, t.height]] = item_scores
  cand = jnp.asarray([[0, 2, -1, 4, 3], [5, -1, -1, -1, 1]], jnp.int32)
  items, _ = forest.rerank(score, jnp.asarray(table), t, jnp.zeros((2, 1), jnp.int32), cand,
                           topk=3)
  np.testing.assert_array_equal(np.asarray(items), [[4, 2, 3], [1, 5, -1]])
