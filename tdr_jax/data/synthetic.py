"""Synthetic interaction data with a known Bayes-optimal answer.

Generative process (all draws from one seeded numpy Generator):

* Taxonomy: `num_top` top categories, each with `num_sub` sub-categories (C = num_top * num_sub
  leaf categories). Every item belongs to one leaf category (category sizes vary).
* Popularity: inside a category, item of popularity rank r has weight (r + 1) ** -zipf_exponent.
* A user's interest is a Dirichlet tree: theta_top ~ Dir(alpha_top), and for every top category t,
  theta_sub[t] ~ Dir(alpha_sub[t]); P(category (t, s)) = theta_top[t] * theta_sub[t, s]. Small
  concentrations make users interested in a few categories (sparse mixtures). The prior means
  carry a global category popularity.
* Each interaction draws a category from the user's interest, then an item from the category's
  Zipf distribution. With drift hazard rho > 0, before each interaction after the first the
  user's interest is redrawn from the prior with probability rho (slow drift by change points).
* The published category of an item is noisy: a fraction `label_noise` of items carry a wrong,
  uniformly drawn category. The true one is kept for evaluation.

Because the model is conjugate, the posterior predictive of the next interaction given the
visible history is closed form (counts plus concentrations, per level of the taxonomy); with
drift it is exact too, by Bayesian online change-point recursion over the run length of the
current segment. `SyntheticWorld.eta` returns, for each user, the true probability of each item
being a label event (the mean over the label horizon of the k-step-ahead predictive), and the
oracle retrieves the top K of it: the Bayes-optimal retriever in the sense of TDR sec. 3.3/4.2.

The data are written in the generic csv format (`user,item,timestamp,category`) and read back
through the same csv loader as users' own data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Settings of the generator. The defaults are the project's synthetic default."""
  num_users: int = 8000
  num_items: int = 5000  # ceil(log2 5000) = 13 tree levels below the root with B = 2
  num_top: int = 16
  num_sub: int = 8
  min_len: int = 15
  mean_extra_len: float = 25.0  # sequence length = min_len + Geometric extra, capped
  max_len: int = 200
  alpha_top: float = 0.4  # total top-level concentration is alpha_top * num_top
  alpha_sub: float = 0.4  # per top category: alpha_sub * num_sub
  zipf_exponent: float = 1.0
  drift: float = 0.0  # change-point hazard per interaction
  label_noise: float = 0.2
  seed: int = 0

  def digest(self) -> str:
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclasses.dataclass
class SyntheticWorld:
  """The generator's parameters: everything the Bayes-optimal predictor needs.

  Attributes:
    config: the SyntheticConfig.
    item_category: int32[N] true leaf category c = t * num_sub + s of every generator item.
    observed_category: int32[N] the published (noisy) category.
    item_in_cat_prob: float64[N] P(item | its category) (Zipf within the category).
    alpha_top: float64[num_top] top-level Dirichlet concentrations.
    alpha_sub: float64[num_top, num_sub] sub-level concentrations.
  """
  config: SyntheticConfig
  item_category: np.ndarray
  observed_category: np.ndarray
  item_in_cat_prob: np.ndarray
  alpha_top: np.ndarray
  alpha_sub: np.ndarray

  @property
  def num_categories(self) -> int:
    return self.config.num_top * self.config.num_sub

  # -- predictive distributions ------------------------------------------------------------
  def prior_category_probs(self) -> np.ndarray:
    """float64[C]: P(category) under the prior (the predictive of an empty history)."""
    return self._cat_probs_from_counts(np.zeros((1, self.num_categories)))[0]

  def _cat_probs_from_counts(self, counts: np.ndarray) -> np.ndarray:
    """Posterior predictive over categories of the Dirichlet tree.

    Args:
      counts: float[..., C] category counts of the observed segment.
    Returns:
      float64[..., C].
    """
    cfg = self.config
    # [..., C] -> [..., num_top, num_sub]: categories are laid out top-major.
    sub_counts = counts.reshape(counts.shape[:-1] + (cfg.num_top, cfg.num_sub))
    top_counts = sub_counts.sum(-1)
    p_top = (self.alpha_top + top_counts) / (self.alpha_top.sum() + top_counts.sum(-1, keepdims=True))
    p_sub = (self.alpha_sub + sub_counts) / (self.alpha_sub.sum(-1) + top_counts)[..., None]
    # [..., num_top, num_sub] -> [..., C]
    return (p_top[..., None] * p_sub).reshape(counts.shape)

  def category_predictive(self, history: Sequence[int], *, horizon: int = 1) -> np.ndarray:
    """Mean over k = 1..horizon of P(category of interaction n + k | history of length n).

    Args:
      history: generator item ids of the visible history, oldest first.
      horizon: number of future interactions averaged over (the label set's length).
    Returns:
      float64[C], sums to 1.
    """
    cats = self.item_category[np.asarray(history, dtype=np.int64)]
    num_cat = self.num_categories
    rho = self.config.drift
    n = len(cats)
    if n == 0:
      return self.prior_category_probs()
    onehot = np.zeros((n, num_cat))
    onehot[np.arange(n), cats] = 1.0
    cum = np.concatenate([np.zeros((1, num_cat)), np.cumsum(onehot, axis=0)])  # [n+1, C]
    if rho == 0.0:
      return self._cat_probs_from_counts(cum[n][None])[0]
    # Bayesian online change-point recursion. log_w[r-1] = log P(run length r | x_1..x_t),
    # run length = number of interactions in the current segment (x_t included).
    prior = self.prior_category_probs()
    log_w = np.zeros(1)
    for t in range(1, n):
      c = cats[t]
      r = np.arange(1, t + 1)
      seg_counts = cum[t][None] - cum[t - r]  # [t, C] counts of the last r interactions
      p_cont = self._cat_probs_from_counts(seg_counts)[:, c]
      grow = log_w + np.log1p(-rho) + np.log(p_cont)
      reset = np.logaddexp.reduce(log_w) + np.log(rho) + np.log(prior[c])
      log_w = np.concatenate([[reset], grow])
      log_w -= np.logaddexp.reduce(log_w)
    r = np.arange(1, n + 1)
    seg_probs = self._cat_probs_from_counts(cum[n][None] - cum[n - r])  # [n, C]
    p_seg = np.exp(log_w) @ seg_probs
    keep = np.mean((1.0 - rho) ** np.arange(1, horizon + 1))
    return keep * p_seg + (1.0 - keep) * prior

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
      counts = np.zeros((len(histories), self.num_categories))
      for u, h in enumerate(histories):
        counts[u] = np.bincount(self.item_category[np.asarray(h, dtype=np.int64)],
                                minlength=self.num_categories)
      cat = self._cat_probs_from_counts(counts)
    else:
      cat = np.stack([self.category_predictive(h, horizon=m) for h, m in zip(histories, horizons)])
    return cat[:, self.item_category] * self.item_in_cat_prob[None, :]


