"""Multi-host data parallel on JAX's own runtime: experiments/run.py as 2 processes on this
machine (jax.distributed over localhost, JAX's CPU collectives) gives the per-step losses and
the metrics of 1 process with as many devices, and a 2-process run killed mid-training resumes
from the checkpoints both processes wrote to the same result. Plus the coordinator flags'
one-line errors and the writer-only outputs.

The runs use a tiny TDR(T) (smoke preset, one round, 15 steps, no warm start); every process
is a subprocess with a timeout, so a hung collective fails the test instead of hanging CI.
The resumed 2-process run reuses the crashed run's compilations (JAX's persistent compilation
cache, set for the test only).
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from tdr_jax import parallel, report
from tdr_jax.config import make_config
from tdr_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
STEPS = 15  # 800 samples / 32 per batch * 0.6 epochs
TINY = ["--preset=smoke", "--tree_rounds=1", "--nobeam_diagnostics", "--warm_start=false",
        "--initial_tree=category", "--epochs=0.6", "--log_every=1", "--checkpoint_every=5"]
TIMEOUT = 300  # seconds per run (a hung collective ends here)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: str | None = None) -> dict:
  # XLA's optimisation level 0: the train step compiles in a third of the time (same numbers
  # for every run of the test, which is all it compares).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       f"--xla_backend_optimization_level=0")
  if cache:  # JAX's persistent compilation cache: the resumed run reuses the crashed run's
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _run(args: list[str], *, processes: int, devices: int, logs: str,
         cache: str | None = None) -> list[subprocess.CompletedProcess]:
  """run.py with `args` as `processes` processes of `devices` CPU devices each (with more than
  one: --coordinator_address=localhost:<free port> --num_processes --process_id), their
  output in files under `logs` (no pipe to fill while another process is waited for)."""
  extra = [[]]
  if processes > 1:
    address = f"localhost:{_free_port()}"
    extra = [[f"--coordinator_address={address}", f"--num_processes={processes}",
              f"--process_id={i}"] for i in range(processes)]
  os.makedirs(logs, exist_ok=True)
  paths = [(os.path.join(logs, f"{i}.out"), os.path.join(logs, f"{i}.err"))
           for i in range(processes)]
  procs = []
  try:
    for e, (out, err) in zip(extra, paths):
      with open(out, "w") as fo, open(err, "w") as fe:
        procs.append(subprocess.Popen([sys.executable, RUN, *args, *e], cwd=ROOT,
                                      env=_env(devices, cache), stdout=fo, stderr=fe))
    for p in procs:
      p.wait(timeout=TIMEOUT)
  finally:
    for p in procs:  # a hung or failed peer: end them all
      if p.poll() is None:
        p.kill()
        p.wait()
  read = lambda path: open(path).read()  # noqa: E731
  return [subprocess.CompletedProcess(p.args, p.returncode, read(o), read(e))
          for p, (o, e) in zip(procs, paths)]


def _losses(stdout: str) -> dict[int, str]:
  """step -> the loss printed for it ("step 3/15  loss 30.9974 ...", 4 decimals)."""
  return {int(s): v for s, v in re.findall(rf"^step (\d+)/{STEPS}  loss (\S+)", stdout, re.M)}


def _printed_row(stdout: str) -> list[str]:
  """The printed metrics of the TDR(T) row (its train seconds left out)."""
  rows = [line.split("|")[2:-2] for line in stdout.splitlines() if line.startswith("| TDR(T) |")]
  assert rows, stdout[-2000:]
  return rows[0]


def _metrics(results: dict) -> dict[str, float]:
  return {f"{r['method']}/{k}": v for r in results["results"] for k, v in r.items()
          if "@" in k}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
  """The 1-process run on 2 devices: (stdout, results.json)."""
  workdir = str(tmp_path_factory.mktemp("one") / "w")
  (proc,) = _run([*TINY, f"--data_dir={data_dir}", f"--workdir={workdir}"], processes=1,
                 devices=2, logs=workdir + "-logs")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return proc.stdout, json.load(f)


def test_two_processes_match_one_and_resume_after_a_crash(one_process, data_dir, tmp_path):
  out1, results1 = one_process
  want = _losses(out1)
  assert sorted(want) == list(range(1, STEPS + 1))
  workdir, cache = str(tmp_path / "w"), str(tmp_path / "cache")
  args = [*TINY, f"--data_dir={data_dir}", f"--workdir={workdir}"]

  # Killed after step 7 (checkpoint at step 5): each process read and trained on its half of
  # every global batch of 32 rows, on 1 device each, with the losses of 1 process on 2.
  crashed = _run([*args, "--stop_after_step=7"], processes=2, devices=1, cache=cache,
                 logs=str(tmp_path / "crashed"))
  for i, proc in enumerate(crashed):
    assert proc.returncode != 0 and "SimulatedCrash" in proc.stderr, proc.stderr[-3000:]
    assert f"process {i} of 2: 1 of 2 devices" in proc.stdout
    assert _losses(proc.stdout) == {s: want[s] for s in range(1, 8)}, i
  assert os.path.isdir(os.path.join(workdir, "round_0", "checkpoints", "5"))
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  # Rerun: both processes restore step 5 and end with the 1-process losses and metrics.
  resumed = _run(args, processes=2, devices=1, cache=cache, logs=str(tmp_path / "resumed"))
  for i, proc in enumerate(resumed):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resuming from checkpoint at step 5 of {STEPS}" in proc.stdout
    assert _losses(proc.stdout) == {s: want[s] for s in range(6, STEPS + 1)}, i
    # Every process evaluated the same (gathered) retrievals: the row of 1 process.
    assert _printed_row(proc.stdout) == _printed_row(out1), i
  with open(os.path.join(workdir, "results.json")) as f:
    results2 = json.load(f)
  got, expected = _metrics(results2), _metrics(results1)
  assert got.keys() == expected.keys() and len(got) > 20
  for k in expected:
    assert got[k] == expected[k], (k, got[k], expected[k])


def test_bad_coordinator_flags_are_one_line_errors(tmp_path):
  from test_cli import assert_one_line_error, run_cli
  workdir = tmp_path / "w"
  proc = run_cli(tmp_path, "--preset=smoke", "--process_id=1", f"--workdir={workdir}",
                 timeout=120)
  assert_one_line_error(proc, "--process_id=1", "needs --num_processes")
  assert not os.path.exists(workdir)


def test_distributed_settings_from_flags():
  from absl import flags
  sys.path.insert(0, ROOT)
  from experiments import cli
  values = flags.FlagValues()
  cli.define_distributed_flags(values)
  values(["x"])
  assert cli.distributed_settings(values) is None  # nothing asked: one process
  values(["x", "--distributed"])
  assert cli.distributed_settings(values) == {}  # JAX detects the cluster
  values.unparse_flags()
  values(["x", "--coordinator_address=h:1234", "--num_processes=4", "--process_id=3"])
  assert cli.distributed_settings(values) == {"coordinator_address": "h:1234",
                                              "num_processes": 4, "process_id": 3}
  values.unparse_flags()
  values(["x", "--num_processes=4"])  # the process id from the cluster (e.g. SLURM)
  assert cli.distributed_settings(values) == {"num_processes": 4}
  for argv, words in ((["--process_id=1"], "--process_id=1 needs --num_processes"),
                      (["--num_processes=2", "--process_id=2"], r"--process_id=2: .* 0 \.\. 1"),
                      (["--num_processes=2", "--process_id=-1"], "--process_id=-1"),
                      (["--num_processes=0"], "--num_processes=0: must be at least 1"),
                      (["--coordinator_address=10.0.0.1"], "10.0.0.1: expected host:port"),
                      (["--coordinator_address=h:99999"], "h:99999: expected host:port")):
    values.unparse_flags()
    values(["x", *argv])
    with pytest.raises(InputError, match=words):
      cli.distributed_settings(values)


def test_only_the_writer_writes_results(tmp_path, monkeypatch):
  cfg = make_config("smoke")
  row = {"method": "M", "train_seconds": 1.0,
         **{f"{m}@{k}": 0.5 for m in ("precision", "recall", "f_measure") for k in (5, 10, 20)}}
  rounds = [dict(row, method="M tree 1", round=0, category_purity=0.5, purity_mislabelled=None,
                 purity_labelled=None), dict(row, method="M tree 2", round=1)]
  out = {"rounds": rounds, "forest_curve": [], "true_cat": None}
  kwargs = dict(rows=[row], warnings=[], per_method={"M": out}, data_summary={}, num_users=3)
  monkeypatch.setattr(parallel, "process_index", lambda: 1)
  other = report.write_results(cfg, str(tmp_path), **kwargs)
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(parallel, "process_index", lambda: 0)
  writer = report.write_results(cfg, str(tmp_path), **kwargs)
  assert writer == other
  assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md", "rounds.png"]


def test_only_rows_builds_one_block_of_the_global_batch():
  """A process's rows of a step's batch are those rows of the 1-process batch, built alone."""
  from test_preprocess import table
  from tdr_jax.data import batches, preprocess
  ds = preprocess(table(), min_user_interactions=3, split=(0.6, 0.2, 0.2), seed=0)
  samples = batches.training_samples(ds, max_train_samples=0, seed=0)
  kw = dict(steps_per_epoch=2, batch_size=8, history_len=3, seed=0, levels=2)
  for step in range(3):  # step 1: an epoch's last batch, padded
    full = batches.batch_for_step(ds, samples, step, label_window=2, **kw)
    for rows in (slice(0, 4), slice(4, 8), slice(2, 6)):
      asked = []
      with batches.only_rows(lambda b, rows=rows: asked.append(b) or rows):
        part = batches.batch_for_step(ds, samples, step, label_window=2, **kw)
        idx, mask = batches.step_indices(len(samples), step, steps_per_epoch=2, batch_size=8,
                                         seed=0)
      assert asked == [8, 8]
      for got, whole in zip(part, full):
        np.testing.assert_array_equal(got, whole[rows])
      np.testing.assert_array_equal(mask, full.mask[rows])
      assert len(idx) == 4
  assert batches.rows_of(8) == slice(0, 8)  # outside the block: every row


def test_process_rows_and_global_batch_on_one_process():
  mesh = parallel.make_mesh()
  n = mesh.devices.size
  assert parallel.process_rows(mesh, 4 * n) == slice(0, 4 * n)
  batch = {"a": np.arange(4 * n), "b": np.ones((4 * n, 3), np.float32)}
  for got in (parallel.global_batch(batch, mesh, 4 * n), parallel.global_batch(batch, mesh)):
    np.testing.assert_array_equal(parallel.to_host(got["a"]), batch["a"])
    assert got["b"].sharding == parallel.data_sharded(mesh)
  assert parallel.same_on_all(np.float32(2.5)) == np.float32(2.5)
  assert parallel.writer_first(lambda: 7, "test") == 7 and parallel.is_writer()
