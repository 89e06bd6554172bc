"""The channel coupling traced from the jaxpr: it must reproduce the families' declared groups,
follow concatenation, depthwise convolutions and side inputs, and report what it cannot follow."""

import jax
import jax.numpy as jnp
import pytest

import bpcp_jax as bp
from bpcp_jax.families.structure import declared_members
from tests import nets

TRAIN = {"train": True, "mutable": ["batch_stats"]}


@pytest.mark.parametrize("name", ["resnet_v2_20", "resnet_v1_bottleneck_20", "resnet_v1_14", "resnet_v2_11"])
def test_traced_groups_equal_declared_groups(name):
  model = bp.create_model(name)
  x = jnp.zeros((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  net = bp.trace_network(model, variables, x, modes={"eval": {}, "train": TRAIN})
  declared = declared_members(model.spec)
  traced = {frozenset(g.members) for g in net.groups.values()}
  assert traced == {frozenset(m) for m in declared.values()}
  widths = {frozenset(g.members): g.width for g in net.groups.values()}
  assert sorted(widths.values()) == sorted(bp.group_widths(model.spec).values())
  assert set(net.blocks) == set(model.spec.block_names())
  assert net.unfollowed == []
  # the stem conv's input (the image) and the classifier's output axis are never pruned
  assert net.coupling.fixed[("params/stem_conv/kernel", 2)]
  assert ("params/head_fc/kernel", 1) in net.coupling.fixed


def _trace(cls, batch=2):
  model = cls()
  x = jnp.ones((batch, 16, 16, 3))
  inputs = (x, jnp.ones((batch, 1))) if cls is nets.TwoInputNet else (x,)
  variables = model.init(jax.random.key(0), *inputs)
  return bp.trace_network(model, variables, *inputs)


def _members(net, group):
  return set(net.groups[group].members)


def test_concatenation_lays_groups_side_by_side():
  net = _trace(nets.InceptionNet)
  assert {n: g.width for n, g in net.groups.items()} == {"stem": 8, "b1": 4, "b2a": 4, "b2b": 6, "b3": 3}
  for branch in ("b1", "b2b", "b3"):  # the BN after the concat and the classifier read every branch
    assert {("params/mix_bn/scale", 0), ("params/fc/kernel", 0)} <= _members(net, branch)
  # positions of the concatenated axis carry the branch groups at their offsets
  program = next(iter(next(iter(net._cache.values()))[0].values()))
  codes = net.coupling.codes[program][program.invars[program.var_paths.index("params/mix_bn/scale")]][0]
  off = net.coupling.offsets
  assert codes.tolist() == ([off["b1"] + i for i in range(4)] + [off["b2b"] + i for i in range(6)]
                            + [off["b3"] + i for i in range(3)])
  assert net.blocks == {}


def test_depthwise_convolutions_join_their_input_group():
  net = _trace(nets.MobileNet)
  assert {n: g.width for n, g in net.groups.items()} == {"stem": 8, "pw1": 16, "pw2": 16, "expand": 32}
  assert ("params/dw1/kernel", 3) in _members(net, "stem")
  assert ("params/dw2/kernel", 3) in _members(net, "pw1")  # multiplier 2: 32 outputs, 16 channels
  assert ("params/project/kernel", 3) in _members(net, "pw2")  # tied by the residual add
  assert list(net.blocks) == ["project"]
  assert "params/expand/kernel" in net.blocks["project"].params


def test_dense_block_concatenations():
  net = _trace(nets.DenseNet)
  assert {n: g.width for n, g in net.groups.items()} == {"stem": 8, "layer0": 4, "layer1": 4, "layer2": 4}
  assert ("params/layer2/kernel", 2) in _members(net, "stem") & _members(net, "layer0") & _members(net, "layer1")


def test_side_input_is_coupled_but_not_a_residual_block():
  net = _trace(nets.TwoInputNet)
  assert {("params/side/kernel", 1), ("params/side/bias", 0), ("params/fc/kernel", 0)} <= _members(net, "c2")
  assert net.blocks == {}  # image features + side embedding: two inputs meeting, not x + f(x)
  assert all(("params/side/kernel", 0) not in g.members for g in net.groups.values())


def test_unfollowable_ops_are_reported_by_name_and_left_unpruned():
  net = _trace(nets.UnfollowableNet)
  reports = [str(u) for u in net.unfollowed]
  assert any(r.startswith("reduce_sum at UnfollowableNet/ln") for r in reports), reports
  assert any(r.startswith("slice at UnfollowableNet") and "slices a channel axis" in r for r in reports), reports
  assert set(net.groups) == {"c1", "c4"}  # c2 (LayerNorm) and c3 (sliced) are not pruned
  assert "ln" in net.coupling.fixed[("params/c2/kernel", 3)]
  assert "slice" in net.coupling.fixed[("params/c3/kernel", 3)]
  assert "not followed: slice" in net.coupling.summary()
