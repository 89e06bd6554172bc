"""The `bpcp-jax` pipeline end to end on real CIFAR-10 images, resume (also past damaged
checkpoints), what the command line says, the reports, and pruned checkpoints."""

import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.training.checkpoint import CheckpointError, CheckpointWarning, StageCheckpoints, load_network, load_stage
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
  # it said what it was about to run before running it
  for line in ("config: ", "network: resnet_v1_8: 78,042 params", "stages: pretrain 2 epochs",
               "-> prune (bn_scale, 30% of channels) -> finetune_channels 1 epoch", "at most 16 train and 10 test",
               "devices: 1 x cpu", "data loaded: 160 train and 100 test images"):
    assert line in out, (line, out)
  assert out.index("devices:") < out.index("| network |")
  # --no-progress hides the bars only: the epoch lines stay (bp_protocol's rows run with it)
  for line in ("[pretrain] epoch 1/2: loss", "[pretrain] epoch 2/2: loss", "[finetune_channels] epoch 1/1: loss"):
    assert line in out, (line, out)
  assert "it/s]" not in out  # no tqdm bar
  # rows say what they are; a latency column for every profiled batch size, with its spread
  assert summary["dense"]["label"] == "dense, pretrained"
  assert summary["pruned"]["label"].endswith("pruned, after finetune_channels")
  assert "| dense, pretrained |" in out and "latency b1 ms | latency b8 ms |" in out and "nan" not in out
  for b in ("b1", "b8"):
    s = summary["dense"]["latency_spread_ms"][b]
    assert s["q25"] <= s["median"] <= s["q75"] and s["rounds"] == 3
    assert summary["speedup_spread"][b]["rounds"] == 3
  # the search decided: every block's keep probability is far from 0.5
  search = summary["block_search"]
  assert search["unsettled"] == [] and "warning" not in out, out
  assert all(b["margin"] >= 0.2 for b in search["blocks"].values())
  assert len(summary["pruned"]["blocks_kept"]) == search["kept"]
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


def test_resume_of_a_finished_run_changes_nothing(tiny_run, cifar_archive):
  workdir, cache, _ = tiny_run
  files = ("summary.json", "config.json", "report.md")
  before = {f: os.stat(os.path.join(workdir, f)).st_mtime_ns for f in files}
  # another setting: refused, naming the key and both values; config.json keeps what was used
  code, out = _run(["pipeline", "--config", TINY, "--workdir", workdir, "--data", cifar_archive, "--resume",
                    f"--config.data.cache_dir={cache}", "--config.stages.prune.ratio=0.6"])
  assert code == 2 and "stages.prune.ratio: run 0.3, now 0.6" in out and "Traceback" not in out, out
  # the same settings (from the run's own config.json): finished, nothing measured or written again
  code, out = _run(["pipeline", "--workdir", workdir, "--data", cifar_archive, "--resume", "--no-progress"])
  assert code == 0 and "has finished" in out and "config.json (--resume without --config)" in out, out
  assert {f: os.stat(os.path.join(workdir, f)).st_mtime_ns for f in files} == before
  assert _json(os.path.join(workdir, "config.json"))["stages"]["prune"]["ratio"] == 0.3


