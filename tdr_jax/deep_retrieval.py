"""Deep Retrieval (Gao et al.): EM training of the structure network and the item paths,
path beam search, softmax reranking, checkpoints and `run_dr`.

Training (EM)
-------------
Paths start random (`init_paths="random"`: J distinct paths per item, seeded) or from
hierarchical k-means codes of warm-start item vectors (`"kmeans"`, `kmeans_paths`). The run
is one `training.fit` cut into em_rounds + 1 phases (E-steps) of `epochs_per_estep` epochs
each, the first optionally longer (`first_estep_epochs`: the network should predict the
initial paths well before the first M-step reads its scores):

* E-step (a phase): `epochs_per_estep` epochs of Adam on the batches of
  `data.batches.batch_for_step` (the same data stream as the other methods, continued across
  E-steps; one optimizer and one learning-rate schedule for the whole run), with the paths
  fixed. Loss per sample: -log sum_j p(pi_j(y) | x) (multi-path structure objective) plus,
  with the reranker, `rerank_weight` times a sampled softmax over items (uniform negatives
  shared by the batch, logQ correction), i.e. Q = Q_pen + Q_softmax; the path-size penalty
  does not depend on the network, so it only enters the M-step. With `rerank_esteps = n` the
  reranker trains in the first n E-steps only and is then frozen (its loss term and updates
  are zeroed), the paper's schedule (sec. 5: two epochs of both, two of the structure network
  alone, against the softmax model overfitting).
* M-step (the hook between phases): every training instance (x, v) is beam-searched with beam
  S (`top_paths`); its S paths and probabilities p(c | x) are accumulated into s[v, c]
  (`score_mode="sum"`: exact sums, then the S best paths per item are kept; `"streaming"`: the
  paper's remark, a top-S list per item updated instance by instance with decay eta and the
  min_score rule). With `score_current_paths` (default, an addition to the paper) each
  instance also contributes the exact p(c | x) of its item's J current paths, so staying put
  is valued by its true score rather than 0 when the beam misses those paths. Then
  `cd_iterations` sweeps of coordinate descent (paper's Algorithm 2) over the items assign J
  distinct paths per item greedily by incremental gain
  N_v [log(partial + s[v, c]) - log(partial)] - alpha [f(|c| + 1) - f(|c|)], f(x) = x^4 / 4.

There are `em_rounds` M-steps and `em_rounds + 1` E-steps (the last E-step fits the network
to the final paths); `em_rounds=0` trains on random paths only.

M-step cost: instance scoring is one forward pass with a beam of S over the n training
instances (O(n D S K) layer evaluations, data-parallel over the mesh). Aggregation ("sum")
sorts the n (S + J) (item, path) pairs, O(n S log(n S)); "streaming" is a `lax.scan` over the
instances, O(n S^2). Coordinate descent is a jitted `lax.scan` over the N items per sweep,
O(T N J (S + J)) plus a size table of K^D ints; it is exact sequential Algorithm 2 (each item
sees the sizes left by the items before it). Measured on a 2-core CPU, S = 10, J = 3: one sweep
takes ~0.1 s for 10^5 items (K^D = 125k) and ~1.5 s for 10^6 items (K^D = 10^6); "sum"
aggregation of 10^6 instances ~7 s, of 10^7 instances ~90 s (the sort dominates).

Inference
---------
Beam search with beam B over paths by path log-probability
(`models.structure_net.beam_search_paths`), the items of the B paths (CSR index path -> items,
gathered to a static [B, max path size] block with -1 padding and masks, duplicates removed),
ordered by the reranker's logits (or, without a reranker, by the item's likelihood under the
structure objective, log sum_j p(pi_j(v) | x) over the beam's paths that hold it, ties to the
lower item id); top K. Users with fewer than K candidates get -1 in the remaining
slots. User batches are split over the devices of the mesh (`parallel.map_user_batches`).

Checkpoints
-----------
With a workdir, `<workdir>/checkpoints` (`training.Checkpointer`) holds the train state
(network + reranker + Adam) and the carry of the phases {item paths int32[N, J, D], M-steps
done} after every `checkpoint_every` steps, at the end of every E-step and after every M-step.
A rerun resumes mid-E-step or between E- and M-step and ends with the same results; a
checkpoint of other settings or another corpus is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from tdr_jax import losses, parallel, train, training
from tdr_jax.data import batches as batches_lib
from tdr_jax.data.preprocess import corpus_fingerprint, train_batch
from tdr_jax.errors import InputError
from tdr_jax.metrics import repeated_in_row, retrieval_metrics
from tdr_jax.models import structure_net
from tdr_jax.training import SimulatedCrash

__all__ = ["DRConfig", "PRESETS", "INIT_PATHS", "dr_config", "random_paths", "kmeans_paths",
           "initial_paths", "expected_nonempty_paths", "aggregate_path_scores",
           "streaming_path_scores", "candidate_lists", "coordinate_descent",
           "penalized_objective", "path_statistics", "score_instances", "m_step", "path_index",
           "retrieve", "fit", "run_dr", "DRModel", "SimulatedCrash"]

_TINY = 1e-30  # floor inside log() of the M-step: a zero score is "very unlikely", not -inf
_SCORE_CHUNK = 64  # M-step batches of training instances built on the host at a time
INIT_PATHS = ("random", "kmeans")


@dataclasses.dataclass(frozen=True)
class DRConfig:
  """Settings of a DR run (data-stream settings -- seed, batch size, history length, sample
  subset -- are arguments of `run_dr`, shared with the other methods)."""
  width: int = 30  # K nodes per layer
  depth: int = 3  # D layers
  beam_size: int = 50  # B paths kept by the inference beam search
  num_paths: int = 3  # J paths per item
  alpha: float = 0.5  # path-size penalty factor, f(x) = x^4 / 4
  top_paths: int = 10  # S: paths kept per training instance and per item in the M-step
  em_rounds: int = 3  # M-steps; there are em_rounds + 1 E-steps
  epochs_per_estep: float = 1.0
  first_estep_epochs: float | None = None  # epochs of the first E-step (None: epochs_per_estep)
  rerank_esteps: int | None = None  # the reranker trains in the first n E-steps only, then is
  # frozen (the paper's schedule: 2 joint epochs, then 2 of the structure network alone);
  # None: in every E-step
  embed_dim: int = 32  # item embeddings of the history
  user_dim: int = 64  # user embedding (GRU state / pooled projection)
  path_dim: int = 16  # path embedding per layer
  hidden: tuple[int, ...] = (128,)  # hidden widths of each layer's MLP
  user_encoder: str = "gru"  # "gru" or "mean"
  prefix_bias: bool = False  # a learned logit bias per (path prefix, code) in every layer
  # Initial prefix bias: "zeros", or "prior" = log p(c_d | c_<d) of the training targets'
  # initial paths (each target counts 1/J on each of its J paths, add-`prior_smoothing`), so
  # the network starts as the user-independent path popularity and learns users' deviations.
  prefix_bias_init: str = "zeros"
  prior_smoothing: float = 0.5
  freeze_prefix_bias: bool = False  # the prefix bias keeps its initial value (Adam's per-entry
  # steps on its sparsely hit rows otherwise turn the prior into noise, BUILD_NOTES, DR)
  reranker: bool = True
  rerank_dim: int = 32
  rerank_negatives: int = 512
  rerank_weight: float = 1.0
  learning_rate: float = 1e-3
  decay_rate: float = 0.9  # learning rate multiplied by this once per epoch
  score_mode: str = "sum"  # M-step scores s[v, c]: "sum" or "streaming"
  score_current_paths: bool = True  # s[v, c] also sums the exact p(c | x) of v's current paths
  streaming_decay: float = 0.999  # eta of the streaming estimate
  cd_iterations: int = 3  # coordinate-descent sweeps per M-step
  mstep_batch_size: int = 1024  # instances per beam-search call of the M-step
  eval_batch_size: int = 256
  checkpoint_every: int = 500
  log_every: int = 50
  init_paths: str = "random"  # initial paths: "random" or "kmeans" (of warm-start vectors)
  init_kmeans_iters: int = 10  # Lloyd iterations per node of the "kmeans" initial paths

  def __post_init__(self):
    if self.width < 2 or self.depth < 1:
      raise InputError(f"need width K >= 2 and depth D >= 1, got K={self.width}, D={self.depth}")
    paths = self.width ** self.depth
    if paths >= 2 ** 31:
      raise InputError(f"K^D = {paths} paths do not fit int32 path ids; lower K or D")
    if self.num_paths < 1 or self.num_paths > paths:
      raise InputError(f"num_paths J={self.num_paths} must lie in [1, K^D={paths}]: every item "
                       "needs J distinct paths")
    if not 1 <= self.beam_size <= paths:
      raise InputError(f"beam_size B={self.beam_size} must lie in [1, K^D={paths}]")
    if not 1 <= self.top_paths <= paths:
      raise InputError(f"top_paths S={self.top_paths} must lie in [1, K^D={paths}]")
    if self.alpha < 0:
      raise InputError(f"alpha must be >= 0, got {self.alpha}")
    if self.em_rounds < 0 or self.cd_iterations < 1 or self.epochs_per_estep <= 0:
      raise InputError("need em_rounds >= 0, cd_iterations >= 1 and epochs_per_estep > 0")
    if self.first_estep_epochs is not None and self.first_estep_epochs <= 0:
      raise InputError(f"first_estep_epochs must be > 0, got {self.first_estep_epochs}")
    if self.rerank_esteps is not None and self.rerank_esteps < 1:
      raise InputError(f"rerank_esteps must be >= 1, got {self.rerank_esteps}")
    if self.user_encoder not in structure_net.USER_ENCODERS:
      raise InputError(f"user_encoder={self.user_encoder!r}: choose {structure_net.USER_ENCODERS}")
    if self.init_paths not in INIT_PATHS:
      raise InputError(f"init_paths={self.init_paths!r}: choose {INIT_PATHS}")
    if self.prefix_bias and structure_net.num_prefixes(self.width, self.depth) * self.width > 10**8:
      raise InputError(f"prefix_bias needs a table of (K^0 + ... + K^(D-1)) x K = "
                       f"{structure_net.num_prefixes(self.width, self.depth) * self.width} "
                       "entries (> 1e8); lower K or D or turn it off")
    if self.prefix_bias_init not in ("zeros", "prior"):
      raise InputError(f"prefix_bias_init={self.prefix_bias_init!r}: choose 'zeros' or 'prior'")
    if self.prefix_bias_init == "prior" and not self.prefix_bias:
      raise InputError("prefix_bias_init='prior' needs prefix_bias=True")
    if self.freeze_prefix_bias and self.prefix_bias_init != "prior":
      raise InputError("freeze_prefix_bias needs prefix_bias_init='prior' (a frozen zero bias "
                       "is no bias)")
    if self.prior_smoothing <= 0:
      raise InputError(f"prior_smoothing must be > 0, got {self.prior_smoothing}")
    if self.init_kmeans_iters < 1:
      raise InputError(f"init_kmeans_iters must be >= 1, got {self.init_kmeans_iters}")
    if self.score_mode not in ("sum", "streaming"):
      raise InputError(f"score_mode={self.score_mode!r}: choose 'sum' or 'streaming'")
    if not 0.0 < self.streaming_decay <= 1.0:
      raise InputError(f"streaming_decay must lie in (0, 1], got {self.streaming_decay}")
    if self.reranker and (self.rerank_dim < 1 or self.rerank_negatives < 1):
      raise InputError("the reranker needs rerank_dim >= 1 and rerank_negatives >= 1")
    if min(self.embed_dim, self.user_dim, self.path_dim, self.mstep_batch_size,
           self.eval_batch_size, self.checkpoint_every, self.log_every) < 1:
      raise InputError("dimensions, batch sizes and checkpoint/log intervals must be positive")

  @property
  def num_structure_paths(self) -> int:
    return self.width ** self.depth

  def check_corpus(self, num_items: int) -> None:
    """Raises InputError for an empty corpus. Paths have no capacity in DR (many items may
    share a path; the penalty alpha f(|c|) only discourages it), so any K^D J is enough."""
    if num_items < 1:
      raise InputError("the corpus has no items")


# Paper sec. 4.3 for the public data sets. `synthetic`: the project's default synthetic data
# (~4,900 items, 200k training samples, history 20) in ~2-3 minutes on 2 CPU cores. K=30, D=3
# gives 27,000 paths = 5.5x the items (1.8x the ~15,000 item-path slots with J=3), close to the
# paper's MovieLens ratio (125k paths for 20.7k items). alpha=0.5: an item averages ~50
# training instances (popular ones thousands), so N_v log-gains reach 10^2-10^4; 0.5 * df(x)
# ~ 0.5 x^3 matches that around x = 20-30, which caps the "hub" paths of popular items at about
# 30 items (alpha=1e-3 lets them grow past 100 and a beam of 100 paths then returns ~2,000 of
# the ~4,900 items). B=50 then retrieves ~600 distinct candidates, ~10x the largest K=60
# evaluated (the paper aims at 5-10x). `smoke`: tiny, seconds (tests).
PRESETS: dict[str, dict[str, Any]] = {
    "movielens": dict(width=50, depth=3, beam_size=25, num_paths=3, alpha=3e-5, top_paths=10,
                      em_rounds=3, epochs_per_estep=1.0),
    "amazon_books": dict(width=100, depth=3, beam_size=50, num_paths=3, alpha=3e-7,
                         top_paths=10, em_rounds=3, epochs_per_estep=1.0),
    "synthetic": dict(width=30, depth=3, beam_size=50, num_paths=3, alpha=0.5, top_paths=10,
                      em_rounds=3, epochs_per_estep=1.0, embed_dim=32, user_dim=64,
                      path_dim=16, hidden=(128,), rerank_dim=32, rerank_negatives=512,
                      learning_rate=2e-3),
    "smoke": dict(width=8, depth=3, beam_size=24, num_paths=2, alpha=1e-3, top_paths=4,
                  em_rounds=1, epochs_per_estep=1.0, embed_dim=8, user_dim=8, path_dim=4,
                  hidden=(16,), rerank_dim=8, rerank_negatives=32, learning_rate=3e-3,
                  mstep_batch_size=128, eval_batch_size=32, checkpoint_every=10, log_every=5),
}


def dr_config(preset: str = "synthetic", **overrides) -> DRConfig:
  """A preset's DRConfig with single fields overridden (None values are ignored)."""
  if preset not in PRESETS:
    raise InputError(f"unknown DR preset {preset!r}; choose from {sorted(PRESETS)}")
  values = dict(PRESETS[preset])
  values.update({k: v for k, v in overrides.items() if v is not None})
  bad = set(values) - {f.name for f in dataclasses.fields(DRConfig)}
  if bad:
    raise InputError(f"unknown DRConfig fields {sorted(bad)}")
  return DRConfig(**values)


