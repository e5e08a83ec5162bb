"""benchmarks/device_suite.py: the quick mode runs on CPU and writes every headline figure; a
part past its time limit is killed and reported, the others' results kept."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "device_suite.py")

# Tiny sizes; XLA:CPU at -O0 compiles the train steps ~2.5x faster (the figures are not speed
# figures here, only their presence is checked).
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def _suite(tmp_path, *args, timeout=240):
  out = tmp_path / "suite.json"
  proc = subprocess.run([sys.executable, SUITE, "--quick", f"--out={out}", *args], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=timeout)
  assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc, json.loads(out.read_text())


def test_quick_suite_writes_every_key(tmp_path):
  proc, res = _suite(tmp_path, "--parts=env,train,beam", "--train_items=16", "--beam_log2=5,6",
                     "--brute_queries=4", "--matmul_n=64", "--budget_s=200")
  log = proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.returncode == 0, log
  assert res["device_kind"] and res["backend"] == "cpu" and res["jax"], res
  assert res["missing"] == [], log
  expected = {"matmul_tflops_f32", "matmul_tflops_bf16", "train_samples_per_s_uniform",
              "train_samples_per_s_top_down", "step_over_forward_uniform",
              "step_over_forward_top_down", "top_down_over_uniform_step", "forward_seconds",
              "beam_queries_per_s_2^5", "beam_queries_per_s_2^6",
              "brute_force_queries_per_s_2^5", "beam_speedup_2^5"}
  assert expected <= set(res["expected"]) <= set(res["summary"])
  for k, v in res["summary"].items():
    assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v)
  assert all(e["status"] == "ok" for e in res["parts"].values()), res["parts"]
  assert res["parts"]["train"]["results"]["settings"]["num_items"] == 16


def test_part_over_its_limit_is_killed_and_reported(tmp_path):
  # 9 s of budget: the train part gets ~6 s, less than its two samplers' steps take (how far
  # it gets depends on the machine: the uniform step alone may or may not finish; a smaller
  # budget skips the part instead of starting it).
  proc, res = _suite(tmp_path, "--parts=train", "--budget_s=9", timeout=60)
  assert proc.returncode == 1
  assert res["parts"]["train"]["status"] == "timeout"
  assert res["parts"]["train"]["seconds"] < 9
  missing, expected = set(res["missing"]), set(res["expected"])
  assert "train_samples_per_s_top_down" in missing  # the killed part did not finish
  assert missing <= expected and not missing & set(res["summary"])
  assert expected <= missing | set(res["summary"])  # every figure: measured or reported missing
  assert res["wall_s"] < 11
