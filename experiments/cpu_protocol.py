"""Runs the CPU protocol (experiments/configs/cpu_protocol.py): five rows from one dense network.

  python experiments/cpu_protocol.py --workdir runs/cpu_protocol [--data PATH]

Rows: ``dense`` (pretraining), ``bp`` (block search + fine-tune from dense), ``cp`` (|BN scale|
channel pruning to 50% of the MACs + fine-tune from dense), ``bpcp`` (channel pruning of the
``bp`` network + fine-tune), ``random`` (random channels at the same MACs budget as ``cp`` +
fine-tune from dense). Every command is printed and timed; a row whose ``summary.json`` exists
is skipped, and an interrupted one resumes. At the end the rows are collected into
``<workdir>/results.csv``, ``results.md`` and plots, which are also copied to
``experiments/results/cpu_protocol/`` with ``protocol.json`` (commands, wall times, machine).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("experiments", "configs", "cpu_protocol.py")


def rows(workdir):
  r = lambda name: os.path.join(workdir, "runs", name)  # noqa: E731
  ck = lambda name, stage: os.path.join(r(name), "checkpoints", stage)  # noqa: E731
  return [
      ("dense", ["train", "--workdir", r("dense")]),
      ("bp", ["pipeline", "--workdir", r("bp"), "--from", ck("dense", "pretrain"),
              "--config.stages.run=search,finetune_blocks"]),
      ("cp", ["pipeline", "--workdir", r("cp"), "--from", ck("dense", "pretrain"),
              "--config.stages.run=prune,finetune_channels"]),
      ("bpcp", ["pipeline", "--workdir", r("bpcp"), "--from", ck("bp", "finetune_blocks"),
                "--config.stages.run=prune,finetune_channels"]),
      ("random", ["pipeline", "--workdir", r("random"), "--from", ck("dense", "pretrain"),
                  "--config.stages.run=prune,finetune_channels", "--config.stages.prune.criterion=random"]),
  ]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs/cpu_protocol")
  ap.add_argument("--data", default=None)
  ap.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "cpu_protocol"))
  a = ap.parse_args()
  log_path = os.path.join(a.workdir, "protocol.json")
  os.makedirs(a.workdir, exist_ok=True)
  log = {"rows": {}}
  if os.path.exists(log_path):
    with open(log_path) as f:
      log = json.load(f)
  log["machine"] = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()}
  for name, args in rows(a.workdir):
    summary = os.path.join(a.workdir, "runs", name, "summary.json")
    if os.path.exists(summary):
      print(f"[{name}] done already, skipping")
      continue
    cmd = ["bpcp-jax", *args[:1], "--config", CONFIG, *args[1:], "--no-progress"]
    if a.data:
      cmd += ["--data", a.data]
    if os.path.isdir(os.path.join(a.workdir, "runs", name, "checkpoints")):
      cmd.append("--resume")
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    seconds = time.time() - t0
    log["rows"].setdefault(name, {"command": " ".join(c for c in cmd if c != "--resume"), "seconds": 0.0})
    log["rows"][name]["seconds"] += seconds
    with open(log_path, "w") as f:
      json.dump(log, f, indent=2)
  log["total_seconds"] = sum(r["seconds"] for r in log["rows"].values())
  with open(log_path, "w") as f:
    json.dump(log, f, indent=2)

  sys.path.insert(0, REPO)
  from bpcp_jax.run.sweep import collect_results, write_results

  results = collect_results(a.workdir)
  written = write_results(a.workdir, results)
  os.makedirs(a.out, exist_ok=True)
  for path in [log_path, *written.values()]:
    if os.path.isfile(path):
      shutil.copy(path, a.out)
  print(f"results in {a.out}; total wall time {log['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
  main()