# ---- paths ---------------------------------------------------------------------------------

def random_paths(rng: np.random.Generator, *, num_items: int, num_structure_paths: int,
                 num_paths: int) -> np.ndarray:
  """J distinct uniformly random path ids per item: int64[N, J]."""
  if num_paths > num_structure_paths:
    raise ValueError(f"cannot draw {num_paths} distinct paths out of {num_structure_paths}")
  if num_structure_paths <= 4 * num_paths:  # dense case: random permutations
    keys = rng.random((num_items, num_structure_paths))
    return np.argsort(keys, axis=1)[:, :num_paths].astype(np.int64)
  ids = rng.integers(0, num_structure_paths, (num_items, num_paths))
  while True:
    bad = np.flatnonzero(repeated_in_row(ids).any(axis=1))
    if len(bad) == 0:
      return ids
    ids[bad] = rng.integers(0, num_structure_paths, (len(bad), num_paths))


def _kmeans(rng: np.random.Generator, x: np.ndarray, k: int, iters: int) -> np.ndarray:
  """Centroids float64[k', E] (k' <= k) of rows x float64[n, E] by k-means++ seeding and
  `iters` Lloyd iterations (an emptied cluster keeps its centroid). With at most k distinct
  rows every distinct row is a centroid, in order of first occurrence."""
  n = len(x)
  _, first = np.unique(x, axis=0, return_index=True)
  if len(first) <= k:
    return x[np.sort(first)]
  cent = [x[rng.integers(n)]]
  d2 = np.sum((x - cent[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = d2.sum()
    i = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
    cent.append(x[i])
    d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, axis=1))
  cent = np.stack(cent)
  for _ in range(iters):
    label = _sq_dists(x, cent).argmin(axis=1)
    counts = np.bincount(label, minlength=k)
    sums = np.zeros_like(cent)
    np.add.at(sums, label, x)
    filled = counts > 0
    new = cent.copy()
    new[filled] = sums[filled] / counts[filled, None]
    if np.allclose(new, cent):
      break
    cent = new
  return cent


def _sq_dists(x: np.ndarray, cent: np.ndarray) -> np.ndarray:
  """float64[n, k] squared distances of rows x[n, E] to centroids cent[k, E]."""
  return (np.sum(x * x, axis=1)[:, None] - 2.0 * x @ cent.T
          + np.sum(cent * cent, axis=1)[None, :])


def kmeans_paths(vectors: np.ndarray, *, width: int, depth: int, num_paths: int,
                 seed: int = 0, iters: int = 10) -> np.ndarray:
  """Informed initial paths: J distinct path ids per item from hierarchical k-means over item
  vectors, int64[N, J].

  The rows of `vectors` float[N, E] are L2-normalised (direction, not popularity-driven norm,
  decides); zero rows (items without training interactions: no signal) get `random_paths`
  instead of all sharing one path (90 such items on the default world). Level 1 splits all
  items into K clusters by k-means (k-means++ seeding, `iters` Lloyd steps, seeded), level 2 splits each cluster into K, ... for D levels;
  a cluster of at most K distinct vectors gives each its own code (in item order). An item's
  first path is its nearest centroid at every level. Its other J - 1 paths share the first D - 1
  codes and take, as the last code, the next-nearest centroids of its level-D split (their
  codes; codes without a centroid rank last, in code order): an item shares paths with its
  nearest neighbours of the same level-(D-1) cluster, so paths start as coherent small groups
  of similar items, J of them per item. Only when J > K, the paths beyond the K of the last
  level are drawn uniformly at random (distinct). Items with identical vectors get identical
  codes (at random beyond K).
  """
  x = np.asarray(vectors, np.float64)
  if x.ndim != 2 or len(x) < 1 or not np.isfinite(x).all():
    raise InputError(f"item vectors must be finite float[N, E] with N >= 1, got {x.shape}")
  total = width ** depth
  if not 1 <= num_paths <= total:
    raise InputError(f"num_paths J={num_paths} must lie in [1, K^D={total}]")
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  rng = np.random.default_rng([seed, 31])
  out = random_paths(rng, num_items=len(x), num_structure_paths=total, num_paths=num_paths)
  signal = np.flatnonzero(norm[:, 0] > 0)
  if len(signal):
    out[signal] = _kmeans_paths(x[signal] / norm[signal], rng, width=width, depth=depth,
                                num_paths=num_paths, iters=iters)
  return out


def _kmeans_paths(x: np.ndarray, rng: np.random.Generator, *, width: int, depth: int,
                  num_paths: int, iters: int) -> np.ndarray:
  """`kmeans_paths` of unit rows x float64[n, E]: int64[n, J]."""
  total = width ** depth
  n = len(x)
  prefix = np.zeros(n, np.int64)  # path-id prefix (base-K number of the codes so far)
  groups = [np.arange(n)]
  for _ in range(depth - 1):
    nxt = []
    for members in groups:
      cent = _kmeans(rng, x[members], width, iters)
      label = _sq_dists(x[members], cent).argmin(axis=1)
      prefix[members] = prefix[members] * width + label
      nxt.extend(members[label == c] for c in range(len(cent)))
    groups = [g for g in nxt if len(g)]
  j_last = min(num_paths, width)
  out = np.full((n, num_paths), -1, np.int64)
  for members in groups:
    cent = _kmeans(rng, x[members], width, iters)
    dist = np.full((len(members), width), np.inf)
    dist[:, :len(cent)] = _sq_dists(x[members], cent)
    rank = np.argsort(dist, axis=1, kind="stable")[:, :j_last]
    out[members, :j_last] = prefix[members, None] * width + rank
  if num_paths > j_last:  # J > K: the remaining paths at random, distinct within each row
    out[:, j_last:] = rng.integers(0, total, (n, num_paths - j_last))
    while True:
      bad = np.flatnonzero(repeated_in_row(out).any(axis=1))
      if len(bad) == 0:
        break
      out[bad, j_last:] = rng.integers(0, total, (len(bad), num_paths - j_last))
  return out


def initial_paths(config: "DRConfig", *, num_items: int, seed: int,
                  item_vectors: np.ndarray | None = None) -> np.ndarray:
  """The paths the EM starts from, int64[N, J]: `random_paths` (seeded as before this option
  existed) or `kmeans_paths` of `item_vectors` float[N, E] (required then)."""
  if config.init_paths == "random":
    return random_paths(np.random.default_rng([seed, 23]), num_items=num_items,
                        num_structure_paths=config.num_structure_paths,
                        num_paths=config.num_paths)
  if item_vectors is None or len(item_vectors) != num_items:
    raise InputError(f"init_paths='kmeans' needs item vectors float[{num_items}, E]")
  return kmeans_paths(item_vectors, width=config.width, depth=config.depth,
                      num_paths=config.num_paths, seed=seed, iters=config.init_kmeans_iters)


def path_statistics(ids: np.ndarray, *, num_structure_paths: int) -> dict:
  """Sizes of the paths of an assignment ids int[N, J] (paper Table 5 style)."""
  sizes = np.bincount(np.asarray(ids).reshape(-1), minlength=num_structure_paths)
  nonempty = sizes[sizes > 0]
  return {"max_path_size": int(sizes.max(initial=0)),
          "mean_items_per_nonempty_path": float(nonempty.mean()) if len(nonempty) else 0.0,
          "nonempty_paths": int(len(nonempty)), "num_structure_paths": int(num_structure_paths)}


def expected_nonempty_paths(*, num_items: int, num_structure_paths: int,
                            num_paths: int) -> float:
  """Expected non-empty paths of `random_paths` (N items, J distinct uniform paths each):
  P (1 - (1 - J / P)^N), P = K^D -- the baseline a learned assignment is compared to."""
  p = float(num_structure_paths)
  return p * (1.0 - (1.0 - num_paths / p) ** num_items)


# ---- M-step: scores s[v, c] ----------------------------------------------------------------

def aggregate_path_scores(items: np.ndarray, beam_ids: np.ndarray, beam_probs: np.ndarray, *,
                          num_items: int, top: int) -> tuple[np.ndarray, np.ndarray]:
  """s[v, c] = sum over the instances of v of p(c | x) (over each instance's beam paths), the
  `top` best paths per item kept.

  Args:
    items: int[n] the instances' target items.
    beam_ids: int[n, S] path ids found for each instance (-1 = none).
    beam_probs: float[n, S] their probabilities p(c | x).
    num_items: N.
    top: paths kept per item.
  Returns:
    (paths int64[N, top] best first, -1 padded; scores float64[N, top], 0 where padded).
  """
  items = np.asarray(items, np.int64)
  beam_ids = np.asarray(beam_ids, np.int64)
  valid = beam_ids >= 0
  span = int(beam_ids.max(initial=0)) + 1
  keys = (np.broadcast_to(items[:, None], beam_ids.shape) * span + beam_ids)[valid]
  uniq, inv = np.unique(keys, return_inverse=True)
  sums = np.bincount(inv, weights=np.asarray(beam_probs, np.float64)[valid],
                     minlength=len(uniq))
  owner = uniq // span
  order = np.lexsort((-sums, owner))  # by item, best score first
  owner, path, sums = owner[order], uniq[order] % span, sums[order]
  first = np.searchsorted(owner, owner, side="left")
  rank = np.arange(len(owner)) - first
  keep = rank < top
  out_p = np.full((num_items, top), -1, np.int64)
  out_s = np.zeros((num_items, top), np.float64)
  out_p[owner[keep], rank[keep]] = path[keep]
  out_s[owner[keep], rank[keep]] = sums[keep]
  return out_p, out_s


@functools.partial(jax.jit, static_argnames=("num_items", "top"))
def _streaming_scan(items, beam_ids, beam_probs, decay, *, num_items: int, top: int):
  def body(carry, xs):
    table_ids, table_s = carry
    v, new_ids, new_s = xs
    old_ids, old_s = table_ids[v], table_s[v]
    min_score = jnp.min(old_s)  # empty slots hold score 0
    match = (old_ids[:, None] == new_ids[None, :]) & (old_ids[:, None] >= 0)  # [top, S]
    upd_old = jnp.where(old_ids >= 0,
                        decay * old_s + jnp.sum(jnp.where(match, new_s[None, :], 0.0), axis=1),
                        -jnp.inf)
    fresh = (new_ids >= 0) & ~match.any(axis=0)
    upd_new = jnp.where(fresh, decay * min_score + new_s, -jnp.inf)
    all_ids = jnp.concatenate([old_ids, new_ids])
    best, idx = jax.lax.top_k(jnp.concatenate([upd_old, upd_new]), top)
    ok = jnp.isfinite(best)
    return (table_ids.at[v].set(jnp.where(ok, all_ids[idx], -1)),
            table_s.at[v].set(jnp.where(ok, best, 0.0))), None

  init = (jnp.full((num_items, top), -1, jnp.int32), jnp.zeros((num_items, top), jnp.float32))
  (ids, scores), _ = jax.lax.scan(body, init, (items, beam_ids, beam_probs))
  return ids, scores


def streaming_path_scores(items: np.ndarray, beam_ids: np.ndarray, beam_probs: np.ndarray, *,
                          num_items: int, top: int, decay: float = 0.999
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Streaming estimate of the top-`top` s[v, c] per item (paper's remark on streaming).

  Instances are processed in order. For the recorded list s[v, c_1:S] and an instance's new
  list s'[v, c'_1:S]: paths in both get eta s + s'; paths only recorded get eta s; paths only
  new get eta min_score + s' (min_score = smallest recorded score, 0 while the list has empty
  slots); the `top` largest survive. Same arguments and returns as `aggregate_path_scores`.
  """
  ids, scores = _streaming_scan(jnp.asarray(items, jnp.int32), jnp.asarray(beam_ids, jnp.int32),
                                jnp.asarray(beam_probs, jnp.float32), jnp.float32(decay),
                                num_items=num_items, top=top)
  ids = np.asarray(ids).astype(np.int64)
  return ids, np.where(ids >= 0, np.asarray(scores, np.float64), 0.0)


# ---- M-step: coordinate descent (Algorithm 2) ----------------------------------------------

def candidate_lists(paths: np.ndarray, scores: np.ndarray, current: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Each item's candidate paths: its scored paths, then its current J paths (score 0 unless
  already scored; repeats become -1). Guarantees >= J distinct candidates per item.

  Args:
    paths: int[N, S] scored paths (-1 padded); scores: float[N, S]; current: int[N, J].
  Returns:
    (int32[N, S + J] candidate path ids, -1 = none; float32[N, S + J] scores).
  """
  cand = np.concatenate([np.asarray(paths, np.int64), np.asarray(current, np.int64)], axis=1)
  sc = np.concatenate([np.where(np.asarray(paths) >= 0, scores, 0.0),
                       np.zeros(current.shape)], axis=1)
  drop = repeated_in_row(cand) | (cand < 0)
  return np.where(drop, -1, cand).astype(np.int32), np.where(drop, 0.0, sc).astype(np.float32)


def _delta_f(size):
  """f(x + 1) - f(x) for f(x) = x^4 / 4, written without cancellation."""
  return size ** 3 + 1.5 * size ** 2 + size + 0.25


@functools.partial(jax.jit, static_argnames=("num_structure_paths",))
def _cd_sweep(cand, scores, counts, current, alpha, *, num_structure_paths: int):
  """One coordinate-descent sweep over all items in id order; returns int32[N, J]."""
  num_paths = current.shape[1]
  sizes0 = jnp.zeros((num_structure_paths,), jnp.int32).at[current.reshape(-1)].add(1)

  def body(sizes, xs):
    c, s, n, cur = xs
    sizes = sizes.at[cur].add(-1)  # take the item out of its paths
    safe = jnp.maximum(c, 0)
    taken = c < 0
    partial = jnp.float32(0.0)
    picks = []
    for _ in range(num_paths):
      # The fit term is n * log(partial + s); the paper's - n * log(partial) is the same for
      # every candidate, so dropping it keeps the argmax and avoids log(0) at the first pick.
      fit = jnp.where(n > 0, n * jnp.log(jnp.maximum(partial + s, _TINY)), 0.0)
      gain = fit - alpha * _delta_f(sizes[safe].astype(jnp.float32))
      k = jnp.argmax(jnp.where(taken, -jnp.inf, gain))
      picks.append(c[k])
      taken = taken.at[k].set(True)
      sizes = sizes.at[c[k]].add(1)
      partial = partial + s[k]
    return sizes, jnp.stack(picks)

  _, new = jax.lax.scan(body, sizes0, (cand, scores, counts, current))
  return new


def penalized_objective(cand: np.ndarray, scores: np.ndarray, counts: np.ndarray,
                        assigned: np.ndarray, *, num_structure_paths: int, alpha: float) -> float:
  """sum_v N_v log(sum_j s[v, pi_j(v)]) - alpha sum_c f(|c|) (the M-step surrogate without its
  constant - sum_v log N_v; s = 0 outside the candidate lists, log floored at 1e-30)."""
  hit = cand[:, None, :] == np.asarray(assigned)[:, :, None]  # [N, J, C]
  s = np.sum(np.where(hit, scores[:, None, :], 0.0), axis=(1, 2), dtype=np.float64)
  counts = np.asarray(counts, np.float64)
  fit = np.sum(np.where(counts > 0, counts * np.log(np.maximum(s, _TINY)), 0.0))
  sizes = np.bincount(np.asarray(assigned).reshape(-1), minlength=num_structure_paths)
  return float(fit - alpha * np.sum(sizes.astype(np.float64) ** 4 / 4.0))


def coordinate_descent(cand: np.ndarray, scores: np.ndarray, counts: np.ndarray,
                       current: np.ndarray, *, num_structure_paths: int, alpha: float,
                       iterations: int) -> tuple[np.ndarray, list[float]]:
  """Penalized path assignment (paper's Algorithm 2), exact sequential coordinate descent.

  Per sweep and item v (in id order): v leaves its J paths (their sizes drop by one), then J
  distinct paths are picked one at a time among v's candidates, each maximizing
  N_v log(partial + s[v, c]) - alpha (f(|c| + 1) - f(|c|)) with partial = sum of the scores
  already picked; the picked path's size grows at once. Items with N_v = 0 only feel the
  penalty. Ties go to the earlier candidate (the higher score).

  Args:
    cand: int32[N, C] candidate path ids per item (-1 = none; >= J valid, distinct).
    scores: float32[N, C] s[v, c] of the candidates.
    counts: float[N] N_v, the number of training instances of each item.
    current: int[N, J] the current assignment (every current path must be a candidate).
    num_structure_paths: K^D.
    alpha: penalty factor.
    iterations: sweeps.
  Returns:
    (int64[N, J] new assignment, objective after each sweep (`penalized_objective`)).
  """
  cand_j, scores_j = jnp.asarray(cand, jnp.int32), jnp.asarray(scores, jnp.float32)
  counts_j = jnp.asarray(counts, jnp.float32)
  assigned = np.asarray(current, np.int64)
  objectives = []
  for _ in range(iterations):
    assigned = np.asarray(_cd_sweep(cand_j, scores_j, counts_j, jnp.asarray(assigned, jnp.int32),
                                    jnp.float32(alpha), num_structure_paths=num_structure_paths)
                          ).astype(np.int64)
    objectives.append(penalized_objective(cand, scores, counts, assigned,
                                          num_structure_paths=num_structure_paths, alpha=alpha))
  return assigned, objectives


# ---- M-step: instance scoring and the whole step -------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "top"))
def _beam_instances(graphdef, params, history, target, paths, *, top: int):
  model = nnx.merge(graphdef, params)
  user = structure_net.encode_users(model, history)
  codes, logp = structure_net.beam_search_paths(model, user, beam=top)
  ids = structure_net.path_ids(codes, width=model.width)
  if paths is None:
    return ids, jnp.exp(logp)
  own = paths[jnp.maximum(target, 0)]  # [b, J, D]
  own_ids = structure_net.path_ids(own, width=model.width)
  own_p = jnp.exp(structure_net.path_log_probs(model, user, own))
  seen = (own_ids[:, :, None] == ids[:, None, :]).any(axis=2)  # already in the beam
  return (jnp.concatenate([ids, jnp.where(seen, -1, own_ids)], axis=1),
          jnp.concatenate([jnp.exp(logp), jnp.where(seen, 0.0, own_p)], axis=1))


def score_instances(graphdef, params, ds, samples: np.ndarray, *, history_len: int, top: int,
                    batch_size: int, paths: np.ndarray | None = None, mesh: Mesh | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Top-`top` paths of every training instance by beam search, with p(c | x).

  With `paths` (int32[N, J, D] codes), each instance also reports the exact probabilities of
  its target's J current paths that the beam missed (extra columns), so the M-step values
  an item's current paths by their true scores instead of 0. Instances go in batches of
  `batch_size` split over the devices of `mesh` (default: all devices).

  Returns (items int32[n], path ids int32[n, W] (-1 = none), probabilities float32[n, W]),
  W = top (+ J with `paths`).
  """
  mesh = mesh or parallel.make_mesh()
  if len(samples) == 0:
    width = top + (0 if paths is None else np.shape(paths)[1])
    return (np.zeros(0, np.int32), np.zeros((0, width), np.int32),
            np.zeros((0, width), np.float32))
  params, paths_dev = parallel.replicate(
      (params, None if paths is None else np.asarray(paths, np.int32)), mesh)

  def beam(history, target):
    return _beam_instances(graphdef, params, history, target, paths_dev, top=top)

  items, ids, probs = [], [], []
  chunk = batch_size * _SCORE_CHUNK  # whole batches: only the very last one is padded
  for lo in range(0, len(samples), chunk):
    hist, target = train_batch(ds, samples[lo:lo + chunk], history_len)
    target = target.astype(np.int32)
    got_ids, got_p = parallel.map_user_batches(beam, [hist.astype(np.int32), target],
                                               batch_size=batch_size, mesh=mesh)
    items.append(target)
    ids.append(got_ids)
    probs.append(got_p)
  return (np.concatenate(items).astype(np.int32), np.concatenate(ids).astype(np.int32),
          np.concatenate(probs).astype(np.float32))


def m_step(graphdef, params, ds, samples: np.ndarray, current: np.ndarray, config: DRConfig, *,
           history_len: int, mesh: Mesh | None = None) -> tuple[np.ndarray, dict]:
  """New item paths int64[N, J] (flat ids) from the network and the current ones, plus info."""
  t0 = time.perf_counter()
  own = (structure_net.path_codes(current, width=config.width, depth=config.depth)
         if config.score_current_paths else None)
  items, ids, probs = score_instances(graphdef, params, ds, samples, history_len=history_len,
                                      top=config.top_paths, batch_size=config.mstep_batch_size,
                                      paths=own, mesh=mesh)
  t1 = time.perf_counter()
  estimate = aggregate_path_scores if config.score_mode == "sum" else functools.partial(
      streaming_path_scores, decay=config.streaming_decay)
  keep = config.top_paths + (config.num_paths if config.score_current_paths else 0)
  paths, scores = estimate(items, ids, probs, num_items=ds.num_items, top=keep)
  cand, cand_s = candidate_lists(paths, scores, current)
  counts = np.bincount(items, minlength=ds.num_items).astype(np.float32)
  n_paths = config.num_structure_paths
  before = penalized_objective(cand, cand_s, counts, current, num_structure_paths=n_paths,
                               alpha=config.alpha)
  t2 = time.perf_counter()
  new, objectives = coordinate_descent(cand, cand_s, counts, current,
                                       num_structure_paths=n_paths, alpha=config.alpha,
                                       iterations=config.cd_iterations)
  t3 = time.perf_counter()
  info = {"score_seconds": t1 - t0, "estimate_seconds": t2 - t1, "cd_seconds": t3 - t2,
          "objective_before": before, "objective_per_sweep": objectives,
          "changed_paths": float(np.mean(np.sort(new, 1) != np.sort(current, 1))),
          **path_statistics(new, num_structure_paths=n_paths)}
  return new, info


# ---- inference -----------------------------------------------------------------------------

def path_index(ids: np.ndarray, *, num_structure_paths: int) -> tuple[np.ndarray, np.ndarray,
                                                                      int]:
  """CSR path -> items of an assignment ids int[N, J]: (offsets int32[K^D + 1],
  items int32[N J] grouped by path, ascending item id within a path, largest path size)."""
  ids = np.asarray(ids, np.int64)
  flat = ids.reshape(-1)
  owner = np.repeat(np.arange(ids.shape[0], dtype=np.int64), ids.shape[1])
  order = np.lexsort((owner, flat))
  sizes = np.bincount(flat, minlength=num_structure_paths)
  offsets = np.zeros(num_structure_paths + 1, np.int64)
  np.cumsum(sizes, out=offsets[1:])
  return offsets.astype(np.int32), owner[order].astype(np.int32), int(sizes.max(initial=0))


def _item_path_log_likelihood(cand: jax.Array, logp: jax.Array, first: jax.Array) -> jax.Array:
  """log sum_j p(pi_j(v) | x) over the beam's paths holding each item v, the item likelihood
  the structure objective trains: at the first copy of every item (elsewhere meaningless).

  cand: int32[b, M] candidate items sorted by item (padding sorts last); logp: float[b, M]
  the log-probability of the path each copy came from (-inf for padding); first: bool[b, M]
  the first copy of each item.
  """
  group = jnp.cumsum(first, axis=1) - 1  # [b, M] index of each copy's item among the row's
  m = cand.shape[1]

  def row(lp, g):
    top = jax.ops.segment_max(lp, g, num_segments=m)  # [M] per item
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jax.ops.segment_sum(jnp.exp(lp - top[g]), g, num_segments=m)
    return (top + jnp.log(total))[g]

  return jax.vmap(row)(logp, jnp.maximum(group, 0))


@functools.partial(jax.jit, static_argnames=("graphdef", "beam", "topk", "max_path_size",
                                             "use_reranker"))
def _retrieve_batch(graphdef, params, history, offsets, path_items, *, beam: int, topk: int,
                    max_path_size: int, use_reranker: bool):
  model = nnx.merge(graphdef, params)
  user = structure_net.encode_users(model, history)
  codes, logp = structure_net.beam_search_paths(model, user, beam=beam)
  pid = structure_net.path_ids(codes, width=model.width)  # [b, B], -1 = no path
  ok = pid >= 0
  safe = jnp.maximum(pid, 0)
  start = offsets[safe]
  size = jnp.where(ok, offsets[safe + 1] - start, 0)
  slot = jnp.arange(max_path_size)
  valid = slot < size[..., None]  # [b, B, M]
  pos = jnp.clip(start[..., None] + slot, 0, path_items.shape[0] - 1)
  b = history.shape[0]
  cand = jnp.where(valid, path_items[pos], model.num_items).reshape(b, -1)  # N = padding
  cand_logp = jnp.where(valid, logp[..., None], -jnp.inf).reshape(b, -1)
  # Sort by item: the copies of an item (one per beam path holding it) become consecutive.
  cand, neg_logp = jax.lax.sort((cand, -cand_logp), dimension=1, num_keys=2)
  keep = cand < model.num_items
  keep = keep & jnp.concatenate([jnp.ones((b, 1), bool), cand[:, 1:] != cand[:, :-1]], axis=1)
  items = jnp.where(keep, cand, -1)
  if use_reranker:
    score = jnp.where(keep, structure_net.rerank_logits(
        model, structure_net.rerank_user_vectors(model, user), items), -jnp.inf)
  else:
    score = jnp.where(keep, _item_path_log_likelihood(cand, -neg_logp, keep), -jnp.inf)
  k = min(topk, items.shape[1])
  best, idx = jax.lax.top_k(score, k)
  out = jnp.where(jnp.isfinite(best), jnp.take_along_axis(items, idx, axis=1), -1)
  if k < topk:
    out = jnp.pad(out, ((0, 0), (0, topk - k)), constant_values=-1)
    best = jnp.pad(best, ((0, 0), (0, topk - k)), constant_values=-jnp.inf)
  # (items, distinct candidates per user, the items' scores: reranker logits or path scores)
  return out.astype(jnp.int32), jnp.sum(keep, axis=1), best


@dataclasses.dataclass
class DRModel:
  """A trained DR model: `nnx.merge(graphdef, params)` rebuilds the network."""
  graphdef: Any
  params: Any
  paths: np.ndarray  # int32[N, J, D] codes of every item's paths
  config: DRConfig
  info: dict

  def module(self) -> structure_net.StructureNet:
    return nnx.merge(self.graphdef, self.params)

  def path_ids(self) -> np.ndarray:
    """int64[N, J] flat path ids."""
    return structure_net.path_ids(self.paths.astype(np.int64), width=self.config.width)


def retrieve(model: DRModel, history: np.ndarray, *, topk: int, beam_size: int | None = None,
             batch_size: int | None = None, mesh: Mesh | None = None,
             use_reranker: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-K items for histories int32[U, L]: (int32[U, topk] best first, -1 padded;
  int64[U] number of distinct candidate items of each user's beam). User batches of
  `batch_size` (default `eval_batch_size`) are split over the devices of `mesh` (default: all
  devices). `use_reranker=False` orders the candidates by path scores alone (default: the
  config's `reranker`)."""
  cfg = model.config
  beam = int(beam_size or cfg.beam_size)
  if not 1 <= beam <= cfg.num_structure_paths:
    raise ValueError(f"beam_size {beam} must lie in [1, K^D={cfg.num_structure_paths}]")
  if topk < 1:
    raise ValueError(f"topk must be >= 1, got {topk}")
  history = np.asarray(history, np.int32)
  if len(history) == 0:
    return np.zeros((0, topk), np.int32), np.zeros(0, np.int64)
  mesh = mesh or parallel.make_mesh()
  offsets, path_items, max_size = path_index(model.path_ids(),
                                             num_structure_paths=cfg.num_structure_paths)
  bs = max(1, min(int(batch_size or cfg.eval_batch_size), len(history)))
  params, offsets_dev, items_dev = parallel.replicate((model.params, offsets, path_items), mesh)

  def one_batch(h):
    return _retrieve_batch(model.graphdef, params, h, offsets_dev, items_dev, beam=beam,
                           topk=topk, max_path_size=max(max_size, 1),
                           use_reranker=cfg.reranker and use_reranker is not False)[:2]

  out, counts = parallel.map_user_batches(one_batch, [history], batch_size=bs, mesh=mesh)
  return out.astype(np.int32), counts.astype(np.int64)


# ---- training ------------------------------------------------------------------------------

def make_loss_fn(graphdef, config: DRConfig, *, num_items: int):
  """`loss_fn(params, batch, aux, key) -> (loss, metrics)`; aux = (paths: int32[N, J, D]
  codes, rerank_on: float32[] 1 while the reranker trains, 0 once it is frozen)."""
  m = int(config.rerank_negatives)
  log_q = -float(np.log(num_items))
  softmax_loss = jax.vmap(functools.partial(losses.sampled_softmax_loss, num_samples=m),
                          in_axes=(0, 0, None, 0))

  def loss_fn(params, batch, aux, key):
    paths, rerank_on = aux
    model = nnx.merge(graphdef, params)
    user = structure_net.encode_users(model, batch.history)
    target = jnp.maximum(batch.target, 0)
    ll = structure_net.multi_path_log_likelihood(
        structure_net.path_log_probs(model, user, paths[target]))
    mask = batch.mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    structure = -jnp.sum(ll * mask) / denom
    if not config.reranker:
      return structure, {"structure": structure, "softmax": jnp.zeros(())}
    vec = structure_net.rerank_user_vectors(model, user)
    pos = structure_net.rerank_logits(model, vec, target[:, None])[:, 0]
    neg = jax.random.randint(key, (m,), 0, num_items)
    per = softmax_loss(pos, structure_net.rerank_logits(model, vec, neg), jnp.full((m,), log_q),
                       neg[None, :] != target[:, None])
    soft = jnp.sum(per * mask) / denom
    # A frozen reranker (rerank_on = 0) sends no gradient into the shared user encoder either.
    return (structure + config.rerank_weight * rerank_on * soft,
            {"structure": structure, "softmax": soft})

  return loss_fn


def estep_lengths(config: DRConfig, num_samples: int, *, batch_size: int) -> list[int]:
  """Steps of each of the em_rounds + 1 E-steps: `first_estep_epochs` (default
  `epochs_per_estep`) epochs for the first, `epochs_per_estep` for the others."""
  _, per = batches_lib.steps_for(num_samples, batch_size=batch_size,
                                 epochs=config.epochs_per_estep)
  first = per
  if config.first_estep_epochs is not None:
    _, first = batches_lib.steps_for(num_samples, batch_size=batch_size,
                                     epochs=config.first_estep_epochs)
  return [first] + [per] * config.em_rounds


def freeze_after(optimizer: optax.GradientTransformation, steps: int,
                 frozen: Callable[[str], bool]) -> optax.GradientTransformation:
  """`optimizer` whose updates of the parameters named `frozen(top-level name)` are zero from
  update number `steps` on (their moments still advance, unused)."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if frozen(str(getattr(path[0], "key", path[0]))) else "free",
        params)
  stop = optax.scale_by_schedule(lambda count: jnp.where(count < steps, 1.0, 0.0))
  return optax.multi_transform({"free": optimizer, "frozen": optax.chain(optimizer, stop)},
                               labels)


def prior_prefix_bias(codes: np.ndarray, item_counts: np.ndarray, *, width: int,
                      smoothing: float = 0.5) -> np.ndarray:
  """The prefix-bias table of the user-independent path model of `item_counts`.

  Each item spreads its count evenly over its J paths; row r(c_<d), column c_d of the table is
  log((n(c_<d, c_d) + a) / (n(c_<d) + a K)), the smoothed log frequency of code c_d after the
  prefix c_<d, so the layers' softmaxes multiply to the smoothed path frequency.

  Args:
    codes: int[N, J, D] every item's paths (`structure_net.path_codes`).
    item_counts: float[N] training targets per item.
    width: K.
    smoothing: a > 0.
  Returns:
    float32[num_prefixes(K, D), K].
  """
  n, j, depth = codes.shape
  offsets = structure_net._prefix_offsets(width, depth)
  weight = np.repeat(np.asarray(item_counts, np.float64) / j, j)  # [N*J]
  flat = codes.reshape(n * j, depth).astype(np.int64)
  num_rows = structure_net.num_prefixes(width, depth)
  counts = np.zeros(num_rows * width, np.float64)
  prefix = np.zeros(n * j, np.int64)
  for d in range(depth):
    np.add.at(counts, (offsets[d] + prefix) * width + flat[:, d], weight)
    prefix = prefix * width + flat[:, d]
  counts = counts.reshape(num_rows, width) + smoothing
  return np.log(counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)


def dr_identity(config: DRConfig) -> dict:
  """The "dr" part of a checkpoint's identity: the DRConfig less its evaluation/logging fields
  (and options left at their old defaults, so runs from before them keep their checkpoints)."""
  skip = {"beam_size", "eval_batch_size", "checkpoint_every", "log_every"}
  if config.init_paths == "random":  # runs from before the option keep their checkpoints
    skip |= {"init_paths", "init_kmeans_iters"}
  skip |= {k for k in ("first_estep_epochs", "rerank_esteps") if getattr(config, k) is None}
  if not config.prefix_bias:
    skip.add("prefix_bias")
  if config.prefix_bias_init == "zeros":
    skip |= {"prefix_bias_init", "prior_smoothing"}
  if not config.freeze_prefix_bias:
    skip.add("freeze_prefix_bias")
  return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def _run_identity(config: DRConfig, ds, *, seed: int, history_len: int, batch_size: int,
                  max_train_samples: int) -> dict:
  """What a checkpoint must match: the DRConfig less its evaluation/logging fields, the data
  stream settings and the corpus."""
  return {"dr": dr_identity(config),
          "fit": {"seed": seed, "history_len": history_len, "batch_size": batch_size,
                  "max_train_samples": max_train_samples},
          "corpus": corpus_fingerprint(ds)}


def fit(ds, config: DRConfig, *, seed: int = 0, history_len: int = 69, batch_size: int = 256,
        max_train_samples: int = 0, workdir: str | None = None, stop_after_step: int = 0,
        verbose: bool = False, mesh: Mesh | None = None,
        item_vectors: np.ndarray | None = None) -> DRModel:
  """EM training (see the module docstring) through `training.fit` on `mesh` (default: all
  devices; `batch_size` must divide over them). `item_vectors` float[N, E]: the warm-start
  vectors of `init_paths="kmeans"` (ignored by "random"). `stop_after_step` > 0 raises
  SimulatedCrash right after that global training step (and its checkpoint, if one is due)
  unless it is the last step -- testing only."""
  config.check_corpus(ds.num_items)
  mesh = mesh or parallel.make_mesh()
  samples = batches_lib.training_samples(ds, max_train_samples=max_train_samples, seed=seed)
  if len(samples) == 0:
    raise ValueError("the dataset has no training samples")
  phase_steps = estep_lengths(config, len(samples), batch_size=batch_size)
  steps_per_epoch, _ = batches_lib.steps_for(len(samples), batch_size=batch_size, epochs=1.0)
  total_steps = sum(phase_steps)
  ids = initial_paths(config, num_items=ds.num_items, seed=seed, item_vectors=item_vectors)
  net = structure_net.StructureNet(
      num_items=ds.num_items, width=config.width, depth=config.depth,
      embed_dim=config.embed_dim, user_dim=config.user_dim, path_dim=config.path_dim,
      hidden=config.hidden, user_encoder=config.user_encoder,
      rerank_dim=config.rerank_dim if config.reranker else 0, prefix_bias=config.prefix_bias,
      rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1)))
  if config.prefix_bias_init == "prior":
    targets = batches_lib.window_labels(ds, samples, 1)[:, 0]
    net.prefix_bias[...] = jnp.asarray(prior_prefix_bias(
        structure_net.path_codes(ids, width=config.width, depth=config.depth),
        np.bincount(targets, minlength=ds.num_items), width=config.width,
        smoothing=config.prior_smoothing))
  graphdef, params = nnx.split(net)
  optimizer = train.make_optimizer(learning_rate=config.learning_rate,
                                   decay_steps=steps_per_epoch, decay_rate=config.decay_rate)
  if config.freeze_prefix_bias:
    optimizer = freeze_after(optimizer, 0, lambda name: name == "prefix_bias")
  rerank_esteps = config.rerank_esteps if config.reranker else None
  if rerank_esteps is not None:
    # Wrapped even when the freeze falls at or after the last step (then a no-op): the same
    # optimizer program whatever the run's length, so a run cut after E-step n agrees with
    # the longer one to the bit (XLA:CPU rounds another program differently).
    optimizer = freeze_after(optimizer, sum(phase_steps[:rerank_esteps]),
                             lambda name: name.startswith("rerank_"))
  # The host-side carry of the phases: int32[N, J, D] path codes, int32[] M-steps done.
  carry = {"paths": structure_net.path_codes(ids, width=config.width,
                                             depth=config.depth).astype(np.int32),
           "msteps": np.zeros((), np.int32)}
  ckpt = None
  if workdir:
    identity = _run_identity(config, ds, seed=seed, history_len=history_len,
                             batch_size=batch_size, max_train_samples=max_train_samples)
    if config.init_paths != "random":  # the initial paths, whatever vectors gave them
      identity["initial_paths"] = zlib.crc32(np.ascontiguousarray(ids).tobytes())
    ckpt = training.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        identity={"fingerprint": training.fingerprint(identity)},
        phrases={"fingerprint": "another dr run"}, record={"method": "dr", **identity})
  mstep_infos = []

  def batches(step: int) -> batches_lib.Batch:
    return batches_lib.batch_for_step(ds, samples, step, steps_per_epoch=steps_per_epoch,
                                      batch_size=batch_size, history_len=history_len,
                                      seed=seed, levels=1)

  def between(phase: int, state: training.TrainState, carry: dict) -> tuple[Any, dict]:
    """The M-step after E-step `phase`."""
    current = structure_net.path_ids(np.asarray(carry["paths"], np.int64), width=config.width)
    new, info = m_step(graphdef, state.params, ds, samples, current, config,
                       history_len=history_len, mesh=mesh)
    msteps = int(carry["msteps"]) + 1
    mstep_infos.append(info)
    if verbose:
      print(f"dr: M-step {msteps}: max path {info['max_path_size']}, non-empty "
            f"{info['nonempty_paths']}, objective {info['objective_before']:.1f} -> "
            f"{info['objective_per_sweep']}, changed {info['changed_paths']:.3f}", flush=True)
    logging.info("dr: M-step %d done after E-step %d (%.1fs scoring, %.1fs coordinate descent)",
                 msteps, phase, info["score_seconds"], info["cd_seconds"])
    paths = structure_net.path_codes(new, width=config.width, depth=config.depth)
    return state, {"paths": paths.astype(np.int32), "msteps": np.asarray(msteps, np.int32)}

  base_key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(b"dr") & 0x7FFFFFFF)
  out = training.fit(
      training.loss_step(make_loss_fn(graphdef, config, num_items=ds.num_items), optimizer,
                         has_aux=True),
      training.init_state(params, optimizer), batches, total_steps=total_steps,
      base_key=base_key, checkpointer=ckpt, mesh=mesh, checkpoint_every=config.checkpoint_every,
      log_every=config.log_every, crash_after=stop_after_step, name="dr", progress=verbose,
      phase_steps=phase_steps, between=between, carry=carry,
      make_aux=lambda c: (np.asarray(c["paths"], np.int32), np.float32(
          rerank_esteps is None or int(c["msteps"]) < rerank_esteps)))
  names = ("loss", "structure", "softmax")
  losses_arr = (np.stack([out.metrics[k] for k in names], axis=1).astype(np.float32)
                if out.steps_run else np.zeros((0, len(names)), np.float32))
  info = {"steps": out.steps, "steps_run": out.steps_run,
          "steps_per_estep": [int(n) for n in phase_steps], "msteps": int(out.carry["msteps"]),
          "resumed_from_checkpoint": out.resumed_from, "seconds": out.seconds,
          "losses": losses_arr, "msteps_run": mstep_infos}
  return DRModel(graphdef=graphdef, params=jax.tree.map(jnp.asarray, out.state.params),
                 paths=np.asarray(out.carry["paths"], np.int32), config=config, info=info)


def run_dr(ds, ev, config: DRConfig, *, topk: int, seed: int, history_len: int,
           batch_size: int, max_train_samples: int, workdir: str | None,
           stop_after_step: int = 0, verbose: bool = False, mesh: Mesh | None = None,
           item_vectors: np.ndarray | None = None, ks: tuple[int, ...] = ()
           ) -> tuple[np.ndarray, float, dict]:
  """Trains DR on `ds` (`item_vectors`: see `fit`) and retrieves `topk` items for the users of
  `ev` (`ev.history`), both data-parallel over `mesh` (default: all devices).

  Returns:
    (retrieved int32[U, topk] (-1 where a user had fewer candidates), train_seconds (this
    call's training, M-steps included), settings: JSON-able -- the DRConfig, steps, final
    losses, path statistics of the final paths, the non-empty paths expected at random,
    candidates per user, M-step diagnostics, and `path_only`: precision/recall/F-measure@K (K
    in `ks`, default (topk,)) of the retrieval by path scores alone, no reranker, against
    `ev`'s labels: whether the paths learned anything).
  """
  mesh = mesh or parallel.make_mesh()
  model = fit(ds, config, seed=seed, history_len=history_len, batch_size=batch_size,
              max_train_samples=max_train_samples, workdir=workdir,
              stop_after_step=stop_after_step, verbose=verbose, mesh=mesh,
              item_vectors=item_vectors)
  t0 = time.perf_counter()
  retrieved, n_cand = retrieve(model, ev.history, topk=topk, mesh=mesh)
  retrieve_seconds = time.perf_counter() - t0
  path_only = (retrieve(model, ev.history, topk=topk, mesh=mesh, use_reranker=False)[0]
               if config.reranker else retrieved)
  path_metrics = (retrieval_metrics(path_only, ev.label_offsets, ev.label_items,
                                    num_items=ds.num_items, ks=tuple(ks) or (topk,))
                  if len(path_only) else {})
  info = model.info
  last = info["losses"][-1] if len(info["losses"]) else [np.nan] * 3
  settings = {
      "config": {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in dataclasses.asdict(config).items()},
      "steps": info["steps"], "steps_run": info["steps_run"],
      "steps_per_estep": info["steps_per_estep"], "msteps": info["msteps"],
      "resumed_from_checkpoint": info["resumed_from_checkpoint"],
      "final_loss": float(last[0]), "final_structure_loss": float(last[1]),
      "final_softmax_loss": float(last[2]),
      "path_stats": path_statistics(model.path_ids(),
                                    num_structure_paths=config.num_structure_paths),
      "candidates_per_user": ({"mean": float(n_cand.mean()), "min": int(n_cand.min()),
                               "max": int(n_cand.max())} if len(n_cand) else {}),
      "users_short_of_topk": int(np.sum(n_cand < topk)),
      "path_only": path_metrics,
      "random_nonempty_paths": expected_nonempty_paths(
          num_items=ds.num_items, num_structure_paths=config.num_structure_paths,
          num_paths=config.num_paths),
      "retrieve_seconds": float(retrieve_seconds),
      "msteps_run": [{k: (float(v) if isinstance(v, (float, np.floating)) else v)
                      for k, v in m.items()} for m in info["msteps_run"]],
  }
  return retrieved, float(info["seconds"]), settings
