"""Flags and error handling shared by the experiment binaries (`run.py`, `ablate.py`).

Importing this module defines one absl flag per config field (tdr_jax.config: same names, help
from the fields; unset = the preset's value) plus `--loader_option` and `--workdir` on the
global FLAGS, once per process. The binaries that train (run.py, ablate.py) also call
`define_distributed_flags()` (`--coordinator_address`, `--num_processes`, `--process_id`,
`--distributed`) and `init_distributed()` first thing in their main: multi-host data parallel on
JAX's own runtime (`jax.distributed.initialize`, one process per host). Expected bad input
(`tdr_jax.errors.InputError`, or a flag absl cannot parse) ends the binary with one line
`error: <message>` on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

import os
import re
import sys

import jax
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


def define_distributed_flags(flag_values=FLAGS) -> None:
  """Defines the coordinator flags of `jax.distributed.initialize` (once per flag_values)."""
  if "num_processes" in flag_values:
    return
  flags.DEFINE_bool("distributed", False, "Start JAX's multi-controller runtime "
                    "(jax.distributed.initialize) even without the three flags below: on a TPU "
                    "slice, under SLURM or Open MPI, or with JAX_COORDINATOR_ADDRESS set, JAX "
                    "finds the coordinator, process count and process id itself. Implied by "
                    "any of the three flags.", flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0, where "
                      "it serves JAX's coordinator (the same on every process; default: "
                      "JAX_COORDINATOR_ADDRESS or the cluster's).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes (one per "
                       "host; default: the cluster's).", flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. "
                       "--num_processes - 1 (default: the cluster's).", flag_values=flag_values)


def distributed_settings(flag_values=FLAGS) -> dict | None:
  """The keyword arguments of `jax.distributed.initialize` from the coordinator flags, or None
  for a single process (no --distributed and none of the three flags). Unset flags stay out:
  JAX then reads them from its environment variables or detects the cluster."""
  address = flag_values.coordinator_address
  num, pid = flag_values.num_processes, flag_values.process_id
  if not (flag_values.distributed or address is not None or num is not None or
          pid is not None):
    return None
  if num is not None and num < 1:
    raise InputError(f"--num_processes={num}: must be at least 1")
  if pid is not None and num is None:
    raise InputError(f"--process_id={pid} needs --num_processes (the process ids are "
                     f"0 .. --num_processes - 1)")
  if pid is not None and not 0 <= pid < num:
    raise InputError(f"--process_id={pid}: must be in 0 .. {num - 1} (--num_processes={num})")
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise InputError(f"--coordinator_address={address}: expected host:port, e.g. "
                       f"10.0.0.1:1234 (process 0's address and a free port)")
  settings = {"coordinator_address": address, "num_processes": num, "process_id": pid}
  return {k: v for k, v in settings.items() if v is not None}


def init_distributed(flag_values=FLAGS) -> dict | None:
  """Starts JAX's multi-controller runtime when the flags ask for it (`distributed_settings`);
  call it before anything else touches JAX. Prints this process's place and returns the
  settings (None: a single process, nothing started). A setting JAX refuses or cannot use
  (no cluster to detect, a coordinator it cannot reach) is an InputError."""
  settings = distributed_settings(flag_values)
  if settings is None:
    return None
  try:
    jax.distributed.initialize(**settings)
  except (ValueError, TypeError, RuntimeError) as e:
    given = ", ".join(f"--{k}={v}" for k, v in settings.items()) or "--distributed"
    raise InputError(f"jax.distributed.initialize ({given}) failed: {e}") from e
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)
  return settings


def check_shared_workdir(flag_values=FLAGS) -> None:
  """Several processes write one run: they need the same --workdir (a folder every process
  sees, for the checkpoints), which a default named after the clock would not give them."""
  if jax.process_count() > 1 and not flag_values.workdir:
    raise InputError(f"--workdir is required with several processes ({jax.process_count()}): "
                     f"the same folder on a filesystem every process sees")


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
