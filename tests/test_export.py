"""experiments/export.py and the standalone loader on a tiny finished TDR(T) run: in a fresh
Python process that imports only jax and numpy (never tdr_jax), the exported function returns
the in-process Retriever's top-K for two batch sizes (batch-polymorphic), raw ids in and out;
bad flags end in one line, status 2."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tdr_jax import experiment, serving
from tdr_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "experiments", "export.py")
K = 10

# Runs in a fresh interpreter with the artifact folder alone on sys.path.
FRESH = r"""
import json, sys
folder, hist_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, folder)
import numpy as np
import retriever_loader
r = retriever_loader.ExportedRetriever.load(folder)
with open(hist_path) as f:
  histories = json.load(f)
out = {"loader": {}, "direct": {}}
for n in (3, len(histories)):
  items, scores = r.retrieve(histories[:n])
  out["loader"][n] = {"items": items, "scores": scores, "stats": r.last_stats}
internal, _ = r.to_internal(histories)
for n in (5,):  # the exported function itself, at an exact (unpadded) batch size
  items, scores = r.exported.call(internal[:n], *r.arrays)
  out["direct"][n] = {"items": np.asarray(items).tolist(), "scores": np.asarray(scores).tolist()}
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("tdr_jax", "flax", "orbax", "optax"))
out["manifest"] = r.manifest
print(json.dumps(out))
"""


def env():
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  e.pop("PYTHONPATH", None)
  return e


def export_cli(*args):
  return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, env=env(),
                        cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def export_module():
  """experiments/export.py loaded in this process (its flags: out, k, use_forest, platforms)."""
  spec = importlib.util.spec_from_file_location("tdr_export_cli", CLI)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, export_module):
  """(workdir, artifact folder, dataset, eval set) of a tiny one-round TDR(T) run."""
  data_dir = str(tmp_path_factory.mktemp("data"))
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = experiment.make_config("smoke", data_dir=data_dir, method="tdr_t", max_train_samples=320,
                               tree_learning="none", tree_rounds=1, beam_diagnostics=False)
  experiment.train_and_evaluate(cfg, workdir)
  out = str(tmp_path_factory.mktemp("art") / "retriever")
  manifest = export_module.export(workdir, out, k=K)
  assert manifest["platforms"] == ["cpu", "cuda"], manifest["platforms_note"]
  ds, _ = experiment.load_data(cfg)
  return workdir, out, ds, experiment.evaluation_set(cfg, ds)


def test_fresh_process_matches_retriever_for_two_batch_sizes(artifact, tmp_path):
  workdir, out, ds, ev = artifact
  raw = [[str(ds.item_raw_ids[i]) for i in row if i >= 0] for row in ev.history[:13]]
  raw[1] = ["no-such-item"] + raw[1]  # dropped and counted, as the Retriever does
  raw[2] = []
  hist_path = str(tmp_path / "histories.json")
  with open(hist_path, "w") as f:
    json.dump(raw, f)
  p = subprocess.run([sys.executable, "-c", FRESH, out, hist_path], capture_output=True,
                     text=True, env=env(), cwd=str(tmp_path), timeout=300)
  assert p.returncode == 0, p.stderr
  got = json.loads(p.stdout.strip().splitlines()[-1])
  assert got["modules"] == []  # the loader ran on jax + numpy alone

  manifest = got["manifest"]
  assert manifest["k"] == K and manifest["method"] == "tdr_t"
  assert manifest["history_len"] == 6 and "cpu" in manifest["platforms"]

  r = serving.Retriever.load(workdir)
  assert manifest["beam_size"] == r.cfg.eval.beam_size
  assert manifest["fingerprint"]["config"] == r.cfg.fingerprint()
  for n, res in got["loader"].items():
    items, scores = r.retrieve(raw[:int(n)], k=K)
    assert res["items"] == items, n
    np.testing.assert_allclose(np.concatenate(res["scores"]), np.concatenate(scores), rtol=1e-5,
                               atol=1e-6)
    assert res["stats"]["unknown_ids"] == r.last_stats["unknown_ids"] == 1
    assert res["stats"]["unknown_per_user"] == r.last_stats["unknown_per_user"]
  internal, _ = r.to_internal(raw)
  for n, res in got["direct"].items():
    items, scores = r.retrieve_internal(internal[:int(n)], K)
    assert res["items"] == items.tolist(), n
    np.testing.assert_allclose(res["scores"], scores, rtol=1e-5, atol=1e-6)


def test_artifact_files_and_loader_cli(artifact, tmp_path):
  _, out, ds, _ = artifact
  assert sorted(os.listdir(out)) == ["item_vocab.json", "manifest.json", "params.npz",
                                     "retriever_loader.py", "search.jaxexport"]
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  for name, rec in manifest["files"].items():
    assert os.path.getsize(os.path.join(out, name)) == rec["bytes"]
  with open(os.path.join(out, "retriever_loader.py")) as f:
    source = f.read()
  assert "tdr_jax" not in "".join(l for l in source.splitlines() if l.startswith(("import", "from")))
  ids = [str(x) for x in ds.item_raw_ids[:3]]
  p = subprocess.run([sys.executable, os.path.join(out, "retriever_loader.py"),
                      f"--history={','.join(ids)}", "--k=4"], capture_output=True, text=True,
                     env=env(), cwd=str(tmp_path), timeout=300)
  assert p.returncode == 0, p.stderr
  assert [l.split("\t")[0] for l in p.stdout.splitlines()] == ["1", "2", "3", "4"]


def test_bad_flags_one_line_exit_2(artifact, export_module, tmp_path):
  workdir = artifact[0]
  p = export_cli(f"--workdir={workdir}", f"--out={tmp_path / 'x'}", "--learning_rate=0.1")
  assert p.returncode == 2
  assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
  assert "a training setting" in p.stderr
  with pytest.raises(InputError, match="exceeds the beam size 20"):
    export_module.export(workdir, str(tmp_path / "y"), k=30)
  with pytest.raises(InputError, match="--platforms"):
    export_module.export(workdir, str(tmp_path / "y"), platforms=("gpu",))


def test_out_that_is_a_file_refused(artifact, export_module, tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  for out in (f, f / "sub"):
    with pytest.raises(InputError, match="exists and is not a folder"):
      export_module.export(artifact[0], str(out))


def test_loader_checks_max_batch_arrays_and_platform(artifact, tmp_path, monkeypatch):
  import jax
  from tdr_jax import export_loader
  out = artifact[1]
  with pytest.raises(ValueError, match="max_batch=0 must be at least 1"):
    export_loader.ExportedRetriever.load(out, max_batch=0)
  p = subprocess.run([sys.executable, os.path.join(out, "retriever_loader.py"), "--history=1",
                      "--max_batch=0"], capture_output=True, text=True, env=env(),
                     cwd=str(tmp_path), timeout=300)
  assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
  # The arrays are checked against the manifest (order a000, a001, ...; shapes and dtypes).
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  with open(copy / "manifest.json") as f:
    manifest = json.load(f)
  manifest["array_shapes"][1][0] = [7] + manifest["array_shapes"][1][0]
  with open(copy / "manifest.json", "w") as f:
    json.dump(manifest, f)
  with pytest.raises(ValueError, match=r"a001 is .* manifest.json says"):
    export_loader.ExportedRetriever.load(str(copy), verify=False)
  # A gpu device is cuda or rocm, as jax.export names the platforms.
  monkeypatch.setattr(jax.export, "default_export_platform", lambda: "rocm")
  with pytest.raises(ValueError, match="running on rocm"):
    export_loader.ExportedRetriever.load(out)
