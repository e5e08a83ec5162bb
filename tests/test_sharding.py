"""Data parallelism: every method family trains and retrieves on 4 simulated CPU devices with
the same result as on 1 (tests/sharding_probe.py runs each in a subprocess)."""

import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sharding_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe(data_dir, devices, family):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharding_probe.py"),
                         data_dir, family], capture_output=True, text=True, env=env,
                        timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", sorted(sharding_probe.PROBES))
def test_four_devices_match_one(tmp_path, family):
  # Both processes at once (each is mostly single-threaded imports and compilation).
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    one, four = pool.map(lambda n: _probe(str(tmp_path / f"d{n}"), n, family), (1, 4))
  assert one["devices"] == 1 and four["devices"] == 4
  assert "data" in four["sharded"]
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=2e-5)
  assert four["items"] == one["items"]