# every kind of damage a full disk or a cut copy leaves, each once at a stage's end and once mid-stage
def _truncate(step_dir):
  for f in glob.glob(os.path.join(step_dir, "**"), recursive=True):
    if os.path.isfile(f):
      os.truncate(f, os.path.getsize(f) // 2)


def _empty_arrays(step_dir):
  for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    os.truncate(f, 0)


def _garble_meta(step_dir):
  with open(os.path.join(step_dir, "meta", "metadata"), "wb") as f:
    f.write(b"\xff\xfe{garbled")


def _empty_dir(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def _missing_files(step_dir):
  for f in glob.glob(os.path.join(step_dir, "state", "**", "manifest.ocdbt"), recursive=True):
    os.remove(f)


DAMAGE = {"truncated": _truncate, "arrays emptied": _empty_arrays, "metadata garbled": _garble_meta,
          "step directory empty": _empty_dir, "files missing": _missing_files}


def test_damaged_checkpoints_are_skipped_and_the_run_ends_as_undamaged(tiny_run, tmp_path, cifar_archive):
  ref, cache, _ = tiny_run
  work = str(tmp_path / "damaged")
  shutil.copytree(ref, work)
  os.remove(os.path.join(work, "summary.json"))  # as if killed while the summary was computed
  ck = os.path.join(work, "checkpoints")
  # (stage, step, damage): every stage's final checkpoint, then mid-stage ones; pretrain and search
  # fall back to step 6, finetune_blocks to 2, prune and finetune_channels have none left
  plan = [("pretrain", 10, "truncated"), ("search", 10, "arrays emptied"), ("finetune_blocks", 5, "metadata garbled"),
          ("prune", 0, "step directory empty"), ("finetune_channels", 5, "files missing"),
          ("pretrain", 8, "files missing"), ("search", 8, "truncated"), ("finetune_blocks", 4, "arrays emptied"),
          ("finetune_channels", 4, "metadata garbled"), ("finetune_channels", 2, "step directory empty")]
  for stage, step, kind in plan:
    DAMAGE[kind](os.path.join(ck, stage, str(step)))
  code, out = _run(["pipeline", "--config", TINY, "--workdir", work, "--data", cifar_archive, "--no-progress",
                    f"--config.data.cache_dir={cache}", "--resume"])
  assert code == 0 and "Traceback" not in out and "Event loop" not in out, out
  for stage, step, kind in plan:
    assert f"skipping unreadable checkpoint {os.path.join(ck, stage, str(step))} (" in out, (stage, step, kind, out)
  assert f"no readable checkpoint left in {os.path.join(ck, 'finetune_channels')}" in out
  assert f"resuming from checkpoint {os.path.join(ck, 'pretrain', '6')}" in out
  # bit for bit where the undamaged run ended, the same metrics, the damaged steps moved aside
  ref_tree, got_tree = _final_tree(ref), _final_tree(work)
  for a, b in zip(jax.tree.leaves(ref_tree), jax.tree.leaves(got_tree), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _records(ref) == _records(work)
  assert _json(os.path.join(ref, "summary.json"))["pruned"]["accuracy"] == \
      _json(os.path.join(work, "summary.json"))["pruned"]["accuracy"]
  assert os.path.isdir(os.path.join(ck, "pretrain", "10.damaged"))


def test_damaged_checkpoints_for_load_network_and_eval(tiny_run, tmp_path, cifar_archive):
  ref, _, _ = tiny_run
  stage = str(tmp_path / "pretrain")
  shutil.copytree(os.path.join(ref, "checkpoints", "pretrain"), stage)
  _truncate(os.path.join(stage, "10"))
  with pytest.warns(CheckpointWarning, match=os.path.join(stage, "10")):
    _, variables, meta = load_stage(stage)
  assert meta["step"] == 8 and os.path.isdir(os.path.join(stage, "10"))  # read-only: skipped, left in place
  for step in ("8", "6"):
    _garble_meta(os.path.join(stage, step))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", CheckpointWarning)
    with pytest.raises(CheckpointError, match=f"no readable checkpoint in {stage}: every one is damaged"):
      load_stage(stage)
  code, out = _run(["eval", "--config", TINY, "--from", stage, "--data", cifar_archive, "--no-progress"])
  assert code == 2 and "Traceback" not in out, out
  assert f"no readable checkpoint in {stage}" in out and f"skipping unreadable checkpoint {stage}/10" in out, out


def _final_tree(workdir):
  ck = StageCheckpoints(os.path.join(workdir, "checkpoints", "finetune_channels"), read_only=True)
  tree, _ = ck.restore_raw()
  ck.close()
  return tree


def _records(workdir):
  rows = _jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_ctrl_c_says_where_it_stopped_and_how_to_resume(tiny_run, tmp_path, cifar_archive):
  ref, cache, _ = tiny_run
  work = str(tmp_path / "interrupted")
  args = ["pipeline", "--config", TINY, "--workdir", work, "--data", cifar_archive, "--no-progress",
          f"--config.data.cache_dir={cache}"]
  proc = _cli(args)
  search = os.path.join(work, "checkpoints", "search")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # Ctrl-C as the search's first checkpoint is written
    if os.path.isdir(search) and os.listdir(search):
      break
    time.sleep(0.002)
  proc.send_signal(signal.SIGINT)  # while the save is written, or just after it: mid-epoch either way
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, out
  assert "Traceback" not in out and "interrupted in stage search at step" in out, out
  last = out.split("last checkpoint: ")[1].split()[0]
  assert os.path.dirname(last) == search and os.path.isdir(last), out  # the save in progress was completed
  command = shlex.split(out.split("resume with: ")[1].splitlines()[0])
  assert command[0] == "bpcp-jax" and command[1:] == args + ["--resume"], out
  assert not os.path.exists(os.path.join(work, "summary.json"))
  code, out = _run(command[1:])  # the printed command resumes mid-epoch and ends bit for bit as uninterrupted
  assert code == 0, out
  for a, b in zip(jax.tree.leaves(_final_tree(ref)), jax.tree.leaves(_final_tree(work)), strict=True):
    np.testing.assert_array_equal(a, b)  # bit for bit on CPU
  assert _records(ref) == _records(work)
  ref_sum, got_sum = _json(os.path.join(ref, "summary.json")), _json(os.path.join(work, "summary.json"))
  assert ref_sum["pruned"]["accuracy"] == got_sum["pruned"]["accuracy"] and ref_sum["pruned"]["spec"] == got_sum["pruned"]["spec"]


def test_subcommands_chain_from_checkpoints(tiny_run, tmp_path, cifar_archive):
  workdir, cache, _ = tiny_run
  common = ["--config", TINY, "--data", cifar_archive, "--no-progress", f"--config.data.cache_dir={cache}"]
  # train alone: one network, one row, no speed-up between a network and itself
  dense_dir = str(tmp_path / "dense")
  code, out = _run(["train", "--workdir", dense_dir, "--config.stages.pretrain.epochs=1", *common])
  assert code == 0, out
  summary = _json(os.path.join(dense_dir, "summary.json"))
  assert summary["identical"] and summary["reduction"]["speedup_b1"] == 1.0
  assert out.count("| dense, pretrained |") == 1 and "nothing was pruned" in out and "speed-up" not in out, out
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
  assert summary["dense"]["label"].startswith("input: search checkpoint")
  # fine-tuning a pruned network: the input is called what it is, and one architecture is timed once
  ft_dir = str(tmp_path / "ft")
  code, out = _run(["finetune", "--workdir", ft_dir, "--from", os.path.join(cp_dir, "checkpoints", "prune"), *common])
  assert code == 0, out
  summary = _json(os.path.join(ft_dir, "summary.json"))
  assert summary["dense"]["label"].startswith("input: prune checkpoint") and "dense" not in summary["dense"]["label"]
  assert summary["pruned"]["label"] == "same architecture, after finetune_channels"
  assert summary["same_architecture"] and not summary["identical"]
  assert summary["reduction"]["speedup_b1"] == 1.0 and summary["reduction"]["speedup_b8"] == 1.0
  assert summary["pruned"]["latency_ms_b1"] == summary["dense"]["latency_ms_b1"]
  assert "timed once, speed-up 1.00x by construction" in out, out
  code, out = _run(["profile", "--workdir", workdir, "--config", TINY])
  assert code == 0 and "latency b1 ms" in out and "interleaved rounds" in out, out
  code, out = _run(["search-blocks", "--workdir", str(tmp_path / "x"), *common])
  assert code == 2 and "--from" in out
  # a run directory given where a stage directory is meant: the stage directories are suggested
  code, out = _run(["search-blocks", "--workdir", str(tmp_path / "y"), "--from", workdir, *common])
  assert code == 2 and os.path.join(workdir, "checkpoints", "pretrain") in out and "did you mean" in out, out
  assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")  # refused: nothing created


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
