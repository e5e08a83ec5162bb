"""experiments/ablate.py on the smoke preset: each sweep's results.json, results.md and plot, a
rerun that trains nothing, refusals of other settings or another corpus, bad flags as one
line; every sweep's point configs for every method; the sampler-bias KL by hand."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdr_jax import experiment, sampler_bias, training
from tdr_jax import tree as tree_lib
from tdr_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATE = os.path.join(ROOT, "experiments", "ablate.py")
# The smoke preset cut to one round of 8 steps, 16 test users and a tree of branching 8 (3
# levels over the 397 items, 512 leaf slots): every point is mostly compilation, which grows
# with the levels.
SMOKE = ["--preset=smoke", "--tree_rounds=1", "--noforest", "--epochs=0.3", "--max_eval_users=16",
         "--branching=8"]
# Each sweep's flags ({data}, {work} = folders of the module). TDR(U) with m = 4 (the smoke
# preset's) recurs in every sweep: with JAX's persistent compilation cache its training step
# compiles once.
SWEEPS = {
    "negatives": ["--methods=tdr_u", "--values=3,4"],
    "sampler": ["--methods=uniform,full_softmax", "--timing_steps=2", "--bias_users=6",
                "--bias_samples=512"],
    "beam": ["--methods=tdr_u", "--values=8,20"],
    "rounds": ["--methods=tdr_u", "--tree_rounds=2"],
}
# Runs the sweeps one after another in one process (one import, one compilation cache); a
# failed sweep prints its traceback and the next one still runs.
DRIVER = """
import importlib.util, json, sys, traceback
spec = importlib.util.spec_from_file_location("ablate", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
for name, argv in json.loads(sys.argv[2]).items():
  print(f"=== sweep {name}", flush=True)
  try:
    mod.FLAGS(["ablate.py", *argv])
    mod.run(["ablate.py"])
    print(f"=== ok {name}", flush=True)
  except Exception:
    traceback.print_exc()
  finally:
    mod.FLAGS.unparse_flags()
"""


def sweep_argv(name: str, data: str, work: str) -> list[str]:
  return [f"--sweep={name}", *SMOKE, *SWEEPS[name], f"--data_dir={data}",
          f"--workdir={os.path.join(work, name)}"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
  """The four smoke sweeps, run once: {"work", "data", "stderr", name: stdout of the sweep}."""
  root = tmp_path_factory.mktemp("ablate")
  data, work = str(root / "data"), str(root / "work")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  argvs = {name: sweep_argv(name, data, work) for name in SWEEPS}
  proc = subprocess.run([sys.executable, "-c", DRIVER, ABLATE, json.dumps(argvs)],
                        capture_output=True, text=True, timeout=900, cwd=str(root), env=env)
  out = {"work": work, "data": data, "stderr": proc.stderr}
  for part in proc.stdout.split("=== sweep ")[1:]:
    name, _, text = part.partition("\n")
    out[name] = text
  return out


def finished(sweeps, name: str) -> tuple[str, str]:
  """(stdout of sweep `name`, its workdir); fails with the driver's stderr if it failed."""
  text = sweeps.get(name, "")
  assert f"=== ok {name}" in text, sweeps["stderr"][-5000:]
  return text, os.path.join(sweeps["work"], name)


@pytest.fixture(scope="module")
def ablate():
  spec = importlib.util.spec_from_file_location("tdr_ablate", ABLATE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def run_ablate(mod, *argv) -> dict:
  try:
    mod.FLAGS(["ablate.py", *argv])
    return mod.run(["ablate.py"])
  finally:
    mod.FLAGS.unparse_flags()


def rerun_trains_nothing(mod, monkeypatch, capsys, sweeps, name, *extra) -> tuple[dict, list]:
  """Sweep `name` again on its finished workdir, in this process, with training.fit disabled:
  (results, progress lines)."""
  def no_training(*args, **kwargs):
    raise AssertionError("a finished sweep trained again")

  monkeypatch.setattr(training, "fit", no_training)
  capsys.readouterr()
  results = run_ablate(mod, *sweep_argv(name, sweeps["data"], sweeps["work"]), *extra)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
  monkeypatch.undo()
  return results, lines


def check_outputs(workdir: str, sweep: str) -> dict:
  """The checks every sweep passes; returns its results.json."""
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["sweep"] == sweep and results["dataset"] == "synthetic"
  assert results["preset"] == "smoke" and results["k"] == 5
  png = os.path.join(workdir, f"{sweep}.png")
  assert results["plot"] == f"{sweep}.png" and os.path.getsize(png) > 5000
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  refs = [r["method"] for r in results["reference"]]
  assert refs == ["oracle", "popularity", "heuristic", "random"]
  methods = [r["method"] for r in results["rows"]]
  assert methods[-4:] == refs
  # Every results.md table of metrics lists popularity and (synthetic data) oracle.
  md = open(os.path.join(workdir, "results.md")).read()
  tables = [t for t in md.split("\n\n") if t.startswith("| ") and "F@5" in t.splitlines()[0]]
  assert len(tables) >= 2
  for t in tables:
    assert "\n| popularity |" in t and "\n| oracle |" in t, t
  # A point's row is flagged exactly when its F@5 is within 5% of popularity's or below.
  pop = results["reference"][1]["f_measure@5"]
  flagged = [r["method"] for r in results["rows"] if r["warning"]]
  assert flagged == [r["method"] for r in results["rows"][:-4] if r["f_measure@5"] <= 1.05 * pop]
  assert len(results["warnings"]) == len(flagged) and "popularity" not in flagged
  return results


def test_negatives_sweep(sweeps, ablate, capsys, monkeypatch):
  out, workdir = finished(sweeps, "negatives")
  results = check_outputs(workdir, "negatives")
  for i, point in enumerate(["tdr_u m=3", "tdr_u m=4"]):
    assert f"[{i + 1}/2] negatives {point}: F@5 0." in out
  points = results["points"]
  assert [(p["method"], p["value"], p["overrides"]) for p in points] == [
      ("tdr_u", 3, {"num_negatives": 3}), ("tdr_u", 4, {"num_negatives": 4})]
  for p in points:  # the value reached the trained model (its checkpoint's config record)
    assert p["row"]["settings"]["num_negatives"] == p["value"]
    (meta,) = glob.glob(os.path.join(workdir, "negatives", p["point"], "round_0",
                                     "checkpoints", "*", "meta", "metadata"))
    assert json.load(open(meta))["record"]["train"]["num_negatives"] == p["value"]
  assert results["series"] == {"TDR(U)": [[m, p["row"]["f_measure@5"]]
                                          for m, p in zip((3, 4), points)]}
  again, lines = rerun_trains_nothing(ablate, monkeypatch, capsys, sweeps, "negatives")
  assert lines == ["[1/2] negatives tdr_u m=3: skipped (done)",
                   "[2/2] negatives tdr_u m=4: skipped (done)"]
  assert again["points"] == points
  # Every record and every point's settings.json carry the same corpus fingerprint.
  corpus = {p["corpus"] for p in points}
  for p in points:
    started = json.load(open(os.path.join(workdir, "negatives", p["point"], "settings.json")))
    assert started == {"settings": p["settings"], "corpus": p["corpus"]}
  assert len(corpus) == 1 and len(corpus.pop()) == 16
  # A finished point is not reused under other settings: one line naming the flag.
  argv = sweep_argv("negatives", sweeps["data"], sweeps["work"])
  with pytest.raises(InputError, match=r"tdr_u-m3.*--epochs=0.3 not 0.5.*another --workdir"):
    run_ablate(ablate, *argv, "--epochs=0.5")
  # Nor is a started one resumed (its checkpoints' identity leaves --epochs out): its
  # settings.json refuses before anything trains.
  done = os.path.join(workdir, "negatives", "tdr_u-m3", "results.json")
  os.rename(done, done + ".away")
  try:
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("a point trained"))
    with pytest.raises(InputError, match=r"tdr_u-m3/settings.json was written with other "
                                         r"settings \(--epochs=0.3 not 0.5\)"):
      run_ablate(ablate, *argv, "--epochs=0.5")
  finally:
    monkeypatch.undo()
    os.rename(done + ".away", done)


def test_negatives_of_the_binary_methods(ablate):
  """JTM/TDM sweep --binary_negatives, TDR --num_negatives."""
  cfg = ablate.experiment.make_config("smoke")
  opts = ablate.parse_options("negatives", cfg, values=["2", "5"], methods=["jtm", "tdr_t"])
  points = ablate.negatives_points(cfg, opts)
  assert [(p.name, p.label, p.overrides) for p in points] == [
      ("jtm-m2", "JTM m=2", {"binary_negatives": 2}),
      ("jtm-m5", "JTM m=5", {"binary_negatives": 5}),
      ("tdr_t-m2", "TDR(T) m=2", {"num_negatives": 2}),
      ("tdr_t-m5", "TDR(T) m=5", {"num_negatives": 5})]
  assert ablate.parse_options("negatives", cfg).values == (5, 10, 20, 40, 70)
  assert ablate.parse_options("beam", cfg).methods == ("tdr_t", "tdr_u", "tdm", "jtm", "otm",
                                                       "plt")


def test_every_sweeps_point_configs(ablate):
  """Each sweep's points and their configs for every method it allows, built without
  training: a point's overrides may replace a setting of its method (the rounds control of
  JTM/TDM/OTM/PLT replaces their --tree_learning)."""
  cfg = experiment.make_config("smoke", tree_rounds=2)
  for sweep in ablate.SWEEPS:
    for name in ablate.allowed_methods(sweep, cfg):
      opts = ablate.parse_options(sweep, cfg, methods=[name])
      if sweep == "negatives":
        points = ablate.negatives_points(cfg, opts)
      elif sweep == "sampler":
        steps, skipped = ablate.sampler_points(cfg, opts, 397)
        assert not skipped
        points = list(steps.values()) + [ablate.clock_point(p, 0.5) for p in steps.values()]
      elif sweep == "beam":
        points = [p for trained, at_beams in ablate.beam_points(cfg, opts)
                  for p in [trained, *at_beams]]
      else:
        points = ablate.rounds_points(cfg, opts)
        assert points[-1].name == f"{name}-control"
      assert points, (sweep, name)
      for p in points:
        pcfg = ablate.point_config(cfg, p)
        settings = {**ablate.METHODS[p.method].settings, **p.overrides}
        got = {n: v for n, v, _ in ablate.config_lib.leaves(pcfg) if n in settings}
        assert got == settings, (sweep, name, p.name)
  control = ablate.rounds_points(cfg, ablate.parse_options("rounds", cfg, methods=["jtm"]))[-1]
  control_cfg = ablate.point_config(cfg, control)
  assert (control_cfg.tree.tree_learning, control_cfg.train.loss) == ("none", "bce")
  (otm, _), = ablate.beam_points(cfg, ablate.parse_options("beam", cfg, methods=["otm"]))
  assert ablate.point_config(cfg, otm).train.otm_beam_size == cfg.eval.beam_size


def test_refusals_name_what_differs(ablate, tmp_path):
  """load_done: another corpus or other settings is one line naming it; the same is reused."""
  cfg = experiment.make_config("smoke")
  path = str(tmp_path / "p" / "results.json")
  assert ablate.load_done(path, cfg, "c0") is None
  ablate.write_json(path, {"settings": ablate.point_settings(cfg), "corpus": "c0", "row": {}})
  assert ablate.load_done(path, cfg.replace(data_dir="elsewhere"), "c0")["row"] == {}
  with pytest.raises(InputError, match=r"results.json was written for another corpus \(corpus "
                                       r"fingerprint c0 not c1: .*--data_dir"):
    ablate.load_done(path, cfg, "c1")
  with pytest.raises(InputError, match=r"--num_negatives=4 not 9\); use another --workdir"):
    ablate.load_done(path, cfg.replace(num_negatives=9), "c0")


def test_timing_is_reused_only_as_measured(ablate):
  wanted = {"settings": {"epochs": 1.0}, "timing_steps": 20, "corpus": "c0"}
  timing = {"samplers": {"uniform": dict(wanted, seconds_per_step=0.5)}}
  assert ablate.timing_of(timing, "uniform", wanted) == 0.5
  assert ablate.timing_of(timing, "top_down", wanted) is None
  for key, other in (("timing_steps", 5), ("corpus", "c1"), ("settings", {"epochs": 2.0})):
    assert ablate.timing_of(timing, "uniform", dict(wanted, **{key: other})) is None, key
  # The layout before the settings were kept: every sampler is timed again.
  assert ablate.timing_of({"timing_steps": 20, "seconds_per_step": {"uniform": 0.5}},
                          "uniform", wanted) is None


def test_bias_levels_are_the_sampled_ones(ablate):
  """The default preset (B = 2, --full_softmax_nodes=64, ~5000 items): levels 1-6 train with
  the full softmax, so the bias is measured at levels 7-10 (<= 1024 valid nodes)."""
  tree = tree_lib.build_random(np.random.default_rng(0), 5000, branching=2)
  assert ablate.bias_levels(tree, 64, ablate.Options(methods=()).bias_max_nodes) == (
      [7, 8, 9, 10], 6)
  assert ablate.bias_levels(tree, 64, 64) == ([], 6)
  assert ablate.bias_levels(tree, 1, 16) == ([2, 3, 4], 0)  # level 1 has 2 nodes (< 3)


def test_sampler_sweep(sweeps, ablate, capsys, monkeypatch):
  out, workdir = finished(sweeps, "sampler")
  results = check_outputs(workdir, "sampler")
  timing = results["timing"]
  sps = timing["seconds_per_step"]
  assert set(sps) == {"uniform", "full_softmax"} and all(v > 0 for v in sps.values())
  assert f"timing uniform: {sps['uniform'] * 1000:.1f} ms/step (2 steps)" in out
  fastest = min(sps, key=sps.get)
  slow = ({"uniform", "full_softmax"} - {fastest}).pop()
  assert timing["fastest"] == fastest
  assert timing["epochs"][fastest] == pytest.approx(0.3)
  assert timing["epochs"][slow] == pytest.approx(0.3 * sps[fastest] / sps[slow])
  by_point = {p["point"]: p for p in results["points"]}
  assert set(by_point) == {"uniform-steps", "full_softmax-steps", f"{slow}-clock"}
  # 397 items, B = 8: the full softmax scores all 8^3 leaf slots, i.e. every level.
  assert by_point["full_softmax-steps"]["overrides"] == {"full_softmax_nodes": 512}
  assert by_point[f"{slow}-clock"]["overrides"]["epochs"] == pytest.approx(
      timing["epochs"][slow])
  clock = results["rows"][2:4]
  assert [r["method"] for r in clock] == ["TDR uniform (equal wall-clock)",
                                          "TDR full softmax (equal wall-clock)"]
  fast_clock = clock[["uniform", "full_softmax"].index(fastest)]
  assert fast_clock["f_measure@5"] == by_point[f"{fastest}-steps"]["row"]["f_measure@5"]
  for name in ("uniform-steps", "full_softmax-steps"):
    bias = by_point[name]["bias"]
    # Level 1 (8 slots <= --full_softmax_nodes=8) trains with the full softmax in every run:
    # only the sampled levels 2 (<= 64 valid nodes) and 3 (397 <= 1024) are measured.
    assert bias["users"] == 6 and bias["levels"] == [2, 3] and bias["full_softmax_levels"] == 1
    assert bias["settings"] == {"bias_users": 6, "bias_samples": 512, "bias_max_nodes": 1024}
    for what in ("uniform", "top_down", "exact"):
      assert len(bias[what]) == 2 and all(v >= 0 for v in bias[what])
    assert bias["mean"]["exact"] == pytest.approx(np.mean(bias["exact"]))
  md = open(os.path.join(workdir, "results.md")).read()
  assert "## Sampler bias (KL, nats)" in md and "| full softmax | 0 (exact loss)" not in md
  timing_file = json.load(open(os.path.join(workdir, "sampler", "timing.json")))
  for s in ("uniform", "full_softmax"):  # kept with what it was measured under
    entry = timing_file["samplers"][s]
    assert entry["timing_steps"] == 2 and entry["seconds_per_step"] == sps[s]
    assert entry["settings"] == by_point[f"{s}-steps"]["settings"]
    assert entry["corpus"] == by_point[f"{s}-steps"]["corpus"]
  # Rerun: nothing trains or is timed again; a smaller --max_full_softmax_nodes skips the full
  # softmax with its reason; another --bias_max_nodes measures the bias again on the restored
  # model.
  again, lines = rerun_trains_nothing(ablate, monkeypatch, capsys, sweeps, "sampler",
                                      "--max_full_softmax_nodes=256", "--bias_max_nodes=64")
  reason = "the leaf level has B^H = 8^3 = 512 node slots > --max_full_softmax_nodes=256"
  assert lines[1].startswith("[1/4] sampler uniform equal steps: bias measured again with "
                             "--bias_users=6, --bias_samples=512, --bias_max_nodes=64 (")
  assert lines[:1] + lines[2:] == ["[1/4] sampler uniform equal steps: skipped (done)",
                   f"[2/4] sampler full_softmax equal steps: skipped ({reason})",
                   "[3/4] sampler uniform equal wall-clock: the equal-steps run (the fastest "
                   "sampler)",
                   f"[4/4] sampler full_softmax equal wall-clock: skipped ({reason})"]
  assert [(p["point"], p["reason"]) for p in again["skipped"]] == [
      ("full_softmax-steps", reason), ("full_softmax-clock", reason)]
  assert again["timing"]["seconds_per_step"] == {"uniform": sps["uniform"]}
  bias, before = again["points"][0]["bias"], by_point["uniform-steps"]["bias"]
  assert bias["levels"] == [2] and bias["settings"]["bias_max_nodes"] == 64
  # The restored model is the trained one: the exact and top-down draws at level 2 (keyed by
  # level, not by the levels measured) give the first measurement's KL.
  for what in ("exact", "top_down"):
    assert bias[what][0] == pytest.approx(before[what][0], rel=1e-4)
  record = json.load(open(os.path.join(workdir, "sampler", "uniform-steps", "results.json")))
  assert record["bias"] == bias


def test_beam_sweep(sweeps, ablate, capsys, monkeypatch):
  out, workdir = finished(sweeps, "beam")
  results = check_outputs(workdir, "beam")
  assert "[1/3] beam tdr_u beam=8: F@5 0." in out and " queries/s (" in out
  assert "[3/3] beam din (brute force): F@5 0." in out
  # Trained once (one evaluation at the preset's beam), searched at both beams.
  assert out.count("round 0: P@5") == 1
  assert sorted(os.listdir(os.path.join(workdir, "beam", "tdr_u"))) == [
      "beam-20", "beam-8", "round_0", "settings.json", "trees"]
  started = json.load(open(os.path.join(workdir, "beam", "tdr_u", "settings.json")))
  assert all(p["corpus"] == started["corpus"] for p in results["points"])
  assert started["settings"] == results["points"][0]["settings"]
  rows = results["rows"]
  assert [r["method"] for r in rows[:3]] == ["TDR(U) beam=8", "TDR(U) beam=20",
                                            "DIN (brute force)"]
  assert [r["beam_size"] for r in rows[:2]] == [8, 20]
  assert "f_measure@10" not in rows[0] and "f_measure@20" in rows[1]  # K <= beam only
  assert all(r["queries_per_second"] > 0 for r in rows[:2])
  assert [q[0] for q in results["queries_per_second"]["TDR(U)"]] == [8, 20]
  # At the preset's beam (20) the sweep's search retrieves what the method's own evaluation
  # did (the line it printed after training).
  f20 = float(out.split("round 0: P@5 ")[1].split("F@5 ")[1].split(",")[0])
  assert rows[1]["f_measure@5"] == pytest.approx(f20, abs=1e-4)
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| DIN (brute force) |" in md and " q/s)" in md
  _, lines = rerun_trains_nothing(ablate, monkeypatch, capsys, sweeps, "beam")
  assert lines == ["[1/3] beam tdr_u beam=8: skipped (done)",
                   "[2/3] beam tdr_u beam=20: skipped (done)",
                   "[3/3] beam din (brute force): skipped (done)"]


