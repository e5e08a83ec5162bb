"""Tests for the SASRec estimator (tdr_jax.models.sasrec)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdr_jax import experiment, metrics, rectification
from tdr_jax import tree as tree_lib
from tdr_jax.models.sasrec import SASRec, train_sasrec

N, L, D = 11, 6, 16


class Jitted:
  """The model's methods, jitted (eager NNX calls are slow to dispatch)."""

  def __init__(self, module):
    graphdef, state = nnx.split(module)
    for name in ("eta_logits", "sequence_hidden"):
      fn = jax.jit(lambda s, h, name=name: getattr(nnx.merge(graphdef, s), name)(h))
      setattr(self, name, lambda h, fn=fn: fn(state, jnp.asarray(h)))


@pytest.fixture(scope="module")
def model():
  return Jitted(SASRec(num_items=N, max_len=L, dim=D, num_blocks=2, num_heads=2,
                       rngs=nnx.Rngs(params=jax.random.key(0))))


HISTORY = np.array([
    [-1, -1, 3, 7, 1, 4],
    [0, 1, 2, 3, 4, 5],
    [-1, -1, -1, -1, -1, 9],
    [-1] * L,
], np.int32)


# ------------------------------------------------------------------------------ the model


def test_shapes(model):
  assert model.eta_logits(HISTORY).shape == (4, N)
  assert model.sequence_hidden(HISTORY).shape == (4, L, D)
  assert model.eta_logits(HISTORY[:, 2:]).shape == (4, N)  # shorter histories accepted
  assert np.isfinite(np.asarray(model.eta_logits(HISTORY))).all()


def test_left_padding_is_ignored(model):
  # The same items with more or less padding (positions are right-aligned) give the same
  # output, as does a history longer than max_len cut to its last max_len items.
  full = np.asarray(model.eta_logits(HISTORY[:1]))
  np.testing.assert_allclose(np.asarray(model.eta_logits(HISTORY[:1, 2:])), full, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.eta_logits(HISTORY[:1, 1:])), full, atol=1e-5)
  longer = np.concatenate([np.full((1, 3), 5, np.int32), HISTORY[:1]], axis=1)
  np.testing.assert_allclose(np.asarray(model.eta_logits(longer)), full, atol=1e-5)
  # ... while the items themselves matter.
  other = HISTORY[:1].copy()
  other[0, 2] = 8
  assert np.abs(np.asarray(model.eta_logits(other)) - full).max() > 1e-4


def test_causal_masking(model):
  base = np.asarray(model.sequence_hidden(HISTORY[1:2]))
  for t in range(L - 1):
    changed = HISTORY[1:2].copy()
    changed[0, t + 1:] = (changed[0, t + 1:] + 3) % N  # change only the future of t
    hid = np.asarray(model.sequence_hidden(changed))
    np.testing.assert_allclose(hid[0, :t + 1], base[0, :t + 1], atol=1e-5)
    assert np.abs(hid[0, t + 1:] - base[0, t + 1:]).max() > 1e-4


