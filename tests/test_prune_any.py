"""Pruning networks the library does not know: masked == materialized, the right MACs, and the
same result as the hand-declared ResNet path."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from tests import nets
from tests.real_networks import random_variables
from tests.helpers import images, random_masks, random_traced_masks
from bpcp_jax.families.structure import declared_members
from tests.test_coupling import TRAIN, trace_small
from tests.test_real_networks import fast_jit

NETS = [nets.InceptionNet, nets.MobileNet, nets.DenseNet, nets.TwoInputNet, nets.UnfollowableNet]


def _setup(cls, batch=3, seed=0):
  rng = np.random.default_rng(seed)
  model = cls()
  x = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32)
  inputs = (x, jnp.asarray(rng.normal(size=(batch, 1)), jnp.float32)) if cls is nets.TwoInputNet else (x,)
  variables = random_variables(model, *inputs, seed=seed)  # non-trivial statistics, scales and biases
  modes = {"eval": {}, "train": TRAIN} if "batch_stats" in variables else {"eval": {}}
  return model, variables, inputs, bp.trace_network(model, variables, *inputs, modes=modes)


def _random_traced_masks(net, seed, drop_blocks=True):
  return random_traced_masks(net, seed, keep_channels=0.5, drop_blocks=0.7 if drop_blocks else 0.0)


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


@pytest.mark.parametrize("cls", NETS, ids=lambda c: c.__name__)
def test_masked_equals_materialized_and_macs_are_right(cls):
  model, variables, inputs, net = _setup(cls)
  dense_params, dense_macs = bp.count_traced(net, variables)
  if hasattr(cls, "expected_macs"):
    assert dense_macs == cls.expected_macs({n: g.width for n, g in net.groups.items()})
  masked = fast_jit(lambda v, m, *x: bp.masked_apply(net, v, m, *x))
  masked_train = fast_jit(lambda v, m, *x: bp.masked_apply(net, v, m, *x, mode="train"))
  for seed in range(3):
    masks = _random_traced_masks(net, seed)
    small, small_vars = bp.materialize_traced(net, variables, masks)
    _close(fast_jit(small.apply)(small_vars, *inputs), masked(variables, masks, *inputs))
    params, macs = bp.count_traced(small, small_vars)
    assert params == sum(x.size for x in jax.tree_util.tree_leaves(small_vars["params"])) < dense_params
    if hasattr(cls, "expected_macs"):
      kept = {n: int(np.sum(masks["channels"][n])) for n in net.groups}
      extra = {"blocks": [b for b in net.blocks if masks["blocks"][b] >= 0]} if cls is nets.MobileNet else {}
      assert macs == cls.expected_macs(kept, **extra)
    if "batch_stats" in variables and seed == 0:  # train mode: same logits and same updated statistics
      ref, ref_upd = masked_train(variables, masks, *inputs)
      out, upd = fast_jit(lambda v, *x: small.apply(v, *x, train=True, mutable=["batch_stats"]))(small_vars, *inputs)
      _close(out, ref)
      jax.tree_util.tree_map(_close, upd["batch_stats"],
                             bp.materialize_traced(net, {**variables, **ref_upd}, masks)[1]["batch_stats"])


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
  x = images(jax.random.key(seed + 50), n=2)
  variables = jax.device_get(random_variables(model, x, seed=seed))  # NumPy: the families' slicing compiles nothing
  net = bp.trace_network(model, variables, x)
  native = random_masks(model, seed)
  declared = {frozenset(m): g for g, m in declared_members(model.spec).items()}
  traced = {"blocks": dict(native["blocks"]),
            "channels": {n: native["channels"][declared[frozenset(g.members)]] for n, g in net.groups.items()}}
  small, small_vars = bp.materialize_traced(net, variables, traced)
  ref_model, ref_vars = bp.materialize(model, variables, native)
  out = fast_jit(small.apply)(small_vars, x)
  _close(out, fast_jit(ref_model.apply)(ref_vars, x))
  _close(out, fast_jit(lambda v, m, x: bp.masked_apply(net, v, m, x))(variables, traced, x))
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


# -- issue 12: the shapes of reported failures, masked == materialized in eval and train mode -----------------------


ISSUE_NETS = [nets.GroupedConvNet, nets.ChannelShuffleNet, nets.DepthToSpaceNet, nets.DenseToMapNet, nets.GroupNormNet,
              nets.FusedQKVNet, nets.DenseGeneralNet, nets.AttentionNet, nets.GateNet, nets.RematNet, nets.SortNet,
              nets.ControlFlowNet, nets.WeightNormNet]


def _train_mode(variables):
  mode = {"train": True, "rngs": {"dropout": jax.random.key(7)}}
  return {**mode, "mutable": ["batch_stats"]} if "batch_stats" in variables else mode


@pytest.mark.parametrize("cls", ISSUE_NETS, ids=lambda c: c.__name__)
def test_issue_networks_masked_equals_materialized_in_eval_and_train_mode(cls):
  model, variables, inputs, _ = trace_small(cls, batch=4)
  net = bp.trace_network(model, variables, *inputs, modes={"eval": {}, "train": _train_mode(variables)})
  rngs = {"dropout": jax.random.key(3)}
  for seed, mode in [(0, "eval"), (1, "train")]:
    masks = _random_traced_masks(net, seed)
    small, small_vars = bp.materialize_traced(net, variables, masks)
    if mode == "eval":
      _close(fast_jit(small.apply)(small_vars, *inputs), fast_jit(lambda v, m, *x: bp.masked_apply(net, v, m, *x))(
          variables, masks, *inputs))
      continue
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    masked = fast_jit(lambda v, m, r, *x: bp.masked_apply(net, v, m, *x, mode="train", rngs=r))(
        variables, masks, rngs, *inputs)
    out = fast_jit(lambda v, r, *x: small.apply(v, *x, train=True, mutable=mutable, rngs=r))(small_vars, rngs, *inputs)
    if mutable:
      (masked, masked_upd), (out, upd) = masked, out
      # the updated statistics of the kept channels are the masked network's, sliced
      _, want = bp.materialize_traced(net, {**variables, **masked_upd}, masks)
      jax.tree_util.tree_map(_close, upd["batch_stats"], want["batch_stats"])
    _close(out, masked)


def test_dropout_draws_from_the_rngs_given_at_call_time():
  model, variables, inputs, _ = trace_small(nets.GateNet, batch=4)
  net = bp.trace_network(model, variables, *inputs, modes={"eval": {}, "train": _train_mode(variables)})
  masks = _random_traced_masks(net, 0)
  small, small_vars = bp.materialize_traced(net, variables, masks)
  small_train = fast_jit(lambda v, r, *x: small.apply(v, *x, train=True, rngs=r))
  masked_train = fast_jit(lambda v, m, r, *x: bp.masked_apply(net, v, m, *x, mode="train", rngs=r))
  original = fast_jit(lambda v, r, *x: model.apply(v, *x, train=True, rngs=r))
  outs = []
  for k in (1, 2):
    rngs = {"dropout": jax.random.key(k)}
    outs.append(small_train(small_vars, rngs, *inputs))
    _close(outs[-1], masked_train(variables, masks, rngs, *inputs))
    _close(masked_train(variables, bp.init_traced_masks(net), rngs, *inputs), original(variables, rngs, *inputs))
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-3
  with pytest.raises(ValueError, match="dropout"):
    bp.masked_apply(net, variables, masks, *inputs, mode="train")


def test_named_batch_axis_in_train_mode():
  """BatchNorm(axis_name=...) as in flax's ImageNet example: traced with the axis, run under it."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Conv(8, (3, 3), use_bias=False)(x)
      h = nn.relu(nn.BatchNorm(use_running_average=not train, axis_name="batch")(h))
      return nn.Dense(5)(jnp.mean(nn.Conv(6, (1, 1))(h), axis=(1, 2)))

  model = Net()
  x = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 3))  # (devices, per-device batch, ...)
  variables = random_variables(model, x[0])
  modes = {"eval": {}, "train": TRAIN}
  eval_net = bp.trace_network(model, variables, x[0])
  net = bp.trace_network(model, variables, x[0], modes=modes, axis_env=[("batch", 2)])
  assert {n: g.members for n, g in net.groups.items()} == {n: g.members for n, g in eval_net.groups.items()}
  assert net.unfollowed == [] and len(net.groups) == 2
  masks = _random_traced_masks(net, 0)
  small, small_vars = bp.materialize_traced(net, variables, masks)
  def under_axis(f):
    return fast_jit(jax.vmap(f, axis_name="batch"))

  masked = under_axis(lambda x: bp.masked_apply(net, variables, masks, x, mode="train"))(x)
  out = under_axis(lambda x: small.apply(small_vars, x, train=True, mutable=["batch_stats"]))(x)
  _close(out[0], masked[0])
  ref = under_axis(lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"]))(x)
  full = under_axis(lambda x: bp.masked_apply(net, variables, bp.init_traced_masks(net), x, mode="train"))(x)
  _close(full[0], ref[0])


def test_grouped_convolution_materializes_with_the_right_group_count():
  model, variables, inputs, net = trace_small(nets.GroupedConvNet, batch=3)
  small, small_vars = bp.materialize_traced(net, variables, bp.init_traced_masks(net))
  _close(small.apply(small_vars, *inputs), model.apply(variables, *inputs))
  masks = bp.init_traced_masks(net)
  whole = [n for n, g in net.groups.items() if g.width == 2][0]  # drop one of the two groups of the grouped conv
  masks["channels"][whole] = jnp.asarray([1.0, 0.0])
  small, small_vars = bp.materialize_traced(net, variables, masks)
  assert small_vars["params"]["grouped"]["kernel"].shape == (3, 3, 4, 4)
  _close(small.apply(small_vars, *inputs), bp.masked_apply(net, variables, masks, *inputs))


def test_optimizer_state_is_carried_and_training_continues_exactly():
  import optax

  model, variables, inputs, net = trace_small(nets.GroupedConvNet, batch=3)
  masks = _random_traced_masks(net, 2)
  opt = optax.adam(1e-2)

  def masked_loss(params, x):
    return jnp.mean(bp.masked_apply(net, {**variables, "params": params}, masks, x) ** 2)

  def small_loss(params, x):
    return jnp.mean(small.apply({**small_vars, "params": params}, x) ** 2)

  def step(loss, params, state, x):
    updates, state = opt.update(jax.grad(loss)(params, x), state)
    return optax.apply_updates(params, updates), state

  masked_step = fast_jit(partial(step, masked_loss))
  params, state = variables["params"], opt.init(variables["params"])
  for _ in range(2):
    params, state = masked_step(params, state, *inputs)
  small, small_vars, small_state = bp.materialize_traced(net, {**variables, "params": params}, masks, opt_state=state)
  assert jax.tree_util.tree_structure(small_state) == jax.tree_util.tree_structure(opt.init(small_vars["params"]))
  # one more step on each side: the small network's parameters are the masked network's, sliced
  params, _ = masked_step(params, state, *inputs)
  small_params, _ = fast_jit(partial(step, small_loss))(small_vars["params"], small_state, *inputs)
  _, want = bp.materialize_traced(net, {**variables, "params": params}, masks)
  jax.tree_util.tree_map(_close, small_params, want["params"])


def test_materialize_compiles_nothing():
  """Slicing is done in NumPy (one gather per leaf), not by compiling a gather per leaf and width."""
  from jax import monitoring

  _, variables, _, net = _setup(nets.DenseNet)
  masks = _random_traced_masks(net, 0)
  compiles = []
  monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None)
  bp.materialize_traced(net, variables, masks)
  assert compiles == []


