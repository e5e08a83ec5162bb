"""Synthetic interaction data with a known Bayes-optimal answer.

Generative process (all draws from seeded numpy Generators):

* Taxonomy: `num_top` top categories, each with `num_sub` sub-categories (C = num_top * num_sub
  leaf categories, the *published* categories), each split into up to `num_clusters` hidden
  clusters (K = C * num_clusters cluster ids, category-major: k = c * num_clusters + m). Every
  item belongs to one cluster. Category sizes vary.
* Shapes (world v2): a fraction `flat_fraction` of the categories are large and flat (size
  weight x `flat_size_factor`, prior mass x `flat_mass_factor`, Zipf exponent
  `flat_zipf_exponent`), the others small and peaked (Zipf exponent `zipf_exponent`). Inside a
  category, the item of popularity rank r has weight (r + 1) ** -exponent; an item's
  probability inside its cluster is its weight renormalized over the cluster.
* A user's interest is a Dirichlet tree over top -> sub -> cluster: theta_top ~ Dir(alpha_top),
  theta_sub[t] ~ Dir(alpha_sub[t]), theta_cluster[c] ~ Dir(alpha_cluster[c]); P(cluster k) =
  theta_top[t] * theta_sub[t, s] * theta_cluster[c, m]. Small concentrations make users sparse
  mixtures; the prior means carry a global popularity of categories and clusters. The cluster
  level makes the ranking inside a category personal (two users of one category prefer
  different clusters of it), and the clusters are never published.
* Each interaction draws a cluster from the user's interest, then an item from the cluster's
  popularity. With drift hazard rho > 0, before each interaction after the first the user's
  interest is redrawn from the prior with probability rho (drift by change points), so recent
  history tells more than old history.
* The published category of an item is noisy: a fraction `label_noise` of items carry a wrong,
  uniformly drawn category. The true one is kept for evaluation. With `categories=False` the
  csv has no category column at all (as in many real files).

Because the model is conjugate, the posterior predictive of the next interaction given the
visible history is closed form (counts plus concentrations at each level of the Dirichlet
tree); with drift it is exact too, by Bayesian online change-point recursion over the run
length of the current segment. `SyntheticWorld.eta` returns, for each user, the true
probability of each item being a label event (the mean over the label horizon of the k-step-
ahead predictive), and the oracle retrieves the top K of it: the Bayes-optimal retriever in the
sense of TDR sec. 3.3/4.2.

Worlds (`WORLDS`, `world_config`): `v2` is the project's synthetic default; `v1` is the earlier
default (no clusters, one shape, Zipf(1), no drift, 20% wrong categories), kept so that its
figures stay reproducible: its draws are exactly those of the earlier generator.

The data are written in the generic csv format (`user,item,timestamp[,category]`) and read
back through the same csv loader as users' own data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Settings of the generator. The defaults are the project's synthetic default (world v2)."""
  num_users: int = 8000
  num_items: int = 5000  # ceil(log2 5000) = 13 tree levels below the root with B = 2
  num_top: int = 16
  num_sub: int = 8
  num_clusters: int = 4  # hidden clusters per published category (1 = none)
  min_len: int = 15
  mean_extra_len: float = 25.0  # sequence length = min_len + Geometric extra, capped
  max_len: int = 200
  alpha_top: float = 0.3  # total top-level concentration is alpha_top * num_top
  alpha_sub: float = 0.4  # per top category: alpha_sub * num_sub
  alpha_cluster: float = 0.15  # per category: alpha_cluster * (its number of clusters)
  zipf_exponent: float = 1.2  # inside peaked categories (all categories when flat_fraction=0)
  flat_fraction: float = 0.25  # share of large flat categories
  flat_size_factor: float = 6.0
  flat_mass_factor: float = 3.0
  flat_zipf_exponent: float = 0.2
  drift: float = 0.03  # change-point hazard per interaction
  label_noise: float = 0.5
  categories: bool = True  # False: the csv has no category column
  version: str = "v2"  # v1: the earlier generator's draws, exactly
  seed: int = 0

  def digest(self) -> str:
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# The named worlds of `--synthetic_world`: overrides of SyntheticConfig's defaults.
WORLDS: dict[str, dict] = {
    "v2": {},
    "v1": dict(version="v1", num_clusters=1, alpha_top=0.4, zipf_exponent=1.0,
               flat_fraction=0.0, drift=0.0, label_noise=0.2),
}