def test_rounds_sweep(sweeps, ablate, capsys, monkeypatch):
  _, workdir = finished(sweeps, "rounds")
  results = check_outputs(workdir, "rounds")
  points = results["points"]
  assert [p["point"] for p in points] == ["tdr_u", "tdr_u-control"]
  assert points[1]["overrides"] == {"tree_learning": "none"}
  for p in points:
    assert [r["round"] for r in p["rounds"]] == [0, 1]
  assert [r["method"] for r in results["rows"][:4]] == [
      "TDR(U) round 1", "TDR(U) round 2", "TDR(U) tree kept (control) round 1",
      "TDR(U) tree kept (control) round 2"]
  assert results["series"]["TDR(U)"] == [[i + 1, r["f_measure@5"]]
                                         for i, r in enumerate(points[0]["rounds"])]
  # Same first round (same seed, same tree), then the learned tree moves items, the control's
  # does not.
  assert points[0]["rounds"][0]["f_measure@5"] == points[1]["rounds"][0]["f_measure@5"]
  trees = {p: [np.load(os.path.join(workdir, "rounds", p, "trees", f"round_{r}.npy"))
               for r in (0, 1)] for p in ("tdr_u", "tdr_u-control")}
  assert np.array_equal(*trees["tdr_u-control"])
  assert not np.array_equal(*trees["tdr_u"])
  _, lines = rerun_trains_nothing(ablate, monkeypatch, capsys, sweeps, "rounds")
  assert lines == ["[1/2] rounds tdr_u (2 rounds): skipped (done)",
                   "[2/2] rounds tdr_u tree_learning=none (control): skipped (done)"]


