"""Faults during a run: SIGKILL at random moments (also mid-save) loses nothing; NaN stops cleanly."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from bpcp_jax.checkpoint import StageCheckpoints
from bpcp_jax.loop import TIMING_KEYS
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
STAGES = ("pretrain", "search", "finetune_blocks", "prune", "finetune_channels")


def _args(workdir, cache, data):
  return ["pipeline", "--config", TINY, "--workdir", workdir, "--data", data, "--no-progress",
          f"--config.data.cache_dir={cache}"]


def _popen(args):
  env = {**os.environ, "XLA_FLAGS": ""}
  return subprocess.Popen([sys.executable, "-m", "bpcp_jax.cli", *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _saving(workdir):
  """True while orbax is writing a checkpoint (its temporary directory exists)."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return False
  return any("tmp" in d for s in os.listdir(root) for d in os.listdir(os.path.join(root, s))
             if os.path.isdir(os.path.join(root, s)))


def _kill_when(proc, condition, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not condition():
    time.sleep(0.005)
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate()
  return proc.returncode, out


def _final(workdir):
  ck = StageCheckpoints(os.path.join(workdir, "checkpoints", "finetune_channels"), read_only=True)
  tree, meta = ck.restore_raw()
  ck.close()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in f]
  return tree, records


def test_sigkill_at_random_points_then_resume_is_exact(tmp_path, cifar_archive):
  cache = str(tmp_path / "cache")
  ref = str(tmp_path / "ref")
  t0 = time.time()
  p = _popen(_args(ref, cache, cifar_archive))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  duration = time.time() - t0

  work = str(tmp_path / "killed")
  args = _args(work, cache, cifar_archive)
  rng = random.Random(1234)
  outcomes = []
  # two kills at random moments, one during a checkpoint write, then run to the end
  for how in ("random", "random", "saving"):
    proc = _popen(args + (["--resume"] if os.path.isdir(os.path.join(work, "checkpoints")) else []))
    if how == "random":
      t_end = time.time() + rng.uniform(0.25, 0.6) * duration  # somewhere inside the run
      outcomes.append(_kill_when(proc, lambda: time.time() > t_end))
    else:
      outcomes.append(_kill_when(proc, lambda: _saving(work)))
  kills = sum(code == -signal.SIGKILL for code, _ in outcomes)
  assert kills >= 2, [(code, out[-2000:]) for code, out in outcomes]
  proc = _popen(args + ["--resume"])
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out

  (ref_tree, ref_records), (tree, records) = _final(ref), _final(work)
  for a, b in zip(jax.tree.leaves(ref_tree), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)
  assert records == ref_records
  with open(os.path.join(ref, "summary.json")) as f1, open(os.path.join(work, "summary.json")) as f2:
    assert json.load(f1)["pruned"]["accuracy"] == json.load(f2)["pruned"]["accuracy"]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cifar_archive):
  work = str(tmp_path / "nan")
  proc = _popen(_args(work, str(tmp_path / "cache"), cifar_archive) + ["--config.stages.pretrain.lr=1e12"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 3, out
  assert "non-finite" in out and "pretrain" in out and "--resume" in out and "step" in out
  assert "Traceback" not in out
  ck = StageCheckpoints(os.path.join(work, "checkpoints", "pretrain"), read_only=True)
  for step in ck.all_steps():  # whatever was kept restores, and is finite
    tree, _ = ck.restore_raw(step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype,
                                                                                          np.floating))
  ck.close()
  assert not os.path.exists(os.path.join(work, "summary.json"))
