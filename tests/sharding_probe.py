"""Trains a few steps and retrieves with one method family on all local devices; prints JSON.

Used by test_sharding.py in subprocesses with different simulated device counts:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_probe.py DATA_DIR FAMILY

Each probe returns {"losses": [...], "items": [[...]], "sharded": <a batch's sharding>}; the
test asserts that 4 devices give the losses and retrieved items of 1.
"""

import json
import sys

import jax
import numpy as np

from tdr_jax import experiment, parallel, sampling, train, training
from tdr_jax import tree as tree_lib
from tdr_jax.data import batches as batches_lib


def probe_tree(data_dir, sampler):
  """TDR: three train steps through `training.fit` and a sharded beam search."""
  cfg = experiment.make_config("smoke", data_dir=data_dir, sampler=sampler)
  ds, _ = experiment.load_data(cfg)
  tree = tree_lib.build_from_categories(np.random.default_rng(0), ds.item_category)
  score_fn, params = experiment.build_model(cfg, tree)
  mesh = parallel.make_mesh()
  opt = train.make_optimizer()
  step = train.make_train_step(
      score_fn, opt, train.StepConfig(sampler=sampler, num_negatives=cfg.num_negatives,
                                      full_softmax_nodes=cfg.full_softmax_nodes),
      branching=2, height=tree.height)
  samples = batches_lib.training_samples(ds, max_train_samples=cfg.max_train_samples,
                                         seed=cfg.seed)
  seen = []

  def batches(s):
    b = batches_lib.batch_for_step(ds, samples, s, steps_per_epoch=100,
                                   batch_size=cfg.batch_size, history_len=cfg.history_len,
                                   seed=cfg.seed, levels=tree.height)
    seen.append(jax.device_put(b, parallel.data_sharded(mesh)))
    return b

  out = training.fit(lambda st, b, aux, k: step(st, b, aux[0], aux[1], k),
                     train.init_state(params, opt), batches, total_steps=3,
                     base_key=jax.random.key(0), aux=(tree, sampling.level_index(tree)),
                     mesh=mesh, log_every=1)
  ev = experiment.evaluation_set(cfg, ds)
  items = experiment.retrieve(score_fn, out.state.params, tree, ev.history[:32], beam_size=20,
                              topk=10, batch_size=32, mesh=mesh)
  return {"losses": out.metrics["loss"].tolist(), "items": items.tolist(),
          "sharded": str(seen[0].history.sharding)}


PROBES = {
    "tdr_top_down": lambda d: probe_tree(d, "top_down"),
    "tdr_uniform": lambda d: probe_tree(d, "uniform"),
}


def main(data_dir, family):
  result = PROBES[family](data_dir)
  result["devices"] = jax.device_count()
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
