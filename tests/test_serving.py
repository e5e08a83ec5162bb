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
  # --history with --output writes the same CSV (user_id empty).
  proc = cli(f"--workdir={workdir}", "--method=tdr_t", f"--history={','.join(hist[1])}",
             "--k=5", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.read_text().splitlines() == ["user_id,rank,item_id,score"] + [
      f",{i},{x},{s:.6g}" for i, (x, s) in enumerate(zip(want[1], tdr.retrieve(hist, k=5)[1][1]),
                                                       start=1)]


def test_cli_refuses_in_one_line(run, tmp_path):
  latin1 = tmp_path / "latin1.csv"
  latin1.write_bytes("u1,caf\xe9\n".encode("latin-1"))
  for args, words in (([f"--workdir={tmp_path / 'none'}", "--history=1"], ["no such folder"]),
                      ([f"--workdir={run[0]}", "--history=1", "--method=tdr_t", "--bogus"],
                       ["bogus"]),
                      ([f"--workdir={run[0]}", "--history=1", "--output=/nonexistent/x.csv"],
                       ["--output=/nonexistent/x.csv", "no such folder"]),
                      ([f"--workdir={run[0]}", f"--input={latin1}"], ["latin1.csv", "UTF-8"])):
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def edited_copy(workdir, dest, edit, vocab_edit=None):
  """A copy of `workdir` whose config.json (and item_vocab.json) `edit` changed in place."""
  shutil.copytree(workdir, dest)
  for name, fn in (("config.json", edit), (serving.VOCAB_FILE, vocab_edit)):
    if fn is None:
      continue
    with open(os.path.join(dest, name)) as f:
      d = json.load(f)
    fn(d)
    with open(os.path.join(dest, name), "w") as f:
      json.dump(d, f)
  return dest


def test_dr_setting_the_checkpoint_lacks_is_refused(run, tmp_path):
  """A DR setting the run left unset (so its record lacks it) but config.json sets is a
  mismatch too (not an Orbax error on restoring another optimizer state)."""
  copy = edited_copy(run[0], str(tmp_path / "c"),
                     lambda c: c["dr"].update(dr_rerank_esteps=1))
  with pytest.raises(InputError, match=r"dr\.rerank_esteps <unset> != 1") as e:
    serving.Retriever.load(copy, method="dr")
  assert "\n" not in str(e.value)


def test_itemcf_checks_the_corpus(run, tmp_path):
  def add_itemcf(c):
    c["method"] += ",itemcf"

  ok = edited_copy(run[0], str(tmp_path / "ok"), add_itemcf)
  r = serving.Retriever.load(ok, method="itemcf")
  ds, ev = run[3], run[4]
  assert len(r.retrieve(raw_histories(ds, ev.history[:2]), k=5)[0][0]) == 5
  bad = edited_copy(run[0], str(tmp_path / "bad"), add_itemcf,
                    lambda v: v.update(corpus_fingerprint="another"))
  with pytest.raises(InputError, match="is not the run's .another"):
    serving.Retriever.load(bad, method="itemcf")


def test_bad_max_batch_and_corrupt_config_refused(run, tmp_path):
  for mb in (0, -1):
    with pytest.raises(InputError, match=f"--max_batch={mb} must be at least 1"):
      serving.Retriever.load(run[0], method="tdr_t", max_batch=mb)
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text('{"method": "tdr_t", ')
  (broken / "results.json").write_text("{}")
  with pytest.raises(InputError, match=r"broken/config.json: not a valid JSON file"):
    serving.Retriever.load(str(broken))


def test_forest_add_items_copies_each_rounds_own_row(run):
  """With vectors (the final model's space), an earlier round's leaf row of the new item is
  that round's row of the nearest item, not the final model's vector."""
  r = serving.Retriever.load(run[0], method="tdr_t", use_forest=True)
  orig = str(r.vocab[7])
  out = r.add_items(["copy"], vectors=r.item_vectors([orig]))
  assert out["items"][0]["nearest"] == orig
  info = r._model.info
  rows = []
  for tree, params in zip(info["trees"], info["params"]):
    table = serving._node_table(params)
    leaf = np.asarray(tree.item_paths)[:, tree.height]
    rows.append((table[leaf[r.index["copy"]]], table[leaf[r.index[orig]]]))
  assert len(rows) == 2 and not np.allclose(rows[0][1], rows[1][1])
  for new, old in rows:
    np.testing.assert_array_equal(new, old)
