"""The README's main job: the smoke pipeline on the real CIFAR-10, all 10,000 test images (slow)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_smoke_pipeline_beats_chance(tmp_path, cifar_archive):
  workdir = str(tmp_path / "smoke")
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.run([sys.executable, "-m", "bpcp_jax.run.cli", "pipeline", "--config",
                         os.path.join(REPO_ROOT, "experiments", "configs", "smoke.py"), "--workdir", workdir,
                         "--data", cifar_archive, "--no-progress"], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["data"]["test_images"] == 10_000
  for section in ("dense", "pruned"):
    assert summary[section]["accuracy"] > 0.25, summary[section]["accuracy"]  # chance is 0.10
  assert summary["pruned"]["macs"] < summary["dense"]["macs"]
