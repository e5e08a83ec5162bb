"""Train a retrieval method and evaluate it on the test users.

  python experiments/run.py                      # TDR(T) on the synthetic default
  python experiments/run.py --dataset=tmall --data_dir=/data/tmall --preset=paper
  python experiments/run.py --dataset=tmall --loader_option=actions=0,2 --skip_bad_rows
  python experiments/run.py --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=0 ...   # on host 0; --process_id=1 on host 1 (README "From one machine
                           # to many"); --distributed on a TPU slice / under SLURM

Expected bad input (a bad flag or flag combination, a missing or malformed data file, a
workdir written with other settings, no data left after filtering) ends the run with one line
`error: <message>` on stderr and exit status 2; anything else is a bug and shows its traceback.
"""

import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The flags (one per config field, --loader_option, --workdir) and the one-line handling of bad
# input are experiments/cli.py's, shared with ablate.py.
from experiments import cli  # noqa: E402
from experiments.cli import (FLAGS, check_no_arguments, config_from_flags,  # noqa: E402
                             exit_on_input_error, parse_flags)
from tdr_jax import experiment  # noqa: E402

cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)  # --help lists the shared flags


def run(argv):
  check_no_arguments(argv)
  config = config_from_flags()
  experiment.parse_methods(config.method)  # before the workdir is made
  if cli.init_distributed():  # before any JAX call
    cli.check_shared_workdir()
  workdir = FLAGS.workdir or os.path.join(
      "runs", f"{config.data.dataset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
  logging.set_verbosity(logging.WARNING)  # Orbax and XLA are chatty at INFO
  print(f"workdir: {workdir}")
  experiment.train_and_evaluate(config, workdir)


def main(argv):
  exit_on_input_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
