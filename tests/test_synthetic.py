"""The synthetic generator and its Bayes-optimal predictor."""

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest

from tdr_jax.data import synthetic

# Tiny worlds for enumeration: v1 (categories only) and v2 (hidden clusters, mixed shapes).
TINY = synthetic.world_config("v1", num_users=10, num_items=6, num_top=2, num_sub=2,
                              alpha_top=0.7, alpha_sub=1.3, seed=3)
TINY_V2 = synthetic.world_config("v2", num_users=10, num_items=10, num_top=2, num_sub=2,
                                 num_clusters=2, alpha_top=0.7, alpha_sub=1.3, alpha_cluster=0.6,
                                 flat_fraction=0.5, seed=3)


def _dirichlet_evidence(alpha, counts):
  """log marginal likelihood of a count vector under Dir(alpha) (entries with alpha=0 unused)."""
  used = alpha > 0
  a, n = alpha[used], counts[used]
  return (math.lgamma(a.sum()) - math.lgamma(a.sum() + n.sum())
          + sum(math.lgamma(x + m) - math.lgamma(x) for x, m in zip(a, n)))


def _log_evidence(world, items):
  """log P(item sequence) of one segment: Dirichlet-tree marginal likelihood of its clusters
  (top -> sub -> cluster) times each item's probability inside its cluster."""
  cfg = world.config
  items = np.asarray(items, dtype=int)
  clu = np.bincount(world.item_cluster[items], minlength=world.num_cluster_ids)
  clu = clu.reshape(cfg.num_top, cfg.num_sub, cfg.num_clusters)
  sub = clu.sum(-1)
  out = _dirichlet_evidence(world.alpha_top, sub.sum(-1))
  a_clu = world.alpha_cluster.reshape(cfg.num_top, cfg.num_sub, cfg.num_clusters)
  for t in range(cfg.num_top):
    out += _dirichlet_evidence(world.alpha_sub[t], sub[t])
    for s_ in range(cfg.num_sub):
      out += _dirichlet_evidence(a_clu[t, s_], clu[t, s_])
  return out + float(np.sum(np.log(world.item_in_cluster_prob[items])))