def test_dropout_only_with_rngs():
  graphdef, state = nnx.split(SASRec(num_items=N, max_len=L, dim=8, num_blocks=1,
                                     dropout=0.5, rngs=nnx.Rngs(params=1)))

  @jax.jit
  def logits(state, key):  # (without rngs, with dropout rngs from key)
    m = nnx.merge(graphdef, state)
    hist = jnp.asarray(HISTORY)
    return m.eta_logits(hist), m.eta_logits(hist, rngs=nnx.Rngs(dropout=key))

  a1, b1 = map(np.asarray, logits(state, jax.random.key(3)))
  a2, b2 = map(np.asarray, logits(state, jax.random.key(4)))
  np.testing.assert_array_equal(a1, a2)  # no rngs: deterministic
  assert np.abs(a1 - b1).max() > 1e-3 and np.abs(b1 - b2).max() > 1e-3


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="divisible"):
    SASRec(num_items=N, max_len=L, dim=10, num_heads=3, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------- training

TRAIN = dict(history_len=6, epochs=2.0, batch_size=64, lr=3e-3, seed=0,
             max_train_samples=2000, dim=32, num_blocks=1, log_every=8, checkpoint_every=32)


@pytest.fixture(scope="module")
def smoke_ds(tmp_path_factory):
  cfg = experiment.make_config("smoke", data_dir=str(tmp_path_factory.mktemp("data")))
  ds, _ = experiment.load_data(cfg)
  return ds


@pytest.fixture(scope="module")
def trained(smoke_ds, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sasrec_full"))
  return workdir, train_sasrec(smoke_ds, workdir=workdir, **TRAIN)


def test_training_loss_decreases_and_beats_random(smoke_ds, trained):
  _, est = trained
  ds = smoke_ds
  assert est.restored_step is None and est.steps == 64  # ceil(2000 / 64) * 2
  first, last = est.losses[0][1], est.losses[-1][1]
  assert first > last + 0.3, est.losses
  ev = ds.eval_split("test", TRAIN["history_len"])
  top = est.retrieve(ev.history, topk=20, batch_size=16)
  assert top.shape == (ev.num_users, 20)
  got = metrics.retrieval_metrics(top, ev.label_offsets, ev.label_items,
                                  num_items=ds.num_items, ks=(20,))
  rng = np.random.default_rng(0)
  rand = np.stack([rng.choice(ds.num_items, 20, replace=False) for _ in range(ev.num_users)])
  base = metrics.retrieval_metrics(rand, ev.label_offsets, ev.label_items,
                                   num_items=ds.num_items, ks=(20,))
  assert got["recall@20"] > 2 * base["recall@20"], (got, base)
  # eta is a distribution over the corpus and its argmax matches the retrieval.
  eta = np.asarray(est.eta(ev.history[:5]))
  np.testing.assert_allclose(eta.sum(1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(eta, 1), top[:5, 0])


def test_finished_checkpoint_is_restored(smoke_ds, trained):
  workdir, est = trained
  again = train_sasrec(smoke_ds, workdir=workdir, **TRAIN)
  assert again.restored_step == est.steps and again.losses == []
  hist = smoke_ds.eval_split("test", TRAIN["history_len"]).history
  np.testing.assert_array_equal(np.asarray(again.eta(hist)), np.asarray(est.eta(hist)))


def test_resume_matches_uninterrupted_run(smoke_ds, trained, tmp_path):
  _, est = trained
  workdir = str(tmp_path / "resumed")
  half = train_sasrec(smoke_ds, workdir=workdir, **dict(TRAIN, epochs=1.0))  # stops at 32
  assert half.steps == 32
  resumed = train_sasrec(smoke_ds, workdir=workdir, **TRAIN)
  assert resumed.restored_step == 32 and resumed.losses[0][0] > 32
  hist = smoke_ds.eval_split("test", TRAIN["history_len"]).history
  np.testing.assert_allclose(np.asarray(resumed.logits(hist)), np.asarray(est.logits(hist)),
                             atol=1e-5)
  with pytest.raises(ValueError, match="other SASRec settings"):
    train_sasrec(smoke_ds, workdir=workdir, **dict(TRAIN, dim=16))


def test_sampled_softmax_trains(smoke_ds):
  est = train_sasrec(smoke_ds, **dict(TRAIN, epochs=0.75, sampled=True, num_negatives=64))
  assert est.losses[0][1] > est.losses[-1][1]
  assert all(np.isfinite(v) for _, v in est.losses)


def test_full_softmax_refused_when_too_large():
  fake = types.SimpleNamespace(num_items=10**7)
  with pytest.raises(ValueError, match="sampled=True"):
    train_sasrec(fake, history_len=4, epochs=1.0, batch_size=256, sampled=False)


def test_estimator_feeds_rectified_weights(smoke_ds, trained):
  # The intended use: weights of a training batch from the estimator's logits.
  _, est = trained
  ds = smoke_ds
  tree = tree_lib.build_random(np.random.default_rng(0), ds.num_items, branching=2)
  hist, target = ds.train_batch(np.arange(32), TRAIN["history_len"])
  w = np.asarray(jax.jit(rectification.rectified_weights)(est.logits(hist),
                                                          jnp.asarray(target), tree))
  assert w.shape == (32, tree.height)
  assert set(np.unique(w)) <= {0.0, 1.0} and (w[:, -1] == 1).all()
  # Deeper levels are positives at least as often as shallower ones (nested subtrees).
  assert (np.diff(w, axis=1) >= 0).all()