@pytest.mark.parametrize("argv,words", [
    ([], ["--sweep", "required"]),
    (["--sweep=beam", "--preset=smoke", "--values=4,20"], ["--values=4,20", "first --topk (5)"]),
    (["--sweep=beam", "--values=60,x"], ["--values=60,x", "integers"]),
    (["--sweep=negatives", "--methods=tdr_u,otm"], ["--methods", "'otm'", "jtm"]),
    (["--sweep=sampler", "--values=1"], ["--values", "--methods"]),
    (["--sweep=sampler", "--methods=softmax"], ["--methods", "full_softmax"]),
    (["--sweep=rounds", "--tree_rounds=1"], ["--tree_rounds=1", "at least 2"]),
    (["--sweep=rounds", "--method=tdr"], ["--method", "--methods"]),
    (["--sweep=sampler", "--bias_samples=0"], ["--bias_samples=0"]),
])
def test_bad_flags_in_process(ablate, tmp_path, argv, words):
  workdir = tmp_path / "w"
  with pytest.raises(InputError) as e:
    run_ablate(ablate, *argv, f"--workdir={workdir}")
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  assert not workdir.exists(), "refused before the workdir is made"


def test_unknown_sweep_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, ABLATE, "--sweep=nope", f"--workdir={tmp_path}/w"],
                        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "--sweep=nope" in lines[0]
  assert "negatives|sampler|beam|rounds" in lines[0] and "Traceback" not in proc.stderr


