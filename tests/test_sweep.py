"""Sweeps and experiment configs: every config file loads, sweep planning, the Pareto front, the
results files, and `bpcp-jax sweep` end to end on real CIFAR-10 images (a failing run, a rerun)."""

import csv
import glob
import os
import subprocess
import sys

import pytest

from bpcp_jax.run import sweep
from bpcp_jax.run.config import check_config, load_config_file
from bpcp_jax.run.pipeline import check_run_config
from tests.conftest import REPO_ROOT

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "experiments", "configs", "*.py")))
SWEEPS = sorted(glob.glob(os.path.join(REPO_ROOT, "experiments", "sweeps", "*.py")))
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_experiment_config_loads(path):
  config = load_config_file(path)
  check_config(config, where=path)
  check_run_config(config)  # model name, stages, criterion, ... all valid before any compute
  doc = _read(path).split('"""')[1]
  assert "bpcp-jax" in doc, f"{path}: the docstring must give the launch command"
  assert "Expected result" in doc, f"{path}: the docstring must give the expected result"


def test_the_configs_of_issue_6_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  want = {"resnet_v2_56_dense", "resnet_v2_56_bp", "resnet_v2_56_slim_04", "resnet_v2_56_slim_05", "resnet_v2_56_l1_03",
          "resnet_v2_56_l1_04", "resnet_v2_56_cop_03", "resnet_v2_56_bpcp", "resnet_v2_56_sfp", "resnet_v2_56_random",
          "resnet_v1_56_dense", "resnet_v1_56_bpcp"}
  assert want <= names, sorted(want - names)


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_sweep_file_plans(path):
  spec = sweep.load_sweep(path)
  base, keys, runs = sweep.plan(spec)
  grid = spec["grid"]
  n = 1
  for values in grid.values():
    n *= len(values)
  assert len(runs) == n + len(spec["runs"]) and keys
  assert len({r["name"] for r in runs}) == len(runs)
  assert "bpcp-jax sweep" in _read(path).split('"""')[1]


def _read(path):
  with open(path) as f:
    return f.read()


def _write_sweep(path, body):
  with open(path, "w") as f:
    f.write(f'"""A test sweep."""\n\n\ndef get_sweep():\n  return {body!r}\n')
  return str(path)


def test_run_list_and_names(tmp_path):
  path = _write_sweep(tmp_path / "s.py", {
      "base": TINY, "grid": {"stages.search.gamma": [0.05, 0.1], "stages.prune.ratio": [0.3]},
      "runs": [{"stages.search.lr": 0.5, "stages.pretrain.lr": 0.2, "stages.prune.criterion": "a/b c"}],
      "overrides": {"stages.pretrain.epochs": 1}})
  base, keys, runs = sweep.plan(sweep.load_sweep(path), ["--config.data.cache_dir=/tmp/x"])
  assert base.stages.pretrain.epochs == 1 and base.data.cache_dir == "/tmp/x"
  assert [r["name"] for r in runs] == ["gamma=0.05,ratio=0.3", "gamma=0.1,ratio=0.3",
                                       "search.lr=0.5,pretrain.lr=0.2,criterion=a_b_c"]
  assert runs[0]["values"] == {"stages.search.gamma": 0.05, "stages.prune.ratio": 0.3, "stages.search.lr": 0.1,
                               "stages.pretrain.lr": 0.1, "stages.prune.criterion": "bn_scale"}
  assert sweep.run_name({}, []) == "base"
  assert os.path.isfile(os.path.join(sweep.repo_root(), "setup.cfg"))  # bases resolve against the checkout
  assert len(sweep.run_name({"model": "x" * 200}, ["model"])) <= 120


@pytest.mark.parametrize("body, match", [
    ({"base": "nowhere.py"}, "base config 'nowhere.py'"),
    ({"base": TINY, "grid": {"stages.search.gama": [1.0]}}, "swept key 'stages.search.gama'"),
    ({"base": TINY, "grid": {"stages.search.gamma": []}}, "grid entry 'stages.search.gamma'"),
    ({"base": TINY, "gird": {}}, "unknown key"),
    ({"base": TINY, "runs": [{"seed": 1}, {"seed": 1}]}, "share the name"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, body, match):
  path = _write_sweep(tmp_path / "bad.py", body)
  with pytest.raises(sweep.SweepError, match=match) as e:
    sweep.plan(sweep.load_sweep(path))
  assert "bad.py" in str(e.value)


def test_cli_override_of_a_swept_key_is_refused(tmp_path):
  path = _write_sweep(tmp_path / "s.py", {"base": TINY, "grid": {"seed": [0, 1]}})
  with pytest.raises(sweep.SweepError, match="seed"):
    sweep.plan(sweep.load_sweep(path), ["--config.seed=3"])


def test_pareto_front():
  pts = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.4), (0.5, 0.3), (3.0, 0.6), (1.0, 0.5), (4.0, 0.9), (None, 1.0),
         (5.0, float("nan"))]
  assert sweep.pareto_front(pts) == [3, 0, 1, 6]
  assert sweep.pareto_front([]) == []
  assert sweep.pareto_front([(1, 1)]) == [0]
  # a cheaper point with the same accuracy dominates; equal cost keeps the more accurate one
  assert sweep.pareto_front([(2, 0.7), (1, 0.7), (1, 0.8)]) == [2]