def test_count_traced_on_any_network_and_independent_of_the_traced_batch():
  class ConstConv(nn.Module):  # a conv applied to a constant (a fixed map), then to the input
    @nn.compact
    def __call__(self, x, train=False):
      bias_map = nn.Conv(4, (3, 3), name="map")(jnp.ones((1, 8, 8, 2)))
      return nn.Conv(4, (3, 3), name="c")(x) + bias_map

  model = ConstConv()
  counts = []
  for batch in (1, 4):
    x = jnp.ones((batch, 8, 8, 3))
    variables = random_variables(model, x)
    net = bp.trace_network(model, variables, x)
    counts.append(bp.count_traced(net, variables)[1])
    assert bp.count_traced(model, variables, x) == bp.count_traced(net, variables)
  assert counts[0] == counts[1] == 64 * 4 * 3 * 9 + 64 * 4 * 2 * 9
  with pytest.raises(ValueError, match="example inputs"):
    bp.count_traced(model, variables)


def test_masked_apply_in_a_jitted_differentiated_train_step():
  """What a training loop does: gradients of a train-mode loss in the parameters and the block gates, with
  mutable statistics and dropout keys."""
  model, variables, inputs, _ = trace_small(nets.MobileNet, batch=4)
  net = bp.trace_network(model, variables, *inputs, modes={"eval": {}, "train": {**TRAIN, "rngs": {
      "dropout": jax.random.key(0)}}})
  masks = _random_traced_masks(net, 0, drop_blocks=False)

  @jax.jit
  def step(params, gates, key):
    def loss(params, gates):
      out, upd = bp.masked_apply(net, {**variables, "params": params}, masks, *inputs, mode="train",
                                 block_gates=gates, rngs={"dropout": key})
      return jnp.mean(out ** 2), upd
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, gates)

  (g_params, g_gates), upd = step(variables["params"], {"project": jnp.float32(1.0)}, jax.random.key(1))
  assert float(jnp.abs(g_gates["project"])) > 0
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(g_params))
  assert jax.tree_util.tree_structure(upd["batch_stats"]) == jax.tree_util.tree_structure(variables["batch_stats"])
