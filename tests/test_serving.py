"""tdr_jax.serving.Retriever and experiments/retrieve.py on a finished smoke run (TDR(T) with
two rounds and its forest, DR, DIN): the restored models retrieve exactly what the run's own
evaluation retrieved; raw ids in and out; unknown ids dropped and counted; one compilation per
batch bucket; mismatched checkpoints and bad flags refused in one line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tdr_jax import evaluation, experiment, parallel, serving
from tdr_jax import metrics as metrics_lib
from tdr_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "experiments", "retrieve.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, results, cfg, ds, ev) of a finished smoke run of tdr_t, dr and din."""
  data_dir = str(tmp_path_factory.mktemp("data"))
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = experiment.make_config("smoke", data_dir=data_dir, method="tdr_t,dr,din",
                               max_train_samples=320, tree_learning="none")
  results = experiment.train_and_evaluate(cfg, workdir)
  ds, _ = experiment.load_data(cfg)
  return workdir, results, cfg, ds, experiment.evaluation_set(cfg, ds)


@pytest.fixture(scope="module")
def tdr(run):
  return serving.Retriever.load(run[0], method="tdr_t")


def raw_histories(ds, history):
  return [[ds.item_raw_ids[i] for i in row if i >= 0] for row in history]


def row_of(results, method):
  return next(r for r in results["results"] if r["method"] == method)


def assert_same_metrics(retrieved, run, method):
  _, results, cfg, ds, ev = run
  got = metrics_lib.retrieval_metrics(retrieved, ev.label_offsets, ev.label_items,
                                      num_items=ds.num_items, ks=cfg.eval.topk)
  want = row_of(results, method)
  assert got == {k: want[k] for k in got}, method


def test_tree_method_retrieves_what_the_run_evaluated(run, tdr):
  workdir, results, cfg, ds, ev = run
  kmax = max(cfg.eval.topk)
  info = tdr._model.info
  ref = evaluation.retrieve(info["score_fn"], info["params"][-1], info["trees"][-1], ev.history,
                            beam_size=cfg.eval.beam_size, topk=kmax,
                            batch_size=cfg.eval.eval_batch_size, mesh=parallel.make_mesh())
  items, scores = tdr.retrieve(raw_histories(ds, ev.history), k=kmax)
  assert items == [[str(ds.item_raw_ids[i]) for i in row if i >= 0] for row in ref]
  assert all(len(s) == len(i) and s == sorted(s, reverse=True) for i, s in zip(items, scores))
  assert tdr.last_stats["unknown_ids"] == 0
  # ... and the restored final round is the model behind the run's TDR(T) row.
  assert_same_metrics(tdr.retrieve_internal(ev.history, kmax)[0], run, "TDR(T)")


def test_forest_dr_din_retrieve_what_the_run_evaluated(run):
  workdir, _, cfg, ds, ev = run
  kmax = max(cfg.eval.topk)
  forest = serving.Retriever.load(workdir, method="tdr_t", use_forest=True)
  assert forest._model.info["rounds"] == 2
  assert_same_metrics(forest.retrieve_internal(ev.history, kmax)[0], run, "TDR(T) forest")
  for method, label in (("dr", "DR"), ("din", "DIN")):
    r = serving.Retriever.load(workdir, method=method)
    internal = r.retrieve_internal(ev.history, kmax)[0]
    assert_same_metrics(internal, run, label)
    items, _ = r.retrieve(raw_histories(ds, ev.history[:5]), k=kmax)
    assert items == [[str(ds.item_raw_ids[i]) for i in row if i >= 0] for row in internal[:5]]


def test_one_compilation_per_batch_bucket(run, tdr):
  ds, ev = run[3], run[4]
  hist = raw_histories(ds, ev.history)
  tdr.retrieve(hist[:5], k=10)
  before = tdr.compiles
  tdr.retrieve(hist[:7], k=10)  # same bucket (8): no new trace
  tdr.retrieve(hist[:6], k=10)
  assert tdr.compiles == before
  tdr.retrieve(hist[:9], k=10)  # bucket 16
  assert tdr.compiles == before + 1


