"""Block-removal rules (``bpcp_jax/pruning/block_controls.py``): valid sets on a family network and a traced user
network, the summands each provider gives against an independent path, and each data-driven rule's ranking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.families.provider import FamilyNetwork
from bpcp_jax.pruning.block_controls import block_scores, lowest_blocks, select_blocks
from tests import zoo
from tests.conftest import REPO_ROOT

ZOO = f"{REPO_ROOT}/tests/zoo.py"


def _random(shapes, seed=0):
  """Variables of ``shapes`` drawn in NumPy (an initializer compiles for seconds): kernels with variance 1/fan-in,
  scales and variances near 1, biases and means near 0."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) >= 2:
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    if "var" in name or "scale" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def _family():
  net = FamilyNetwork(bp.dense_spec("resnet_v1", 20, 10))  # 3 stages of 3 basic blocks
  return net, _random(jax.eval_shape(net.init, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def _traced():
  net = bp.FlaxNetwork.from_factory(f"{ZOO}:make_bit", 10, (32, 32, 3))  # 4 units, no BatchNorm
  return net, _random(net.variable_shapes())


def _data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


@pytest.mark.parametrize("which", ["family", "traced"])
@pytest.mark.parametrize("method", ["random", "last", "single_drop", "importance"])
def test_every_rule_gives_a_valid_set_that_never_empties_a_stage(which, method):
  net, variables = _family() if which == "family" else _traced()
  images, labels = _data()
  stages = [s for s in net.block_stages() if s]
  most = sum(len(s) - 1 for s in stages)
  for n in (1, most):
    logits = select_blocks(net, variables, method, n, seed=3, images=images, labels=labels, batch_size=8)
    assert sorted(logits) == sorted(net.block_names)
    removed = {b for b, v in logits.items() if v < 0}
    assert len(removed) == n
    assert all(any(b not in removed for b in s) for s in stages), (method, removed)
  with pytest.raises(ValueError, match="each stage keeps one"):
    select_blocks(net, variables, method, most + 1, images=images, labels=labels)


def test_family_summands_equal_the_traced_programs():
  """The family's own summands (sown by the module) against the traced program's add operands: two paths."""
  net, variables = _family()
  x = jnp.asarray(_data(4)[0])
  own = net.block_io(variables, x)
  traced = bp.trace_network(net.module(), variables, x)
  from bpcp_jax.tracer.block_io import block_io

  other = block_io(traced, variables, x)
  assert sorted(own) == sorted(other) == sorted(net.block_names)
  for b in own:
    for a, c in zip(own[b], other[b]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)


def _silence(variables, net, block):
  """``variables`` with ``block``'s branch computing zero (its last layer's weights zeroed)."""
  def zero(path, leaf):
    key = jax.tree_util.keystr(path)
    hit = (f"'{block}'" in key and "conv2" in key) if "unit" in block else f"'{block}_bn2'" in key
    return jnp.zeros_like(leaf) if hit and ("kernel" in key or "scale" in key or "bias" in key) else leaf
  return {"params": jax.tree_util.tree_map_with_path(zero, variables["params"]),
          **{k: v for k, v in variables.items() if k != "params"}}


@pytest.mark.parametrize("which", ["family", "traced"])
@pytest.mark.parametrize("rule", ["single_drop", "importance"])
def test_a_block_that_computes_nothing_scores_zero_and_goes_first(which, rule):
  net, variables = _family() if which == "family" else _traced()
  block = sorted(net.block_names)[1]
  quiet = _silence(variables, net, block)
  images, labels = _data()
  scores = block_scores(net, quiet, images, labels, rule=rule, batch_size=8)
  assert abs(scores[block]) < 1e-6, scores
  others = [abs(v) for b, v in scores.items() if b != block]
  assert min(others) > 1e-4, scores
  if rule == "importance":  # influence is >= 0; with single drop another block may even help the loss
    assert lowest_blocks(net, scores, 1) == [block]


def test_scored_rules_name_missing_data():
  net, variables = _traced()
  with pytest.raises(ValueError, match="give images="):
    select_blocks(net, variables, "importance", 1)
  with pytest.raises(ValueError, match="one label per image"):
    block_scores(net, variables, _data()[0], None, rule="single_drop")
  with pytest.raises(ValueError, match=r"images of shape \(2, 8, 8, 3\)"):
    block_scores(net, variables, np.zeros((2, 8, 8, 3)), rule="importance")
  with pytest.raises(ValueError, match="unknown block selection 'greedy'"):
    select_blocks(net, variables, "greedy", 1)


def test_two_searches_with_different_seeds_draw_different_gates_from_the_same_data_and_keys():
  """``stages.search.seed`` (``train_step(gate_seed=...)``): the gate samples differ, nothing else does."""
  from bpcp_jax.training import optim, steps

  net, variables = _family()
  tx = optim.make_optimizer(0.0, gate_learning_rate=1.0)  # weights frozen: only the gates move
  state = steps.create_train_state(variables, tx, np.zeros(2, np.uint32), gates=net.init_masks()["blocks"])
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  batch = {"image": images, "label": np.arange(8, dtype=np.int32) % 10}

  @functools.partial(jax.jit, static_argnums=1)
  def step(state, seed):
    return steps.train_step(state, batch, network=net, tx=tx, mode="search", gamma=0.1, gate_seed=seed)[0].gates

  a, again, b = step(state, 0), step(state, 0), step(state, 7)
  assert all(np.array_equal(a[k], again[k]) for k in a)  # the same seed: the same gates
  assert any(not np.array_equal(a[k], b[k]) for k in a), "another seed drew the same gates"


def test_the_pipeline_removes_blocks_by_a_scored_rule(tmp_path, monkeypatch):
  """``--config.stages.search.method=importance``: the pipeline scores the blocks on training images."""
  import os

  from bpcp_jax.run import pipeline
  from bpcp_jax.run.config import apply_overrides, load_config_file
  from bpcp_jax.training import data

  rng = np.random.default_rng(0)
  split = data.Split(images=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                     labels=np.arange(16, dtype=np.int32) % 3, class_names=("a", "b", "c"))
  monkeypatch.setattr(pipeline, "load_data", lambda *a, **k: (split, split))
  config = apply_overrides(load_config_file(os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")),
                           [f"model={ZOO}:make_bit", "num_classes=3", "stages.run=search",
                            "stages.search.method=importance",
                            "stages.search.blocks=2", "stages.search.control_images=8", "batch_size=8",
                            "eval_batch_size=8", "profile.batch_sizes=2", "profile.repeats=1"])
  lines = []
  summary = pipeline.run_pipeline(config, str(tmp_path / "run"), progress=False, log=lines.append)
  assert summary["pruned"]["blocks"] == 2, summary["pruned"]
  assert any("method importance: removing 2 of 4 blocks" in line for line in lines), lines
