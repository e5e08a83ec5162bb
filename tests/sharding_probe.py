"""Trains a few steps and retrieves with one method family on all local devices; prints JSON.

Used by test_sharding.py in subprocesses with different simulated device counts:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_probe.py DATA_DIR FAMILY

Each probe returns {"losses": [...], "items": [[...]], "sharded": <a batch's sharding>}; the
test asserts that 4 devices give the losses and retrieved items of 1.
"""

import json
import sys
import types

import jax
import numpy as np

from tdr_jax import deep_retrieval, evaluation, experiment, parallel, sampling, train, training
from tdr_jax import tree as tree_lib
from tdr_jax.baselines import din_brute, youtube_dnn
from tdr_jax.data import batches as batches_lib
from tdr_jax.methods import tree_family
from tdr_jax.models import sasrec

# The smoke preset's run settings, used by every probe.
_SMOKE = dict(seed=0, batch_size=32, history_len=6, max_train_samples=800)


def _smoke_users(data_dir, users=32):
  """(dataset, the first `users` evaluation users) of the smoke synthetic dataset."""
  cfg = experiment.make_config("smoke", data_dir=data_dir)
  ds, _ = experiment.load_data(cfg)
  ev = experiment.evaluation_set(cfg, ds)
  return ds, types.SimpleNamespace(history=np.asarray(ev.history)[:users])


def _samples(ds):
  return batches_lib.training_samples(ds, max_train_samples=_SMOKE["max_train_samples"],
                                      seed=_SMOKE["seed"])


def _batch_sharding(ds, mesh, stream=batches_lib.STREAM):
  """str(sharding) `training.fit` gives a batch of the smoke run's stream on `mesh`."""
  b = batches_lib.batch_for_step(ds, _samples(ds), 0, steps_per_epoch=25,
                                 batch_size=_SMOKE["batch_size"],
                                 history_len=_SMOKE["history_len"], seed=_SMOKE["seed"],
                                 stream=stream)
  return str(jax.device_put(b, parallel.data_sharded(mesh)).history.sharding)


def probe_tree(data_dir, sampler):
  """TDR: three train steps through `training.fit` and a sharded beam search."""
  cfg = experiment.make_config("smoke", data_dir=data_dir, sampler=sampler)
  ds, users = _smoke_users(data_dir)
  tree = tree_lib.build_from_categories(np.random.default_rng(0), ds.item_category)
  score_fn, params = tree_family.build_model(cfg, tree)
  mesh = parallel.make_mesh()
  opt = train.make_optimizer()
  step = train.make_train_step(
      score_fn, opt, train.StepConfig(sampler=sampler, num_negatives=cfg.train.num_negatives,
                                      full_softmax_nodes=cfg.train.full_softmax_nodes),
      branching=2, height=tree.height)
  samples = _samples(ds)

  def batches(s):
    return batches_lib.batch_for_step(ds, samples, s, steps_per_epoch=100,
                                      batch_size=_SMOKE["batch_size"],
                                      history_len=_SMOKE["history_len"], seed=_SMOKE["seed"],
                                      levels=tree.height)

  out = training.fit(lambda st, b, aux, k: step(st, b, aux[0], aux[1], k),
                     train.init_state(params, opt), batches, total_steps=3,
                     base_key=jax.random.key(0), aux=(tree, sampling.level_index(tree)),
                     mesh=mesh, log_every=1)
  items = evaluation.retrieve(score_fn, out.state.params, tree, users.history, beam_size=20,
                              topk=10, batch_size=32, mesh=mesh)
  return {"losses": out.metrics["loss"].tolist(), "items": items.tolist(),
          "sharded": _batch_sharding(ds, mesh)}


def probe_youtube_dnn(data_dir):
  """YouTubeDNN: three train steps (`youtube_dnn.fit`) and sharded brute-force MIPS."""
  ds, users = _smoke_users(data_dir)
  mesh = parallel.make_mesh()
  model = youtube_dnn.fit(ds, epochs=0.12, num_negatives=50, log_every=1, mesh=mesh, **_SMOKE)
  items = youtube_dnn.retrieve(model, users, topk=10, batch_size=32, mesh=mesh)
  return {"losses": model.info["losses"].tolist(), "items": items.tolist(),
          "sharded": _batch_sharding(ds, mesh)}


def probe_din(data_dir):
  """Item-level DIN: three train steps (`din_brute.fit`) and sharded scoring of every item."""
  ds, users = _smoke_users(data_dir)
  mesh = parallel.make_mesh()
  model = din_brute.fit(ds, epochs=0.12, num_negatives=10, windows=(1, 2, 3),
                        attention_hidden=(8,), mlp_hidden=(16, 8), log_every=1, mesh=mesh,
                        **_SMOKE)
  items = din_brute.retrieve(model, users, topk=10, batch_size=32, mesh=mesh)
  return {"losses": model.info["losses"].tolist(), "items": items.tolist(),
          "sharded": _batch_sharding(ds, mesh)}


def probe_sasrec(data_dir):
  """SASRec estimator: three train steps (`train_sasrec`) and sharded top-K of eta."""
  ds, users = _smoke_users(data_dir)
  mesh = parallel.make_mesh()
  est = sasrec.train_sasrec(ds, epochs=0.12, dim=16, num_blocks=1, log_every=1, **_SMOKE)
  items = est.retrieve(users.history, topk=10, batch_size=32, mesh=mesh)
  return {"losses": [loss for _, loss in est.losses], "items": items.tolist(),
          "sharded": _batch_sharding(ds, mesh, stream=23)}


def probe_dr(data_dir):
  """Deep Retrieval: two E-steps of 3 steps around one M-step (`deep_retrieval.fit`), then a
  sharded path beam search + reranking for 32 users."""
  ds, users = _smoke_users(data_dir)
  mesh = parallel.make_mesh()
  config = deep_retrieval.dr_config("smoke", epochs_per_estep=0.12, em_rounds=1, log_every=1)
  model = deep_retrieval.fit(ds, config, mesh=mesh, **_SMOKE)
  items, _ = deep_retrieval.retrieve(model, users.history, topk=10, batch_size=32, mesh=mesh)
  assert model.info["msteps"] == 1 and model.info["steps"] == 6, model.info
  return {"losses": model.info["losses"][:, 0].tolist(), "items": items.tolist(),
          "sharded": _batch_sharding(ds, mesh)}


PROBES = {
    "dr": probe_dr,
    "tdr_top_down": lambda d: probe_tree(d, "top_down"),
    "tdr_uniform": lambda d: probe_tree(d, "uniform"),
    "din": probe_din,
    "youtube_dnn": probe_youtube_dnn,
    "sasrec": probe_sasrec,
}


def main(data_dir, family):
  result = PROBES[family](data_dir)
  result["devices"] = jax.device_count()
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
