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

from tdr_jax import experiment  # noqa: E402
from tdr_jax.data import datasets  # noqa: E402
from tdr_jax.errors import InputError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS),
                  "paper: TDR sec. 8.4 settings; default: fits `make run` on a 2-core CPU; "
                  "smoke: seconds, for tests.")
flags.DEFINE_string("dataset", "synthetic", "synthetic, movielens, tmall, taobao, amazon_books, "
                    "mind or csv.")
flags.DEFINE_string("data_dir", None, "Folder of the raw files (and the preprocessing cache); "
                    "default data/<dataset>.")
flags.DEFINE_string("method", "tdr", "Retrieval method(s), comma-separated, or 'all': tdr, "
                    "tdr_u, tdr_t, tdr_t_rl, tdm, jtm, otm, plt, dr, din, youtube_dnn, itemcf.")
flags.DEFINE_enum("sampler", None, ["uniform", "top_down"], "Negative sampler (default top_down).")
flags.DEFINE_integer("num_negatives", None, "Negatives per level (paper: 70).")
flags.DEFINE_integer("beam_size", None, "Beam size k (paper: 150).")
flags.DEFINE_list("topk", None, "Cut-offs K, e.g. 20,40,60.")
flags.DEFINE_integer("branching", None, "Tree branching factor B.")
flags.DEFINE_float("epochs", None, "Training epochs (fractions allowed).")
flags.DEFINE_integer("batch_size", None, "Training batch size.")
flags.DEFINE_integer("history_len", None, "History length L (windows must sum to it).")
flags.DEFINE_list("windows", None, "Time-window sizes, most recent first.")
flags.DEFINE_float("learning_rate", None, "Adam learning rate.")
flags.DEFINE_integer("seed", None, "Seed of data split, tree, init and sampling.")
flags.DEFINE_integer("max_train_samples", None, "Use a seeded subset of the training samples.")
flags.DEFINE_integer("max_eval_users", None, "Evaluate on the first N test users only.")
flags.DEFINE_integer("checkpoint_every", None, "Checkpoint period in steps.")
flags.DEFINE_integer("tree_rounds", None, "Trees learned in turn with the model (JTM Alg. 1); "
                     "1 = keep the initial category tree.")
flags.DEFINE_enum("tree_learning", None, ["tdr", "jtm", "tdm", "none"],
                  "Tree update between rounds (none: keep the initial tree, the control).")
flags.DEFINE_integer("tree_gap", None, "Layer gap d of tree learning (paper: 7).")
flags.DEFINE_integer("tree_users_per_item", None, "Cap on the samples per item in tree learning.")
flags.DEFINE_enum("tree_assignment", None, ["greedy", "priced"],
                  "Capacity rule of tree learning: the paper's greedy pass on the matching "
                  "scores, or the same pass on scores minus Sinkhorn capacity prices (default).")
flags.DEFINE_bool("forest", None, "Also retrieve with the forest of every round's tree+model.")
flags.DEFINE_enum("initial_tree", None, ["auto", "category", "kmeans", "random"],
                  "Initial tree: categories, balanced k-means over warm-start item vectors, "
                  "random, or auto (categories when they are present and informative, else "
                  "k-means; the run prints which and why).")
flags.DEFINE_bool("warm_start", None, "Initialise the node embeddings of the tree methods and "
                  "of brute-force DIN from warm-start item vectors (a two-tower model).")
flags.DEFINE_enum("warm_start_model", None, ["svd", "two_tower"], "Warm-start item vectors: "
                  "truncated SVD of the training user-item matrix (default) or a two-tower "
                  "model (YouTubeDNN).")
flags.DEFINE_float("warm_start_epochs", None, "Epochs of the warm-start two-tower model.")
flags.DEFINE_bool("rectify", None, "TDR(T-RL): rectified labels (Eq. 15) from a SASRec "
                  "estimator trained once per workdir.")
flags.DEFINE_integer("otm_beam_size", None, "OTM: beam size of the training beam search.")
flags.DEFINE_float("sasrec_epochs", None, "Epochs of the SASRec estimator of --rectify.")
flags.DEFINE_integer("sasrec_dim", None, "Width of the SASRec estimator of --rectify.")
flags.DEFINE_string("dr_preset", None, "Deep Retrieval settings: movielens, amazon_books, "
                    "synthetic or smoke (default: by dataset).")
