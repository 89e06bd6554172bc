"""The `bpcp-jax` pipeline end to end on real CIFAR-10 images, resume, and pruned checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.training.checkpoint import StageCheckpoints, load_network
from bpcp_jax.training.loop import TIMING_KEYS
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")


def _cli(args, env_extra=None, **kw):
  env = {**os.environ, "XLA_FLAGS": "", **(env_extra or {})}
  return subprocess.Popen([sys.executable, "-m", "bpcp_jax.run.cli", *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _json(path):
  with open(path) as f:
    return json.load(f)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _run(args, env_extra=None, timeout=600):
  p = _cli(args, env_extra)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar_archive):
  workdir = str(tmp_path_factory.mktemp("tiny") / "run")
  cache = str(tmp_path_factory.mktemp("cache"))
  code, out = _run(["pipeline", "--config", TINY, "--workdir", workdir, "--data", cifar_archive, "--no-progress",
                    f"--config.data.cache_dir={cache}"])
  assert code == 0, out
  return workdir, cache, out


def test_pipeline_writes_the_run_directory(tiny_run):
  workdir, _, out = tiny_run
  for name in ("config.json", "metrics.jsonl", "summary.json", "report.md", "accuracy.png", "gates.png",
               "channels.png", "prune_report.md"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  for stage in ("pretrain", "search", "finetune_blocks", "prune", "finetune_channels"):
    assert os.path.isdir(os.path.join(workdir, "checkpoints", stage)), stage
  summary = _json(os.path.join(workdir, "summary.json"))
  for section in ("dense", "pruned"):
    for key in ("accuracy", "params", "macs", "latency_ms_b1", "blocks_kept", "channels_per_group"):
      assert key in summary[section], (section, key)
  assert summary["pruned"]["params"] < summary["dense"]["params"]
  assert summary["data"]["test_images"] == 100
  records = _jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["stage"] for r in records] == ["pretrain"] * 2 + ["search"] * 2 + ["finetune_blocks", "finetune_channels"]
  assert all("gate_probs" in r for r in records if r["stage"] == "search")
  assert "| dense |" in out and "| pruned |" in out
  assert os.listdir(os.environ["BPCP_COMPILATION_CACHE"])  # the command line stored what it compiled


def test_pruned_checkpoint_restores_alone(tiny_run, cifar_archive):
  workdir, cache, _ = tiny_run
  final = os.path.join(workdir, "checkpoints", "finetune_channels")
  model, variables = load_network(final)
  summary = _json(os.path.join(workdir, "summary.json"))
  assert model.spec == bp.ArchSpec.from_dict(summary["pruned"]["spec"])
  assert bp.count_leaves(variables["params"]) == summary["pruned"]["params"]
  # the same accuracy on the same 100 test images, from the checkpoint directory alone
  code, out = _run(["eval", "--config", TINY, "--from", final, "--data", cifar_archive, "--no-progress",
                    f"--config.data.cache_dir={cache}"])
  assert code == 0, out
  result = json.loads(out.strip().splitlines()[-1])
  assert result["accuracy"] == pytest.approx(summary["pruned"]["accuracy"], abs=1e-9)


def test_rerun_without_resume_refuses_to_overwrite(tiny_run, cifar_archive):
  workdir, cache, _ = tiny_run
  code, out = _run(["pipeline", "--config", TINY, "--workdir", workdir, "--data", cifar_archive, "--no-progress",
                    f"--config.data.cache_dir={cache}"])
  assert code == 2 and "--resume" in out and "pretrain" in out


def _final_tree(workdir):
  ck = StageCheckpoints(os.path.join(workdir, "checkpoints", "finetune_channels"), read_only=True)
  tree, _ = ck.restore_raw()
  ck.close()
  return tree


def _records(workdir):
  rows = _jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_killed_mid_stage_and_resumed_equals_uninterrupted(tiny_run, tmp_path, cifar_archive):
  ref_dir, cache, _ = tiny_run
  workdir = str(tmp_path / "killed")
  args = ["pipeline", "--config", TINY, "--workdir", workdir, "--data", cifar_archive, "--no-progress",
          f"--config.data.cache_dir={cache}"]
  proc = _cli(args)
  search_dir = os.path.join(workdir, "checkpoints", "search")
  deadline = time.time() + 300
  while time.time() < deadline:  # kill once the search has a mid-epoch checkpoint
    steps = [int(d) for d in os.listdir(search_dir) if d.isdigit()] if os.path.isdir(search_dir) else []
    if any(s % 5 for s in steps):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert any(s % 5 for s in steps), f"the run was not killed mid-epoch (checkpoints: {steps})"
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  code, out = _run(args + ["--resume"])
  assert code == 0, out
  ref, got = _final_tree(ref_dir), _final_tree(workdir)
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)  # bit for bit on CPU
  assert _records(ref_dir) == _records(workdir)
  ref_sum = _json(os.path.join(ref_dir, "summary.json"))
  got_sum = _json(os.path.join(workdir, "summary.json"))
  assert ref_sum["pruned"]["accuracy"] == got_sum["pruned"]["accuracy"]
  assert ref_sum["pruned"]["spec"] == got_sum["pruned"]["spec"]


def test_subcommands_chain_from_checkpoints(tiny_run, tmp_path, cifar_archive):
  workdir, cache, _ = tiny_run
  common = ["--config", TINY, "--data", cifar_archive, "--no-progress", f"--config.data.cache_dir={cache}"]
  bp_dir = str(tmp_path / "bp")
  code, out = _run(["search-blocks", "--workdir", bp_dir,
                    "--from", os.path.join(workdir, "checkpoints", "pretrain"), *common])
  assert code == 0, out
  assert os.listdir(os.path.join(bp_dir, "checkpoints")) == ["search"]
  cp_dir = str(tmp_path / "cp")
  code, out = _run(["prune-channels", "--workdir", cp_dir, "--from", os.path.join(bp_dir, "checkpoints", "search"),
                    "--config.stages.prune.criterion=l1", *common])
  assert code == 0, out
  summary = _json(os.path.join(cp_dir, "summary.json"))
  assert summary["pruned"]["macs"] < summary["dense"]["macs"]
  code, out = _run(["profile", "--workdir", workdir, *common])
  assert code == 0 and "latency_ms_b1" in out, out
  code, out = _run(["search-blocks", "--workdir", str(tmp_path / "x"), *common])
  assert code == 2 and "--from" in out


def test_prune_channels_with_speed_aware_selection(tiny_run, tmp_path, cifar_archive):
  workdir, cache, _ = tiny_run
  out_dir = str(tmp_path / "speed")
  code, out = _run(["prune-channels", "--workdir", out_dir, "--from", os.path.join(workdir, "checkpoints", "pretrain"),
                    "--config", TINY, "--data", cifar_archive, "--no-progress", f"--config.data.cache_dir={cache}",
                    "--config.stages.prune.selection=speed", "--config.stages.prune.cost=latency",
                    "--config.stages.prune.target=macs", "--config.stages.prune.ratio=0.5",
                    "--config.stages.prune.round_to=4"])
  assert code == 0, out
  summary = _json(os.path.join(out_dir, "summary.json"))
  assert summary["pruned"]["macs"] <= 0.5 * summary["dense"]["macs"]
  with open(os.path.join(out_dir, "prune_report.md")) as f:
    report = f.read()
  assert "Speed-aware selection: cost latency at batch 1, round_to 4" in report and "target met" in report
  code, out = _run(["prune-channels", "--workdir", str(tmp_path / "bad"), "--from",
                    os.path.join(workdir, "checkpoints", "pretrain"), "--config", TINY, "--data", cifar_archive,
                    "--config.stages.prune.selection=fast"])
  assert code == 2 and "stages.prune.selection" in out and "'fast'" in out, out