def make_world(config: SyntheticConfig) -> SyntheticWorld:
  """Draws the taxonomy, category sizes, popularity and priors from `config.seed`."""
  rng = np.random.default_rng([config.seed, 0])
  num_cat = config.num_top * config.num_sub
  n = config.num_items
  if n < num_cat:
    raise ValueError(f"num_items={n} must be at least the number of categories {num_cat}")
  # Category sizes: every category gets one item, the rest spread by Dirichlet weights.
  weights = rng.dirichlet(np.full(num_cat, 2.0))
  sizes = 1 + rng.multinomial(n - num_cat, weights)
  item_category = np.repeat(np.arange(num_cat), sizes)
  rng.shuffle(item_category)
  item_in_cat_prob = np.zeros(n)
  for c in range(num_cat):
    members = np.flatnonzero(item_category == c)
    rank = rng.permutation(len(members))
    w = (rank + 1.0) ** -config.zipf_exponent
    item_in_cat_prob[members] = w / w.sum()
  # Global popularity of categories enters through the prior means.
  top_mean = rng.dirichlet(np.full(config.num_top, 3.0))
  sub_mean = rng.dirichlet(np.full(config.num_sub, 3.0), size=config.num_top)
  alpha_top = config.alpha_top * config.num_top * top_mean
  alpha_sub = config.alpha_sub * config.num_sub * sub_mean
  observed = item_category.copy()
  noisy = rng.random(n) < config.label_noise
  shift = rng.integers(1, num_cat, size=n)  # a uniformly drawn *different* category
  observed[noisy] = (item_category[noisy] + shift[noisy]) % num_cat
  return SyntheticWorld(config=config, item_category=item_category.astype(np.int32),
                        observed_category=observed.astype(np.int32),
                        item_in_cat_prob=item_in_cat_prob, alpha_top=alpha_top,
                        alpha_sub=alpha_sub)


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray, rows: int) -> np.ndarray:
  """float64[rows, *alpha.shape]: independent Dirichlet draws over the last axis."""
  g = rng.gamma(np.broadcast_to(alpha, (rows,) + alpha.shape))
  g = np.maximum(g, 1e-300)
  return g / g.sum(-1, keepdims=True)


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
  cdf = np.cumsum(p_cat, axis=1)
  cdf[:, -1] = 1.0
  u = rng.random(len(user))
  cat = np.empty(len(user), dtype=np.int64)
  chunk = 1 << 16
  for lo in range(0, len(user), chunk):
    rows = cdf[segment[lo:lo + chunk]]
    cat[lo:lo + chunk] = np.minimum((rows < u[lo:lo + chunk, None]).sum(1), cdf.shape[1] - 1)
  # Item inside the category: inverse CDF on keys c + cdf_within(c), sorted category-major.
  order = np.lexsort((np.arange(cfg.num_items), world.item_category))
  sorted_cat = world.item_category[order]
  within = np.cumsum(world.item_in_cat_prob[order])
  first = np.searchsorted(sorted_cat, sorted_cat, side="left")
  within = within - np.concatenate([[0.0], within])[first]
  keys = sorted_cat + np.minimum(within, 1.0)
  last_of_cat = np.searchsorted(sorted_cat, np.arange(world.num_categories), side="right") - 1
  keys[last_of_cat] = np.arange(world.num_categories) + 1.0
  idx = np.searchsorted(keys, cat + rng.random(len(user)), side="left")
  idx = np.minimum(idx, last_of_cat[cat])
  item = order[idx]
  timestamp = 1_500_000_000 + 60 * pos + rng.integers(0, 60, size=len(user))
  return {"user": user, "item": item.astype(np.int64), "timestamp": timestamp}


def write_csv(path: str, inter: dict[str, np.ndarray], observed_category: np.ndarray) -> None:
  """Writes the generic csv format: header `user,item,timestamp,category`."""
  import pyarrow as pa
  import pyarrow.csv as pacsv
  table = pa.table({
      "user": pa.array(inter["user"]).cast(pa.string()),
      "item": pa.array(inter["item"]).cast(pa.string()),
      "timestamp": pa.array(inter["timestamp"]),
      "category": pa.array(observed_category[inter["item"]]).cast(pa.string()),
  })
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(b"user,item,timestamp,category\n")
    pacsv.write_csv(table, f, write_options=pacsv.WriteOptions(include_header=False,
                                                                quoting_style="none"))
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
    write_csv(csv_path, inter, world.observed_category)
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
