"""The device benchmark suite (issue #15 item 2): one command, a wall-clock budget, one JSON.

Runs on whatever `jax.devices()[0]` is (GPU, TPU or CPU; nothing here picks a platform) and
writes one JSON (`--out`, default benchmarks/results/device_suite-<platform>[-quick].json)
with the device name (`device_kind`), the JAX version and:

  env           device kind, backend, versions, device memory, the matmul peak (f32 and bf16
                n x n products; on GPU f32 runs at JAX's default precision, recorded)
  train         paper config (2^17 items, 69-item histories in 10 windows, 70 negatives per
                level, batch 256): train-step samples/s with uniform and with top-down
                sampling, a plain forward over the loss's pairs, train step / forward
                (bench_train_retrieval.setup / train_step_seconds / forward_seconds)
  beam          beam-search queries/s at batch 256 (paper scorer sizes, beam 150, top 150) on
                random trees of 2^17 and 2^20 leaves, and brute-force queries/s at the
                smallest size (bench_latency.build_model / in_process_search / throughput)
  step_profile  the default preset's training loop on synthetic data: host batch assembly vs
                device step vs the loop as it runs (bench_step_profile.profile)
  run           the `make run` equivalent: `experiments/run.py` at the default preset, fresh
                data folder and workdir (data generation included, install excluded); wall
                seconds and the results rows. Only if budget is left (`--min_run_s`);
                `--run_args` adds flags (quick: smoke preset, `--tree_rounds=1`).

Each part runs in its own child process under its own time limit: the budget left is shared
among the parts still to run by weight (time a part does not use goes to the later ones), a
child past its limit is killed (its process group), and an error or a hang in one part leaves
the others' results. Every child writes its results as it goes (after each measurement) and the
parent rewrites the JSON after every part, so a suite stopped at any point leaves what it had.
The parent never imports JAX (it would take the accelerator's memory away from the children).

JSON layout: top-level `device_kind`, `backend`, `jax`, `budget_s`, `wall_s`, `settings`;
`summary` (the headline figures, flat: train_samples_per_s_uniform, ..._top_down,
step_over_forward_uniform, beam_queries_per_s_2^17, beam_queries_per_s_2^20, ...);
`expected` (the summary keys the selected parts produce) and `missing` (those not produced:
empty when everything ran); `parts` (per part: status ok / timeout / error / skipped, seconds,
limit, full results, the error's last lines).

On the device machine (the session's `run` tool, kind nvidia-h200). It has no network; its
`python3` (3.12, /opt/torch/.venv; jax 0.11.2 with jax-cuda13-plugin in the package list of
/work/.library/device/KINDS.md, a lead until the suite's `env` part records the versions it
found) already holds every dependency (jax, flax, optax, orbax-checkpoint, numpy, scipy,
absl-py, pyarrow, matplotlib, tqdm, flatbuffers): nothing to install, and no `pip install -e .`
(it would need the network for its build requirements; every script here puts the repository
root on sys.path instead). One call:

  run(timeout_s=600, command="set -o pipefail; nvidia-smi -L; PYTHONUNBUFFERED=1 python3
      benchmarks/device_suite.py --budget_s=540 --out=$OUT/device_suite.json 2>&1
      | tee $OUT/device_suite.log")

(one line in the call). The suite ends within `--budget_s` (each child is killed at its limit),
leaving 60 s of the 600 s command limit; the reply's output_tail ends with the summary table and
both files come back under files_at: copy the JSON to benchmarks/results/device_suite-gpu.json
and the figures into BUILD_NOTES.md. With the machine's start (1-2 minutes) the call takes
about 11 of the session's 15 device minutes; a second, short call (e.g. `--parts=run
--budget_s=150` when the first left the run part out) fits only right after the first, while
the machine is still warm. Without a GPU in sight (JAX fell back to its CPU) the suite stops
after `env` with a message instead of spending the budget on CPU figures. If that machine's
flax or jax should not run this code, carry wheels as /work/.library/device/README.md says
(`pip download --no-deps ... flax==0.12.8` into .whl, `carry=[".whl"]`, then `python3 -m pip
install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;`
before the command).

Here (2-core CPU), tiny sizes, about 2-3 minutes:

  .venv/bin/python benchmarks/device_suite.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PARTS = ("env", "train", "beam", "step_profile", "run")
# Share of the budget left that each part may use (renormalised over the parts still to run).
WEIGHTS = {"env": 0.5, "train": 3.5, "beam": 2.5, "step_profile": 1.2, "run": 2.3}
# A part's limit is at least this (or all that is left): `env` must see the device (JAX's GPU
# start-up alone can take ~10-20 s) so that a CPU fallback is caught before the long parts.
MIN_LIMIT = {"env": 45.0}

# Full sizes (the issue's) and --quick sizes (seconds on a 2-core CPU).
FULL = dict(train_preset="paper", train_items=2 ** 17, train_batch=None, repeats=3,
            min_seconds=2.0, beam_preset="paper", beam_log2="17,20", beam_batch=256,
            beam_size=150, beam_topk=150, brute_queries=16, profile_preset="default",
            profile_steps=40, run_preset="default", run_args="", matmul_n=8192,
            min_run_s=120.0)
QUICK = dict(train_preset="smoke", train_items=2 ** 6, train_batch=32, repeats=1,
             min_seconds=0.0, beam_preset="smoke", beam_log2="8,10", beam_batch=32,
             beam_size=20, beam_topk=20, brute_queries=4, profile_preset="smoke",
             profile_steps=5, run_preset="smoke", run_args="--tree_rounds=1", matmul_n=256,
             min_run_s=20.0)


# ----------------------------------------------------------------------------- expected keys
def expected_keys(parts, s) -> list[str]:
  """The summary keys the selected parts produce with settings `s`."""
  keys = []
  if "env" in parts:
    keys += ["matmul_tflops_f32", "matmul_tflops_bf16"]
  if "train" in parts:
    keys += ["train_samples_per_s_uniform", "train_samples_per_s_top_down",
             "train_step_seconds_uniform", "train_step_seconds_top_down", "forward_seconds",
             "step_over_forward_uniform", "step_over_forward_top_down",
             "top_down_over_uniform_step"]
  if "beam" in parts:
    log2s = _log2s(s["beam_log2"])
    keys += [f"beam_queries_per_s_2^{g}" for g in log2s]
    if s["brute_queries"]:
      keys += [f"brute_force_queries_per_s_2^{log2s[0]}", f"beam_speedup_2^{log2s[0]}"]
  if "step_profile" in parts:
    keys += ["profile_host_ms_per_step", "profile_device_ms_per_step",
             "profile_loop_ms_per_step", "profile_loop_samples_per_s"]
  if "run" in parts:
    keys += ["run_wall_seconds"]
  return keys


def _log2s(text: str) -> list[int]:
  return [int(x) for x in str(text).split(",") if x]


# ----------------------------------------------------------------------------- the children
def _write(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_jsonable)
  os.replace(tmp, path)


def _jsonable(x):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


def _device_info() -> dict:
  import jax
  d = jax.devices()[0]
  return {"device_kind": d.device_kind, "backend": jax.default_backend(), "jax": jax.__version__}


def part_env(s, out: dict, save) -> None:
  """Device, versions, memory and the matmul peak (f32 at the default precision, bf16 with f32
  accumulation) on random n x n operands."""
  import importlib.metadata as md
  import platform

  import jax
  import jax.numpy as jnp
  from bench_train_retrieval import timed

  out.update(_device_info())
  print(f"[env] {jax.devices()} kind {out['device_kind']!r}, jax {jax.__version__}", flush=True)
  out["devices"] = [str(d) for d in jax.devices()]
  out["device_count"] = jax.device_count()
  out["platform"] = platform.platform()
  out["cpus"] = os.cpu_count()
  out["versions"] = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy",
               "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu"):
    try:
      out["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  out["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
  try:
    stats = jax.devices()[0].memory_stats() or {}
    out["memory_bytes_limit"] = int(stats.get("bytes_limit", 0)) or None
  except Exception:  # noqa: BLE001 - not every backend has memory stats
    out["memory_bytes_limit"] = None
  save()
  n = s["matmul_n"]
  for dtype, key in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    sec, _ = timed(mm, a, b, repeats=s["repeats"] * 3, min_seconds=s["min_seconds"] / 2)
    out[f"matmul_tflops_{key}"] = 2 * n ** 3 / sec / 1e12
    out["matmul_n"] = n
    save()


def part_train(s, out: dict, save) -> None:
  """Train-step samples/s (uniform, top-down) and step / forward at the paper config."""
  import bench_train_retrieval as btr

  out.update(_device_info())
  t = time.perf_counter()
  ctx = btr.setup(s["train_preset"], s["train_items"], s["train_batch"])
  out["settings"] = ctx["res"]
  out["setup_seconds"] = time.perf_counter() - t
  save()
  for sampler in ("uniform", "top_down"):
    t = time.perf_counter()
    out.update(btr.train_step_seconds(ctx, sampler, s["repeats"], s["min_seconds"]))
    out[f"compile_and_time_seconds_{sampler}"] = time.perf_counter() - t
    print(f"[train] {sampler}: {out[f'samples_per_s_{sampler}']:.1f} samples/s", flush=True)
    save()
  out["forward_seconds"] = btr.forward_seconds(ctx, s["repeats"], s["min_seconds"])
  out["step_over_forward_uniform"] = out["step_seconds_uniform"] / out["forward_seconds"]
  out["step_over_forward_top_down"] = out["step_seconds_top_down"] / out["forward_seconds"]
  out["top_down_over_uniform_step"] = out["step_seconds_top_down"] / out["step_seconds_uniform"]
  print(f"[train] step / forward: {out['step_over_forward_uniform']:.2f} (uniform)", flush=True)
  save()


def part_beam(s, out: dict, save) -> None:
  """Beam-search queries/s at batch `beam_batch` per tree size; brute force at the smallest."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import bench_latency as bl
  from tdr_jax import beam_search as bs
  from tdr_jax import config as config_lib

  out.update(_device_info())
  cfg = config_lib.make_config(s["beam_preset"])
  L, b, beam, k = cfg.data.history_len, s["beam_batch"], s["beam_size"], s["beam_topk"]
  out["settings"] = {"preset": s["beam_preset"], "history_len": L, "batch": b, "beam": beam,
                     "topk": k, "embed_dim": cfg.model.embed_dim,
                     "attention_hidden": list(cfg.model.attention_hidden),
                     "mlp_hidden": list(cfg.model.mlp_hidden)}
  rng = np.random.default_rng(0)
  for i, log2 in enumerate(_log2s(s["beam_log2"])):
    n = 1 << log2
    t = time.perf_counter()
    tree, score_fn, params, pbytes, tbytes = bl.build_model(rng, n, cfg.model)
    hist = bl.histories(rng, b, L, n)
    out[f"build_seconds_2^{log2}"] = time.perf_counter() - t
    out[f"param_bytes_2^{log2}"] = pbytes
    _, call = bl.in_process_search(score_fn, tree, params, beam=beam, k=k)
    t = time.perf_counter()
    est = bl.throughput(call, hist, b, 1)  # compile + one timed call
    out[f"compile_seconds_2^{log2}"] = time.perf_counter() - t
    repeats = max(s["repeats"], min(200, int(est * max(s["min_seconds"], 0.0) / b) + 1))
    out[f"beam_queries_per_s_2^{log2}"] = bl.throughput(call, hist, b, repeats)
    out[f"beam_repeats_2^{log2}"] = repeats
    print(f"[beam] 2^{log2}: {out[f'beam_queries_per_s_2^{log2}']:.1f} queries/s", flush=True)
    save()
    if i == 0 and s["brute_queries"]:
      q = s["brute_queries"]
      chunk = min(n, 8192)

      def brute(h):
        return jax.device_get(bs.brute_force(score_fn, params, tree, jnp.asarray(h), topk=k,
                                             chunk_size=chunk))

      out[f"brute_force_queries_per_s_2^{log2}"] = bl.throughput(brute, hist, q, 1)
      out[f"beam_speedup_2^{log2}"] = (out[f"beam_queries_per_s_2^{log2}"]
                                       / out[f"brute_force_queries_per_s_2^{log2}"])
      save()
    del tree, params, call