def _fake_rows():
  rows = []
  for i, (gamma, acc, macs, sp, blocks) in enumerate([(0.02, 0.91, 40e6, 1.4, 16), (0.05, 0.90, 30e6, 2.0, 12),
                                                      (0.1, 0.86, 35e6, 2.4, 8)]):
    rows.append({"name": f"gamma={gamma}", "stages.search.gamma": gamma, "status": "done", "pruned_accuracy": acc,
                 "dense_accuracy": 0.93, "accuracy_drop_pct_points": 100 * (0.93 - acc), "pruned_params": 300000 - i,
                 "dense_params": 590426, "pruned_macs": macs, "dense_macs": 87214592, "params_removed_pct": 49.0,
                 "macs_removed_pct": 60.0, "pruned_blocks": blocks, "dense_blocks": 18, "pruned_latency_ms_b1": 5.0,
                 "dense_latency_ms_b1": 5.0 * sp, "speedup_b1": sp, "message": "", "workdir": f"runs/gamma={gamma}"})
  rows.append({"name": "gamma=9", "stages.search.gamma": 9.0, "status": "failed",
               **{k: None for k in rows[0] if k not in ("name", "stages.search.gamma", "status", "message", "workdir")},
               "message": "ValueError: boom", "workdir": "runs/gamma=9"})
  return rows


def test_write_results_files_and_read_back(tmp_path):
  rows = _fake_rows()
  written = sweep.write_results(str(tmp_path), rows)
  assert set(written) == {"csv", "md", "pareto", "speedup", "blocks_vs_gamma"}
  for name in ("pareto", "speedup", "blocks_vs_gamma"):
    with open(written[name], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  back = sweep.read_results(str(tmp_path))
  assert back == rows
  md = _read(written["md"])
  assert "4 runs: 3 done, 1 failed." in md and "| gamma=0.05 | 0.05 | done | 90.00 |" in md
  assert "ValueError: boom" in md and "![pareto](pareto.png)" in md


def test_results_are_replaced_whole(tmp_path, monkeypatch):
  """A write that fails half way (a full disk, a killed process) leaves the previous results.csv
  as it was and no temporary file; two sweep processes never interleave one file."""
  rows = _fake_rows()
  written = sweep.write_results(str(tmp_path), rows)
  before = _read(written["csv"])
  calls = []

  def fail_on_second_row(self, row):
    calls.append(row)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    return real(self, row)

  real = csv.DictWriter.writerow
  monkeypatch.setattr(csv.DictWriter, "writerow", fail_on_second_row)
  with pytest.raises(OSError, match="No space left"):
    sweep.write_results(str(tmp_path), rows[:2])
  assert _read(written["csv"]) == before
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def _cli(args, timeout=900):
  env = {**os.environ, "XLA_FLAGS": ""}
  p = subprocess.run([sys.executable, "-m", "bpcp_jax.run.cli", *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, timeout=timeout)
  return p.returncode, p.stdout


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, cifar_archive):
  """Two real tiny runs (gamma 0.05 and 0.2) and one that fails on a bad criterion."""
  root = tmp_path_factory.mktemp("sweep")
  path = _write_sweep(root / "tiny_two.py", {"base": TINY, "grid": {"stages.search.gamma": [0.05, 0.2]},
                                             "runs": [{"stages.prune.criterion": "nope"}]})
  workdir = str(root / "out")
  args = ["sweep", "--sweep", path, "--workdir", workdir, "--data", cifar_archive, "--no-progress",
          f"--config.data.cache_dir={root / 'cache'}"]
  code, out = _cli(args)
  return workdir, args, code, out


def _csv(workdir):
  with open(os.path.join(workdir, "results.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_sweep_runs_records_failure_and_writes_results(tiny_sweep):
  workdir, _, code, out = tiny_sweep
  assert code == 1, out  # one run failed
  rows = {r["name"]: r for r in _csv(workdir)}
  assert list(rows) == ["gamma=0.05", "gamma=0.2", "criterion=nope"], out
  assert [r["status"] for r in rows.values()] == ["done", "done", "failed"], out
  for name in ("gamma=0.05", "gamma=0.2"):
    r = rows[name]
    assert os.path.isfile(os.path.join(workdir, "runs", name, "summary.json"))
    assert r["stages.prune.criterion"] == "bn_scale" and float(r["stages.search.gamma"]) == float(name[6:])
    for col in ("pruned_accuracy", "dense_accuracy", "pruned_params", "pruned_macs", "pruned_latency_ms_b1",
                "speedup_b1", "pruned_blocks", "params_removed_pct", "macs_removed_pct"):
      assert r[col] != "", (name, col)
    assert int(r["pruned_params"]) < int(r["dense_params"])
  bad = rows["criterion=nope"]
  assert bad["stages.prune.criterion"] == "nope" and "'nope'" in bad["message"] and bad["pruned_accuracy"] == ""
  error = _read(os.path.join(workdir, "runs", "criterion=nope", "error.txt"))
  assert "Traceback" in error and "stages.prune.criterion" in error and "'nope'" in error
  md = _read(os.path.join(workdir, "results.md"))
  assert "3 runs: 2 done, 1 failed." in md and "| gamma=0.2 |" in md and "## Failed runs" in md
  for png in ("pareto.png", "speedup.png", "blocks_vs_gamma.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(4) == b"\x89PNG", png
  assert "FAILED" in out and "failed: criterion=nope" in out


def test_sweep_rerun_skips_finished_runs(tiny_sweep):
  workdir, args, _, _ = tiny_sweep
  summaries = [os.path.join(workdir, "runs", n, "summary.json") for n in ("gamma=0.05", "gamma=0.2")]
  before = [os.stat(p).st_mtime_ns for p in summaries]
  code, out = _cli(args)
  assert code == 1, out  # the bad run is tried again and fails again
  assert "gamma=0.05: skipped" in out and "gamma=0.2: skipped" in out, out
  assert [os.stat(p).st_mtime_ns for p in summaries] == before
  assert [r["status"] for r in _csv(workdir)] == ["done", "done", "failed"]
