"""Bad input, run through the CLI as a user would: exit status 2 and a message naming the culprit."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import bpcp_jax as bp
from bpcp_jax.training import steps
from bpcp_jax.training.checkpoint import StageCheckpoints
from bpcp_jax.training.optim import make_optimizer
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cli(*args, devices=1):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  p = subprocess.run([sys.executable, "-m", "bpcp_jax.run.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  return p.returncode, p.stdout + p.stderr


def _folder(root, *, size=32, skip_class_in_test=None, corrupt=None, wrong_size=None):
  """A 10-class image folder with two images per class and split."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in CLASSES:
      if split == "test" and c == skip_class_in_test:
        continue
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(2):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(root, split, c, f"{i}.png"))
  if corrupt:
    with open(os.path.join(root, *corrupt), "wb") as f:
      f.write(b"this is not an image")
  if wrong_size:
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(os.path.join(root, *wrong_size))
  return root


@pytest.fixture
def run_args(tmp_path):
  return ["pipeline", "--config", TINY, "--workdir", str(tmp_path / "run"), "--no-progress",
          f"--config.data.cache_dir={tmp_path / 'cache'}"]


def _assert_error(code, out, *needles):
  assert code == 2, out
  assert "Traceback" not in out, out
  for n in needles:
    assert n in out, (n, out)


def test_missing_data_path(run_args, tmp_path):
  _assert_error(*_cli(*run_args, "--data", "/nonexistent/cifar.tar.gz"), "/nonexistent/cifar.tar.gz")
  assert not os.path.exists(tmp_path / "run")  # a refused command leaves no run directory behind