flags.DEFINE_float("dr_alpha", None, "Deep Retrieval path-size penalty alpha.")
flags.DEFINE_integer("dr_beam_size", None, "Deep Retrieval inference beam (paths).")
flags.DEFINE_integer("dr_em_rounds", None, "Deep Retrieval M-steps.")
flags.DEFINE_integer("synthetic_users", None, "Users of the synthetic dataset.")
flags.DEFINE_integer("synthetic_items", None, "Items of the synthetic dataset.")
flags.DEFINE_enum("synthetic_world", None, ["v1", "v2"], "Generator version of the synthetic "
                  "dataset (default v2; v1 = the old default).")
flags.DEFINE_bool("synthetic_categories", None, "Synthetic dataset: write the (noisy) item "
                  "categories (default true); false: the items have none.")
flags.DEFINE_multi_string("loader_option", [], "key=value option of the dataset's loader, "
                          "repeatable, e.g. --loader_option=actions=0,2 (tmall); a bad key "
                          "lists the loader's options with their defaults.")
flags.DEFINE_bool("skip_bad_rows", False, "Skip (and count) malformed rows of the raw files "
                  "instead of stopping at the first.")
flags.DEFINE_string("workdir", None, "Output folder; default runs/<dataset>-<method>-<time>. "
                    "An existing workdir with checkpoints is resumed.")


def loader_options_from_flags() -> tuple:
  """--loader_option values converted to the loader's types, as sorted (key, value) pairs."""
  if FLAGS.dataset not in datasets.DATASETS:
    raise InputError(f"--dataset={FLAGS.dataset}: unknown dataset; choose from "
                     f"{', '.join(sorted(datasets.DATASETS))}")
  if FLAGS.dataset == "synthetic":
    if FLAGS.loader_option:
      raise InputError("--loader_option: the synthetic dataset has no loader options "
                       "(use --dataset=csv to read a csv of your own)")
    return ()
  options = datasets.parse_loader_options(FLAGS.dataset, FLAGS.loader_option,
                                          flag="--loader_option")
  return tuple(sorted(options.items()))


def config_from_flags() -> experiment.Config:
  ints = lambda v: tuple(int(x) for x in v) if v else None  # noqa: E731
  loader_options = loader_options_from_flags()
  data_dir = FLAGS.data_dir or os.path.join("data", FLAGS.dataset)
  return experiment.make_config(
      FLAGS.preset, dataset=FLAGS.dataset, data_dir=data_dir, method=FLAGS.method,
      sampler=FLAGS.sampler, num_negatives=FLAGS.num_negatives, beam_size=FLAGS.beam_size,
      topk=ints(FLAGS.topk), branching=FLAGS.branching, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, history_len=FLAGS.history_len, windows=ints(FLAGS.windows),
      learning_rate=FLAGS.learning_rate, seed=FLAGS.seed,
      max_train_samples=FLAGS.max_train_samples, max_eval_users=FLAGS.max_eval_users,
      checkpoint_every=FLAGS.checkpoint_every, tree_rounds=FLAGS.tree_rounds,
      tree_learning=FLAGS.tree_learning, tree_gap=FLAGS.tree_gap,
      tree_users_per_item=FLAGS.tree_users_per_item, tree_assignment=FLAGS.tree_assignment,
      forest=FLAGS.forest, initial_tree=FLAGS.initial_tree, warm_start=FLAGS.warm_start,
      warm_start_epochs=FLAGS.warm_start_epochs, warm_start_model=FLAGS.warm_start_model,
      synthetic_users=FLAGS.synthetic_users, synthetic_items=FLAGS.synthetic_items,
      synthetic_world=FLAGS.synthetic_world, synthetic_categories=FLAGS.synthetic_categories,
      loader_options=loader_options, skip_bad_rows=FLAGS.skip_bad_rows,
      rectify=FLAGS.rectify, otm_beam_size=FLAGS.otm_beam_size, dr_preset=FLAGS.dr_preset,
      dr_alpha=FLAGS.dr_alpha, dr_beam_size=FLAGS.dr_beam_size, dr_em_rounds=FLAGS.dr_em_rounds,
      sasrec_epochs=FLAGS.sasrec_epochs, sasrec_dim=FLAGS.sasrec_dim)


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
      "runs", f"{config.dataset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
  logging.set_verbosity(logging.WARNING)  # Orbax and XLA are chatty at INFO
  print(f"workdir: {workdir}")
  experiment.train_and_evaluate(config, workdir)


def main(argv):
  exit_on_input_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