# ---- the sampler-bias KL by hand --------------------------------------------------------

def test_kl_of_empirical_distribution_by_hand():
  p, kept = sampler_bias.empirical_distribution(jnp.asarray([[0, 0, 1, 2], [0, 3, 3, 1]]),
                                                jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 1]], bool),
                                                4)
  np.testing.assert_allclose(p, [[0.5, 0.25, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0]])
  assert kept.tolist() == [4, 2]
  # KL([.5, .25, .25, 0] || uniform over 4) = .5 ln 2 (+ 0 + 0; the empty bin adds nothing).
  log_q = jnp.log(jnp.asarray([[0.25] * 4, [0.5, 0.25, 0.25, 0.0]]))
  kl = sampler_bias.kl_divergence(p, log_q)
  # Row 2: .5 ln(.5/.5) + .5 ln(.5/.25) = .5 ln 2, with q = 0 on a bin p leaves empty.
  np.testing.assert_allclose(kl, [0.5 * np.log(2), 0.5 * np.log(2)], rtol=1e-6)
  assert float(sampler_bias.kl_divergence(jnp.asarray([0.5, 0.5]), jnp.log(
      jnp.asarray([1.0, 0.0])))) == np.inf  # mass where q has none
  assert float(sampler_bias.kl_divergence(jnp.asarray([0.2, 0.8]), jnp.log(
      jnp.asarray([0.2, 0.8])))) == pytest.approx(0.0, abs=1e-7)


