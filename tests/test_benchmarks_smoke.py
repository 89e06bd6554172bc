"""Smoke tests of the benchmarks: each runs with ``--quick`` in a subprocess and writes its JSON.

No timing is asserted (this is a shared CPU); the tests check that the commands run, that the
record names the device, versions and command, and that the figures are positive.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(module, tmp_path, *extra):
  out = tmp_path / f"{module}.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--json", str(out), *extra],
                 cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=240)
  record = json.loads(out.read_text())
  for key in ("device", "versions", "command", "argv", "date", "results"):
    assert key in record, key
  assert record["device"]["platform"] == "cpu"
  assert {"jax", "jaxlib", "flax", "optax", "python"} <= set(record["versions"])
  assert module in record["command"]
  return record["results"]


def test_train_throughput_quick(tmp_path):
  r = run_benchmark("train_throughput", tmp_path)
  for mode in ("dense", "search", "masked"):
    assert r[f"{mode}_step_images_per_s"] > 0
    assert r[f"{mode}_step_compile_s"] >= 0
  assert r["search_over_dense"] > 0
  assert r["process_peak_rss_gib"] > 0


@pytest.mark.slow  # a minute: two allocators, each in its own process (README: pytest -m slow)
def test_train_throughput_compares_allocators(tmp_path):
  from bpcp_jax.run import host

  available = host.available_allocators()
  assert "glibc" in available and "glibc-hugetlb" in available
  allocators = [available[0], "glibc"]  # the one the command line picks, and none
  r = run_benchmark("train_throughput", tmp_path, "--modes", "dense", "--compare-allocators",
                    "--allocators", ",".join(allocators))
  assert set(r["allocators"]) == {f"{a}_{m}" for a in allocators for m in ("dense", "search")}
  for key, row in r["allocators"].items():
    assert row["images_per_s"] > 0 and row["peak_rss_gib"] > 0
    assert row["ran_with"] == [key.rsplit("_", 1)[0]]  # each child really ran with its allocator


def test_inference_speedup_quick(tmp_path):
  r = run_benchmark("inference_speedup", tmp_path)
  names = [n["name"] for n in r["networks"]]
  assert names[0] == "dense" and len(names) >= 3
  for n in r["networks"]:
    for key in ("macs_ratio", "batch1_latency_ms", "batch1_speedup", "large_batch_images_per_s",
                "large_batch_speedup", "large_batch_speedup_over_macs_ratio"):
      assert n[key] > 0, (n["name"], key)
  assert r["networks"][1]["macs"] < r["networks"][0]["macs"]


def test_input_pipeline_quick(tmp_path):
  r = run_benchmark("input_pipeline", tmp_path)
  for key in ("host_index_images_per_s", "host_index_shard_images_per_s", "prefetch_shard_images_per_s",
              "augment_on_device_images_per_s"):
    assert r[key] > 0, key


@pytest.mark.parametrize("module", ["train_throughput", "inference_speedup", "input_pipeline"])
def test_help(module):
  out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=120)
  assert "--json" in out.stdout and "--quick" in out.stdout


def test_speed_select_quick(tmp_path):
  r = run_benchmark("speed_select", tmp_path)
  assert set(r["rows"]) == {"dense", "macs", "macs_r8", "latency"}
  for name, row in r["rows"].items():
    assert row["latency_b1_ms"] > 0 and row["speedup_b1"] > 0
    if name != "dense":
      assert row["macs_kept"] <= 0.4 and row["actions"]