def test_empty_data_dir(run_args, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  _assert_error(*_cli(*run_args, "--data", str(empty)), str(empty))


def test_corrupt_image_is_named(run_args, tmp_path):
  root = _folder(str(tmp_path / "data"), corrupt=("train", "cat", "1.png"))
  _assert_error(*_cli(*run_args, "--data", root), "1.png", "cat")
  assert not os.path.exists(tmp_path / "run")


def test_wrong_image_size_is_named(run_args, tmp_path):
  root = _folder(str(tmp_path / "data"), wrong_size=("test", "dog", "0.png"))
  _assert_error(*_cli(*run_args, "--data", root), "0.png", "dog")


def test_class_missing_from_a_split(run_args, tmp_path):
  root = _folder(str(tmp_path / "data"), skip_class_in_test="frog")
  _assert_error(*_cli(*run_args, "--data", root), "frog", "test")


@pytest.mark.parametrize("override,needles", [
    ("--config.model=resnet_v2_57", ("57", "9n+2")),
    ("--config.model=vgg_16", ("vgg", "resnet_v2, resnet_v1_bottleneck, resnet_v1")),
    ("--config.stages.prune.ratio=1.5", ("stages.prune.ratio", "1.5")),
    ("--config.stages.search.gamma=-0.1", ("stages.search.gamma", "-0.1")),
    ("--config.stages.prune.criterion=nope", ("nope", "bn_scale")),
    ("--config.stages.serch.gamma=0.1", ("stages.serch.gamma", "pretrain, prune, run, search", "'stages.search'")),
    ("--config.stages.search.gama=0.1", ("epochs, gamma, lr", "'stages.search.gamma'")),
    ("--config.batch_size=many", ("batch_size", "many")),
    ("--config.stages.run=pretrain,distill", ("distill", "finetune_channels")),
])
def test_bad_config_values(run_args, tmp_path, cifar_archive, override, needles):
  _assert_error(*_cli(*run_args, "--data", cifar_archive, override), *needles)
  assert not os.path.exists(tmp_path / "run")


def test_traceback_on_request_for_bug_reports(run_args, cifar_archive, monkeypatch):
  monkeypatch.setenv("BPCP_JAX_TRACEBACK", "1")
  code, out = _cli(*run_args, "--data", cifar_archive, "--config.stages.prune.ratio=1.5")
  assert code == 1 and "Traceback (most recent call last)" in out and "prune.ratio" in out, out


def test_batch_not_divisible_by_devices(run_args, cifar_archive):
  _assert_error(*_cli(*run_args, "--data", cifar_archive, "--config.batch_size=30", devices=4),
                "batch_size", "30", "4")


def test_missing_config_file(tmp_path):
  _assert_error(*_cli("pipeline", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")),
                "nope.py")


def test_unwritable_workdir(tmp_path, cifar_archive):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  _assert_error(*_cli("pipeline", "--config", TINY, "--workdir", str(blocker / "run"), "--data", cifar_archive,
                      "--no-progress"), str(blocker))


def _fake_checkpoint(directory, model_name, stage):
  model = bp.create_model(model_name)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  state = steps.create_train_state(variables, make_optimizer(0.1), jax.random.PRNGKey(0))
  ck = StageCheckpoints(directory)
  ck.save(2, state, {"spec": model.spec.to_dict(), "stage": stage, "epoch": 0, "step": 2, "done": False})
  ck.close()


def test_checkpoint_of_another_architecture(run_args, tmp_path, cifar_archive):
  _fake_checkpoint(str(tmp_path / "run" / "checkpoints" / "pretrain"), "resnet_v1_14", "pretrain")
  _assert_error(*_cli(*run_args, "--data", cifar_archive, "--resume"), "another architecture",
                os.path.join("checkpoints", "pretrain"))


def test_checkpoint_of_another_stage(run_args, tmp_path, cifar_archive):
  _fake_checkpoint(str(tmp_path / "run" / "checkpoints" / "pretrain"), "resnet_v1_8", "search")
  _assert_error(*_cli(*run_args, "--data", cifar_archive, "--resume"), "'search'", "'pretrain'")


def test_from_a_directory_that_is_not_a_checkpoint(tmp_path, cifar_archive):
  _assert_error(*_cli("eval", "--config", TINY, "--from", str(tmp_path / "nothing"), "--data", cifar_archive,
                      "--no-progress"), str(tmp_path / "nothing"))


def test_search_blocks_on_a_network_without_blocks():
  from bpcp_jax.run.pipeline import StageOutput, StartNetwork, check_stage_inputs

  spec = bp.create_model("resnet_v1_8").spec.to_dict()
  for stage in spec["stages"]:
    stage["blocks"] = []  # every residual block removed
  network = bp.FamilyNetwork(bp.ArchSpec.from_dict(spec))
  start = StartNetwork(StageOutput(network, {}, {}), "input", "runs/x/checkpoints/finetune_channels")
  with pytest.raises(ValueError, match="network from runs/x/checkpoints/finetune_channels has no residual blocks left"):
    check_stage_inputs(["search"], start)  # search-blocks alone: nothing to do
  check_stage_inputs(["search", "finetune_blocks"], start)  # within a longer run the search is skipped (and said)
  check_stage_inputs(["prune", "finetune_channels"], start)  # channels can still be pruned


@pytest.mark.parametrize("command, own, foreign", [
    ("eval", ["--from", "--config", "--data"], ["--resume", "--workdir", "--stage"]),
    ("profile", ["--from", "--workdir"], ["--resume", "--data"]),
    ("train", ["--workdir", "--resume", "--data"], ["--from", "--stage"]),
    ("finetune", ["--from", "--stage", "--resume"], []),
])
def test_each_subcommand_explains_itself_with_its_own_options(capsys, command, own, foreign):
  from bpcp_jax.run.cli import DESCRIPTIONS, main

  with pytest.raises(SystemExit) as e:
    main([command, "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert "".join(DESCRIPTIONS[command].split()) in "".join(text.split())  # wrapped by argparse
  assert "Default:thepaper'srecipe:resnet_v2_56" in "".join(text.split())  # what runs without --config
  for option in own:
    assert option in text, (command, option)
  for option in foreign:
    assert option not in text, (command, option)


def test_tfds_source_without_tensorflow_datasets_is_refused(monkeypatch):
  from bpcp_jax.run.config import apply_overrides, load_config_file
  from bpcp_jax.run.pipeline import check_run_config
  from bpcp_jax.training import data

  monkeypatch.setattr(data, "tfds_available", lambda: False)
  config = apply_overrides(load_config_file(TINY), ["data.source=tfds:cifar10"])
  with pytest.raises(ValueError, match=r"'tfds:cifar10' needs tensorflow_datasets .* data.source=folder"):
    check_run_config(config)
  assert data.usable_source("tfds:cifar10")[0] == "folder" and "not installed" in data.usable_source("tfds:cifar10")[1]
  assert data.usable_source("folder") == ("folder", "")
