"""Flax NNX networks: traced, pruned and materialized into a smaller module of the user's classes;
masked == materialized to 1e-5 in eval and train mode (outputs and updated batch statistics)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bpcp_jax as bp
from bpcp_jax.tracer import nnx as bnnx
from bpcp_jax.tracer.network import leaves_by_path


class Block(nnx.Module):
  """``x + f(x)``, or ``conv1x1(x) + f(x)`` with ``project``."""

  def __init__(self, c, rngs, project=False):
    self.conv1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(c, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c, momentum=0.9, rngs=rngs)
    self.shortcut = nnx.Conv(c, c, (1, 1), rngs=rngs) if project else None

  def __call__(self, x):
    h = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
    return (x if self.shortcut is None else self.shortcut(x)) + h


class CNN(nnx.Module):
  """Stem, residual blocks in an ``nnx.List``, a depthwise conv, a dense head with dropout."""

  def __init__(self, rngs, project=(False, False), rate=0.3):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([Block(8, rngs, p) for p in project])
    self.dw = nnx.Conv(8, 16, (3, 3), feature_group_count=8, rngs=rngs)
    self.fc = nnx.Linear(16, 12, rngs=rngs)
    self.drop = nnx.Dropout(rate, rngs=rngs)
    self.head = nnx.Linear(12, 5, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.stem(x)))
    for b in self.blocks:
      h = b(h)
    h = jnp.mean(nnx.relu(self.dw(h)), axis=(1, 2))
    return self.head(self.drop(nnx.relu(self.fc(h))))


_run = nnx.jit(lambda m, x: m(x))  # one compilation per module structure and mode


def _model(project=(False, False), rate=0.3):
  return _numpy_init(lambda: CNN(nnx.Rngs(0), project, rate))


def _numpy_init(factory):
  """The module ``factory`` makes, its variables drawn with NumPy (kernels scaled by fan-in,
  positive vectors, so that statistics and biases are non-trivial): no initializer is compiled
  (compiling them costs more than the rest of a test)."""
  model = nnx.eval_shape(factory)
  rng = np.random.default_rng(1)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.RngKey):
      var.set_value(jax.random.key(0))
    elif isinstance(var, nnx.RngCount):
      var.set_value(jnp.zeros((), jnp.uint32))
    elif isinstance(var, nnx.Variable):
      shape = var.get_value().shape
      value = rng.uniform(0.5, 1.5, shape) if len(shape) == 1 else rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
      var.set_value(jnp.asarray(value, jnp.float32))
  return model


def _masks(net, remove=()):
  rng = np.random.default_rng(2)
  masks = bp.init_traced_masks(net)
  for name, g in net.groups.items():
    keep = rng.random(g.width) < 0.6
    keep[:2] = (False, True)
    masks["channels"][name] = keep.astype(np.float32)
  for name in remove:
    masks["blocks"][name] = np.float32(-1.0)
  return masks


def _close(a, b):
  a, b = leaves_by_path(a), leaves_by_path(b)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b[k]).max())), err_msg=k)


def _shapes(tree):
  return {k: tuple(np.shape(v)) for k, v in leaves_by_path(tree).items()}


X = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)


def test_nnx_cnn_pruned_and_materialized_equals_masked_in_eval_and_train_mode():
  # no dropout, so that the train mode compares exactly (a narrowed Dropout draws its own mask:
  # see test_nnx_dropout_network_materialized)
  model = _model(rate=0.0)
  net, variables = bp.trace_nnx(model, X)
  assert set(net.blocks) == {"blocks/0", "blocks/1"} and "stem" in net.groups
  masks = _masks(net, remove=("blocks/0",))
  small, report = bp.materialize_nnx(net, variables, masks, X)
  assert type(small) is CNN and type(small.blocks[1]) is Block and isinstance(small.blocks[0], bp.Skipped)
  assert report.plan["removed_blocks"] == ["blocks/0"] and max(report.max_abs_diff.values()) <= 1e-5

  # nnx.split of it has the smaller shapes: those of materialize_traced
  _, small_vars = bp.materialize_traced(net, jax.tree_util.tree_map(np.asarray, variables), masks)
  _, params, stats, _ = nnx.split(small, nnx.Param, nnx.BatchStat, ...)
  assert _shapes({"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}) == _shapes(small_vars)
  kept = int(masks["channels"]["stem"].sum())
  per_group = int(masks["channels"]["dw"].sum())  # the depthwise multiplier's kept positions (of 2)
  assert small.stem.out_features == kept < 8 and small.dw.feature_group_count == kept
  assert small.dw.in_features == kept and small.dw.out_features == per_group * kept

  # eval: the module called as users call it, jitted by nnx.jit
  small.eval()
  evaluated = _run(small, X)
  _close(evaluated, jax.jit(lambda v: bp.masked_apply(net, v, masks, X))(variables))
  # train: outputs and the updated statistics, which nnx.jit writes back into the module
  small.train()
  out = _run(small, X)
  masked, updates = jax.jit(lambda v: bp.masked_apply(net, v, masks, X, mode="train"))(variables)
  _close(out, masked)
  _, want = bp.materialize_traced(net, jax.tree_util.tree_map(np.asarray, {**variables, **updates}), masks)
  _close(nnx.to_pure_dict(nnx.state(small, nnx.BatchStat)), want["batch_stats"])

  # a checkpoint: the class (a factory), the plan as JSON and the variables give the same module
  restored = bp.narrow_nnx(_model(rate=0.0), json.loads(json.dumps(report.plan)), small_vars)
  restored.eval()
  _close(_run(restored, X), evaluated)


def test_nnx_materialized_module_recalibrates_its_batch_statistics():
  """bp.recalibrate_nnx on materialize_nnx's module: "exact" on one batch gives that batch's
  statistics (eval mode == train mode on it, not before); "momentum" equals NNX's own train-mode
  calls in place; the parameters and the module given are left as they were."""
  model = _model(rate=0.3)
  net, variables = bp.trace_nnx(model, X)
  small, _ = bp.materialize_nnx(net, variables, _masks(net, remove=("blocks/0",)), X)
  before = nnx.to_pure_dict(nnx.state(small, nnx.BatchStat))
  new = bp.recalibrate_nnx(small, np.stack([X, X]))
  assert type(new) is CNN and isinstance(new.blocks[0], bp.Skipped) and new is not small
  _close(nnx.to_pure_dict(nnx.state(small, nnx.BatchStat)), before)
  _close(nnx.to_pure_dict(nnx.state(new, nnx.Param)), nnx.to_pure_dict(nnx.state(small, nnx.Param)))
  # dropout sits after every BatchNorm, so the train mode's features before it are deterministic
  features = nnx.jit(lambda m, x: m.fc(jnp.mean(nnx.relu(m.dw(_trunk(m, x))), axis=(1, 2))))
  for m in (small, new):
    m.train()
  train_features = features(nnx.clone(small), X)
  for m in (small, new):
    m.eval()
  assert float(jnp.max(jnp.abs(features(small, X) - train_features))) > 1e-2
  _close(features(new, X), train_features)

  batches = np.random.default_rng(3).normal(size=(3, *X.shape)).astype(np.float32)
  by_momentum = bp.recalibrate_nnx(small, batches, average="momentum")
  by_hand = nnx.clone(small)
  by_hand.train()
  for b in batches:
    _run(by_hand, b)
  _close(nnx.to_pure_dict(nnx.state(by_momentum, nnx.BatchStat)), nnx.to_pure_dict(nnx.state(by_hand, nnx.BatchStat)))
  # the variables-dict form returns the dict
  as_dict = bp.recalibrate_batch_stats(small, bp.NnxNetwork.of(small).variables(), batches, average="momentum")
  _close(as_dict["batch_stats"], nnx.to_pure_dict(nnx.state(by_hand, nnx.BatchStat)))


def _trunk(m, x):
  h = nnx.relu(m.bn(m.stem(x)))
  for b in m.blocks:
    h = b(h)
  return h


def test_nnx_recalibration_reseeds_dropout_from_the_key():
  class DropBN(nnx.Module):
    def __init__(self, rngs):
      self.drop, self.bn = nnx.Dropout(0.5, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.drop(x))

  m = DropBN(nnx.Rngs(0))
  batches = np.random.default_rng(0).normal(size=(2, 8, 4)).astype(np.float32) + 2.0
  stats = {k: nnx.to_pure_dict(nnx.state(bp.recalibrate_nnx(m, batches, rng=jax.random.key(k)), nnx.BatchStat))
           for k in (0, 0, 1)}
  a, b = (np.asarray(stats[k]["bn"]["mean"]) for k in (0, 1))
  assert not np.allclose(a, b)
  again = nnx.to_pure_dict(nnx.state(bp.recalibrate_nnx(m, batches, rng=jax.random.key(0)), nnx.BatchStat))
  np.testing.assert_array_equal(again["bn"]["mean"], a)


class _FlagBN(nnx.Module):
  """A module ported from linen: its BatchNorm's mode comes from a ``train`` argument; returns a tuple."""

  def __init__(self, rngs, frozen=False):
    self.lin, self.bn, self.frozen = nnx.Linear(4, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), frozen

  def __call__(self, x, train: bool = False):
    h = self.bn(self.lin(x), use_running_average=self.frozen or not train)
    return h, jnp.sum(h, axis=-1)


