"""The synthetic generator and its Bayes-optimal predictor."""

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest

from tdr_jax.data import synthetic

TINY = synthetic.SyntheticConfig(num_users=10, num_items=6, num_top=2, num_sub=2, alpha_top=0.7,
                                 alpha_sub=1.3, seed=3)


def _log_evidence(world, cats):
  """log P(category sequence) of one segment, by the Dirichlet-tree marginal likelihood."""
  cfg = world.config
  counts = np.bincount(np.asarray(cats, dtype=int), minlength=world.num_categories)
  sub = counts.reshape(cfg.num_top, cfg.num_sub)
  top = sub.sum(1)
  a = world.alpha_top
  out = math.lgamma(a.sum()) - math.lgamma(a.sum() + top.sum())
  out += sum(math.lgamma(a[t] + top[t]) - math.lgamma(a[t]) for t in range(cfg.num_top))
  for t in range(cfg.num_top):
    b = world.alpha_sub[t]
    out += math.lgamma(b.sum()) - math.lgamma(b.sum() + top[t])
    out += sum(math.lgamma(b[s] + sub[t, s]) - math.lgamma(b[s]) for s in range(cfg.num_sub))
  return out


def _brute_force_joint(world, cats):
  """P(category sequence) summed over every change-point configuration."""
  rho = world.config.drift
  n = len(cats)
  total = 0.0
  for flags in itertools.product([0, 1], repeat=n - 1):
    logp = sum(math.log(rho) if f else math.log1p(-rho) for f in flags) if rho > 0 else (
        0.0 if not any(flags) else -math.inf)
    if logp == -math.inf:
      continue
    bounds = [0] + [i + 1 for i, f in enumerate(flags) if f] + [n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      logp += _log_evidence(world, cats[lo:hi])
    total += math.exp(logp)
  return total


def _brute_force_predictive(world, hist_cats, horizon):
  num_cat = world.num_categories
  base = _brute_force_joint(world, list(hist_cats))
  out = np.zeros(num_cat)
  for k in range(1, horizon + 1):
    for middle in itertools.product(range(num_cat), repeat=k - 1):
      for c in range(num_cat):
        out[c] += _brute_force_joint(world, list(hist_cats) + list(middle) + [c]) / base
  return out / horizon


@pytest.mark.parametrize("drift", [0.0, 0.2])
@pytest.mark.parametrize("horizon", [1, 2])
def test_predictive_matches_enumeration(drift, horizon):
  world = synthetic.make_world(dataclasses.replace(TINY, drift=drift))
  # Items whose categories give a history that mixes categories and repeats one.
  cats_wanted = [0, 0, 3, 0, 2]
  hist = [int(np.flatnonzero(world.item_category == c)[0]) for c in cats_wanted]
  got = world.category_predictive(hist, horizon=horizon)
  want = _brute_force_predictive(world, cats_wanted, horizon)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  # eta factorizes into category predictive times within-category popularity.
  eta = world.eta([hist], horizons=[horizon])[0]
  np.testing.assert_allclose(eta.sum(), 1.0)
  np.testing.assert_allclose(eta, want[world.item_category] * world.item_in_cat_prob, rtol=1e-9)


def test_generator_agrees_with_predictive():
  """Empirical P(2nd category | 1st category) over many users matches the oracle's predictive."""
  cfg = synthetic.SyntheticConfig(num_users=60000, num_items=40, num_top=2, num_sub=2, min_len=2,
                                  mean_extra_len=0.0, max_len=2, seed=5)
  world = synthetic.make_world(cfg)
  inter = synthetic.sample_interactions(world)
  cats = world.item_category[inter["item"]].reshape(cfg.num_users, 2)
  for c1 in range(world.num_categories):
    rows = cats[cats[:, 0] == c1, 1]
    if len(rows) < 3000:
      continue
    item = int(np.flatnonzero(world.item_category == c1)[0])
    want = world.category_predictive([item])
    emp = np.bincount(rows, minlength=world.num_categories) / len(rows)
    # Binomial standard error is below 0.01 at these counts; 4 sigma.
    np.testing.assert_allclose(emp, want, atol=0.04)
  # First interactions follow the prior predictive; items follow the within-category Zipf law.
  emp_first = np.bincount(cats[:, 0], minlength=world.num_categories) / cfg.num_users
  np.testing.assert_allclose(emp_first, world.prior_category_probs(), atol=0.01)
  items = inter["item"]
  for c in range(world.num_categories):
    members = np.flatnonzero(world.item_category == c)
    sel = items[np.isin(items, members)]
    emp = np.array([(sel == m).mean() for m in members])
    np.testing.assert_allclose(emp, world.item_in_cat_prob[members], atol=0.02)


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