def test_sampler_kl_on_a_tree_by_hand():
  """A complete binary tree over 8 items with fixed node scores: level 1 ties, at level 2
  node 3 scores ln 3 and nodes 4-6 score 0; the positive lies under node 6.

  Target at level 2 (node 6 left out): q = (3, 1, 1) / 5 over nodes 3, 4, 5.
  Uniform draws (3, 4, 5) evenly: KL = 1/3 [ln(5/9) + 2 ln(5/3)].
  Top-down picks level 1 evenly, then 3 or 4 with 3/4, 1/4 and 5 or 6 evenly: level-2 law
  (3/8, 1/8, 1/4, 1/4); without node 6, (1/2, 1/6, 1/3): KL = 1/2 ln(5/6) + 1/6 ln(5/6) +
  1/3 ln(5/3)."""
  tree = tree_lib.build_random(np.random.default_rng(0), 8, branching=2)
  scores = np.zeros(tree.num_nodes, np.float32)
  scores[3] = np.log(3.0)

  def score_fn(params, tree, history, nodes, level=None):
    return params[nodes]

  item = int(np.asarray(tree.leaf_to_item)[13 - 7])  # leaf 13, a child of node 6
  assert np.asarray(tree.item_paths)[item].tolist() == [0, 2, 6, 13]
  out = sampler_bias.sampler_kl(jax.random.key(0), score_fn, jnp.asarray(scores), tree,
                                np.zeros((5, 3), np.int32), np.full(5, item), levels=[2],
                                num_samples=20000, user_batch=2)
  uniform = (np.log(5 / 9) + 2 * np.log(5 / 3)) / 3
  top_down = 0.5 * np.log(5 / 6) + np.log(5 / 6) / 6 + np.log(5 / 3) / 3
  assert out["uniform"][0] == pytest.approx(uniform, abs=3e-3)
  assert out["top_down"][0] == pytest.approx(top_down, abs=3e-3)
  assert 0 <= out["exact"][0] < 3e-4  # (3 - 1) / (2 * 20000) expected for an exact sampler
  assert out["users"].tolist() == [5]
  assert sampler_bias.measurable_levels(tree, 4) == [2]  # level 1 has 2 nodes, level 3 has 8