def test_unknown_ids_dropped_and_counted_long_histories_keep_recent(run, tdr):
  ds = run[3]
  raw = [str(x) for x in ds.item_raw_ids[:40]]
  L = tdr.history_len
  clean = [raw[:3], raw[3:3 + L]]
  noisy = [["nope-1"] + raw[:1] + ["nope-2"] + raw[1:3], raw[:20] + raw[3:3 + L]]
  items, scores = tdr.retrieve(noisy, k=10)
  assert tdr.last_stats["unknown_ids"] == 2
  assert tdr.last_stats["unknown_per_user"] == [2, 0]
  assert tdr.last_stats["truncated_histories"] == 1
  assert (items, scores) == tdr.retrieve(clean, k=10)
  as_ints = [[int(x) for x in h] for h in clean]  # ints as in the file are the same ids
  assert tdr.retrieve(as_ints, k=10)[0] == items
  assert tdr.retrieve([["nope"]], k=5)[0] == tdr.retrieve([[]], k=5)[0]
  assert tdr.last_stats["empty_histories"] == 1


def test_method_choice_and_refusals(run, tmp_path):
  workdir = run[0]
  with pytest.raises(InputError, match="choose one with --method"):
    serving.Retriever.load(workdir)
  with pytest.raises(InputError, match="holds"):
    serving.Retriever.load(workdir, method="tdm")
  with pytest.raises(InputError, match="no such folder"):
    serving.Retriever.load(str(tmp_path / "missing"))
  # A checkpoint that does not match the workdir's config.json: refused naming the setting.
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "config.json")) as f:
    cfg = json.load(f)
  cfg["train"]["num_negatives"] = 5
  cfg["dr"]["dr_alpha"] = 123.0
  with open(os.path.join(copy, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(InputError, match=r"copy: the checkpoint .* --num_negatives 4 != 5"):
    serving.Retriever.load(copy, method="tdr_t")
  with pytest.raises(InputError, match=r"dr\.alpha"):
    serving.Retriever.load(copy, method="dr")
  with pytest.raises(InputError, match=r"din\.num_negatives"):
    serving.Retriever.load(copy, method="din")


def test_run_without_vocabulary_file_loads_the_dataset(run, tdr, tmp_path):
  workdir, _, _, ds, ev = run
  copy = str(tmp_path / "old")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, serving.VOCAB_FILE))
  old = serving.Retriever.load(copy, method="tdr_t")
  hist = raw_histories(ds, ev.history[:4])
  assert old.retrieve(hist, k=10) == tdr.retrieve(hist, k=10)


def cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True,
                        timeout=300, env=env)


def test_cli_writes_topk_with_raw_ids(run, tdr, tmp_path):
  workdir, _, _, ds, ev = run
  hist = raw_histories(ds, ev.history[:3])
  src = tmp_path / "histories.csv"
  src.write_text("user_id,history\n" + "".join(
      f"user{i},{' '.join(h + (['unknown'] if i == 0 else []))}\n" for i, h in enumerate(hist)))
  out = tmp_path / "topk.csv"
  proc = cli(f"--workdir={workdir}", "--method=tdr_t", f"--input={src}", "--k=5",
             f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dropped 1 unknown item ids (1 users)" in proc.stderr
  lines = out.read_text().splitlines()
  assert lines[0] == "user_id,rank,item_id,score"
  want, _ = tdr.retrieve(hist, k=5)
  got = {}
  for line in lines[1:]:
    user, rank, item, _ = line.split(",")
    got.setdefault(user, []).append(item)
    assert int(rank) == len(got[user])
  assert got == {f"user{i}": w for i, w in enumerate(want)}


def test_cli_refuses_in_one_line(run, tmp_path):
  for args, words in (([f"--workdir={tmp_path / 'none'}", "--history=1"], ["no such folder"]),
                      ([f"--workdir={run[0]}", "--history=1", "--method=tdr_t", "--bogus"],
                       ["bogus"])):
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