def test_nnx_recalibration_passes_the_train_argument_and_refuses_what_changes_nothing():
  batches = np.random.default_rng(0).normal(size=(3, 6, 4)).astype(np.float32) + 1.0
  model = _FlagBN(nnx.Rngs(0))
  new = bp.recalibrate_nnx(model, batches)
  h = np.einsum("nbi,io->nbo", batches, np.asarray(model.lin.kernel.get_value())) + np.asarray(model.lin.bias.get_value())
  np.testing.assert_allclose(new.bn.mean.get_value(), h.mean(1).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.bn.var.get_value(), h.var(1).mean(0), rtol=1e-5, atol=1e-6)
  # the same module traced: its train mode updates the statistics (train=True reaches the BatchNorm)
  net, variables = bp.trace_nnx(model, batches[0])
  _, updates = bp.masked_apply(net, variables, bp.init_traced_masks(net), batches[0], mode="train")
  assert not np.allclose(updates["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
  with pytest.raises(ValueError, match="no running statistic of _FlagBN changed .*use_running_average=True"):
    bp.recalibrate_nnx(_FlagBN(nnx.Rngs(0), frozen=True), batches)
  # recalibrating again on the same batches (a notebook cell run twice) changes nothing and is no error
  again = bp.recalibrate_nnx(new, batches)
  _close(nnx.to_pure_dict(nnx.state(again, nnx.BatchStat)), nnx.to_pure_dict(nnx.state(new, nnx.BatchStat)))
  with pytest.raises(ValueError, match=r"batches have shape \(6, 4\); expected \[N, B, \*input_shape\]"):
    bp.recalibrate_nnx(model, batches[0])
  # a batch of another input shape: named, not the module's own shape error
  with pytest.raises(ValueError, match=r"_FlagBN does not run on one batch batches\[i\] of shape \(6, 3\).*"
                     r"batches\[None\] for a single batch"):
    bp.recalibrate_nnx(model, batches[..., :3])
  images = np.zeros((2, 8, 8, 3), np.float32)  # one batch of images, the N axis forgotten
  with pytest.raises(ValueError, match=r"CNN does not run on one batch batches\[i\] of shape \(8, 8, 3\)"):
    bp.recalibrate_nnx(_model(), images)
  with pytest.raises(TypeError, match=r"rng has shape \(\) and dtype int32; expected a key"):
    bp.recalibrate_nnx(model, batches, rng=0)
  # the variables-dict form checks the variables against the module
  with pytest.raises(TypeError, match="variables are a State; expected the nested dicts"):
    bp.recalibrate_batch_stats(model, nnx.state(model), batches)
  wrong = bp.NnxNetwork.of(model).variables()
  wrong["params"]["linear"] = wrong["params"].pop("lin")
  with pytest.raises(ValueError, match=r"variables do not fit the module: missing \['params/lin/bias'"):
    bp.recalibrate_batch_stats(model, wrong, batches)


def test_nnx_recalibration_compiles_once_per_module_structure():
  batches = np.random.default_rng(0).normal(size=(2, 6, 4)).astype(np.float32)
  bp.recalibrate_nnx(_FlagBN(nnx.Rngs(0)), batches)
  size = bnnx._recalibrated._cache_size()
  for seed in (1, 2):  # other modules of the same structure, other values
    bp.recalibrate_nnx(_FlagBN(nnx.Rngs(seed)), batches + seed)
  assert bnnx._recalibrated._cache_size() == size


def test_nnx_dropout_network_materialized():
  net, variables = bp.trace_nnx(_model(), X)
  masks = _masks(net, remove=("blocks/1",))
  small, report = bp.materialize_nnx(net, variables, masks, X)
  assert type(small) is CNN and set(report.max_abs_diff) == {"eval"}  # train mode: compared in shapes
  small.eval()
  _close(_run(small, X), jax.jit(lambda v: bp.masked_apply(net, v, masks, X))(variables))
  small.train()
  a, b = _run(small, X), _run(small, X)  # the module's own rng stream advances
  assert a.shape == b.shape and float(jnp.abs(a - b).max()) > 1e-4


def test_nnx_removed_projection_block_keeps_its_shortcut():
  net, variables = bp.trace_nnx(_model(project=(False, True)), X, modes={"eval": {}})
  # the branch's modules return zeros; the shortcut stays: shortcut(x) + 0, as the traced program computes
  masks = _masks(net, remove=("blocks/1",))
  small, report = bp.materialize_nnx(net, variables, masks, X)
  assert sorted(report.plan["zeroed"]) == ["blocks/1/bn1", "blocks/1/bn2", "blocks/1/conv1", "blocks/1/conv2"]
  assert isinstance(small.blocks[1].conv1, bp.Zeroed) and isinstance(small.blocks[1].shortcut, nnx.Conv)
  small.eval()
  _close(_run(small, X), jax.jit(lambda v: bp.masked_apply(net, v, masks, X))(variables))
  small, report = bp.materialize_nnx(net, variables, _masks(net, remove=("blocks/0",)), X)
  assert report.plan["removed_blocks"] == ["blocks/0"] and isinstance(small.blocks[1].shortcut, nnx.Conv)
  # pruned again: the plan still rebuilds it from the class
  net2, variables2 = bp.trace_nnx(small, X, modes={"eval": {}})
  masks2 = _masks(net2)
  smaller, report2 = bp.materialize_nnx(net2, variables2, masks2, X)
  assert report2.plan["removed_blocks"] == ["blocks/0"] and smaller.stem.out_features < small.stem.out_features
  restored = bp.narrow_nnx(_model(project=(False, True)), report2.plan, nnx.state(smaller))
  assert nnx.graphdef(restored) == nnx.graphdef(smaller)  # same classes, attributes and structure
  for kind in (nnx.Param, nnx.BatchStat):
    _close(nnx.to_pure_dict(nnx.state(restored, kind)), nnx.to_pure_dict(nnx.state(smaller, kind)))


def test_nnx_attention_heads_narrowed_from_the_variables():
  """Heads 1 and 3 of an nnx.MultiHeadAttention cut from its variables: the narrowed module
  equals the dense one with those heads' rows of the output projection zeroed."""
  model = _numpy_init(lambda: nnx.MultiHeadAttention(4, 6, qkv_features=16, decode=False, rngs=nnx.Rngs(0)))
  x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
  keep = np.array([0, 2])
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  small = {"params": {n: {"kernel": params[n]["kernel"][:, keep], "bias": params[n]["bias"][keep]}
                      for n in ("query", "key", "value")}}
  small["params"]["out"] = {"kernel": params["out"]["kernel"][keep], "bias": params["out"]["bias"]}
  narrowed = nnx.clone(model)
  bnnx._write(narrowed, leaves_by_path(small))
  problems = []
  layers = bnnx._layer_widths(narrowed, {"params": params}, problems, [])
  assert not problems and {k: layers[""][k] for k in ("num_heads", "num_kv_heads", "qkv_features")} == {
      "num_heads": 2, "num_kv_heads": 2, "qkv_features": 8}
  plan = {"format": bp.PLAN_FORMAT, "class": "MultiHeadAttention", "layers": layers, "removed_blocks": []}
  narrowed = bp.narrow_nnx(nnx.clone(model), plan, small)
  assert narrowed.num_heads == 2 and narrowed.head_dim == 4
  zeroed = nnx.clone(model)
  zeroed.out.kernel.set_value(np.asarray(params["out"]["kernel"]).copy() * np.array([1, 0, 1, 0])[:, None, None])
  _close(_run(narrowed, x), _run(zeroed, x))
