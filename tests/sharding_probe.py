"""Runs a few TDR train steps and a beam search on all local devices; prints JSON.

Used by test_sharding.py in subprocesses with different simulated device counts:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_probe.py DATA_DIR
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tdr_jax import experiment, sampling, train
from tdr_jax import tree as tree_lib


def main(data_dir, sampler):
  cfg = experiment.make_config("smoke", data_dir=data_dir, sampler=sampler)
  ds, _ = experiment.load_data(cfg)
  tree = tree_lib.build_from_categories(np.random.default_rng(0), ds.item_category)
  score_fn, params = experiment.build_model(cfg, tree)
  mesh = experiment.make_mesh()
  opt = train.make_optimizer()
  step = jax.jit(train.make_train_step(
      score_fn, opt, train.StepConfig(sampler=sampler, num_negatives=cfg.num_negatives,
                                      full_softmax_nodes=cfg.full_softmax_nodes),
      branching=2, height=tree.height), donate_argnums=0)
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = jax.device_put(train.init_state(params, opt), rep)
  tree_d = jax.device_put(tree, rep)
  index = jax.device_put(sampling.level_index(tree), rep)
  samples = experiment.training_samples(cfg, ds)
  losses = []
  for s in range(3):
    batch = jax.device_put(experiment.batch_for_step(cfg, ds, samples, s, 100, tree.height), data)
    state, m = step(state, batch, tree_d, index, jax.random.key(0))
    losses.append(float(m["loss"]))
  ev = experiment.evaluation_set(cfg, ds)
  items = experiment.retrieve(score_fn, state.params, tree, ev.history[:32], beam_size=20,
                              topk=10, batch_size=32, mesh=mesh)
  print(json.dumps({"devices": mesh.devices.size, "losses": losses,
                    "sharded": str(batch.history.sharding), "items": items.tolist()}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
