"""Smoke test of ``python -m benchmarks.any_network --quick`` (a few of the small networks, in a subprocess)."""

import subprocess
import sys

from tests.test_benchmarks_smoke import REPO, run_benchmark


def test_any_network_quick(tmp_path):
  r = run_benchmark("any_network", tmp_path, "--networks", "bit_resnet,regnet,vit")
  assert r["quick"] and [n["name"] for n in r["networks"]] == ["bit_resnet", "regnet", "vit"]
  for n in r["networks"]:
    for key in ("trace_s", "select_s", "materialize_s", "macs", "params"):
      assert n[key] > 0, (n["name"], key)
    assert n["prunable_fraction"] == 1.0 and n["unfollowed"] == [] and n["groups"] > 0
    assert n["target_met"] and n["selected_macs"] <= 0.5 * n["macs"]


def test_any_network_help():
  out = subprocess.run([sys.executable, "-m", "benchmarks.any_network", "--help"], cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=120)
  assert "--json" in out.stdout and "--quick" in out.stdout and "--networks" in out.stdout
