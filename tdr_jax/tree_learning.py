"""Tree learning with the preference model fixed: TDR (sec. 6), JTM and TDM.

All three functions return a new :class:`~tdr_jax.tree.Tree` over the same items with the
same shape (``N``, ``B``, ``H``), so compiled scorers and train steps are reused.

TDR / JTM (:func:`learn_tree_tdr`)
----------------------------------
Every item ``i`` comes with the training samples that target it (``A_i``; built by
:func:`item_user_pairs`, one *pair* = one sample's history). Items are moved top-down.
At level ``l`` (start: ``l = 0``, every item under the root) each item sits under one node
``v`` of level ``l``; with ``l' = min(H, l + gap)`` its candidates are the ``C = B**(l'-l)``
descendants of ``v`` at level ``l'``. The matching score of item ``i`` and candidate ``c`` is

* ``matching="softmax"`` (TDR, Eq. 24): ``sum_{u in A_i} log_softmax_c(o_u(c))``, the
  softmax taken over the candidates of ``v`` that can hold items;
* ``matching="binary"`` (JTM): ``sum_{u in A_i} log sigmoid(o_u(c))``, the log-likelihood
  of the binary (sigmoid) node model.

With ``path_levels=True`` the score of ``c`` also adds the same terms for the ancestors of
``c`` at the intermediate levels ``l+1 .. l'-1`` (each normalised over its own level's
descendants of ``v``), i.e. JTM's ``L_c^{l+1, l'}`` summed over the whole gap; the default
(``False``) uses level ``l'`` only, as Eq. 24 does.

Capacities. Items are placed by the balanced rule of :mod:`tdr_jax.tree` (a node holding
``n`` items gives child ``b`` ``n // B + (1 if b < n % B else 0)``), so the number of items
each node must hold depends only on ``(N, B)``; it is the node's capacity (equal to its
number of leaves when ``N = B**H``). Candidates of capacity 0 are never scored into the
softmax (masked with ``-inf``) and never chosen. Because every level-``l'`` node ends with
exactly its capacity, the final mapping is balanced and passes :func:`tree.validate`.

Greedy assignment order (deterministic). Inside each level-``l`` node independently:

1. *Items that have pairs* are taken one at a time in order of decreasing **margin** -- the
   difference between their best and second-best candidate score at the start of the step
   (``+inf`` when only one candidate can hold items) -- ties broken by smaller item id.
2. Each takes the candidate with the highest score among those not yet full (ties: smaller
   node id); if its best node is full it takes the next best, and so on (the paper's
   "second largest ... or even successive nodes" rule).
3. *Items without any pair* come last, in order of their leaf in the input tree, and fill
   the slots still free in order of node id (the k-th such item of a node gets the k-th
   free slot), so they keep their old relative order.

Processing by decreasing margin lets the items that lose the most log-likelihood when
displaced choose first; scores are sums over an item's pairs, so an item with more pairs
(more weight in the objective) gets a proportionally larger margin. The rule is a serial
assignment, computed exactly but vectorised (:func:`greedy_assign`): all level-``l`` nodes
advance in lock step through chunks of their priority lists; a chunk's items all take their
best open node unless that overfills a node, in which case the chunk is cut just before the
first item that would overflow (everything before it is exactly what the one-by-one rule
gives) and the next chunk starts there with updated capacities.

Scoring. One jitted call per level step scores every pair against all candidates of its
item's current node in batches of ``batch_size`` pairs (a ``lax.fori_loop`` over the padded
batches, ``level=l'`` passed to the scorer), normalises per pair, and scatter-adds the rows
into an ``[items with pairs, C]`` accumulator on the device, which also masks capacity-0
candidates and computes every item's first choice and margin; the greedy assignment runs on
the host. The scorer is always called with the *input* tree (the model was trained on it:
DIN's hierarchical history representation reads ``tree.item_paths``). Shapes are static per
(number of pairs, level step) and ``score_fn`` is a static argument, so repeated rounds with
the same pairs and the same scorer function object reuse the compilations.

TDM (:func:`learn_tree_tdm`): balanced k-means (:func:`tree.build_kmeans`) over the items'
current leaf embeddings.

Category purity (:func:`category_purity`): with ``K`` distinct true categories, take the
first level ``j*`` whose node count ``B**j`` exceeds ``K`` (``H`` if none does); the purity
is the fraction of items whose level-``j*`` node's majority true category is their own,
i.e. ``sum over level-j* nodes of (count of its most frequent category) / N``. It is 1.0
iff no level-``j*`` node mixes categories, and does not depend on how majority ties break.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tdr_jax import tree as tree_lib

__all__ = [
    "item_user_pairs",
    "balanced_capacities",
    "greedy_assign",
    "learn_tree_tdr",
    "learn_tree_tdm",
    "category_purity",
    "purity_level",
]

# Default number of (pair, candidate node) scores per scorer call when batch_size is None.
_DEFAULT_NODE_BUDGET = 1 << 16


# --------------------------------------------------------------------------
# Training pairs per item
# --------------------------------------------------------------------------


def item_user_pairs(
    targets, num_items: int, *, max_users_per_item: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """The samples targeting each item (its ``A_i``), optionally capped per item.

  ``targets: int[S]`` is the target item of each training sample. Returns
  ``(pair_item int32[P], pair_sample int64[P])`` sorted by item, then by sample index.
  With ``max_users_per_item = k > 0`` an item with more than ``k`` samples keeps a
  uniformly random subset of ``k`` of them, drawn from ``numpy.random.default_rng(seed)``
  (same seed and targets -> same pairs); ``None`` or ``0`` keeps all.
  """
  t = np.asarray(targets)
  if t.ndim != 1:
    raise ValueError(f"targets must be 1-D, got shape {t.shape}")
  if t.size and not np.issubdtype(t.dtype, np.integer):
    raise ValueError(f"targets must be integer item ids, got dtype {t.dtype}")
  t = t.astype(np.int64)
  if t.size and (t.min() < 0 or t.max() >= num_items):
    raise ValueError(
        f"targets must lie in [0, {num_items}), got min {t.min()}, max {t.max()}"
    )
  sample = np.arange(t.size, dtype=np.int64)
  if max_users_per_item:
    if max_users_per_item < 0:
      raise ValueError(f"max_users_per_item must be >= 0, got {max_users_per_item}")
    rng = np.random.default_rng(seed)
    tie = rng.random(t.size)  # a random rank for every sample
    order = np.lexsort((tie, t))  # by item, random inside an item
    ts = t[order]
    start = np.searchsorted(ts, ts, side="left")  # first position of each item's run
    keep = (np.arange(t.size) - start) < max_users_per_item
    sample = np.sort(order[keep])
    t = t[sample]
  order = np.lexsort((sample, t))
  return t[order].astype(np.int32), sample[order]


# --------------------------------------------------------------------------
# Capacities and the greedy assignment
# --------------------------------------------------------------------------


def balanced_capacities(num_items: int, *, branching: int) -> list[np.ndarray]:
  """Items every node must hold under the balanced placement: ``int64[B**j]`` per level
  ``j = 0..H`` (heap order). These are the capacities of tree learning."""
  b = int(branching)
  h = tree_lib.tree_height(num_items, branching=b)
  counts = [np.asarray([num_items], dtype=np.int64)]
  slot = np.arange(b)
  for _ in range(h):
    c = counts[-1]
    # c[:, None]: one row per parent node, B columns for its children.
    kids = c[:, None] // b + (slot[None, :] < (c[:, None] % b))
    counts.append(kids.reshape(-1))  # flatten parent-major = next level in heap order
  return counts


def _margins(scores: np.ndarray) -> np.ndarray:
  """Best minus second-best score per row (``+inf`` when one finite entry)."""
  m = scores.shape[0]
  if scores.shape[1] == 1:
    return np.full(m, np.inf)
  top2 = -np.partition(-scores, 1, axis=1)[:, :2]
  with np.errstate(invalid="ignore"):
    marg = top2[:, 0].astype(np.float64) - top2[:, 1]
  return np.where(np.isneginf(top2[:, 1]), np.inf, marg)


def greedy_assign(
    scores, group, capacity, *, priority=None, first_choice=None, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Serial capacity-constrained assignment, computed in vectorised chunks.

  Args:
    scores: ``float[M, C]`` score of every row (item) for each of the ``C`` candidate
      slots of its group; ``-inf`` marks slots the row must not take.
    group: ``int[M]`` group (level-``l`` node) of each row, in ``[0, G)``.
    capacity: ``int[G, C]`` capacity of each slot of each group. Every group must have
      at least as many slots as rows, and every row a finite score on every slot of
      positive capacity.
    priority: ``float[M]``, larger goes first inside a group (default: the margin
      between the row's best and second-best score); ties by smaller row index.
    first_choice: ``int[M]``, optional precomputed best slot of every row among the
      slots of positive capacity (ties: smaller slot). When both ``priority`` and
      ``first_choice`` are given, the ``[M, C]`` checks and temporaries are skipped.
    chunk: rows per group per vectorised round (default: rows per open slot). Any
      value gives the same result; it only trades rounds for wasted work.

  Rows are processed inside each group in priority order; each takes its highest-scoring
  slot that still has room (ties: smaller slot). Returns ``(slot int64[M], remaining
  int64[G, C])`` -- the chosen slot of every row and the capacity left afterwards.
  """
  s = np.asarray(scores)
  if s.ndim != 2:
    raise ValueError(f"scores must be [M, C], got shape {s.shape}")
  m, c = s.shape
  grp = np.asarray(group).astype(np.int64)
  rem = np.array(capacity, dtype=np.int64, copy=True)
  if rem.ndim != 2 or rem.shape[1] != c:
    raise ValueError(f"capacity must be [G, {c}], got shape {rem.shape}")
  g_total = rem.shape[0]
  if grp.shape != (m,) or (m and (grp.min() < 0 or grp.max() >= g_total)):
    raise ValueError("group must be int[M] with values in [0, G)")
  slot = np.full(m, -1, dtype=np.int64)
  if m == 0:
    return slot, rem
  rows_per_group = np.bincount(grp, minlength=g_total)
  if (rows_per_group > rem.sum(axis=1)).any():
    g = int(np.flatnonzero(rows_per_group > rem.sum(axis=1))[0])
    raise ValueError(f"group {g} has {rows_per_group[g]} rows but {rem[g].sum()} slots")
  if priority is None or first_choice is None:
    open0 = rem[grp] > 0  # [M, C]
    if not np.isfinite(np.where(open0, s, 0.0)).all():
      raise ValueError("scores must be finite on every slot with positive capacity")
    masked = np.where(open0, s, -np.inf)
    if priority is None:
      priority = _margins(masked)
    if first_choice is None:
      first_choice = np.argmax(masked, axis=1)
    del open0, masked
  priority = np.asarray(priority, dtype=np.float64)
  # Current proposal of every row: its best slot among those open when last checked.
  prop = np.array(first_choice, dtype=np.int64, copy=True)

  order = np.lexsort((np.arange(m), -priority, grp))  # group, priority desc, row
  gstart = np.concatenate([[0], np.cumsum(rows_per_group)[:-1]])
  active = np.flatnonzero(rows_per_group)
  start = gstart[active]
  end = rows_per_group[active]
  ptr = np.zeros(active.size, dtype=np.int64)
  c_open = max(1, int((rem > 0).sum(axis=1).max()))
  k = int(chunk) if chunk else max(1, -(-int(end.max()) // c_open))
  kk = np.arange(k)

  while True:
    live = np.flatnonzero(ptr < end)
    if live.size == 0:
      break
    a = live.size
    g = active[live]  # [A] group ids
    left = end[live] - ptr[live]
    valid = kk[None, :] < left[:, None]  # [A, K]
    pos = np.minimum(start[live, None] + ptr[live, None] + kk[None, :], m - 1)
    rows = order[pos]  # [A, K]
    gk = np.broadcast_to(g[:, None], rows.shape)
    pr = prop[rows]
    # A proposal whose slot filled up since it was computed is recomputed.
    stale = valid & (rem[gk, pr] <= 0)
    if stale.any():
      r, gg = rows[stale], gk[stale]
      best = np.argmax(np.where(rem[gg] > 0, s[r], -np.inf), axis=1)
      prop[r] = best
      pr[stale] = best
    # Occurrence number of each (group, slot) proposal within the chunk, in row order.
    key = np.where(valid, np.arange(a)[:, None] * c + pr, a * c).reshape(-1)
    srt = np.argsort(key, kind="stable")
    ks = key[srt]
    new_run = np.ones(ks.size, dtype=bool)
    new_run[1:] = ks[1:] != ks[:-1]
    idx = np.arange(ks.size)
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    occ = np.empty(ks.size, dtype=np.int64)
    occ[srt] = idx - run_start
    occ = occ.reshape(a, k)
    over = valid & (occ >= rem[gk, pr])
    # Accept the prefix before the first overflowing row (all valid rows if none).
    first = np.where(over.any(axis=1), over.argmax(axis=1), np.minimum(left, k))
    acc = kk[None, :] < first[:, None]
    slot[rows[acc]] = pr[acc]
    taken = np.bincount((np.arange(a)[:, None] * c + pr)[acc], minlength=a * c)
    rem[g] -= taken.reshape(a, c)
    ptr[live] += first
  return slot, rem


def _fill_free_slots(rem: np.ndarray, group: np.ndarray, order_key: np.ndarray) -> np.ndarray:
  """Slots for rows without scores: inside each group, rows sorted by ``order_key`` take
  the free slots in slot order. ``rem[G, C]`` must hold exactly as many free slots per
  group as such rows. Returns ``int64[len(group)]`` slots."""
  n = group.shape[0]
  out = np.empty(n, dtype=np.int64)
  if n == 0:
    return out
  g_total, c = rem.shape
  order = np.lexsort((order_key, group))
  free = np.repeat(np.arange(g_total * c), rem.reshape(-1))  # flat (group, slot), sorted
  if free.size != n or not np.array_equal(free // c, group[order]):
    raise RuntimeError("free slots do not match the unscored items of each node")
  out[order] = free % c
  return out


# --------------------------------------------------------------------------
# Batched scoring of one level step
# --------------------------------------------------------------------------


def _level_first(branching: int, level: int) -> int:
  return tree_lib.level_start(branching, level)


@functools.partial(
    jax.jit,
    static_argnames=(
        "score_fn", "branching", "level_from", "level_to", "matching", "path_levels",
        "batch_size",
    ),
)
def _step_scores(params, tree, hist, pair_item, pair_row, row_item, pos, caps, *, score_fn,
                 branching, level_from, level_to, matching, path_levels, batch_size):
  """Matching scores of one level step, with what the greedy pass needs first.

  ``hist/pair_item/pair_row`` are padded to a multiple of ``batch_size`` (padding rows
  carry ``pair_row = num_rows`` and are dropped). ``row_item[r]`` is the item of score row
  ``r``; ``pos[i]`` is item i's node position inside level ``level_from``; ``caps[t]`` the
  capacities of level ``level_from + 1 + t`` (only the last level's without
  ``path_levels``).

  Returns ``scores float32[num_rows, C]`` (summed log-probabilities of the row's pairs for
  every level-``level_to`` descendant of its item's node; ``-inf`` on capacity-0 nodes),
  ``margin float32[num_rows]`` (best minus second best, ``+inf`` with one candidate),
  ``first int32[num_rows]`` (best candidate, smallest on ties) and ``finite bool[]`` (no
  NaN/inf on a candidate that can hold items)."""
  num_rows = row_item.shape[0]
  b = branching
  n_cand = b ** (level_to - level_from)
  levels = range(level_from + 1, level_to + 1) if path_levels else (level_to,)
  n_batches = hist.shape[0] // batch_size

  def body(i, acc):
    lo = i * batch_size
    h = jax.lax.dynamic_slice_in_dim(hist, lo, batch_size)
    items = jax.lax.dynamic_slice_in_dim(pair_item, lo, batch_size)
    rows = jax.lax.dynamic_slice_in_dim(pair_row, lo, batch_size)
    base = pos[items]  # [bs] level-`level_from` position of each pair's item
    total = jnp.zeros((batch_size, n_cand), jnp.float32)
    for j in levels:
      width = b ** (j - level_from)
      loc = base[:, None] * width + jnp.arange(width, dtype=jnp.int32)  # [bs, width]
      nodes = loc + _level_first(b, j)
      o = score_fn(params, tree, h, nodes, level=j).astype(jnp.float32)
      ok = caps[j - level_from - 1 if path_levels else 0][loc] > 0
      if matching == "softmax":
        v = jax.nn.log_softmax(jnp.where(ok, o, -jnp.inf), axis=-1)
      else:
        v = jax.nn.log_sigmoid(o)
      v = jnp.where(ok, v, 0.0)
      if width < n_cand:  # ancestor term, shared by its level-`level_to` descendants
        v = jnp.repeat(v, n_cand // width, axis=1, total_repeat_length=n_cand)
      total = total + v
    return acc.at[rows].add(total, mode="drop", indices_are_sorted=True)

  acc = jnp.zeros((num_rows, n_cand), jnp.float32)
  acc = jax.lax.fori_loop(0, n_batches, body, acc)
  loc = pos[row_item][:, None] * n_cand + jnp.arange(n_cand, dtype=jnp.int32)
  ok = caps[-1][loc] > 0
  finite = jnp.all(jnp.isfinite(acc) | ~ok)
  acc = jnp.where(ok, acc, -jnp.inf)
  first = jnp.argmax(acc, axis=1).astype(jnp.int32)
  best = jnp.max(acc, axis=1)
  col = jnp.arange(n_cand, dtype=jnp.int32)
  second = jnp.max(jnp.where(col == first[:, None], -jnp.inf, acc), axis=1)
  margin = jnp.where(jnp.isneginf(second), jnp.inf, best - second)
  return acc, margin, first, finite


@functools.partial(jax.jit, static_argnames=("num_groups", "iterations"))
def _sinkhorn_prices(scores, group, log_cap, *, temperature, tol, num_groups, iterations):
  """Log-domain Sinkhorn with row masses 1 and slot masses <= capacity (see
  :func:`capacity_prices`). Returns ``(g float32[G, C] <= 0, iterations run)``."""
  neg = jnp.float32(-jnp.inf)
  open_slot = jnp.isfinite(log_cap)  # [G, C] slots that can hold items
  s = scores / temperature  # [M, C]

  def body(carry):
    g, _, it = carry
    a = jnp.where(open_slot[group], s + g[group], neg)  # [M, C]
    f = -jax.nn.logsumexp(a, axis=1)  # [M] rows normalised to mass 1
    b = jnp.where(open_slot[group], s + f[:, None], neg)
    # Per-group column log-sum-exp over the group's rows.
    mx = jax.ops.segment_max(b, group, num_segments=num_groups)  # [G, C]
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    tot = jax.ops.segment_sum(jnp.exp(b - mx[group]), group, num_segments=num_groups)
    lse = jnp.log(tot) + mx  # -inf where no row can take the slot
    g_new = jnp.where(open_slot, jnp.minimum(0.0, log_cap - lse), 0.0)
    delta = jnp.max(jnp.abs(g_new - g))
    return g_new, delta, it + 1

  def cond(carry):
    _, delta, it = carry
    return (it < iterations) & (delta > tol)

  g0 = jnp.zeros(log_cap.shape, jnp.float32)
  g, _, it = jax.lax.while_loop(cond, body, (g0, jnp.float32(jnp.inf), jnp.int32(0)))
  return g * temperature, it


def capacity_prices(scores, group, capacity, *, temperature: float = 1.0,
                    iterations: int = 100, tol: float = 1e-3) -> tuple[np.ndarray, int]:
  """Prices of the capacity constraints of the assignment problem of one level step.

  The problem is: give every row (item) one slot of its group (its level-``l`` node's
  candidates) maximising the total score, with at most ``capacity`` rows per slot. Its
  entropy-regularised relaxation (temperature ``tau``) is solved by Sinkhorn iterations in
  the log domain (row masses 1, slot masses at most the capacity, so only over-demanded
  slots get a price); the result is the slot prices ``p = -g >= 0``, in score units.
  Subtracting them removes what every row of a group wants alike (e.g. a popular node
  that every item's users favour), leaving each row's *relative* preference, so that the
  greedy pass of :func:`greedy_assign` on ``scores - p`` meets few full slots and lands
  close to the optimal assignment (measured against an exact solver in BUILD_NOTES.md).

  Args:
    scores: ``float[M, C]``; ``-inf`` where the row must not go.
    group: ``int[M]`` group of each row, in ``[0, G)``.
    capacity: ``int[G, C]``.
    temperature: ``tau`` in score units; smaller is closer to the exact optimum and
      converges more slowly.
    iterations: maximum Sinkhorn iterations; ``tol``: stop when no potential moves by
      more than ``tol`` (in units of ``tau``).
  Returns:
    ``(prices float32[G, C] >= 0, iterations run)``.
  """
  sc = np.asarray(scores, dtype=np.float32)
  cap = np.asarray(capacity)
  grp = np.asarray(group).astype(np.int32)
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  with np.errstate(divide="ignore"):
    log_cap = np.log(cap.astype(np.float64)).astype(np.float32)  # -inf: closed slot
  g, it = _sinkhorn_prices(jnp.asarray(sc), jnp.asarray(grp), jnp.asarray(log_cap),
                           temperature=jnp.float32(temperature), tol=jnp.float32(tol),
                           num_groups=int(cap.shape[0]), iterations=int(iterations))
  return -np.asarray(g), int(it)


# --------------------------------------------------------------------------
# TDR / JTM tree learning
# --------------------------------------------------------------------------


def learn_tree_tdr(
    score_fn: Callable,
    params,
    tree: tree_lib.Tree,
    histories,
    pair_item,
    *,
    gap: int = 7,
    batch_size: int | None = None,
    matching: str = "softmax",
    path_levels: bool = False,
    assignment: str = "priced",
    temperature: float = 1.0,
    chunk: int | None = None,
    return_stats: bool = False,
):
  """Re-learns the item-to-leaf mapping with the model fixed (TDR sec. 6 / JTM Alg. 2).

  Args:
    score_fn: ``score_fn(params, tree, history, nodes, level=None) -> float[U, M]``.
    params: the fixed model parameters.
    tree: the current tree (also the one the scorer sees).
    histories: ``int32[P, L]`` history of every pair (sample).
    pair_item: ``int[P]`` the item each pair targets (any order; items may have no pair).
    gap: layer gap ``d >= 1``; each step moves from level ``l`` to ``min(H, l + d)``.
    batch_size: pairs per scorer call (default per step: the largest power of two
      <= 65536 / candidates, at least 8).
    matching: ``"softmax"`` (TDR, Eq. 24) or ``"binary"`` (JTM, log sigmoid).
    path_levels: also count the candidates' ancestors at the levels inside the gap.
    assignment: ``"greedy"``: the greedy rule on the matching scores themselves;
      ``"priced"`` (default): the same greedy rule on the scores minus the capacity prices
      of :func:`capacity_prices` (see the module docstring).
    temperature: Sinkhorn temperature of ``"priced"``, in score units.
    chunk: rows per node per round of :func:`greedy_assign` (result-neutral).
    return_stats: also return a dict of per-step timings and counts.

  Returns the new :class:`Tree` (validated), or ``(tree, stats)``. See the module
  docstring for the capacities and the deterministic greedy order.
  """
  if matching not in ("softmax", "binary"):
    raise ValueError(f"matching must be 'softmax' or 'binary', got {matching!r}")
  if assignment not in ("greedy", "priced"):
    raise ValueError(f"assignment must be 'greedy' or 'priced', got {assignment!r}")
  gap = int(gap)
  if gap < 1:
    raise ValueError(f"gap must be >= 1, got {gap}")
  hist = np.asarray(histories)
  items = np.asarray(pair_item)
  if hist.ndim != 2 or items.shape != (hist.shape[0],):
    raise ValueError(
        f"expected histories [P, L] and pair_item [P], got {hist.shape} and {items.shape}"
    )
  n, b, h = tree.num_items, tree.branching, tree.height
  if items.size and (items.min() < 0 or items.max() >= n):
    raise ValueError(f"pair_item must lie in [0, {n})")

  stats = {"steps": []}
  caps = balanced_capacities(n, branching=b)

  # Pairs sorted by item (already so when they come from item_user_pairs); score rows are
  # the items that have at least one pair, in item order.
  if items.size and not np.all(items[1:] >= items[:-1]):
    order = np.argsort(items, kind="stable")
    items, hist = items[order], hist[order]
  items = items.astype(np.int32, copy=False)
  hist = hist.astype(np.int32, copy=False)
  p = int(items.size)
  new_run = np.ones(p, dtype=bool)
  new_run[1:] = items[1:] != items[:-1]
  scored = items[new_run].astype(np.int64)
  num_rows = int(scored.size)
  pair_row = (np.cumsum(new_run) - 1).astype(np.int32)
  has_pair = np.zeros(n, dtype=bool)
  has_pair[scored] = True
  unscored = np.flatnonzero(~has_pair)
  old_leaf = np.asarray(tree.item_to_leaf)

  # Batch size of every step (powers of two unless given, so one padding fits all).
  steps, level = [], 0
  while level < h:
    steps.append((level, min(h, level + gap)))
    level = steps[-1][1]
  cap_p = 1 << max(3, (max(p, 1) - 1).bit_length())  # no batch beyond all pairs
  if batch_size:
    sizes = [int(batch_size)] * len(steps)
  else:
    sizes = [min(cap_p, 1 << max(3, (_DEFAULT_NODE_BUDGET // b ** (t - f)).bit_length() - 1))
             for f, t in steps]
  if num_rows:
    pad = (-p) % max(sizes)
    hist_dev = jnp.asarray(np.concatenate([hist, np.full((pad, hist.shape[1]), -1, np.int32)]))
    item_dev = jnp.asarray(np.concatenate([items, np.zeros(pad, np.int32)]))
    row_dev = jnp.asarray(np.concatenate([pair_row, np.full(pad, num_rows, np.int32)]))
    row_item_dev = jnp.asarray(scored.astype(np.int32))
    tree_dev = jax.device_put(tree)

  pos = np.zeros(n, dtype=np.int64)  # node position of every item inside level l
  for (level, nxt), bs in zip(steps, sizes):
    n_cand = b ** (nxt - level)
    # reshape(groups, C): the level-l' capacities grouped under their level-l node.
    cap = caps[nxt].reshape(b**level, n_cand)
    slot = np.empty(n, dtype=np.int64)
    rem = cap
    t0 = time.perf_counter()
    t1 = t0
    if num_rows:
      lv = range(level + 1, nxt + 1) if path_levels else (nxt,)
      caps_dev = tuple(jnp.asarray(caps[j].astype(np.int32)) for j in lv)
      out = _step_scores(
          params, tree_dev, hist_dev, item_dev, row_dev, row_item_dev,
          jnp.asarray(pos.astype(np.int32)), caps_dev, score_fn=score_fn, branching=b,
          level_from=level, level_to=nxt, matching=matching,
          path_levels=bool(path_levels), batch_size=bs)
      sc, margin, first, finite = jax.device_get(out)
      t1 = time.perf_counter()
      if not finite:
        raise FloatingPointError(
            f"non-finite matching scores in level step {level} -> {nxt} (NaN/inf from "
            "the scorer?)")
      iters = 0
      if assignment == "priced":
        prices, iters = capacity_prices(sc, pos[scored], cap, temperature=temperature)
        # Margins and first choices of the priced scores (recomputed by the pass).
        s_slot, rem = greedy_assign(sc - prices[pos[scored]], pos[scored], cap,
                                    chunk=chunk)
      else:
        s_slot, rem = greedy_assign(sc, pos[scored], cap, priority=margin,
                                    first_choice=first, chunk=chunk)
      slot[scored] = s_slot
    if unscored.size:
      slot[unscored] = _fill_free_slots(rem, pos[unscored], old_leaf[unscored])
    t2 = time.perf_counter()
    stats["steps"].append({"from": level, "to": nxt, "candidates": n_cand,
                           "batch_size": bs, "score_s": t1 - t0, "assign_s": t2 - t1,
                           "sinkhorn_iterations": iters if num_rows else 0})
    pos = pos * n_cand + slot
  new_tree = tree_lib.from_item_to_leaf(pos.astype(np.int32), branching=b, num_items=n)
  return (new_tree, stats) if return_stats else new_tree


# --------------------------------------------------------------------------
# TDM tree learning
# --------------------------------------------------------------------------


def learn_tree_tdm(rng: np.random.Generator, node_embeddings, tree: tree_lib.Tree, *,
                   branching: int | None = None, **kmeans_kwargs) -> tree_lib.Tree:
  """TDM tree learning: balanced k-means over the items' current leaf embeddings.

  ``node_embeddings: float[num_nodes, D]`` (e.g. the DIN node table); item ``i`` is
  represented by ``node_embeddings[tree.item_paths[i, H]]``. Extra keyword arguments go
  to :func:`tree.build_kmeans`.
  """
  emb = np.asarray(node_embeddings)
  if emb.ndim != 2 or emb.shape[0] < tree.num_nodes:
    raise ValueError(
        f"node_embeddings must be [num_nodes={tree.num_nodes}, D], got {emb.shape}")
  b = tree.branching if branching is None else int(branching)
  x = emb[np.asarray(tree.item_paths)[:, tree.height]]
  return tree_lib.build_kmeans(rng, x, branching=b, **kmeans_kwargs)


# --------------------------------------------------------------------------
# Category purity
# --------------------------------------------------------------------------


def purity_level(num_categories: int, *, branching: int, height: int) -> int:
  """First level whose node count ``B**j`` exceeds ``num_categories`` (at most ``H``)."""
  j = 0
  while j < height and branching**j <= num_categories:
    j += 1
  return j


def category_purity(tree: tree_lib.Tree, true_category, *, level: int | None = None,
                    items=None) -> float:
  """Fraction of items whose node at the purity level has their category as majority.

  ``true_category: int[N]``. The level is :func:`purity_level` of the number of distinct
  categories unless given. Over all items it equals ``sum over nodes of max_c count(node, c)
  / N``. ``items: bool[N]`` restricts the fraction to those items (e.g. the mislabelled
  ones), the majorities still being those of all items (ties go to the smaller category id).
  Returns NaN when ``items`` selects none.
  """
  cat = np.asarray(true_category)
  n = tree.num_items
  if cat.shape != (n,):
    raise ValueError(f"true_category must have shape ({n},), got {cat.shape}")
  _, cat_id = np.unique(cat, return_inverse=True)
  cat_id = cat_id.reshape(-1).astype(np.int64)
  k = int(cat_id.max()) + 1
  j = purity_level(k, branching=tree.branching, height=tree.height) if level is None else level
  if not 0 <= j <= tree.height:
    raise ValueError(f"level must lie in [0, {tree.height}], got {j}")
  node = np.asarray(tree.item_paths)[:, j].astype(np.int64)
  node = node - node.min()
  counts = np.zeros((int(node.max()) + 1, k), dtype=np.int64)
  np.add.at(counts, (node, cat_id), 1)
  home = counts.argmax(1)[node] == cat_id  # [N] item's category is its node's majority
  if items is None:
    return float(home.mean())
  sel = np.asarray(items, dtype=bool)
  if sel.shape != (n,):
    raise ValueError(f"items must have shape ({n},), got {sel.shape}")
  return float(home[sel].mean()) if sel.any() else float("nan")