def world_config(name: str = "v2", *, categories: bool = True, **overrides) -> SyntheticConfig:
  """SyntheticConfig of the named world with `overrides` (num_users, num_items, seed, ...)."""
  if name not in WORLDS:
    raise ValueError(f"--synthetic_world={name!r}: choose from {sorted(WORLDS)}")
  return SyntheticConfig(**{**WORLDS[name], "categories": bool(categories), **overrides})


@dataclasses.dataclass
class SyntheticWorld:
  """The generator's parameters: everything the Bayes-optimal predictor needs.

  Attributes:
    config: the SyntheticConfig.
    item_category: int32[N] true leaf category c = t * num_sub + s of every generator item.
    item_cluster: int32[N] hidden cluster k = c * num_clusters + m of every item.
    observed_category: int32[N] the published (noisy) category.
    item_in_cat_prob: float64[N] global P(item | its category).
    item_in_cluster_prob: float64[N] P(item | its cluster).
    flat: bool[C] the large flat categories.
    alpha_top: float64[num_top] top-level Dirichlet concentrations.
    alpha_sub: float64[num_top, num_sub] sub-level concentrations.
    alpha_cluster: float64[C, num_clusters] cluster-level concentrations (0 = no such cluster).
  """
  config: SyntheticConfig
  item_category: np.ndarray
  item_cluster: np.ndarray
  observed_category: np.ndarray
  item_in_cat_prob: np.ndarray
  item_in_cluster_prob: np.ndarray
  flat: np.ndarray
  alpha_top: np.ndarray
  alpha_sub: np.ndarray
  alpha_cluster: np.ndarray

  @property
  def num_categories(self) -> int:
    return self.config.num_top * self.config.num_sub

  @property
  def num_cluster_ids(self) -> int:
    return self.num_categories * self.config.num_clusters

  # -- predictive distributions ------------------------------------------------------------
  def _cluster_probs_from_counts(self, counts: np.ndarray) -> np.ndarray:
    """Posterior predictive over clusters of the Dirichlet tree.

    Args:
      counts: float[..., K] cluster counts of the observed segment (K = C * num_clusters).
    Returns:
      float64[..., K]; entries of clusters that do not exist are 0.
    """
    cfg = self.config
    lead = counts.shape[:-1]
    # [..., K] -> [..., T, S, M]: cluster ids are category-major, categories top-major.
    clu = counts.reshape(lead + (cfg.num_top, cfg.num_sub, cfg.num_clusters))
    sub = clu.sum(-1)
    top = sub.sum(-1)
    a_clu = self.alpha_cluster.reshape(cfg.num_top, cfg.num_sub, cfg.num_clusters)
    p_top = (self.alpha_top + top) / (self.alpha_top.sum() + top.sum(-1, keepdims=True))
    p_sub = (self.alpha_sub + sub) / (self.alpha_sub.sum(-1) + top)[..., None]
    p_clu = (a_clu + clu) / (a_clu.sum(-1) + sub)[..., None]
    return (p_top[..., None, None] * p_sub[..., None] * p_clu).reshape(counts.shape)

  def prior_cluster_probs(self) -> np.ndarray:
    """float64[K]: P(cluster) under the prior (the predictive of an empty history)."""
    return self._cluster_probs_from_counts(np.zeros((1, self.num_cluster_ids)))[0]

  def prior_item_probs(self) -> np.ndarray:
    """float64[N]: the predictive of an empty history (the generator's item popularity)."""
    return self.prior_cluster_probs()[self.item_cluster] * self.item_in_cluster_prob

  def prior_category_probs(self) -> np.ndarray:
    """float64[C]: P(category) under the prior."""
    return self.prior_cluster_probs().reshape(self.num_categories, -1).sum(-1)

  def cluster_predictive(self, history: Sequence[int], *, horizon: int = 1) -> np.ndarray:
    """Mean over k = 1..horizon of P(cluster of interaction n + k | history of length n).

    Args:
      history: generator item ids of the visible history, oldest first.
      horizon: number of future interactions averaged over (the label set's length).
    Returns:
      float64[K], sums to 1.
    """
    clus = self.item_cluster[np.asarray(history, dtype=np.int64)]
    num_k = self.num_cluster_ids
    rho = self.config.drift
    n = len(clus)
    if n == 0:
      return self.prior_cluster_probs()
    onehot = np.zeros((n, num_k))
    onehot[np.arange(n), clus] = 1.0
    cum = np.concatenate([np.zeros((1, num_k)), np.cumsum(onehot, axis=0)])  # [n+1, K]
    if rho == 0.0:
      return self._cluster_probs_from_counts(cum[n][None])[0]
    # Bayesian online change-point recursion. log_w[r-1] = log P(run length r | x_1..x_t),
    # run length = number of interactions in the current segment (x_t included). The item's
    # probability inside its cluster is the same under every run length and cancels.
    prior = self.prior_cluster_probs()
    log_w = np.zeros(1)
    for t in range(1, n):
      k = clus[t]
      r = np.arange(1, t + 1)
      seg_counts = cum[t][None] - cum[t - r]  # [t, K] counts of the last r interactions
      p_cont = self._cluster_probs_from_counts(seg_counts)[:, k]
      grow = log_w + np.log1p(-rho) + np.log(p_cont)
      reset = np.logaddexp.reduce(log_w) + np.log(rho) + np.log(prior[k])
      log_w = np.concatenate([[reset], grow])
      log_w -= np.logaddexp.reduce(log_w)
    r = np.arange(1, n + 1)
    seg_probs = self._cluster_probs_from_counts(cum[n][None] - cum[n - r])  # [n, K]
    p_seg = np.exp(log_w) @ seg_probs
    # k steps ahead the segment survives with probability (1 - rho)^k; after a change point
    # the (unobserved) new segment's draws follow the prior predictive.
    keep = np.mean((1.0 - rho) ** np.arange(1, horizon + 1))
    return keep * p_seg + (1.0 - keep) * prior

  def category_predictive(self, history: Sequence[int], *, horizon: int = 1) -> np.ndarray:
    """float64[C]: the cluster predictive summed per category."""
    p = self.cluster_predictive(history, horizon=horizon)
    return p.reshape(self.num_categories, -1).sum(-1)

  def eta(self, histories: Iterable[Sequence[int]], *, horizons: Sequence[int] | None = None
          ) -> np.ndarray:
    """True label probabilities of every generator item.

    Args:
      histories: per user, generator item ids of the visible history.
      horizons: per user, the label horizon (defaults to 1 each). Without drift it does not
        matter: every future interaction has the same predictive.
    Returns:
      float64[U, N].
    """
    histories = list(histories)
    if horizons is None:
      horizons = [1] * len(histories)
    if self.config.drift == 0.0:
      counts = np.zeros((len(histories), self.num_cluster_ids))
      for u, h in enumerate(histories):
        counts[u] = np.bincount(self.item_cluster[np.asarray(h, dtype=np.int64)],
                                minlength=self.num_cluster_ids)
      clu = self._cluster_probs_from_counts(counts)
    else:
      clu = np.stack([self.cluster_predictive(h, horizon=m) for h, m in zip(histories, horizons)])
    return clu[:, self.item_cluster] * self.item_in_cluster_prob[None, :]


