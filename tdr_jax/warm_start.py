"""Warm-start item vectors: a cheap item-embedding model fitted before the tree model.

Without good categories a tree model starts from a random tree and random node embeddings,
and one CPU epoch is not enough to find either. Two item-embedding models:

* `svd` (default): a truncated SVD of the user-item matrix of the run's training interactions
  (binary, each item's column divided by the square root of its user count), item vector =
  right singular vector x singular value. Items bought by the same users get near vectors;
  a second on the default world, no training loop.
* `two_tower`: the YouTubeDNN of `tdr_jax.baselines.youtube_dnn` (mean-pooled history, sampled
  softmax over shared uniform negatives), its output item table after a few epochs.

Measured on world v2 (BUILD_NOTES): balanced k-means over the SVD vectors puts 36% of the
items in a node of their true category (the category tree of the 50%-noisy published
categories: 48%; k-means over 3-epoch two-tower vectors: 20%) and 31% in a node of their
hidden cluster (category tree: 25%).

The vectors give

* the initial tree (`--initial_tree=kmeans`: balanced k-means over the vectors, TDM-style), and
* the initial node embeddings of the scorer (`node_rows`): a leaf's row is its item's vector
  (projected to the scorer's width when the widths differ), an internal node's row the mean
  of its items' vectors, rescaled to the RMS of the scorer's own initial table.

Both are fitted on the run's training samples (the same interactions every method of the run
sees); the two-tower model is checkpointed under the workdir and restored on resume, the SVD
is recomputed (deterministic).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from tdr_jax import tree as tree_lib
from tdr_jax.baselines import itemcf, youtube_dnn
from tdr_jax.data.preprocess import UNKNOWN_CATEGORY, train_batch, training_samples

__all__ = ["WarmStartConfig", "item_vectors", "node_rows", "informative_categories"]


MODELS = ("svd", "two_tower")


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  model: str = "svd"
  epochs: float = 3.0  # two_tower only
  embed_dim: int = 24
  num_negatives: int = 1000  # two_tower only
  learning_rate: float = 3e-3  # two_tower only


def svd_vectors(ds, samples: np.ndarray, dim: int) -> np.ndarray:
  """float32[N, dim]: truncated SVD of the column-normalised binary user-item matrix of the
  given training samples' targets (items without any get the zero vector)."""
  x = itemcf.user_item_matrix(ds, samples=samples).astype(np.float64)
  x = x[np.diff(x.indptr) > 0]  # users with training interactions
  deg = np.asarray(x.sum(axis=0)).ravel()
  x = x @ sp.diags(1.0 / np.sqrt(np.maximum(deg, 1.0)))
  k = min(dim, min(x.shape) - 1)
  if k < 1:
    return np.zeros((ds.num_items, dim), np.float32)
  _, sing, vt = sla.svds(x, k=k, random_state=0)
  order = np.argsort(-sing)
  out = np.zeros((ds.num_items, dim), np.float32)
  out[:, :k] = (vt[order].T * sing[order]).astype(np.float32)
  return out


def item_vectors(ds, wcfg: WarmStartConfig, *, seed: int, batch_size: int, history_len: int,
                 max_train_samples: int, workdir: str | None) -> tuple[np.ndarray, dict]:
  """Fits (or restores) the warm-start model; returns (float32[N, D] item vectors, info)."""
  t0 = time.perf_counter()
  if wcfg.model == "svd":
    samples = training_samples(ds, max_train_samples=max_train_samples, seed=seed)
    vectors = svd_vectors(ds, samples, wcfg.embed_dim)
    seconds = time.perf_counter() - t0
    return vectors, {"model": "svd of the user-item matrix of the training samples",
                     "embed_dim": wcfg.embed_dim, "train_seconds": seconds, "seconds": seconds,
                     "steps_run": 0}
  model = youtube_dnn.fit(ds, seed=seed, epochs=wcfg.epochs, batch_size=batch_size,
                          history_len=history_len, max_train_samples=max_train_samples,
                          learning_rate=wcfg.learning_rate, embed_dim=wcfg.embed_dim,
                          num_negatives=wcfg.num_negatives,
                          workdir=os.path.join(workdir, "warm_start") if workdir else None)
  vectors = np.asarray(model.module().item_vectors(), np.float32)
  info = {"model": "two-tower (YouTubeDNN), output item table", "epochs": wcfg.epochs,
          "embed_dim": wcfg.embed_dim, "steps": model.info["steps"],
          "steps_run": model.info["steps_run"], "train_seconds": float(model.info["seconds"]),
          "seconds": time.perf_counter() - t0}
  return vectors, info