def part_step_profile(s, out: dict, save) -> None:
  """Host batch assembly vs device step vs the loop (bench_step_profile.profile)."""
  import bench_step_profile as bsp

  out.update(_device_info())
  t = time.perf_counter()
  out.update(bsp.profile(s["profile_preset"], s["profile_steps"],
                         os.path.join(s["workroot"], "profile_data")))
  out["seconds_with_data"] = time.perf_counter() - t
  save()


def part_run(s, out: dict, save) -> None:
  """`experiments/run.py` at `run_preset` with a fresh data folder and workdir: wall seconds."""
  workdir = os.path.join(s["workroot"], "run")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "run.py"),
         f"--preset={s['run_preset']}", f"--workdir={workdir}",
         f"--data_dir={os.path.join(s['workroot'], 'run_data')}"] + s["run_args"].split()
  out["command"] = " ".join(cmd[1:])
  save()
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT)
  out["run_wall_seconds"] = time.perf_counter() - t
  out["returncode"] = proc.returncode
  save()
  if proc.returncode:
    raise RuntimeError(f"experiments/run.py exited {proc.returncode}")
  with open(os.path.join(workdir, "results.json")) as f:
    rows = json.load(f)["results"]
  keep = ("train_seconds", "f_measure@20", "recall@20", "precision@20", "oracle_ratio@20",
          "queries_per_second")
  out["rows"] = [{k: v for k, v in r.items() if k in keep or k in ("method", "label")}
                 for r in rows]
  row = rows[0]
  if isinstance(row.get("train_seconds"), (int, float)):
    out["run_train_seconds"] = row["train_seconds"]
  save()