def make_world(config: SyntheticConfig) -> SyntheticWorld:
  """Draws the taxonomy, shapes, clusters, popularity and priors from `config.seed`.

  The draws of stream [seed, 0] are those of world v1 (which has no flat categories and one
  cluster per category); what v2 adds is drawn from stream [seed, 2]."""
  rng = np.random.default_rng([config.seed, 0])
  extra = np.random.default_rng([config.seed, 2])
  num_cat = config.num_top * config.num_sub
  n = config.num_items
  m_max = config.num_clusters
  if n < num_cat:
    raise ValueError(f"num_items={n} must be at least the number of categories {num_cat}")
  if m_max < 1:
    raise ValueError(f"num_clusters={m_max} must be at least 1")
  flat = np.zeros(num_cat, bool)
  if config.flat_fraction > 0:
    flat = extra.random(num_cat) < config.flat_fraction
  # Category sizes: every category gets one item, the rest spread by Dirichlet weights.
  weights = rng.dirichlet(np.full(num_cat, 2.0))
  if flat.any():
    weights = np.where(flat, config.flat_size_factor, 1.0) * weights
    weights /= weights.sum()
  sizes = 1 + rng.multinomial(n - num_cat, weights)
  item_category = np.repeat(np.arange(num_cat), sizes)
  rng.shuffle(item_category)
  exponent = np.where(flat, config.flat_zipf_exponent, config.zipf_exponent)
  item_in_cat_prob = np.zeros(n)
  item_cluster = np.zeros(n, np.int64)
  alpha_cluster = np.zeros((num_cat, m_max))
  for c in range(num_cat):
    members = np.flatnonzero(item_category == c)
    rank = rng.permutation(len(members))
    w = (rank + 1.0) ** -exponent[c]
    item_in_cat_prob[members] = w / w.sum()
    m_c = min(m_max, len(members))
    if m_max > 1:
      # Every cluster of the category gets one item, the rest uniformly at random.
      slot = np.concatenate([np.arange(m_c), extra.integers(0, m_c, len(members) - m_c)])
      item_cluster[members] = c * m_max + extra.permutation(slot)
      alpha_cluster[c, :m_c] = config.alpha_cluster * m_c * extra.dirichlet(np.full(m_c, 3.0))
    else:
      item_cluster[members] = c
      alpha_cluster[c, 0] = 1.0  # one cluster: P(cluster | category) = 1 for any value
  in_cluster = np.bincount(item_cluster, weights=item_in_cat_prob, minlength=num_cat * m_max)
  item_in_cluster_prob = item_in_cat_prob / in_cluster[item_cluster]
  # Global popularity of categories enters through the prior means.
  top_mean = rng.dirichlet(np.full(config.num_top, 3.0))
  sub_mean = rng.dirichlet(np.full(config.num_sub, 3.0), size=config.num_top)
  if flat.any():
    sub_mean = sub_mean * np.where(flat, config.flat_mass_factor, 1.0).reshape(sub_mean.shape)
    sub_mean /= sub_mean.sum(-1, keepdims=True)
  alpha_top = config.alpha_top * config.num_top * top_mean
  alpha_sub = config.alpha_sub * config.num_sub * sub_mean
  observed = item_category.copy()
  noisy = rng.random(n) < config.label_noise
  shift = rng.integers(1, num_cat, size=n)  # a uniformly drawn *different* category
  observed[noisy] = (item_category[noisy] + shift[noisy]) % num_cat
  return SyntheticWorld(config=config, item_category=item_category.astype(np.int32),
                        item_cluster=item_cluster.astype(np.int32),
                        observed_category=observed.astype(np.int32),
                        item_in_cat_prob=item_in_cat_prob,
                        item_in_cluster_prob=item_in_cluster_prob, flat=flat,
                        alpha_top=alpha_top, alpha_sub=alpha_sub, alpha_cluster=alpha_cluster)


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray, rows: int) -> np.ndarray:
  """float64[rows, *alpha.shape]: independent Dirichlet draws over the last axis.

  Entries with alpha = 0 are 0 (a cluster that does not exist)."""
  g = rng.gamma(np.broadcast_to(alpha, (rows,) + alpha.shape))
  g = np.maximum(g, 1e-300) * (alpha > 0)
  return g / g.sum(-1, keepdims=True)


