"""Networks written as public code writes them (tests/zoo.py), linen AND NNX, through ``bpcp-jax pipeline``.

For each of ViT, MLP-Mixer, ConvNeXt, Swin, an He-style ResNet (``relu(x + f(x))``) and BiT (GroupNorm,
weight standardization, no BatchNorm), in both frameworks:

- the API: masked == materialized in eval and train mode to 1e-5 (same dropout key), with a block removed
  and channels cut in every group;
- the command line: ``bpcp-jax pipeline --config experiments/configs/tiny.py --config.model=tests/zoo.py:...``
  runs on real CIFAR-10 images in its own process (block search with a gamma that removes blocks, channel
  prune, fine-tune); at least one block is removed; the final checkpoint loads with
  ``bp.load_network`` here, in another process than the one that wrote it, and scores the accuracy that
  ``summary.json`` reports on the same test images; the report says in one line whether the pruned network is
  the user's class or the traced program.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bpcp_jax as bp
from bpcp_jax.run.config import apply_overrides, load_config_file
from bpcp_jax.run import pipeline
from bpcp_jax.training import data
from tests import zoo
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
ZOO = os.path.join(REPO_ROOT, "tests", "zoo.py")
NAMES = sorted(zoo.LINEN)
# a short run: the search starts from the factory's initialisation (no pretrain) with a gamma large enough that
# its gates remove blocks, then channel pruning and its fine-tune; latency timed once at batch 1
# CI runs each architecture through the command line in one framework (the other is marked slow: README "Tests");
# both frameworks' masked == materialized checks run in CI
IN_CI = {("vit", "linen"), ("mixer", "linen"), ("he_resnet", "linen"), ("convnext", "nnx"), ("swin", "nnx"),
         ("bit", "nnx")}
CLI_CASES = [pytest.param(name, kind, marks=() if (name, kind) in IN_CI else pytest.mark.slow, id=f"{name}-{kind}")
             for name in NAMES for kind in ("linen", "nnx")]
OVERRIDES = ["stages.run=search,prune,finetune_channels", "stages.search.gamma=100.0",
             "data.max_train_per_class=8", "data.max_test_per_class=5", "batch_size=16",
             "stages.search.epochs=2", "profile.batch_sizes=1", "profile.repeats=1"]


def _random_like(variables, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(rng.uniform(0.5, 1.5, a.shape) if a.ndim <= 1 else
                                           rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1])), np.float32),
                      variables)


def _cut(net):
  """A block removed and about a third of every group's channels cut."""
  masks = bp.init_traced_masks(net)
  masks["blocks"][sorted(net.blocks)[-1]] = np.float32(-1.0)
  for g, m in masks["channels"].items():
    keep = np.ones(m.shape[0], np.float32)
    keep[1::3] = 0.0
    masks["channels"][g] = keep
  return masks


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
@pytest.mark.parametrize("name", NAMES)
def test_masked_equals_materialized_in_eval_and_train_mode(name, kind):
  net = bp.FlaxNetwork.from_factory(f"{ZOO}:make_{'nnx_' if kind == 'nnx' else ''}{name}", 10, (32, 32, 3))
  assert net.block_names, f"{name}: no residual block found"
  shapes = net.variable_shapes()
  variables = _random_like(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  masks = _cut(net.traced)
  small, small_vars = net.materialize(variables, masks)
  assert small.counts()["params"] < net.counts()["params"]
  assert len(small.block_names) == len(net.block_names) - 1
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  _close(small.apply(small_vars, x, train=False), net.apply(variables, x, train=False, masks=masks))
  key = jax.random.key(2)
  out, stats = small.apply(small_vars, x, train=True, rng=key)
  want, want_stats = net.apply(variables, x, train=True, masks=masks, rng=key)
  if not _draws(net):  # a narrowed dropout draws at its own width: outputs compare where nothing is drawn
    _close(out, want)
  if want_stats:
    _, sliced = bp.materialize_traced(net.traced, {**variables, "batch_stats": want_stats}, masks)
    _close(stats, sliced["batch_stats"])


def _draws(net) -> bool:
  from bpcp_jax.tracer.program import draws_random_numbers

  return draws_random_numbers(net.traced.traced("train", (net.example(),))[0])


def _run_cli(workdir, factory):
  argv = [sys.executable, "-m", "bpcp_jax.run.cli", "pipeline", "--config", TINY, "--workdir", workdir,
          f"--config.model={factory}", "--no-progress", *[f"--config.{o}" for o in OVERRIDES]]
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize("name,kind", CLI_CASES)
def test_through_the_command_line_and_loaded_in_another_process(name, kind, tmp_path, cifar_archive):
  factory = f"{ZOO}:make_{'nnx_' if kind == 'nnx' else ''}{name}"
  workdir = str(tmp_path / "run")
  stdout = _run_cli(workdir, factory)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  dense_blocks, kept = summary["dense"]["blocks"], summary["pruned"]["blocks"]
  assert kept < dense_blocks, f"{name}: no block removed ({kept} of {dense_blocks} kept)"
  assert summary["pruned"]["macs"] < summary["dense"]["macs"]
  materialized = [line for line in stdout.splitlines() if line.startswith("[materialize]")]
  assert all(len(line) < 400 for line in materialized), materialized
  # the checkpoint alone rebuilds the network here, in another process, to the accuracy the run reported
  final = os.path.join(workdir, "checkpoints", "finetune_channels")
  model, variables = bp.load_network(final)
  config = apply_overrides(load_config_file(TINY), OVERRIDES)
  _, test = pipeline.load_data(config, progress=False)
  predict = bp.make_predictor(model, variables)
  logits = np.concatenate([np.asarray(predict(data.normalize(test.images[i:i + 50])))
                           for i in range(0, len(test.images), 50)])
  accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
  assert abs(accuracy - summary["pruned"]["accuracy"]) < 1e-6, (accuracy, summary["pruned"])


PUBLIC = os.path.join(REPO_ROOT, "tests", "public_code.py")
# factory -> (has BatchNorm, draws random numbers in train mode)
PUBLIC_CODE = {
    os.path.join(REPO_ROOT, "tests", "public_models", "imagenet_resnet.py") + ":make_model": (True, False),
    os.path.join(REPO_ROOT, "tests", "public_models", "convnext.py") + ":make_model": (False, True),
    f"{PUBLIC}:make_training_switch": (True, True),
    f"{PUBLIC}:make_output_object": (False, True),
    f"{PUBLIC}:make_nnx_training": (True, True),
    f"{PUBLIC}:make_nnx_call_rngs": (False, True),
    os.path.join(REPO_ROOT, "tests", "public_code_sibling", "model.py") + ":make_model": (True, False),
}


def _train_twice(network, variables, x):
  """Two train-mode passes with two keys, under the network's BatchNorm axis where it has one (one device)."""
  from bpcp_jax.training.parallel import step_axis

  axis = step_axis(network) if getattr(network, "axis_names", ()) else None

  def run(key):
    if axis is None:
      return network.apply(variables, x, train=True, rng=key)[0]
    f = jax.pmap(lambda v, xx: network.apply(v, xx, train=True, rng=key, axis_name=axis)[0], axis_name=axis)
    return f(jax.tree.map(lambda a: a[None], variables), x[None])[0]

  return run(jax.random.key(1)), run(jax.random.key(2))


# flax's ImageNet ResNet and the drop_path ConvNeXt go through every stage in CI in tests/test_public_pipeline.py
SLOW_HERE = {os.path.join(REPO_ROOT, "tests", "public_models", "imagenet_resnet.py") + ":make_model",
             os.path.join(REPO_ROOT, "tests", "public_models", "convnext.py") + ":make_model"}


@pytest.mark.parametrize("factory", [pytest.param(f, marks=pytest.mark.slow if f in SLOW_HERE else (),
                                                  id=os.path.relpath(f, REPO_ROOT).replace(os.sep, "/").replace(".py:", ":")) for f in sorted(PUBLIC_CODE)])
def test_public_code_habits_through_the_command_line_and_training_trains(factory, tmp_path, cifar_archive):
  """Each habit of tests/public_code.py through ``bpcp-jax pipeline``; the networks load in this process; the
  searched network's BatchNorm statistics moved from their initial values (the search trains in train mode);
  the dense network's train mode draws differently from two keys (the steps fold a new key per step); the final
  network computes what its checkpoint's ``bp.load_network`` predictor computes."""
  has_bn, draws = PUBLIC_CODE[factory]
  workdir = str(tmp_path / "run")
  _run_cli(workdir, factory)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["pruned"]["blocks"] < summary["dense"]["blocks"], summary["pruned"]
  searched, searched_vars, _ = bp.load_stage(os.path.join(workdir, "checkpoints", "search"))
  if has_bn:
    stats = searched_vars.get("batch_stats") or {}
    means = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(stats) if "mean" in jax.tree_util.keystr(p)]
    assert means and all(np.abs(m).max() > 1e-6 for m in means), "BatchNorm running means did not move"
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  dense = bp.FlaxNetwork.from_factory(factory, 10, (32, 32, 3))
  dense_vars = jax.tree.map(lambda s: np.full(s.shape, 0.1, s.dtype), dense.variable_shapes())
  a, b = _train_twice(dense, dense_vars, x)
  assert (not np.allclose(a, b)) == draws, "train mode with two keys: " + ("same" if draws else "differ")
  final = os.path.join(workdir, "checkpoints", "finetune_channels")
  network, variables, _ = bp.load_stage(final)
  model, same = bp.load_network(final)
  out = bp.make_predictor(model, same)(x)
  out = getattr(out, "logits", out)  # the user's own module returns its own output object
  np.testing.assert_allclose(np.asarray(out), np.asarray(network.apply(variables, x, train=False)),
                             rtol=1e-5, atol=1e-5)