CHILDREN = {"env": part_env, "train": part_train, "beam": part_beam,
            "step_profile": part_step_profile, "run": part_run}


def child_main(part: str, settings_path: str, out_path: str) -> int:
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  with open(settings_path) as f:
    s = json.load(f)
  out: dict = {}
  try:
    CHILDREN[part](s, out, lambda: _write(out_path, out))
  except Exception:  # noqa: BLE001 - reported in the JSON; the parent goes on
    out["error"] = traceback.format_exc()[-3000:]
    _write(out_path, out)
    traceback.print_exc()
    return 1
  _write(out_path, out)
  return 0


# ----------------------------------------------------------------------------- the parent
SUMMARY = {  # summary key -> (part, result key)
    "matmul_tflops_f32": ("env", "matmul_tflops_f32"),
    "matmul_tflops_bf16": ("env", "matmul_tflops_bf16"),
    "train_samples_per_s_uniform": ("train", "samples_per_s_uniform"),
    "train_samples_per_s_top_down": ("train", "samples_per_s_top_down"),
    "train_step_seconds_uniform": ("train", "step_seconds_uniform"),
    "train_step_seconds_top_down": ("train", "step_seconds_top_down"),
    "forward_seconds": ("train", "forward_seconds"),
    "step_over_forward_uniform": ("train", "step_over_forward_uniform"),
    "step_over_forward_top_down": ("train", "step_over_forward_top_down"),
    "top_down_over_uniform_step": ("train", "top_down_over_uniform_step"),
    "profile_host_ms_per_step": ("step_profile", "host_ms_per_step"),
    "profile_device_ms_per_step": ("step_profile", "device_ms_per_step"),
    "profile_loop_ms_per_step": ("step_profile", "loop_ms_per_step"),
    "profile_loop_samples_per_s": ("step_profile", "loop_samples_per_s"),
    "run_wall_seconds": ("run", "run_wall_seconds"),
    "run_train_seconds": ("run", "run_train_seconds"),
}


