"""Your own Flax network through the command line: ``model=file.py:factory``, ``init_from``, resume.

A VGG-style network (BatchNorm, dropout, no residual block) goes through `bpcp-jax pipeline` from
weights saved with ``flax.serialization.to_bytes``, and its pruned checkpoint loads with
``bp.load_network`` in a fresh process to the accuracy the summary reports. A small residual
network is killed twice and resumed, and ends bit for bit where an uninterrupted run ends.
"""

import pytest
import json
import os
import signal
import subprocess
import sys

import flax
import jax
import numpy as np

import bpcp_jax as bp
from tests.conftest import REPO_ROOT
from tests.test_faults import _assert_same_run, _final, _kill_when, _popen, _saving

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
USER_MODELS = os.path.join(REPO_ROOT, "tests", "user_models.py")


def _args(workdir, cache, data, factory, *extra):
  return ["pipeline", "--config", TINY, "--workdir", workdir, "--data", data, "--no-progress",
          f"--config.data.cache_dir={cache}", f"--config.model={USER_MODELS}:{factory}", *extra]


def test_user_network_from_its_weights_to_a_reloadable_pruned_network(tmp_path, cifar_archive):
  net = bp.FlaxNetwork.from_factory(f"{USER_MODELS}:make_vgg", 10, (32, 32, 3))
  variables = jax.device_get(net.init(jax.random.PRNGKey(7)))
  weights = tmp_path / "vgg.msgpack"
  weights.write_bytes(flax.serialization.to_bytes(variables))
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
  p = _popen(_args(workdir, cache, cifar_archive, "make_vgg", f"--config.init_from={weights}"))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert "skipped: starting from the trained weights" in out and "no residual blocks" in out, out
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert "pretrain" not in summary["stages"]
  assert summary["pruned"]["network"]["kind"] == "flax" and summary["pruned"]["params"] < summary["dense"]["params"]
  # the dense row is the user's network with the user's weights
  assert summary["dense"]["params"] == sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
  final = os.path.join(workdir, "checkpoints", "finetune_channels")
  program = f"""
import json, numpy as np, bpcp_jax as bp
from bpcp_jax.training import data
model, variables = bp.load_network({final!r})
test = data.load_image_folder({cifar_archive!r}, "test", max_per_class=10, cache_dir={cache!r}, progress=False)
logits = bp.make_predictor(model, variables)(data.normalize(test.images))
correct = int(np.sum(np.argmax(logits, -1) == test.labels))
print(json.dumps({{"accuracy": correct / len(test.labels), "type": type(model).__name__}}))
"""
  res = subprocess.run([sys.executable, "-c", program], cwd=str(tmp_path), capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": ""})
  assert res.returncode == 0, res.stderr
  loaded = json.loads(res.stdout.strip().splitlines()[-1])
  assert loaded["accuracy"] == summary["pruned"]["accuracy"]
  assert loaded["type"] == "VGG"  # the user's own class, narrowed: not the traced program


def _has_checkpoint(workdir, stage):
  d = os.path.join(workdir, "checkpoints", stage)
  return os.path.isdir(d) and any(x.isdigit() for x in os.listdir(d))


@pytest.mark.slow  # a minute and a half (README: pytest -m slow); the families' SIGKILL test stays in CI
def test_user_network_killed_twice_resumes_bit_for_bit(tmp_path, cifar_archive):
  cache = str(tmp_path / "cache")
  ref = str(tmp_path / "ref")
  p = _popen(_args(ref, cache, cifar_archive, "make_resnet"))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  work = str(tmp_path / "killed")
  args = _args(work, cache, cifar_archive, "make_resnet")
  outcomes = []
  # killed inside the block search (after its first checkpoint), then during a later checkpoint write
  proc = _popen(args)
  outcomes.append(_kill_when(proc, lambda: _has_checkpoint(work, "search")))
  proc = _popen(args + ["--resume"])
  outcomes.append(_kill_when(proc, lambda: _has_checkpoint(work, "finetune_blocks") and _saving(work)))
  assert sum(code == -signal.SIGKILL for code, _ in outcomes) >= 1, [(c, o[-2000:]) for c, o in outcomes]
  proc = _popen(args + ["--resume"])
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  _assert_same_run(_final(ref), _final(work))
