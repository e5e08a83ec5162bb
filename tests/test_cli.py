"""experiments/run.py: expected bad input ends as one line `error: ...` on stderr, status 2."""

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tdr_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")


def run_cli(cwd, *args, env=None, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=str(cwd), env=env)


def assert_one_line_error(proc, *words):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: "), lines[0]
  for w in words:
    assert w in lines[0], (w, lines[0])


def write_csv(folder, users, per_user, bad_line=None):
  """user,item,timestamp,category with `per_user` interactions per user; `bad_line` (1-based,
  header = 1) gets a timestamp that is not an integer."""
  os.makedirs(folder, exist_ok=True)
  lines = ["user,item,timestamp,category"]
  for u in range(users):
    for j in range(per_user):
      item = (u * 7 + j * 3) % 60
      lines.append(f"u{u},i{item},{1000 + 100 * u + j},c{item % 6}")
  if bad_line:
    lines[bad_line - 1] = "u0,i3,soon,c3"
  with open(os.path.join(folder, "interactions.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  return {
      "good": write_csv(root / "good", users=40, per_user=20),
      "bad_row": write_csv(root / "bad_row", users=40, per_user=20, bad_line=3),
      "sparse": write_csv(root / "sparse", users=30, per_user=10),  # nobody has 15
      "few": write_csv(root / "few", users=5, per_user=20),  # 0 test users
  }


SMOKE = ["--preset=smoke", "--dataset=csv", "--tree_rounds=1", "--forest=false"]

# (case, flags; {name} = a fixture folder of `data`, {tmp} = a fresh folder, words in the line).
# Each costs ~2.5 s of imports; more bad flags are checked in-process below.
FAILURES = [
    ("unknown dataset", ["--dataset=nope"], ["--dataset=nope", "unknown dataset", "tmall"]),
    ("unknown method", ["--method=tdr,nope"], ["--method", "nope"]),
    ("windows", ["--preset=smoke", "--history_len=5"], ["windows", "history_len"]),
    ("option key", ["--dataset=tmall", "--loader_option=nope=1"],
     ["--loader_option nope", "tmall", "actions=0", "file='user_log_format1.csv'"]),
    ("enum flag", ["--sampler=best"], ["--sampler=best", "uniform"]),
    ("unknown flag", ["--num_negative=5"], ["num_negative"]),
    ("missing folder", SMOKE + ["--data_dir={tmp}/nope"],
     ["{tmp}/nope/interactions.csv", "does not exist"]),
    ("missing file", ["--dataset=tmall", "--data_dir={tmp}"], ["user_log_format1.csv", "{tmp}"]),
    ("malformed row", SMOKE + ["--data_dir={bad_row}"],
     ["interactions.csv:3:", "timestamp", "--skip_bad_rows"]),
    ("nobody left", SMOKE + ["--data_dir={sparse}"],
     ["no data left after filtering", "min_user_interactions=15", "30 users"]),
    ("no test user", SMOKE + ["--data_dir={few}"], ["0 test users", "5 users"]),
    ("batch vs devices", SMOKE + ["--data_dir={good}", "--batch_size=31", "--devices=2"],
     ["--batch_size=31", "2 devices"]),
]


@pytest.fixture(scope="module")
def failures(data, tmp_path_factory):
  """Every case of FAILURES, run three at a time (each is mostly the ~2 s of imports)."""
  def one(case):
    name, args, words = case
    fill = dict(data, tmp=str(tmp_path_factory.mktemp("case")))
    args = [a.format(**fill) for a in args]
    env = None
    if "--devices=2" in args:
      args.remove("--devices=2")
      env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    workdir = os.path.join(fill["tmp"], "w")
    proc = run_cli(fill["tmp"], *args, f"--workdir={workdir}", env=env)
    return name, (proc, [w.format(**fill) for w in words], workdir, args)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return dict(pool.map(one, FAILURES))


@pytest.mark.parametrize("case", [c[0] for c in FAILURES])
def test_expected_failure_is_one_line(failures, case):
  proc, words, workdir, args = failures[case]
  assert_one_line_error(proc, *words)
  if not any(a.startswith("--data_dir") for a in args):  # flags alone: refused up front
    assert not os.path.exists(workdir), "refused before the workdir is made"


def test_skip_bad_rows_runs_and_foreign_checkpoint_is_refused(data, tmp_path):
  workdir = tmp_path / "w"
  proc = run_cli(tmp_path, *SMOKE, f"--data_dir={data['bad_row']}", "--skip_bad_rows",
                 f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "dataset csv: read 800 rows from 1 file(s) with the csv loader, kept 799" in out
  assert "skipped 1 malformed row(s)" in out and "interactions.csv:3: timestamp" in out
  assert "40 users, 60 items, 799 interactions" in out and "categories: 6 distinct" in out
  results = json.load(open(workdir / "results.json"))
  assert results["data"]["rows_skipped"] == 1 and results["data"]["rows_loaded"] == 799
  config = json.load(open(workdir / "config.json"))
  assert config["data"]["skip_bad_rows"] is True and config["data"]["loader_options"] == []
  # Same workdir, another model setting: the checkpoint is refused.
  proc = run_cli(tmp_path, *SMOKE, f"--data_dir={data['bad_row']}", "--skip_bad_rows",
                 "--num_negatives=5", f"--workdir={workdir}")
  assert_one_line_error(proc, "was written for another configuration", "--workdir")


# ---- in-process: the handler and the flag plumbing ------------------------------------------

@pytest.fixture(scope="module")
def run_module():
  spec = importlib.util.spec_from_file_location("tdr_run_cli", RUN)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_handler_turns_input_errors_into_one_line(run_module, capsys):
  def bad():
    raise InputError("first line\n  second line")

  with pytest.raises(SystemExit) as e:
    run_module.exit_on_input_error(bad)
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: first line second line\n"


def test_handler_keeps_unexpected_errors(run_module):
  def bug():
    raise ZeroDivisionError("a bug")

  def not_input(exc):
    raise exc

  with pytest.raises(ZeroDivisionError, match="a bug"):
    run_module.exit_on_input_error(bug)
  for exc in (ValueError("plain"), FileNotFoundError("elsewhere"), KeyError("k")):
    with pytest.raises(type(exc)):
      run_module.exit_on_input_error(not_input, exc)
  assert run_module.exit_on_input_error(lambda x: x + 1, 1) == 2


@pytest.mark.parametrize("argv,words", [
    (["--preset=smoke", "--beam_size=10"], ["--beam_size=10", "max(--topk)=20"]),
    (["--dataset=tmall", "--loader_option=actions=click"],
     ["--loader_option actions=click", "'click' is not int", "list[int]"]),
    (["--dataset=movielens", "--loader_option=genre=second"],
     ["--loader_option genre=second", "first, all, none"]),
    (["--dataset=taobao", "--loader_option=behaviors"], ["'behaviors'", "key=value"]),
    (["--loader_option=path=x.csv"], ["--loader_option", "synthetic"]),
    (["--dataset=nope"], ["--dataset=nope"]),
])
def test_bad_flag_values_in_process(run_module, argv, words):
  flags = run_module.FLAGS
  try:
    flags(["run.py", *argv])
    with pytest.raises(InputError) as e:
      run_module.config_from_flags()
    for w in words:
      assert w in str(e.value), (w, str(e.value))
    with pytest.raises(InputError, match="unexpected arguments"):
      run_module.run(["run.py", "smoke"])
  finally:
    flags.unparse_flags()


def test_flag_parse_errors_in_process(run_module, capsys):
  for argv, word in ((["--synthetic_world=v9"], "--synthetic_world=v9"),
                     (["--num_negatives=many"], "--num_negatives=many")):
    with pytest.raises(SystemExit) as e:
      run_module.parse_flags(["run.py", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and word in err
    run_module.FLAGS.unparse_flags()


def test_flags_reach_the_config(run_module):
  flags = run_module.FLAGS
  try:
    flags(["run.py", "--dataset=tmall", "--loader_option=actions=0,2",
           "--loader_option=file=log.csv", "--skip_bad_rows", "--preset=smoke"])
    cfg = run_module.config_from_flags()
    assert cfg.data.loader_options == (("actions", (0, 2)), ("file", "log.csv"))
    assert cfg.data.skip_bad_rows is True
    fp = cfg.fingerprint()
    flags.unparse_flags()
    flags(["run.py", "--dataset=tmall", "--loader_option=actions=0", "--preset=smoke"])
    assert run_module.config_from_flags().fingerprint() != fp
    flags.unparse_flags()
    flags(["run.py", "--synthetic_world=v1", "--nosynthetic_categories"])
    cfg = run_module.config_from_flags()
    data = cfg.data
    assert (data.synthetic_world, data.synthetic_categories, data.loader_options) == (
        "v1", False, ())
    flags.unparse_flags()
    flags(["run.py"])
    cfg = run_module.config_from_flags()
    data = cfg.data
    assert (data.synthetic_world, data.synthetic_categories, data.skip_bad_rows) == (
        "v2", True, False)
  finally:
    flags.unparse_flags()
