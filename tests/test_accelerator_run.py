"""experiments/accelerator_run.py: the one-shot accelerator run, on CPU with ``--quick``, and its parts.

The quick run goes through the same code as on a GPU (throughput and inference phase, the recipe
through the pipeline with epochs planned from measured times, the supervisor and its outputs) with
tiny networks and data; the test checks the files, the rows, that every number is finite, and
that the run ended within its budget. The planner and the supervisor's deadlines are tested alone.
"""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "accelerator_run.py")


def _module():
  spec = importlib.util.spec_from_file_location("accelerator_run", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


acc = _module()


def _finite_numbers(row):
  for key, value in row.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      assert math.isfinite(value), (row["table"], row["name"], key, value)


def test_quick_run_writes_every_table_within_its_budget(tmp_path, cifar_archive):
  out, work = tmp_path / "out", tmp_path / "work"
  budget = 1.5 * acc.QUICK.budget_s  # room for a loaded machine: every phase must end by itself (about 50 s of CPU)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  start = time.time()
  cmd = [sys.executable, SCRIPT, "--quick", "--data", cifar_archive, "--out", str(out), "--workdir", str(work),
         "--compile-threads", "2", "--budget", str(budget)]  # 2: the threaded compilations run too
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget + 60)
  wall = time.time() - start
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert wall <= budget + 5, wall  # the supervisor ends every phase in time (5 s: the interpreter's start)

  # what comes back from a device: at most 8 plain files, no folders
  assert sorted(os.listdir(out)) == sorted(acc.OUT_FILES)
  record = json.loads((out / "results.json").read_text())
  assert record["quick"] and record["device"] == "cpu" and record["timings"]["total_s"] <= budget
  for phase in ("bench", "recipe"):  # each ended by itself, not at its deadline
    p = record["phases"][phase]
    assert (p["returncode"], p["interrupted"], p["killed"]) == (0, False, False), (phase, p)
  rows = record["rows"]
  for row in rows:
    _finite_numbers(row)
  s = acc.QUICK

  train = {(r["name"], r["batch"], r["dtype"]) for r in rows if r["table"] == "train_step"}
  assert train == {(m, b, d) for m in acc.MODES for b in s.train_batches for d in s.dtypes}
  for r in rows:
    if r["table"] in ("train_step", "inference", "final"):
      assert r["images_per_s"] > 0 and r["ms"] > 0, r

  inference = [r for r in rows if r["table"] == "inference"]
  names = list(dict.fromkeys(r["name"] for r in inference))
  assert names[0] == "dense" and len(names) >= 3
  assert {(n, b) for n in names for b in (1, *s.inference_batches)} == {(r["name"], r["batch"]) for r in inference}
  assert all(r["speedup"] == 1.0 for r in inference if r["name"] == "dense")
  assert all(r["macs_ratio"] > 1.0 for r in inference if r["name"] != "dense")

  recipe = [r for r in rows if r["table"] == "recipe"]
  assert [r["name"] for r in recipe] == ["pretrain", "search", "finetune_blocks", "prune", "finetune_channels"]
  for r in recipe:
    assert r["seconds"] > 0 and r["params"] > 0 and r["macs"] > 0
    if r["name"] != "prune":
      assert r["epochs"] == s.max_epochs and 0.0 <= r["accuracy"] <= 1.0
  assert recipe[-1]["macs"] < recipe[0]["macs"]  # channels were pruned
  final = {r["name"]: r for r in rows if r["table"] == "final"}
  assert set(final) == {"dense", "pruned"} and final["pruned"]["macs"] < final["dense"]["macs"]
  assert record["recipe"]["status"] == "complete"
  assert record["recipe"]["data"] == {**record["recipe"]["data"], "train_images": 80, "test_images": 50}
  assert [p["stage"] for p in record["recipe"]["plan"]] == list(acc.STAGES)

  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows) and set(table[0]) == set(acc.CSV_COLUMNS)
  stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
  assert stages == set(acc.TRAINING_STAGES)
  md = (out / "results.md").read_text()
  assert "jax " in md and "## Train steps" in md and "Dense vs pruned" in md and "![plots](plots.png)" in md
  assert (out / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  log = (out / "log.txt").read_text()
  assert "[bench] device: cpu" in log and "[recipe] [plan] pretrain" in log


def test_plan_shares_the_time_by_weight_within_bounds():
  weights = acc.parse_weights(acc.DEFAULT_WEIGHTS)
  stages = list(acc.TRAINING_STAGES)
  epoch = {s: 10.0 for s in stages}
  overhead = {s: 5.0 for s in stages}
  # 900 s: 20 s of overhead, 880 s shared 4:2:1:2 -> pretrain 391 s = 39 epochs
  assert acc.plan_epochs("pretrain", stages, 900.0, epoch, overhead, weights, 160) == 39
  assert acc.plan_epochs("search", stages[1:], 900.0, epoch, overhead, weights, 160) == 35  # 885 * 2/5
  assert acc.plan_epochs("pretrain", stages, 900.0, epoch, overhead, weights, 12) == 12  # capped
  assert acc.plan_epochs("pretrain", stages, -50.0, epoch, overhead, weights, 160) == 1  # late: still one
  assert acc.plan_epochs("pretrain", stages, 900.0, {**epoch, "pretrain": math.inf}, overhead, weights, 160) == 1
  with pytest.raises(ValueError, match="unknown stage 'prune'"):
    acc.parse_weights("prune=1")
  with pytest.raises(ValueError, match="positive weight"):
    acc.parse_weights("pretrain=0")


def test_planner_sets_epochs_and_learns_from_the_stage_before(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  now = [1000.0]
  planner = acc.StagePlanner(deadline=1000.0 + 600, reserve_s=20.0, train_images=50_000, test_images=10_000,
                             batch_size=100, step_s={"dense": 0.01, "search": 0.02}, compile_s=10.0,
                             weights={"pretrain": 1, "search": 1, "finetune_blocks": 1, "finetune_channels": 1},
                             max_epochs=100, stages=list(acc.STAGES), metrics_path=str(metrics), clock=lambda: now[0])

  config = types.SimpleNamespace(stages={s: types.SimpleNamespace(epochs=0) for s in acc.STAGES})
  # estimates from the throughput: 500 steps x 10 ms = 5 s + eval (1/15 of it) + 0.5 s; 17 s to start
  assert planner.epoch_s["pretrain"] == pytest.approx(5.0 * (1 + 1 / 15) + 0.5)
  planner("pretrain", config)
  first = config.stages["pretrain"].epochs  # (580 - 4 x 17) / 4 / 5.83 s
  assert first == int((580 - 4 * 17) / 4 / planner.epoch_s["pretrain"])
  # pretraining really took 3 s per epoch after a first one of 20 s, and 100 s in all
  metrics.write_text("".join(json.dumps({"stage": "pretrain", "epoch": e + 1, "epoch_seconds": 20.0 if e == 0 else 3.0})
                             + "\n" for e in range(first)))
  now[0] += 100.0
  planner("search", config)
  assert planner.wall_s["pretrain"] == 100.0
  assert planner.epoch_s["search"] == pytest.approx(planner._epoch(6.0))  # 3 s x the search / dense ratio
  assert planner.epoch_s["finetune_blocks"] == pytest.approx(planner._epoch(3.0))
  overhead = 100.0 - first * planner._epoch(3.0)
  assert planner.overhead_s["finetune_blocks"] == pytest.approx(overhead)  # measured, no longer the prior
  assert config.stages["search"].epochs == acc.plan_epochs(
      "search", ["search", "finetune_blocks", "finetune_channels"], 1600.0 - 1100.0 - 20.0,
      planner.epoch_s, planner.overhead_s, planner.weights, 100)
  now[0] += 50.0
  planner("prune", config)  # not a training stage: timed, not planned
  assert planner.history[-1] == {"stage": "prune", "at_s": now[0]}
  planner.finish()
  assert planner.wall_s["prune"] == 0.0


@pytest.mark.parametrize("ignores_interrupt", [False, True])
def test_supervisor_interrupts_then_kills_a_late_phase(tmp_path, ignores_interrupt):
  code = ("import signal, time\n"
          + ("signal.signal(signal.SIGINT, signal.SIG_IGN)\n" if ignores_interrupt else "")
          + "try:\n  print('sleeping', flush=True)\n  time.sleep(60)\n"
          + "except KeyboardInterrupt:\n  print('writing what it has', flush=True)\n")
  log = acc.Log(str(tmp_path / "log.txt"))
  proc = acc.start_child([sys.executable, "-c", code], log, "late")
  deadline = time.time() + 60  # the interpreter is up and sleeping (slow to start on a loaded machine)
  while "sleeping" not in (tmp_path / "log.txt").read_text() and time.time() < deadline:
    time.sleep(0.05)
  start = time.time()
  status = acc.supervise(proc, start + 0.5, start + 2.5)
  log.close()
  assert status["interrupted"] and status["killed"] == ignores_interrupt
  assert status["ended"] - start < (3.5 if ignores_interrupt else 1.5)
  assert ("writing what it has" in (tmp_path / "log.txt").read_text()) != ignores_interrupt


def test_without_matplotlib_the_reports_skip_their_plots(tmp_path, monkeypatch):
  """The lent machine may lack matplotlib: the pipeline's report and this script's results say so instead."""
  from bpcp_jax.run import report

  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
  assert not acc.write_plots(str(tmp_path / "plots.png"), [], [])
  assert not (tmp_path / "plots.png").exists()
  net = {"accuracy": 0.5, "params": 10, "macs": 100, "blocks_kept": ["stage0_block0"], "latency_ms_b1": 1.0,
         "channels_per_group": {"stem": 16}}
  summary = {"model": "resnet_v1_8", "dense": net, "pruned": {**net, "macs": 50},
             "reduction": {"macs_removed_pct": 50.0, "params_removed_pct": 0.0, "accuracy_drop_pct_points": 0.0}}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "pretrain", "epoch": 1, "train_accuracy": 0.4}) + "\n")
  with open(report.write_report(str(tmp_path))) as f:
    text = f.read()
  assert "| dense | 50.00 |" in text and "Plots skipped: matplotlib is not installed." in text
  assert not list(tmp_path.glob("*.png"))
