"""Top-K items of users from a finished run (`tdr_jax.serving.Retriever`).

  python experiments/retrieve.py --workdir=runs/X --input=histories.csv --k=50 --output=topk.csv
  python experiments/retrieve.py --workdir=runs/X --history=i12,i7,i33 --k=10
  python experiments/retrieve.py --workdir=runs/X --method=dr --input=... # --method=a,b runs

Input (--input): a CSV file, one user per row, two columns `user_id,history`; `history` is the
user's item ids as in the training data (raw ids), oldest first, separated by spaces (may be
empty); an optional first row `user_id,history` is a header. E.g.

  user_id,history
  u1,i12 i7 i33
  u2,i5

Output (--output, default stdout): a CSV with the header `user_id,rank,item_id,score` and one
row per retrieved item (rank 1 = best; a user may get fewer than --k rows). --history=a,b,c
(comma-separated raw ids, oldest first) retrieves for one user and prints `rank item_id score`
lines (with --output: writes that CSV, user_id empty). Unknown item ids are dropped from the histories (never mapped to another item) and
counted on stderr; histories longer than the run's --history_len keep their most recent items.

Bad input (a bad flag, a missing or unfinished workdir, a checkpoint that does not match the
workdir's config.json, a malformed or non-UTF-8 input file, an --output folder that does not
exist) ends with one line `error: <message>` on stderr
and exit status 2.
"""

import csv
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# --workdir, --method and --beam_size are experiments/cli.py's flags (shared with run.py);
# the other training flags are refused (the run's settings come from its config.json).
from experiments import cli  # noqa: E402,F401
from experiments.cli import (FLAGS, check_served_run_flags, exit_on_input_error,  # noqa: E402
                             parse_flags)
from tdr_jax import serving  # noqa: E402
from tdr_jax.errors import InputError  # noqa: E402

flags.DEFINE_string("input", None, "CSV of histories: rows `user_id,history` (space-separated "
                    "raw item ids, oldest first); optional header `user_id,history`.")
flags.DEFINE_string("output", None, "Output CSV `user_id,rank,item_id,score` (default: stdout).")
flags.DEFINE_list("history", None, "One user's history: comma-separated raw item ids, oldest "
                  "first (instead of --input).")
flags.DEFINE_integer("k", 50, "Items to retrieve per user.")
flags.DEFINE_bool("use_forest", False, "Tree methods: retrieve with every round's (tree, model) "
                  "and rerank with the last model (the run's forest row).")
flags.DEFINE_integer("max_batch", 256, "Users per retrieval call (padded to a power of two).")

ALLOWED_CONFIG_FLAGS = {"method", "beam_size"}


def read_histories(path: str) -> tuple[list[str], list[list[str]]]:
  if not os.path.isfile(path):
    raise InputError(f"--input={path}: no such file")
  users, histories = [], []
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except UnicodeDecodeError as e:
    raise InputError(f"--input={path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
  for line, row in enumerate(rows, start=1):
    if not row or (len(row) == 1 and not row[0].strip()):
      continue
    if line == 1 and [c.strip() for c in row] == ["user_id", "history"]:
      continue
    if len(row) != 2:
      raise InputError(f"{path}:{line}: expected 2 columns `user_id,history` (history = "
                       f"space-separated item ids), got {len(row)}")
    users.append(row[0].strip())
    histories.append(row[1].split())
  return users, histories


def run(argv):
  check_served_run_flags(argv, FLAGS, binary="retrieve.py", allowed=ALLOWED_CONFIG_FLAGS)
  if (FLAGS.input is None) == (FLAGS.history is None):
    raise InputError("pass exactly one of --input=histories.csv and --history=id1,id2,...")
  if FLAGS.k < 1:
    raise InputError(f"--k={FLAGS.k} must be at least 1")
  if FLAGS.max_batch < 1:
    raise InputError(f"--max_batch={FLAGS.max_batch} must be at least 1")
  if FLAGS.output:
    folder = os.path.dirname(os.path.abspath(FLAGS.output))
    if not os.path.isdir(folder):
      raise InputError(f"--output={FLAGS.output}: no such folder {folder}")
    if os.path.isdir(FLAGS.output):
      raise InputError(f"--output={FLAGS.output} is a folder; name the CSV file to write")
  if FLAGS.input is not None:
    users, histories = read_histories(FLAGS.input)
  else:
    users, histories = [""], [[x.strip() for x in FLAGS.history if x.strip()]]
  logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO/WARNING
  retriever = serving.Retriever.load(FLAGS.workdir, method=FLAGS.method,
                                     use_forest=FLAGS.use_forest, max_batch=FLAGS.max_batch)
  items, scores = retriever.retrieve(histories, FLAGS.k, beam_size=FLAGS.beam_size)
  stats = retriever.last_stats
  if stats["unknown_ids"]:
    sys.stderr.write(f"dropped {stats['unknown_ids']} unknown item ids ("
                     f"{stats['users_with_unknown_ids']} users)\n")
  if FLAGS.history is not None and not FLAGS.output:
    for rank, (item, score) in enumerate(zip(items[0], scores[0]), start=1):
      print(f"{rank}\t{item}\t{score:.6g}")
    return
  try:
    out = open(FLAGS.output, "w", newline="") if FLAGS.output else sys.stdout
  except OSError as e:
    raise InputError(f"--output={FLAGS.output}: cannot write ({e.strerror})") from None
  try:
    w = csv.writer(out)
    w.writerow(["user_id", "rank", "item_id", "score"])
    for user, row, sc in zip(users, items, scores):
      for rank, (item, score) in enumerate(zip(row, sc), start=1):
        w.writerow([user, rank, item, f"{score:.6g}"])
  finally:
    if FLAGS.output:
      out.close()
  if FLAGS.output:
    print(f"{len(users)} users, top {FLAGS.k} ({retriever.method}"
          f"{', forest' if FLAGS.use_forest else ''}) -> {FLAGS.output}")


def main(argv):
  exit_on_input_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
