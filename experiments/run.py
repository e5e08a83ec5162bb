"""Train a retrieval method and evaluate it on the test users.

  python experiments/run.py                      # TDR(T) on the synthetic default
  python experiments/run.py --dataset=tmall --data_dir=/data/tmall --preset=paper
  python experiments/run.py --dataset=tmall --loader_option=actions=0,2 --skip_bad_rows

Expected bad input (a bad flag or flag combination, a missing or malformed data file, a
workdir written with other settings, no data left after filtering) ends the run with one line
`error: <message>` on stderr and exit status 2; anything else is a bug and shows its traceback.
"""

import os
import re
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tdr_jax import config as config_lib  # noqa: E402
from tdr_jax import experiment  # noqa: E402
from tdr_jax.data import datasets  # noqa: E402
from tdr_jax.errors import InputError  # noqa: E402

FLAGS = flags.FLAGS
# One flag per config field (tdr_jax.config: same names, help from the fields; unset = the
# preset's value), plus the two below that are not config fields.
config_lib.define_flags(FLAGS)
flags.DEFINE_multi_string("loader_option", [], "key=value option of the dataset's loader, "
                          "repeatable, e.g. --loader_option=actions=0,2 (tmall); a bad key "
                          "lists the loader's options with their defaults.")
flags.DEFINE_string("workdir", None, "Output folder; default runs/<dataset>-<method>-<time>. "
                    "An existing workdir with checkpoints is resumed.")


def loader_options_from_flags() -> tuple:
  """--loader_option values converted to the loader's types, as sorted (key, value) pairs."""
  dataset = FLAGS.dataset or "synthetic"
  if dataset not in datasets.DATASETS:
    raise InputError(f"--dataset={dataset}: unknown dataset; choose from "
                     f"{', '.join(sorted(datasets.DATASETS))}")
  if dataset == "synthetic":
    if FLAGS.loader_option:
      raise InputError("--loader_option: the synthetic dataset has no loader options "
                       "(use --dataset=csv to read a csv of your own)")
    return ()
  options = datasets.parse_loader_options(dataset, FLAGS.loader_option,
                                          flag="--loader_option")
  return tuple(sorted(options.items()))


def config_from_flags() -> config_lib.Config:
  overrides = config_lib.overrides_from_flags(FLAGS)
  dataset = overrides.get("dataset", "synthetic")
  overrides.setdefault("data_dir", os.path.join("data", dataset))
  return config_lib.make_config(overrides.pop("preset", None) or "default",
                                loader_options=loader_options_from_flags(), **overrides)


def fail(message: str):
  """`error: <message>` as one line on stderr, exit status 2."""
  sys.stdout.flush()
  message = re.sub(r"\s*\n\s*", " ", str(message).strip())
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(2)


def exit_on_input_error(fn, *args):
  """fn(*args); an InputError (expected bad input) becomes `fail(message)`. Any other
  exception propagates with its traceback."""
  try:
    return fn(*args)
  except InputError as e:
    fail(str(e))


def parse_flags(argv):
  """absl's flag parsing, with errors (unknown flag, bad enum or number) as one line, status 2
  (absl's own parser prints two lines and exits 1)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e))


def run(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments {argv[1:]}: flags are written --name=value")
  config = config_from_flags()
  experiment.parse_methods(config.method)  # before the workdir is made
  workdir = FLAGS.workdir or os.path.join(
      "runs", f"{config.data.dataset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
  logging.set_verbosity(logging.WARNING)  # Orbax and XLA are chatty at INFO
  print(f"workdir: {workdir}")
  experiment.train_and_evaluate(config, workdir)


def main(argv):
  exit_on_input_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