def _brute_force_joint(world, items):
  """P(item sequence) summed over every change-point configuration."""
  rho = world.config.drift
  n = len(items)
  total = 0.0
  for flags in itertools.product([0, 1], repeat=n - 1):
    logp = sum(math.log(rho) if f else math.log1p(-rho) for f in flags) if rho > 0 else (
        0.0 if not any(flags) else -math.inf)
    if logp == -math.inf:
      continue
    bounds = [0] + [i + 1 for i, f in enumerate(flags) if f] + [n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      logp += _log_evidence(world, items[lo:hi])
    total += math.exp(logp)
  return total


def _brute_force_eta(world, hist, horizon):
  """Mean over k = 1..horizon of P(item n + k | history), unobserved items in between summed."""
  num_items = world.config.num_items
  base = _brute_force_joint(world, list(hist))
  out = np.zeros(num_items)
  for k in range(1, horizon + 1):
    for middle in itertools.product(range(num_items), repeat=k - 1):
      for i in range(num_items):
        out[i] += _brute_force_joint(world, list(hist) + list(middle) + [i]) / base
  return out / horizon


@pytest.mark.parametrize("tiny", [TINY, TINY_V2], ids=["v1", "v2"])
@pytest.mark.parametrize("drift", [0.0, 0.2])
@pytest.mark.parametrize("horizon", [1, 2])
def test_predictive_matches_enumeration(tiny, drift, horizon):
  world = synthetic.make_world(dataclasses.replace(tiny, drift=drift))
  # A history that mixes clusters and categories and repeats one cluster.
  clusters = np.flatnonzero(world.alpha_cluster.reshape(-1) > 0)
  wanted = [clusters[0], clusters[0], clusters[-1], clusters[0], clusters[len(clusters) // 2]]
  hist = [int(np.flatnonzero(world.item_cluster == k)[-1]) for k in wanted]
  got = world.eta([hist], horizons=[horizon])[0]
  want = _brute_force_eta(world, hist, horizon)
  np.testing.assert_allclose(want.sum(), 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  # The category predictive is the cluster predictive summed per category.
  cat = world.category_predictive(hist, horizon=horizon)
  np.testing.assert_allclose(cat, np.bincount(world.item_category, weights=want,
                                              minlength=world.num_categories), rtol=1e-9)


def test_v2_plants_hidden_clusters_and_shapes():
  world = synthetic.make_world(synthetic.SyntheticConfig())
  cfg = world.config
  assert cfg.version == "v2" and cfg.drift > 0 and cfg.label_noise >= 0.5
  # Every item's cluster lies inside its category; P(item | cluster) sums to 1 per cluster.
  np.testing.assert_array_equal(world.item_cluster // cfg.num_clusters, world.item_category)
  per_cluster = np.bincount(world.item_cluster, weights=world.item_in_cluster_prob)
  np.testing.assert_allclose(per_cluster[per_cluster > 0], 1.0)
  # Mixed shapes: flat categories are larger and their top item holds a smaller share.
  sizes = np.bincount(world.item_category, minlength=world.num_categories)
  top_share = np.array([world.item_in_cat_prob[world.item_category == c].max()
                        for c in range(world.num_categories)])
  assert world.flat.any() and (~world.flat).any()
  assert sizes[world.flat].mean() > 3 * sizes[~world.flat].mean()
  assert top_share[world.flat].mean() < 0.5 * top_share[~world.flat].mean()
  # About half of the published categories are wrong.
  assert 0.45 < np.mean(world.observed_category != world.item_category) < 0.55


def test_v1_reproduces_the_earlier_generator():
  """World v1 draws exactly what the generator drew before world v2 (digest of its output,
  computed with the earlier code)."""
  import hashlib
  world = synthetic.make_world(synthetic.world_config("v1", num_users=200, num_items=500,
                                                     seed=4, drift=0.05))
  inter = synthetic.sample_interactions(world)
  h = hashlib.sha256()
  for k in ("user", "item", "timestamp"):
    h.update(np.ascontiguousarray(inter[k], np.int64).tobytes())
  h.update(np.ascontiguousarray(world.observed_category, np.int32).tobytes())
  assert h.hexdigest()[:16] == "863fd40b05cd2fb9"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_generator_agrees_with_predictive(version):
  """Empirical P(2nd category | 1st category) over many users matches the oracle's predictive."""
  cfg = synthetic.world_config(version, num_users=60000, num_items=40, num_top=2, num_sub=2,
                               min_len=2, mean_extra_len=0.0, max_len=2, seed=5, drift=0.0)
  world = synthetic.make_world(cfg)
  inter = synthetic.sample_interactions(world)
  # Clusters (v1: one per category).
  clus = world.item_cluster[inter["item"]].reshape(cfg.num_users, 2)
  checked = 0
  for k1 in range(world.num_cluster_ids):
    rows = clus[clus[:, 0] == k1, 1]
    if len(rows) < 3000:
      continue
    item = int(np.flatnonzero(world.item_cluster == k1)[0])
    want = world.cluster_predictive([item])
    emp = np.bincount(rows, minlength=world.num_cluster_ids) / len(rows)
    # Binomial standard error is below 0.01 at these counts; 4 sigma.
    np.testing.assert_allclose(emp, want, atol=0.04)
    checked += 1
  assert checked >= 2
  # First interactions follow the prior predictive; items follow the popularity inside their
  # cluster.
  emp_first = np.bincount(clus[:, 0], minlength=world.num_cluster_ids) / cfg.num_users
  np.testing.assert_allclose(emp_first, world.prior_cluster_probs(), atol=0.01)
  items = inter["item"]
  for k in np.unique(world.item_cluster):
    members = np.flatnonzero(world.item_cluster == k)
    sel = items[np.isin(items, members)]
    emp = np.array([(sel == m).mean() for m in members])
    want = world.item_in_cluster_prob[members]
    sigma = np.sqrt(want * (1 - want) / max(len(sel), 1))
    assert np.all(np.abs(emp - want) <= 4 * sigma + 1e-3), (k, emp, want, len(sel))


def test_generation_is_deterministic_and_noisy_labels():
  cfg = synthetic.SyntheticConfig(num_users=300, num_items=800, seed=11, label_noise=0.25)
  a = synthetic.sample_interactions(synthetic.make_world(cfg))
  b = synthetic.sample_interactions(synthetic.make_world(cfg))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  world = synthetic.make_world(cfg)
  wrong = np.mean(world.observed_category != world.item_category)
  assert 0.2 < wrong < 0.3
  lengths = np.bincount(a["user"])
  assert lengths.min() >= cfg.min_len and lengths.max() <= cfg.max_len
  c = synthetic.make_world(dataclasses.replace(cfg, seed=12))
  assert not np.array_equal(c.item_category, world.item_category)


def test_default_is_deep_enough():
  cfg = synthetic.SyntheticConfig()
  assert math.ceil(math.log2(cfg.num_items)) >= 12


def test_materialize_writes_generic_csv(tmp_path):
  cfg = synthetic.SyntheticConfig(num_users=50, num_items=200, seed=2)
  folder, world = synthetic.materialize(str(tmp_path), cfg)
  with open(f"{folder}/interactions.csv") as f:
    header = f.readline().strip()
    first = f.readline().strip().split(",")
  assert header == "user,item,timestamp,category"
  item = int(first[1])
  assert int(first[3]) == world.observed_category[item]
  mtime = os.path.getmtime(f"{folder}/interactions.csv")
  synthetic.materialize(str(tmp_path), cfg)  # cached: not rewritten
  assert os.path.getmtime(f"{folder}/interactions.csv") == mtime


def test_no_category_variant_loads_through_csv_loader(tmp_path):
  from tdr_jax.data import datasets
  cfg = synthetic.world_config("v2", categories=False, num_users=60, num_items=300, seed=2)
  folder, world = synthetic.materialize(str(tmp_path), cfg)
  with open(f"{folder}/interactions.csv") as f:
    assert f.readline().strip() == "user,item,timestamp"
  ds = datasets.load_dataset("csv", folder, min_user_interactions=15, seed=0)
  assert ds.num_users == 60 and ds.num_items > 0
  assert len(np.unique(ds.item_category)) == 1  # one group: no categories published
  # With categories the same world publishes them (a different file, same draws).
  folder2, _ = synthetic.materialize(str(tmp_path), dataclasses.replace(cfg, categories=True))
  assert folder2 != folder
  ds2 = datasets.load_dataset("csv", folder2, min_user_interactions=15, seed=0)
  np.testing.assert_array_equal(ds2.seq_items, ds.seq_items)
  assert len(np.unique(ds2.item_category)) > 10


@pytest.mark.parametrize("tiny", [TINY, TINY_V2], ids=["v1", "v2"])
@pytest.mark.parametrize("drift", [0.0, 0.2])
def test_batched_next_predictive_matches_enumeration(tiny, drift):
  # One batch of histories of different lengths (empty, 1, 3, 5): the batched recursion keeps
  # the shorter ones' run-length posteriors while the longer ones go on.
  world = synthetic.make_world(dataclasses.replace(tiny, drift=drift))
  clusters = np.flatnonzero(world.alpha_cluster.reshape(-1) > 0)
  wanted = [clusters[0], clusters[0], clusters[-1], clusters[0], clusters[len(clusters) // 2]]
  full = [int(np.flatnonzero(world.item_cluster == k)[-1]) for k in wanted]
  hists = [full[:0], full[:1], full[2:], full]
  got = synthetic.next_cluster_probs(world, hists)  # [4, K]
  assert got.shape == (4, world.num_cluster_ids)
  np.testing.assert_allclose(got[0], world.prior_cluster_probs(), rtol=1e-12)
  for h, row in zip(hists[1:], got[1:]):
    want = np.bincount(world.item_cluster, weights=_brute_force_eta(world, h, 1),
                       minlength=world.num_cluster_ids)
    np.testing.assert_allclose(row, want, rtol=1e-9, atol=1e-12)


def test_next_item_eta_is_dataset_eta_of_horizon_one():
  world = synthetic.make_world(synthetic.world_config("v2", num_users=50, num_items=300, seed=2))
  rng = np.random.default_rng(0)
  raw_ids = np.asarray([str(i) for i in rng.permutation(300)[:250]])  # a corpus of 250 items
  hists = [rng.integers(0, 250, size=n) for n in (0, 1, 7, 40, 3, 120)]  # dense ids
  got = synthetic.next_item_eta(world, raw_ids, hists)
  want = synthetic.dataset_eta(world, raw_ids, hists, horizons=[1] * len(hists))
  assert got.shape == (6, 250)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
