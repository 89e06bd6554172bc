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

from bpcp_jax.training.checkpoint import StageCheckpoints
from bpcp_jax.training.loop import TIMING_KEYS
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
STAGES = ("pretrain", "search", "finetune_blocks", "prune", "finetune_channels")


def _args(workdir, cache, data):
  return ["pipeline", "--config", TINY, "--workdir", workdir, "--data", data, "--no-progress",
          f"--config.data.cache_dir={cache}"]


def _popen(args, **env_vars):
  env = {**os.environ, "XLA_FLAGS": "", **env_vars}
  return subprocess.Popen([sys.executable, "-m", "bpcp_jax.run.cli", *args], cwd=REPO_ROOT, env=env,
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


def _assert_same_run(a, b):
  (a_tree, a_records), (b_tree, b_records) = a, b
  assert len(jax.tree.leaves(a_tree)) == len(jax.tree.leaves(b_tree))
  for x, y in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    np.testing.assert_array_equal(x, y)
  assert a_records == b_records


def test_sigkill_at_random_points_then_resume_is_exact(tmp_path, cifar_archive):
  cache = str(tmp_path / "cache")
  # an empty compilation cache (the first run compiles everything), and the allocator restart every
  # user's command makes (the other tests skip it): the killed process is the restarted one
  xla = {"BPCP_COMPILATION_CACHE": str(tmp_path / "xla"), "BPCP_NO_HOST_TUNING": ""}
  ref = str(tmp_path / "ref")
  p = _popen(_args(ref, cache, cifar_archive), **xla)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  # the same run again loads every step from the compilation cache: as fast as the runs below,
  # and it must compute exactly what the compiling run did
  again = str(tmp_path / "again")
  t0 = time.time()
  p = _popen(_args(again, cache, cifar_archive), **xla)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  duration = time.time() - t0
  _assert_same_run(_final(ref), _final(again))

  work = str(tmp_path / "killed")
  args = _args(work, cache, cifar_archive)
  rng = random.Random(1234)
  outcomes = []
  # two kills at random moments, one during a checkpoint write, then run to the end
  for how in ("random", "random", "saving"):
    proc = _popen(args + (["--resume"] if os.path.isdir(os.path.join(work, "checkpoints")) else []), **xla)
    if how == "random":
      t_end = time.time() + rng.uniform(0.25, 0.6) * duration  # somewhere inside the run
      outcomes.append(_kill_when(proc, lambda: time.time() > t_end))
    else:
      outcomes.append(_kill_when(proc, lambda: _saving(work)))
  kills = sum(code == -signal.SIGKILL for code, _ in outcomes)
  assert kills >= 2, [(code, out[-2000:]) for code, out in outcomes]
  proc = _popen(args + ["--resume"], **xla)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out

  _assert_same_run(_final(ref), _final(work))
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
