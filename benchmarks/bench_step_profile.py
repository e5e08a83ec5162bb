"""Where a default-preset training step spends its time: host batch assembly vs device compute.

  python benchmarks/bench_step_profile.py                  # default preset, synthetic default
  python benchmarks/bench_step_profile.py --preset=paper

Times, after a compile step, `--steps` steps of the training loop of `tree_family.train_round`
three ways: (a) host only: `batch_for_step` (numpy gathers of histories and targets) plus
`device_put`; (b) device only: the jitted step on a batch already on the device, blocked
until ready; (c) the loop as it runs (build, put, dispatch; the host syncs every `log_every`
steps), so (a) + (b) - (c) is the overlap the asynchronous dispatch already gets. Writes JSON
to benchmarks/results/step_profile-<preset>.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tdr_jax import experiment, methods, parallel, sampling, train  # noqa: E402
from tdr_jax.data import batches  # noqa: E402
from tdr_jax.methods import tree_family  # noqa: E402

flags.DEFINE_string("preset", "default", "Experiment preset.")
flags.DEFINE_integer("steps", 40, "Timed steps per measurement.")
flags.DEFINE_string("data_dir", "data/synthetic", "Synthetic data folder.")
FLAGS = flags.FLAGS


def profile(preset: str = "default", steps: int = 40, data_dir: str = "data/synthetic",
            **overrides) -> dict:
  """Times host-only, device-only and the loop as it runs (module docstring) for `steps` steps
  of `preset` (with config `overrides`) on the synthetic data under `data_dir`; returns the
  JSON dict."""
  cfg = experiment.make_config(preset, data_dir=data_dir, **overrides)
  ds, _ = experiment.load_data(cfg)
  tree = tree_family.build_initial_tree(cfg, ds, "category", None)
  score_fn, params = tree_family.build_model(cfg, tree)
  samples = methods.run_samples(cfg, ds)
  steps_per_epoch, _ = batches.steps_for(len(samples), batch_size=cfg.train.batch_size,
                                         epochs=cfg.train.epochs)
  optimizer = train.make_optimizer(learning_rate=cfg.train.learning_rate,
                                   decay_steps=steps_per_epoch, decay_rate=cfg.train.decay_rate)
  step_cfg = train.StepConfig(loss=cfg.train.loss, sampler=cfg.train.sampler,
                              num_negatives=cfg.train.num_negatives,
                              full_softmax_nodes=cfg.train.full_softmax_nodes)
  step_fn = jax.jit(train.make_train_step(score_fn, optimizer, step_cfg,
                                          branching=tree.branching, height=tree.height),
                    donate_argnums=0)
  mesh = parallel.make_mesh()
  data = NamedSharding(mesh, P("data"))
  state = jax.device_put(train.init_state(params, optimizer), NamedSharding(mesh, P()))
  tree_dev = jax.device_put(tree, NamedSharding(mesh, P()))
  index = jax.device_put(sampling.level_index(tree), NamedSharding(mesh, P()))
  key = jax.random.key(cfg.seed)
  n = steps

  def host(step):
    return jax.device_put(batches.batch_for_step(
        ds, samples, step, steps_per_epoch=steps_per_epoch, batch_size=cfg.train.batch_size,
        history_len=cfg.data.history_len, seed=cfg.seed, levels=tree.height), data)

  batch = host(0)
  state, m = step_fn(state, batch, tree_dev, index, key)  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for s in range(1, n + 1):
    jax.block_until_ready(host(s))
  host_s = (time.perf_counter() - t0) / n
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = step_fn(state, batch, tree_dev, index, key)
    jax.block_until_ready(m)
  device_s = (time.perf_counter() - t0) / n
  t0 = time.perf_counter()
  pending = []
  for s in range(1, n + 1):
    state, m = step_fn(state, host(s), tree_dev, index, key)
    pending.append(m["loss"])
    if len(pending) >= cfg.train.log_every:
      jax.device_get(pending)
      pending = []
  jax.device_get(pending)
  loop_s = (time.perf_counter() - t0) / n
  out = {"preset": cfg.preset, "batch_size": cfg.train.batch_size, "steps": n,
         "device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
         "host_ms_per_step": 1e3 * host_s, "device_ms_per_step": 1e3 * device_s,
         "loop_ms_per_step": 1e3 * loop_s, "host_share": host_s / (host_s + device_s),
         "loop_samples_per_s": cfg.train.batch_size / loop_s}
  return out


def main(argv):
  del argv
  out = profile(FLAGS.preset, FLAGS.steps, FLAGS.data_dir)
  print(json.dumps(out, indent=1))
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                      f"step_profile-{out['preset']}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