def node_rows(vectors: np.ndarray, tree: tree_lib.Tree, *, width: int, rms: float,
              seed: int = 0) -> np.ndarray:
  """float32[num_nodes, width]: every node's initial embedding from item vectors.

  Args:
    vectors: float[N, D] item vectors.
    tree: the tree the rows are indexed by.
    width: the scorer's embedding width; vectors are projected by a seeded random orthonormal
      map when D != width.
    rms: target root-mean-square of the rows of valid nodes (the scorer's own init scale).
    seed: seed of the projection.
  Returns:
    Rows of valid nodes: a leaf's is its item's vector, an internal node's the mean of its
    items' vectors; rows of empty nodes are 0.
  """
  v = np.asarray(vectors, np.float64)
  n, d = v.shape
  if d != width:
    g = np.random.default_rng([seed, 23]).normal(size=(max(d, width), max(d, width)))
    q, _ = np.linalg.qr(g)
    v = v @ q[:d, :width]
  paths = np.asarray(tree.item_paths)
  rows = np.zeros((tree.num_nodes, width))
  counts = np.zeros(tree.num_nodes)
  for j in range(tree.height + 1):
    np.add.at(rows, paths[:, j], v)
    counts += np.bincount(paths[:, j], minlength=tree.num_nodes)
  valid = counts > 0
  rows[valid] /= counts[valid, None]
  cur = np.sqrt(np.mean(rows[valid] ** 2)) if valid.any() else 0.0
  if cur > 0:
    rows *= rms / cur
  return rows.astype(np.float32)


def informative_categories(ds, samples: np.ndarray, *, min_coverage: float = 0.9,
                           min_lift: float = 2.0, history_len: int = 20) -> tuple[bool, dict]:
  """Do the published categories tell where a user goes next?

  True when at least `min_coverage` of the items carry a category (not the '<unknown>' group
  of items without one, see `preprocess`), there are at least two, and the
  share of training targets whose category appears in the last `history_len` items (targets
  that repeat a history item left out) is at least `min_lift` times what the same category
  sizes would give at random (categories shuffled over items). Returns (decision, figures).
  """
  cat = np.asarray(ds.item_category)
  known = np.asarray(ds.category_names)[cat] != UNKNOWN_CATEGORY
  num_cat = len(np.unique(cat[known]))
  info = {"categories": int(num_cat), "coverage": float(known.mean()) if len(cat) else 0.0}
  if num_cat <= 1 or info["coverage"] < min_coverage:
    info["reason"] = (f"{num_cat} categories on {info['coverage']:.0%} of the items "
                      f"(need >= 2 on >= {min_coverage:.0%})")
    return False, info
  rng = np.random.default_rng(0)
  pick = samples if len(samples) <= 20000 else rng.choice(samples, 20000, replace=False)
  hist, target = train_batch(ds, np.sort(pick), history_len)

  # Repeats (the target itself in the history) share a category under any labelling: left out.
  keep = ~np.any(hist == target[:, None], axis=1)
  hist, target = hist[keep], target[keep]

  def share(c):
    hc = np.where(hist >= 0, c[np.maximum(hist, 0)], -1)
    return float(np.mean(np.any(hc == c[target][:, None], axis=1)))

  observed = share(cat)
  shuffled = share(rng.permutation(cat))
  lift = observed / max(shuffled, 1e-9)
  info.update({"same_category_share": observed, "shuffled_share": shuffled, "lift": lift})
  ok = lift >= min_lift
  info["reason"] = (f"the next item's category is in the recent history {observed:.1%} of the "
                    f"time vs {shuffled:.1%} with shuffled categories (lift {lift:.2f}, "
                    f"{'>=' if ok else '<'} {min_lift})")
  return ok, info
