"""Many devices compute what one device computes: fake CPU devices and two processes over gloo."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

WORKER = os.path.join(REPO_ROOT, "tests", "workers", "parallel_worker.py")


def _worker(args, devices, **kw):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out


def _compare(a_path, b_path, rtol, atol):
  a, b = np.load(a_path), np.load(b_path)
  assert set(a.files) == set(b.files)
  np.testing.assert_allclose(a["losses"], b["losses"], rtol=rtol, atol=atol)
  for k in a.files:
    if k not in ("losses", "devices"):
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)
  return int(a["devices"]), int(b["devices"])


def test_eight_devices_match_one_device(tmp_path):
  many, one = str(tmp_path / "many.npz"), str(tmp_path / "one.npz")
  _finish(_worker(["--mode", "dense", "--out", many], devices=8))
  _finish(_worker(["--mode", "dense", "--out", one, "--reference"], devices=1))
  assert _compare(many, one, rtol=2e-4, atol=2e-5) == (8, 1)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # a minute: two coordinated processes (README: pytest -m slow); 8 devices in one process stay in CI
def test_two_processes_match_one_process_with_four_devices(tmp_path):
  single, multi = str(tmp_path / "single.npz"), str(tmp_path / "multi.npz")
  _finish(_worker(["--mode", "search", "--out", single], devices=4))
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [_worker(["--mode", "search", "--out", multi, "--coordinator", coordinator, "--num-processes", "2",
                    "--process-id", str(i)], devices=2) for i in range(2)]
  for p in procs:
    _finish(p)
  assert _compare(multi, single, rtol=2e-4, atol=2e-5) == (4, 4)