def _draw_rows(rng: np.random.Generator, probs: np.ndarray, row_of: np.ndarray) -> np.ndarray:
  """int64[len(row_of)]: one draw from probs[row_of[i]] (rows sum to 1) per entry."""
  cdf = np.cumsum(probs, axis=1)
  cdf[:, -1] = 1.0
  u = rng.random(len(row_of))
  out = np.empty(len(row_of), dtype=np.int64)
  chunk = max(1, (1 << 22) // probs.shape[1])
  for lo in range(0, len(row_of), chunk):
    rows = cdf[row_of[lo:lo + chunk]]
    out[lo:lo + chunk] = np.minimum((rows < u[lo:lo + chunk, None]).sum(1), probs.shape[1] - 1)
  return out


def _draw_within(rng: np.random.Generator, group: np.ndarray, prob: np.ndarray,
                 wanted: np.ndarray) -> np.ndarray:
  """Generator item ids: for each entry of `wanted` (a group id), one item of that group drawn
  with probability `prob` (which sums to 1 over each group's items). Inverse CDF on keys
  g + cdf_within(g), sorted group-major."""
  num_groups = int(group.max()) + 1
  order = np.lexsort((np.arange(len(group)), group))
  sorted_g = group[order]
  within = np.cumsum(prob[order])
  first = np.searchsorted(sorted_g, sorted_g, side="left")
  within = within - np.concatenate([[0.0], within])[first]
  keys = sorted_g + np.minimum(within, 1.0)
  last_of = np.searchsorted(sorted_g, np.arange(num_groups), side="right") - 1
  present = np.bincount(group, minlength=num_groups) > 0
  keys[last_of[present]] = np.flatnonzero(present) + 1.0
  idx = np.searchsorted(keys, wanted + rng.random(len(wanted)), side="left")
  idx = np.minimum(idx, last_of[wanted])
  return order[idx]


def sample_interactions(world: SyntheticWorld) -> dict[str, np.ndarray]:
  """Draws every user's sequence. Returns int64 arrays user, item, timestamp, in time order."""
  cfg = world.config
  rng = np.random.default_rng([cfg.seed, 1])
  p_extra = 1.0 / (1.0 + cfg.mean_extra_len)
  lengths = np.minimum(cfg.min_len + rng.geometric(p_extra, size=cfg.num_users) - 1, cfg.max_len)
  user = np.repeat(np.arange(cfg.num_users), lengths)
  start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  pos = np.arange(len(user)) - start[user]
  # Segments of constant interest: a new one at each user's start and at each change point.
  change = (pos == 0) | (rng.random(len(user)) < cfg.drift)
  segment = np.cumsum(change) - 1
  num_seg = int(segment[-1]) + 1
  theta_top = _dirichlet_rows(rng, world.alpha_top, num_seg)  # [S, T]
  theta_sub = _dirichlet_rows(rng, world.alpha_sub, num_seg)  # [S, T, Sub]
  # [S, T, Sub] -> [S, C], top-major like the category ids.
  p_cat = (theta_top[:, :, None] * theta_sub).reshape(num_seg, -1)
  if cfg.version == "v1":  # the earlier generator: category, then Zipf item of the category
    cat = _draw_rows(rng, p_cat, segment)
    item = _draw_within(rng, world.item_category.astype(np.int64), world.item_in_cat_prob, cat)
  else:
    theta_clu = _dirichlet_rows(rng, world.alpha_cluster, num_seg)  # [S, C, M]
    p_clu = (p_cat[:, :, None] * theta_clu).reshape(num_seg, -1)  # [S, K] category-major
    clu = _draw_rows(rng, p_clu, segment)
    item = _draw_within(rng, world.item_cluster.astype(np.int64), world.item_in_cluster_prob,
                        clu)
  timestamp = 1_500_000_000 + 60 * pos + rng.integers(0, 60, size=len(user))
  return {"user": user, "item": item.astype(np.int64), "timestamp": timestamp}


def write_csv(path: str, inter: dict[str, np.ndarray], observed_category: np.ndarray | None
              ) -> None:
  """Writes the generic csv format: header `user,item,timestamp[,category]` (no category
  column when `observed_category` is None)."""
  columns = {
      "user": pa.array(inter["user"]).cast(pa.string()),
      "item": pa.array(inter["item"]).cast(pa.string()),
      "timestamp": pa.array(inter["timestamp"]),
  }
  if observed_category is not None:
    columns["category"] = pa.array(observed_category[inter["item"]]).cast(pa.string())
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write((",".join(columns) + "\n").encode())
    pacsv.write_csv(pa.table(columns), f, write_options=pacsv.WriteOptions(
        include_header=False, quoting_style="none"))
  os.replace(tmp, path)


def materialize(data_dir: str, config: SyntheticConfig | None = None) -> tuple[str, SyntheticWorld]:
  """Generates (once) the synthetic csv under data_dir and returns (csv folder, world).

  The folder is `data_dir/synthetic-<config digest>/`, holding `interactions.csv` and
  `config.json`; the world is rebuilt from the config (cheap and deterministic).
  """
  config = config or SyntheticConfig()
  world = make_world(config)
  folder = os.path.join(data_dir, f"synthetic-{config.digest()}")
  csv_path = os.path.join(folder, "interactions.csv")
  if not os.path.exists(csv_path):
    os.makedirs(folder, exist_ok=True)
    inter = sample_interactions(world)
    write_csv(csv_path, inter, world.observed_category if config.categories else None)
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(dataclasses.asdict(config), f, indent=1, sort_keys=True)
  return folder, world


def dataset_eta(world: SyntheticWorld, item_raw_ids: np.ndarray, histories: Iterable[np.ndarray],
                horizons: Sequence[int] | None = None) -> np.ndarray:
  """eta over the dataset's dense item ids.

  Args:
    world: the generator.
    item_raw_ids: [N_dense] raw ids (strings of generator item ids) of the dataset's items.
    histories: per user, DENSE item ids of the visible history (the whole first half).
    horizons: per user, the number of label interactions.
  Returns:
    float64[U, N_dense]: eta restricted to the corpus and renormalized over it.
  """
  gen_ids = np.asarray([int(x) for x in item_raw_ids], dtype=np.int64)
  gen_hist = [gen_ids[np.asarray(h, dtype=np.int64)] for h in histories]
  full = world.eta(gen_hist, horizons=horizons)
  eta = full[:, gen_ids]
  return eta / eta.sum(1, keepdims=True)


def _logsumexp(x: np.ndarray) -> np.ndarray:
  """log(sum(exp(x), axis=-1)) of finite rows float[..., M] -> float[...]."""
  m = x.max(axis=-1)
  return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def next_cluster_probs(world: SyntheticWorld, histories: Sequence[Sequence[int]]) -> np.ndarray:
  """P(cluster of the next interaction | the whole history), for a batch of histories.

  The same quantity as ``world.cluster_predictive(h, horizon=1)`` for every ``h``, computed for
  the batch at once: the change-point recursion runs over positions for the histories still
  longer than the position (the others keep their run-length posterior), and the
  probability of continuing a segment is taken for the observed cluster only, from the counts
  of that cluster, its category and its top category in the segment, instead of for all K
  clusters. Cost O(B * L^2) for the recursion plus O(L * K) per history, where the reference
  costs O(L^2 * K) per history.

  Args:
    world: the generator.
    histories: B histories of generator item ids, oldest first (any lengths, empty allowed).
  Returns:
    float64[B, K], rows sum to 1.
  """
  cfg = world.config
  rho = cfg.drift
  num_k, per_cat = world.num_cluster_ids, cfg.num_clusters
  per_top = cfg.num_sub * per_cat
  lengths = np.asarray([len(h) for h in histories], np.int64)
  num = len(lengths)
  prior = world.prior_cluster_probs()
  out = np.tile(prior, (num, 1))
  if num == 0 or lengths.max() == 0:
    return out
  width = int(lengths.max())
  clus = np.full((num, width), -1, np.int64)  # [B, L] right-padded with -1
  for b, h in enumerate(histories):
    clus[b, :len(h)] = world.item_cluster[np.asarray(h, dtype=np.int64)]
  # Run-length posteriors: column r-1 = log P(run length r) (columns beyond the history's
  # current position unused).
  log_w = np.zeros((num, width))
  if rho > 0.0:
    a_top, a_sub = world.alpha_top, world.alpha_sub.reshape(-1)  # [T], [C]
    a_clu = world.alpha_cluster.reshape(-1)  # [K]
    a_sub_row = world.alpha_sub.sum(-1)  # [T] the sub-level total of each top category
    a_clu_row = world.alpha_cluster.sum(-1)  # [C] the cluster-level total of each category
    for t in range(1, width):
      rows = np.flatnonzero(t < lengths)  # [A] histories with an interaction at position t
      k = clus[rows, t]  # [A] the cluster of interaction t
      prev = clus[rows, :t][:, ::-1]  # [A, t] most recent first: column r-1 ends run length r
      # Counts of k, its category and its top category among the last r interactions (all
      # t previous entries are real items: the rows are histories longer than t).
      n_clu = np.cumsum(prev == k[:, None], axis=1)
      n_cat = np.cumsum(prev // per_cat == (k // per_cat)[:, None], axis=1)
      n_top = np.cumsum(prev // per_top == (k // per_top)[:, None], axis=1)
      r = np.arange(1, t + 1, dtype=np.float64)[None, :]
      top, cat = k // per_top, k // per_cat
      p_top = (a_top[top][:, None] + n_top) / (a_top.sum() + r)
      p_sub = (a_sub[cat][:, None] + n_cat) / (a_sub_row[top][:, None] + n_top)
      p_clu = (a_clu[k][:, None] + n_clu) / (a_clu_row[cat][:, None] + n_cat)
      old = log_w[rows, :t]  # [A, t] log P(run length 1..t), normalized
      grow = old + np.log1p(-rho) + np.log(p_top * p_sub * p_clu)
      reset = _logsumexp(old) + np.log(rho) + np.log(prior[k])
      new = np.concatenate([reset[:, None], grow], axis=1)  # [A, t + 1]
      log_w[rows, :t + 1] = new - _logsumexp(new)[:, None]
  for b in np.flatnonzero(lengths > 0):
    n = int(lengths[b])
    onehot = np.zeros((n, num_k))
    onehot[np.arange(n), clus[b, :n][::-1]] = 1.0
    seg_counts = np.cumsum(onehot, axis=0)  # [n, K] row r-1: counts of the last r interactions
    if rho == 0.0:
      out[b] = world._cluster_probs_from_counts(seg_counts[-1:])[0]
      continue
    p_seg = np.exp(log_w[b, :n]) @ world._cluster_probs_from_counts(seg_counts)
    out[b] = (1.0 - rho) * p_seg + rho * prior
  return out


def next_item_eta(world: SyntheticWorld, item_raw_ids: np.ndarray,
                  histories: Sequence[np.ndarray]) -> np.ndarray:
  """Exact eta of the NEXT interaction (horizon 1) over the dataset's dense item ids.

  ``dataset_eta(world, item_raw_ids, histories, [1] * B)`` computed by `next_cluster_probs`
  (batched, for the training samples of TDR(T-RL) with ``--rectify_estimator=exact``).

  Args:
    world: the generator.
    item_raw_ids: [N_dense] raw ids (strings of generator item ids) of the dataset's items.
    histories: B histories of DENSE item ids, oldest first (the whole prefix, not a window).
  Returns:
    float64[B, N_dense]: eta restricted to the corpus and renormalized over it.
  """
  gen_ids = np.asarray([int(x) for x in item_raw_ids], dtype=np.int64)
  clu = next_cluster_probs(world, [gen_ids[np.asarray(h, dtype=np.int64)] for h in histories])
  eta = clu[:, world.item_cluster[gen_ids]] * world.item_in_cluster_prob[gen_ids][None, :]
  return eta / eta.sum(1, keepdims=True)
