"""Per-level beam diagnostics: at which level of the tree a beam search loses the test labels.

For every level j from the beam's start level s (`beam_search.start_level`) to the leaf level
H, the *beam recall at level j* is the share of the users' label items whose level-j ancestor
is in the beam kept at level j. It never rises with j (a node can only be a candidate when its
parent was kept), and at level H it is the share of labels among the final beam's leaves. Next
to it: the share of labels in the beam's top-K (what the results row scores) and in the exact
top-K of the same model by leaf score (`beam_search.brute_force`), for every cut-off K. The gap
between brute force and the beam, and the level where the per-level curve drops, locate the
loss.

Label sets are CSR on the host (`label_offsets int[U+1]`, `label_items int[T]`); a user's
repeated label counts once. On the device they are a dense `int32[U, T_max]` matrix padded
with -1; every -1 is masked explicitly before any gather (JAX clamps out-of-range indices
silently, so an unmasked -1 would read the last item's ancestors).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tdr_jax import beam_search as bs
from tdr_jax import label_tree
from tdr_jax import parallel
from tdr_jax import tree as tree_lib


def padded_labels(label_offsets: np.ndarray, label_items: np.ndarray) -> np.ndarray:
  """CSR label sets -> int32[U, T_max] of each user's distinct labels (sorted), -1 padded.

  T_max >= 1 (a matrix of -1 when no user has a label)."""
  offsets = np.asarray(label_offsets, np.int64)
  items = np.asarray(label_items, np.int64)
  rows = [np.unique(items[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
  width = max([len(r) for r in rows] + [1])
  out = np.full((len(rows), width), -1, np.int32)
  for u, r in enumerate(rows):
    out[u, :len(r)] = r
  return out


def kept_beams(trace: bs.BeamTrace, *, beam_size: int) -> jax.Array:
  """The beam kept at every level s..H of a search (`beam_search.beam_trace`).

  Recomputes the search's own `top_k` over each level's candidate scores (same inputs, same
  choice), so trace.beam is the last row.

  Returns:
    int32[H-s+1, U, beam_size]: row i holds the nodes of level s+i kept by the beam; -1 for a
    dead slot (score -inf: an invalid node, or fewer than beam_size valid candidates) and for
    the padding of level s when it has fewer than beam_size nodes.
  """
  num_users, width = trace.first_scores.shape
  k0 = min(beam_size, width)
  sc, idx = jax.lax.top_k(trace.first_scores, k0)
  first = jnp.where(jnp.isfinite(sc), jnp.take_along_axis(trace.first_nodes, idx, axis=1), -1)
  first = jnp.pad(first, ((0, 0), (0, beam_size - k0)), constant_values=-1)
  if trace.nodes.shape[0] == 0:
    return first[None]
  # [H-s, U, k*B] candidates -> [H-s, U, k] kept: top_k works on the last axis.
  sc, idx = jax.lax.top_k(trace.scores, beam_size)
  rest = jnp.where(jnp.isfinite(sc), jnp.take_along_axis(trace.nodes, idx, axis=2), -1)
  return jnp.concatenate([first[None], rest.astype(jnp.int32)], axis=0)


def level_hits(trace: bs.BeamTrace, tree: tree_lib.Tree, labels: jax.Array, *,
               beam_size: int) -> jax.Array:
  """Per user and level, how many labels have their level-j ancestor in the level-j beam.

  Args:
    trace: the search (`beam_search.beam_trace`) for U users, with `beam_size`.
    tree: its tree.
    labels: int32[U, T] distinct label items per user, -1 padded (padding never counts).
    beam_size: the search's k (static).
  Returns:
    int32[U, H-s+1]: column i counts level s+i.
  """
  kept = kept_beams(trace, beam_size=beam_size)  # [n, U, k], n = H-s+1
  n = kept.shape[0]
  s = tree.height + 1 - n
  valid = labels >= 0
  paths = jnp.asarray(tree.item_paths)[jnp.where(valid, labels, 0)]  # [U, T, H+1]
  anc = jnp.moveaxis(paths[:, :, s:], 2, 0)  # [n, U, T]: the labels' level-(s+i) ancestors
  # Membership by binary search in each (level, user) sorted beam: O(T log k) per row.
  srt = jnp.sort(kept, axis=2)
  find = jax.vmap(jax.vmap(lambda row, q: jnp.searchsorted(row, q)))
  pos = jnp.minimum(find(srt, anc), beam_size - 1)
  found = jnp.take_along_axis(srt, pos, axis=2) == anc
  hits = jnp.sum(found & valid[None], axis=2, dtype=jnp.int32)  # [n, U]
  return hits.T


def topk_hits(items: jax.Array, labels: jax.Array, ks: Sequence[int]) -> jax.Array:
  """int32[U, len(ks)]: labels among the first K of `items` (int32[U, K_max], -1 padded,
  distinct per row) for each K; `labels` int32[U, T] distinct, -1 padded."""
  valid = labels >= 0
  eq = (labels[:, :, None] == items[:, None, :]) & valid[:, :, None] & (items >= 0)[:, None, :]
  return jnp.stack([jnp.sum(jnp.any(eq[:, :, :k], axis=2), axis=1, dtype=jnp.int32)
                    for k in ks], axis=1)


@functools.partial(jax.jit, static_argnames=("score_fn", "brute_fn", "beam_size", "ks",
                                             "path_scores", "chunk_size"))
def _batch_hits(score_fn, brute_fn, params, tree, history, labels, *, beam_size: int,
                ks: tuple[int, ...], path_scores: bool, chunk_size: int):
  """One user batch: (level hits [U, n], beam top-K hits [U, |ks|], brute-force hits)."""
  kmax = max(ks)
  trace = bs.beam_trace(score_fn, params, tree, history, beam_size=beam_size,
                        path_scores=path_scores)
  beam_items, _ = bs._leaf_items(tree, trace.beam, trace.beam_scores, kmax)
  brute_items, _ = bs.brute_force(brute_fn, params, tree, history, topk=kmax,
                                  chunk_size=chunk_size)
  return (level_hits(trace, tree, labels, beam_size=beam_size),
          topk_hits(beam_items, labels, ks), topk_hits(brute_items, labels, ks))


@functools.lru_cache(maxsize=16)
def _brute_fn(score_fn, path_scores: bool):
  """The brute force's scorer (leaf path scores for PLT); cached so that repeated calls with
  one scorer reuse the compiled batch function (a new closure would compile again)."""
  return label_tree.path_score_fn(score_fn) if path_scores else score_fn


def _shares(hits: np.ndarray, num_labels: np.ndarray) -> tuple[list[float], list[float]]:
  """(pooled share of all label items, mean over users with labels of their share)."""
  hits = hits.astype(np.float64)
  total = max(int(num_labels.sum()), 1)
  has = num_labels > 0
  per_user = hits[has] / num_labels[has, None]
  pooled = (hits.sum(0) / total).tolist()
  mean = per_user.mean(0).tolist() if has.any() else [0.0] * hits.shape[1]
  return pooled, mean


def brute_force_chunk(*, num_items: int, batch_size: int, history_len: int,
                      attention_width: int, levels: int = 1,
                      max_elements: int = 1 << 25) -> int:
  """Items per brute-force chunk so that the DIN activations [batch, chunk, L, A] (times the
  `levels` nodes of a path for path scores) stay within `max_elements` floats."""
  per_item = batch_size * history_len * max(attention_width, 1) * max(levels, 1)
  return max(1, min(num_items, max_elements // per_item))


def level_recall(score_fn, params, tree: tree_lib.Tree, history: np.ndarray,
                 label_offsets: np.ndarray, label_items: np.ndarray, *, beam_size: int,
                 ks: Sequence[int], batch_size: int, mesh: Mesh,
                 path_scores: bool = False, chunk_size: int = 4096) -> dict:
  """Beam recall per level, beam and brute-force recall@K of one model on its tree, for all
  users in fixed-size batches over the mesh (`parallel.map_user_batches`).

  Args:
    score_fn, params, tree: the model and its tree (as in `beam_search.beam_search`).
    history: int32[U, L] the users' histories.
    label_offsets, label_items: CSR label sets of the U users (a repeated label counts once).
    beam_size: k; ks: cut-offs K (<= k).
    batch_size: users per batch; mesh: the data mesh.
    path_scores: PLT: the beam and the brute force rank by path log-probabilities.
    chunk_size: items the brute force scores at a time (its activations grow with
      batch x chunk; size it from the scorer, e.g. `brute_force_chunk`).
  Returns:
    A JSON-ready dict: `levels` [s..H]; `beam_recall_per_level` (share of all label items
    whose level-j ancestor the level-j beam kept) and `beam_recall_per_level_user_mean` (the
    same share per user, averaged, as the results rows average recall@K); for every K,
    `beam_recall@K` / `brute_force_recall@K` (shares of all label items in the beam's / the
    exact top-K) and their `_user_mean` forms (the beam's equals the row's recall@K);
    `label_items` (distinct (user, item) labels), `beam_size`, `start_level`, `height`,
    `path_scores`, `seconds` (wall time, compilation included).
  """
  t0 = time.perf_counter()
  ks = tuple(int(k) for k in ks)
  if max(ks) > beam_size:
    raise ValueError(f"K={max(ks)} exceeds the beam size {beam_size}")
  labels = padded_labels(label_offsets, label_items)
  num_labels = np.sum(labels >= 0, axis=1)
  brute_fn = _brute_fn(score_fn, bool(path_scores))
  params_dev, tree_dev = parallel.replicate((params, tree), mesh)
  lv, beam, brute = parallel.map_user_batches(
      lambda h, lab: _batch_hits(score_fn, brute_fn, params_dev, tree_dev, h, lab,
                                 beam_size=beam_size, ks=ks, path_scores=path_scores,
                                 chunk_size=int(chunk_size)),
      [np.asarray(history, np.int32), labels], batch_size=batch_size, mesh=mesh)
  s = bs.start_level(branching=tree.branching, height=tree.height, beam_size=beam_size)
  out = {"beam_size": int(beam_size), "start_level": int(s), "height": int(tree.height),
         "levels": list(range(s, tree.height + 1)), "label_items": int(num_labels.sum()),
         "path_scores": bool(path_scores)}
  out["beam_recall_per_level"], out["beam_recall_per_level_user_mean"] = _shares(
      np.asarray(lv), num_labels)
  for name, hits in (("beam", beam), ("brute_force", brute)):
    pooled, mean = _shares(np.asarray(hits), num_labels)
    for k, p, m in zip(ks, pooled, mean):
      out[f"{name}_recall@{k}"] = p
      out[f"{name}_recall_user_mean@{k}"] = m
  out["seconds"] = time.perf_counter() - t0
  return out
