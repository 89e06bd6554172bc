"""Pruning networks the library does not know: masked == materialized, the right MACs, and the
same result as the hand-declared ResNet path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from tests import nets
from tests.helpers import images, perturbed_variables, random_masks
from bpcp_jax.families.structure import declared_members
from tests.test_coupling import TRAIN

NETS = [nets.InceptionNet, nets.MobileNet, nets.DenseNet, nets.TwoInputNet, nets.UnfollowableNet]


def _setup(cls, batch=3, seed=0):
  rng = np.random.default_rng(seed)
  model = cls()
  x = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32)
  inputs = (x, jnp.asarray(rng.normal(size=(batch, 1)), jnp.float32)) if cls is nets.TwoInputNet else (x,)
  variables = model.init(jax.random.key(seed), *inputs)
  # non-trivial statistics and biases, so that a wrongly sliced leaf shows in the logits
  variables = jax.tree_util.tree_map(
      lambda a: jnp.abs(a) + 0.1 if a.ndim == 1 else a + 0.1 * jnp.asarray(rng.normal(size=a.shape), a.dtype), variables)
  modes = {"eval": {}, "train": TRAIN} if "batch_stats" in variables else {"eval": {}}
  return model, variables, inputs, bp.trace_network(model, variables, *inputs, modes=modes)


def _random_traced_masks(net, seed, drop_blocks=True):
  rng = np.random.default_rng(seed)
  masks = bp.init_traced_masks(net)
  for name, g in net.groups.items():
    keep = rng.random(g.width) < 0.5
    keep[rng.integers(g.width)] = True
    masks["channels"][name] = jnp.asarray(keep, jnp.float32)
  for name in net.blocks:
    masks["blocks"][name] = jnp.float32(-1.0 if drop_blocks and rng.random() < 0.7 else 1.0)
  return masks


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


@pytest.mark.parametrize("cls", NETS, ids=lambda c: c.__name__)
def test_masked_equals_materialized_and_macs_are_right(cls):
  model, variables, inputs, net = _setup(cls)
  dense_params, dense_macs = bp.count_traced(net, variables)
  if hasattr(cls, "expected_macs"):
    assert dense_macs == cls.expected_macs({n: g.width for n, g in net.groups.items()})
  for seed in range(3):
    masks = _random_traced_masks(net, seed)
    small, small_vars = bp.materialize_traced(net, variables, masks)
    _close(small.apply(small_vars, *inputs), bp.masked_apply(net, variables, masks, *inputs))
    params, macs = bp.count_traced(small, small_vars)
    assert params == sum(x.size for x in jax.tree_util.tree_leaves(small_vars["params"])) < dense_params
    if hasattr(cls, "expected_macs"):
      kept = {n: int(np.sum(masks["channels"][n])) for n in net.groups}
      extra = {"blocks": [b for b in net.blocks if masks["blocks"][b] >= 0]} if cls is nets.MobileNet else {}
      assert macs == cls.expected_macs(kept, **extra)
    if "batch_stats" in variables:  # train mode: same logits and same updated statistics
      ref, ref_upd = bp.masked_apply(net, variables, masks, *inputs, mode="train")
      out, upd = small.apply(small_vars, *inputs, train=True, mutable=["batch_stats"])
      _close(out, ref)
      assert jax.tree_util.tree_structure(upd["batch_stats"]) == jax.tree_util.tree_structure(small_vars["batch_stats"])


def test_materialized_network_runs_jitted_at_other_batch_sizes_and_drops_removed_blocks():
  model, variables, inputs, net = _setup(nets.MobileNet)
  masks = _random_traced_masks(net, 1, drop_blocks=False)
  masks["blocks"]["project"] = jnp.float32(-2.0)
  small, small_vars = bp.materialize_traced(net, variables, masks)
  assert not {"expand", "dw3", "project", "expand_bn", "dw3_bn", "project_bn"} & set(small_vars["params"])
  x = jnp.asarray(np.random.default_rng(5).normal(size=(7, 16, 16, 3)), jnp.float32)
  masked = jax.jit(lambda v, m, x: bp.masked_apply(net, v, m, x))(variables, masks, x)
  _close(jax.jit(small.apply)(small_vars, x), masked)


@pytest.mark.parametrize("name,seed", [("resnet_v2_11", 0), ("resnet_v1_bottleneck_11", 1), ("resnet_v1_8", 2)])
def test_traced_path_agrees_with_the_declared_resnet_path(name, seed):
  model = bp.create_model(name)
  variables = perturbed_variables(model, jax.random.key(seed))
  x = images(jax.random.key(seed + 50), n=2)
  net = bp.trace_network(model, variables, x)
  native = random_masks(model, seed)
  declared = {frozenset(m): g for g, m in declared_members(model.spec).items()}
  traced = {"blocks": dict(native["blocks"]),
            "channels": {n: native["channels"][declared[frozenset(g.members)]] for n, g in net.groups.items()}}
  small, small_vars = bp.materialize_traced(net, variables, traced)
  ref_model, ref_vars = bp.materialize(model, variables, native)
  out = jax.jit(small.apply)(small_vars, x)
  _close(out, ref_model.apply(ref_vars, x))
  _close(out, bp.masked_apply(net, variables, traced, x))
  assert bp.count_traced(small, small_vars)[1] == bp.count_params_macs(ref_model.spec)["macs"]
  assert jax.tree_util.tree_map(jnp.shape, small_vars) == jax.tree_util.tree_map(jnp.shape, ref_vars)


def test_bad_masks_are_named():
  _, variables, inputs, net = _setup(nets.InceptionNet)
  masks = bp.init_traced_masks(net)
  masks["channels"]["b2b"] = jnp.ones((5,))
  with pytest.raises(ValueError, match="'b2b' has shape"):
    bp.materialize_traced(net, variables, masks)
  masks = bp.init_traced_masks(net)
  masks["channels"]["b3"] = jnp.zeros((3,))
  with pytest.raises(ValueError, match="'b3' keeps no channel"):
    bp.materialize_traced(net, variables, masks)
  _, variables, inputs, net = _setup(nets.TwoInputNet)  # no BatchNorm: traced in eval mode only
  with pytest.raises(ValueError, match="mode 'train' was not traced"):
    bp.masked_apply(net, variables, bp.init_traced_masks(net), *inputs, mode="train")


def test_block_search_on_a_traced_residual_network():
  """BP on a network found by tracing: straight-through gates reach the logits, the penalty
  pushes an unhelpful block out, and materialization removes it."""
  import optax

  _, variables, inputs, net = _setup(nets.MobileNet)
  masks = bp.init_traced_masks(net)

  def loss(logits, key):
    gates = bp.sample_gates(key, logits)
    out = bp.masked_apply(net, variables, masks, *inputs, block_gates=gates)
    return jnp.mean(out ** 2) * 1e-3 + bp.gate_penalty(gates, 1.0)

  grad = jax.jit(jax.grad(loss))
  g = grad(masks["blocks"], jax.random.key(0))
  assert float(g["project"]) != 0.0
  opt = optax.sgd(1.0)
  logits, state = masks["blocks"], opt.init(masks["blocks"])
  for step in range(20):
    updates, state = opt.update(grad(logits, jax.random.key(step)), state)
    logits = optax.apply_updates(logits, updates)
  assert bp.decide_blocks(logits) == {"project": False}
  small, small_vars = bp.materialize_traced(net, variables, {**masks, "blocks": logits})
  assert "project" not in small_vars["params"]
