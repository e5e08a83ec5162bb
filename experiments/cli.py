"""Flags and error handling shared by the experiment binaries (`run.py`, `ablate.py`).

Importing this module defines one absl flag per config field (tdr_jax.config: same names, help
from the fields; unset = the preset's value) plus `--loader_option` and `--workdir` on the
global FLAGS, once per process. Expected bad input (`tdr_jax.errors.InputError`, or a flag absl
cannot parse) ends the binary with one line `error: <message>` on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

import os
import re
import sys

from absl import flags

from tdr_jax import config as config_lib
from tdr_jax.data import datasets
from tdr_jax.errors import InputError

FLAGS = flags.FLAGS
config_lib.define_flags(FLAGS)
flags.DEFINE_multi_string("loader_option", [], "key=value option of the dataset's loader, "
                          "repeatable, e.g. --loader_option=actions=0,2 (tmall); a bad key "
                          "lists the loader's options with their defaults.")
flags.DEFINE_string("workdir", None, "Output folder; default runs/<dataset>-<method>-<time> "
                    "(run.py) or runs/ablate-<sweep>-<dataset>-<preset> (ablate.py). An "
                    "existing workdir with checkpoints is resumed.")
flags.adopt_module_key_flags(config_lib)  # --help of the binaries lists the config's flags


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


def config_from_flags(**defaults) -> config_lib.Config:
  """The config of the flags: the preset (default `default`) with every set flag over it.
  `defaults`: values (flat field names) for fields whose flag is not set."""
  overrides = config_lib.overrides_from_flags(FLAGS)
  for name, value in defaults.items():
    overrides.setdefault(name, value)
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


def check_no_arguments(argv) -> None:
  if len(argv) > 1:
    raise InputError(f"unexpected arguments {argv[1:]}: flags are written --name=value")


def check_served_run_flags(argv, flag_values, *, binary: str, allowed: set) -> None:
  """The common checks of the binaries that read a finished run (retrieve.py, export.py): no
  positional arguments, no training setting other than `allowed` (the run's settings come from
  its config.json) and --workdir given."""
  check_no_arguments(argv)
  extra = set(config_lib.overrides_from_flags(flag_values)) - allowed
  if extra:
    raise InputError(f"--{sorted(extra)[0]}: a training setting; {binary} takes the run's "
                     f"settings from <workdir>/config.json")
  if not flag_values.workdir:
    raise InputError("--workdir is required (a finished run of experiments/run.py)")