def summarize(res: dict) -> None:
  parts = res["parts"]
  summary = {}
  for key, (part, rkey) in SUMMARY.items():
    v = parts.get(part, {}).get("results", {}).get(rkey)
    if isinstance(v, (int, float)):
      summary[key] = v
  for rkey, v in parts.get("beam", {}).get("results", {}).items():
    if rkey.startswith(("beam_queries_per_s_", "brute_force_queries_per_s_", "beam_speedup_")):
      summary[rkey] = v
  if parts.get("run", {}).get("status") != "ok":
    summary.pop("run_wall_seconds", None)  # a killed or failed run has no equivalent wall time
  res["summary"] = summary
  res["missing"] = [k for k in res["expected"] if k not in summary]
  for part in PARTS:
    info = parts.get(part, {}).get("results", {})
    if info.get("device_kind"):
      for k in ("device_kind", "backend", "jax"):
        res[k] = res.get(k) or info.get(k)


def run_child(part: str, limit: float, settings_path: str, out_path: str) -> tuple[str, float]:
  """Runs one part in a child process (own session) for at most `limit` seconds."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--_child={part}",
         f"--_settings={settings_path}", f"--_child_out={out_path}"]
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
  try:
    rc = proc.wait(timeout=limit)
    status = "ok" if rc == 0 else "error"
  except subprocess.TimeoutExpired:
    status = "timeout"
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()
  return status, time.perf_counter() - t


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--budget_s", type=float, default=540.0,
                  help="wall-clock budget of the whole suite, seconds")
  ap.add_argument("--quick", action="store_true", help="tiny sizes (a 2-core CPU, minutes)")
  ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {PARTS}")
  ap.add_argument("--out", default=None)
  ap.add_argument("--allow_cpu", action="store_true",
                  help="run the full sizes even when jax.devices()[0] is a CPU (without it, a "
                  "full-size suite that finds no accelerator stops after `env`: on the device "
                  "machine that means JAX did not see the GPU)")
  for k, v in FULL.items():
    ap.add_argument(f"--{k}", type=type(v) if v is not None else int, default=None,
                    help=f"default {v} (quick: {QUICK[k]})")
  ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_settings", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_child_out", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a._child:
    return child_main(a._child, a._settings, a._child_out)

  t_start = time.perf_counter()
  parts = [p for p in a.parts.split(",") if p]
  bad = [p for p in parts if p not in PARTS]
  if bad:
    ap.error(f"unknown parts {bad}; choose from {PARTS}")
  s = dict(QUICK if a.quick else FULL)
  for k in FULL:
    if getattr(a, k) is not None:
      s[k] = getattr(a, k)
  workroot = tempfile.mkdtemp(prefix="device_suite_")
  s["workroot"] = workroot
  settings_path = os.path.join(workroot, "settings.json")
  _write(settings_path, s)
  args_text = sys.argv[1:] if argv is None else list(argv)
  res = {"command": " ".join(["python", os.path.relpath(__file__, ROOT)] + args_text),
         "device_kind": None, "backend": None, "jax": None, "quick": a.quick,
         "budget_s": a.budget_s, "wall_s": None, "load_avg_at_start": os.getloadavg(),
         "settings": {k: v for k, v in s.items() if k != "workroot"}, "parts": {},
         "expected": expected_keys(parts, s), "summary": {}, "missing": []}
  out_path = a.out

  def save():
    nonlocal out_path
    res["wall_s"] = time.perf_counter() - t_start
    summarize(res)
    if out_path is None and res["backend"]:
      out_path = os.path.join(HERE, "results", f"device_suite-{res['backend']}"
                              f"{'-quick' if a.quick else ''}.json")
    path = out_path or os.path.join(workroot, "device_suite-partial.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write(path, res)

  reserve = 3.0  # seconds kept for the parent's last write
  no_accelerator = None
  try:
    for i, part in enumerate(parts):
      left = a.budget_s - (time.perf_counter() - t_start) - reserve
      share = WEIGHTS[part] / sum(WEIGHTS[p] for p in parts[i:])
      limit = left * share if i < len(parts) - 1 else left
      limit = max(limit, min(left, MIN_LIMIT.get(part, 0.0)))
      entry = {"status": "skipped", "limit_s": round(limit, 1), "seconds": 0.0, "results": {}}
      res["parts"][part] = entry
      floor = s["min_run_s"] if part == "run" else 5.0
      if no_accelerator:
        entry["why"] = no_accelerator
        print(f"== {part}: skipped ({entry['why']})", flush=True)
        save()
        continue
      if limit < floor:
        entry["why"] = f"budget: {limit:.0f} s left for it, under the {floor:.0f} s floor"
        print(f"== {part}: skipped ({entry['why']})", flush=True)
        save()
        continue
      print(f"== {part}: limit {limit:.0f} s", flush=True)
      child_out = os.path.join(workroot, f"{part}.json")
      status, seconds = run_child(part, limit, settings_path, child_out)
      entry.update(status=status, seconds=round(seconds, 2))
      if os.path.exists(child_out):
        with open(child_out) as f:
          entry["results"] = json.load(f)
        if "error" in entry["results"]:
          entry["error"] = entry["results"].pop("error")
      print(f"== {part}: {status} in {seconds:.1f} s", flush=True)
      save()
      if (part == "env" and res["backend"] == "cpu" and not a.quick and not a.allow_cpu):
        no_accelerator = ("no accelerator: jax.devices()[0] is a CPU and the full sizes take "
                          "hours there (check the JAX GPU plugin; --allow_cpu runs them anyway)")
        print(f"!! {no_accelerator}", flush=True)
  finally:
    save()
    import shutil
    shutil.rmtree(workroot, ignore_errors=True)

  print(f"\ndevice: {res['device_kind']} ({res['backend']}), jax {res['jax']}, "
        f"wall {res['wall_s']:.0f} s of {a.budget_s:.0f}")
  print("| part | status | seconds |\n|---|---|---|")
  for part, e in res["parts"].items():
    print(f"| {part} | {e['status']} | {e['seconds']} |")
  print("| measure | value |\n|---|---|")
  for k, v in res["summary"].items():
    print(f"| {k} | {v:.4g} |")
  if res["missing"]:
    print("missing:", ", ".join(res["missing"]))
  print(f"-> {out_path}")
  ok = not res["missing"] and all(math.isfinite(v) and v > 0 for v in res["summary"].values())
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
