"""The channel coupling traced from the jaxpr: it must reproduce the families' declared groups,
follow concatenation, depthwise and grouped convolutions, side inputs, reshapes splitting a channel
axis, attention, train-mode ops and remat, and report by name what it cannot follow."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.families.structure import declared_members
from tests import nets
from tests.real_networks import random_variables

TRAIN = {"train": True, "mutable": ["batch_stats"]}


@pytest.mark.parametrize("name", ["resnet_v2_20", "resnet_v1_bottleneck_20", "resnet_v1_14", "resnet_v2_11"])
def test_traced_groups_equal_declared_groups(name):
  model = bp.create_model(name)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)  # tracing needs the shapes only
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
  variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)  # tracing needs the shapes only
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
  assert codes.shape == (13, 1)  # one factor per position
  assert codes[:, 0].tolist() == ([off["b1"] + i for i in range(4)] + [off["b2b"] + i for i in range(6)]
                            + [off["b3"] + i for i in range(3)])
  assert net.blocks == {}


def test_depthwise_convolutions_join_their_input_group():
  net = _trace(nets.MobileNet)
  assert {n: g.width for n, g in net.groups.items()} == {"stem": 8, "pw1": 16, "dw2": 2, "pw2": 16, "expand": 32}
  assert ("params/dw1/kernel", 3) in _members(net, "stem")
  # multiplier 2: output 2 * c + k is (input channel c) x (copy k); the copies are a group of their own
  assert ("params/dw2/kernel", 3) in _members(net, "pw1") & _members(net, "dw2")
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


def test_layernorm_and_channel_slices_are_followed():
  """A reduction over channels (LayerNorm) is computed over the kept channels, a slice of the channel axis keeps
  the kept channels of its range: neither keeps a group whole."""
  net = _trace(nets.UnfollowableNet)
  assert net.unfollowed == []
  assert set(net.groups) == {"c1", "c2", "c3", "c4"}
  assert ("params/ln/scale", 0) in _members(net, "c2")


def trace_small(cls, batch=2, modes=None, seed=0, **kwargs):
  """(model, variables, inputs, net) for one of the issue-12 networks at its small input shape."""
  model = cls(**kwargs)
  shape = nets.INPUT_SHAPES.get(cls, (8, 8, 3))
  x = jax.random.normal(jax.random.key(seed + 100), (batch,) + shape)
  variables = random_variables(model, x, seed=seed)
  return model, variables, (x,), bp.trace_network(model, variables, x, modes=modes)


def _widths(net):
  return sorted(g.width for g in net.groups.values())


def _producer_group(net, path, axis):
  """Names of the groups the output axis ``axis`` of kernel ``path`` maps into."""
  return sorted(n for n, g in net.groups.items() if (path, axis) in g.members)


def assert_kept_whole_is_reported(net):
  """Every parameter axis kept whole is kept because it reaches the network's input or output, or because of an
  op listed in ``net.unfollowed``: nothing is kept silently."""
  listed = {str(u) for u in net.unfollowed}
  for (path, axis), reason in net.coupling.fixed.items():
    assert reason.startswith("reaches the network's") or reason in listed, (path, axis, reason, listed)


def test_grouped_convolution_prunes_whole_groups_and_equal_numbers_per_group():
  _, _, _, net = trace_small(nets.GroupedConvNet)
  assert net.unfollowed == []
  # pw1's 8 channels are read as 2 groups x 4 per group: one group of 2 (whole groups) and one of 4 (positions in
  # every group); the grouped conv's output is 2 groups (the same ones) x 4 of its own
  assert _producer_group(net, "params/grouped/kernel", 2) == [n for n in _producer_group(net, "params/pw1/kernel", 3)
                                                              if net.groups[n].width == 4]
  assert sorted(net.groups[n].width for n in _producer_group(net, "params/pw1/kernel", 3)) == [2, 4]
  assert sorted(net.groups[n].width for n in _producer_group(net, "params/grouped/kernel", 3)) == [2, 4]
  assert set(_producer_group(net, "params/pw1/kernel", 3)) & set(_producer_group(net, "params/grouped/kernel", 3))
  assert _widths(net) == [2, 4, 4, 6]


def test_grouped_convolution_on_the_input_traces():
  """The issue's crash: a grouped 1x1 convolution reading the network's input, writing its output."""
  model = nn.Conv(4, (1, 1), feature_group_count=2)
  x = jnp.ones((1, 2, 2, 4))
  variables = random_variables(model, x)
  net = bp.trace_network(model, variables, x)
  assert net.groups == {} and net.unfollowed == []
  small, small_vars = bp.materialize_traced(net, variables, bp.init_traced_masks(net))
  assert jnp.allclose(small.apply(small_vars, x), model.apply(variables, x))


@pytest.mark.parametrize("cls", [nets.ChannelShuffleNet, nets.DepthToSpaceNet, nets.DenseToMapNet, nets.GroupNormNet,
                                 nets.FusedQKVNet], ids=lambda c: c.__name__)
def test_reshapes_splitting_a_channel_axis_are_followed(cls):
  _, _, _, net = trace_small(cls)
  assert net.unfollowed == []
  assert_kept_whole_is_reported(net)
  producer = {"ChannelShuffleNet": "c1", "DepthToSpaceNet": "c1", "DenseToMapNet": "project", "GroupNormNet": "c1",
              "FusedQKVNet": "qkv"}[cls.__name__]
  axis = 3 if cls.__name__ in ("ChannelShuffleNet", "DepthToSpaceNet", "GroupNormNet") else 1
  assert _producer_group(net, f"params/{producer}/kernel", axis), net.coupling.summary()


def test_reshape_granularity():
  """GroupNorm: whole groups and equal positions per group; depth-to-space: the channels left after the two spatial
  factors; a dense output viewed as a 4x4x6 map: its 6 channels; fused qkv: heads and head dims."""
  _, _, _, net = trace_small(nets.GroupNormNet)
  assert sorted(net.groups[n].width for n in _producer_group(net, "params/c1/kernel", 3)) == [2, 4]
  _, _, _, net = trace_small(nets.DepthToSpaceNet)
  assert [net.groups[n].width for n in _producer_group(net, "params/c1/kernel", 3)] == [2]
  _, _, _, net = trace_small(nets.DenseToMapNet)
  assert [net.groups[n].width for n in _producer_group(net, "params/project/kernel", 1)] == [6]
  _, _, _, net = trace_small(nets.FusedQKVNet)
  assert sorted(net.groups[n].width for n in _producer_group(net, "params/qkv/kernel", 1)) == [2, 4]
  assert ("params/proj/kernel", 0) in net.groups[_producer_group(net, "params/qkv/kernel", 1)[0]].members


def test_dense_general_and_multi_head_attention():
  _, _, _, net = trace_small(nets.DenseGeneralNet)
  assert net.unfollowed == []
  assert _producer_group(net, "params/split/kernel", 1) and _producer_group(net, "params/split/kernel", 2)
  _, _, _, net = trace_small(nets.AttentionNet)
  assert net.unfollowed == []
  heads = _producer_group(net, "params/attn/query/kernel", 1)
  assert len(heads) == 1 and net.groups[heads[0]].width == 2
  for path, axis in [("params/attn/key/kernel", 1), ("params/attn/value/kernel", 1), ("params/attn/out/kernel", 0)]:
    assert (path, axis) in net.groups[heads[0]].members
  qk = _producer_group(net, "params/attn/query/kernel", 2)
  v = _producer_group(net, "params/attn/value/kernel", 2)
  assert len(qk) == len(v) == 1 and qk != v  # q/k dims paired, v dims paired with the output projection
  assert ("params/attn/key/kernel", 2) in net.groups[qk[0]].members
  assert ("params/attn/out/kernel", 1) in net.groups[v[0]].members
  assert ("params/ln1/scale", 0) in net.groups[_producer_group(net, "params/embed/kernel", 1)[0]].members


@pytest.mark.parametrize("cls", [nets.GateNet, nets.GroupedConvNet, nets.InceptionNet, nets.DenseNet],
                         ids=lambda c: c.__name__)
def test_train_mode_keeps_the_eval_groups(cls):
  """Batch statistics, dropout masks and count divisions in train mode change no group."""
  _, variables, (x,), eval_net = trace_small(cls)
  train = {**TRAIN, "rngs": {"dropout": jax.random.key(1)}}
  both = bp.trace_network(cls(), variables, x, modes={"eval": {}, "train": train})
  assert {n: g.members for n, g in both.groups.items()} == {n: g.members for n, g in eval_net.groups.items()}
  assert both.unfollowed == [] and set(both.blocks) == set(eval_net.blocks)


def test_size_one_gates_scalars_count_maps_and_dropout_keep_every_group():
  _, _, _, net = trace_small(nets.GateNet, modes={"eval": {}, "train": {"train": True,
                                                                        "rngs": {"dropout": jax.random.key(1)}}})
  assert set(net.groups) == {"c1", "c2", "c3"} and net.unfollowed == []
  assert ("params/fc/kernel", 0) in net.groups["c3"].members  # the dense layer after the dropout


def test_remat_is_followed():
  _, _, _, plain = trace_small(nets.RematNet, remat=False)
  _, _, _, remat = trace_small(nets.RematNet, remat=True)
  assert {n: g.members for n, g in remat.groups.items()} == {n: g.members for n, g in plain.groups.items()}
  assert set(remat.blocks) == set(plain.blocks) == {"block0", "block1"}


def test_ops_that_forbid_pruning_are_reported_by_name():
  _, _, _, net = trace_small(nets.SortNet)
  reports = [str(u) for u in net.unfollowed]
  assert len(reports) == 1 and reports[0].startswith("sort at SortNet"), reports
  assert set(net.groups) == {"c1", "c3"}
  assert "sort" in net.coupling.fixed[("params/c2/kernel", 3)]
  assert "not followed: sort" in net.coupling.summary()
  assert_kept_whole_is_reported(net)


def test_sub_programs_are_inlined_and_control_flow_passes_channels_through():
  _, _, _, net = trace_small(nets.ControlFlowNet)
  assert set(net.groups) == {"c1", "c3"}  # c1 through custom_vjp, checkpoint, a cond and a loop; c2 into a branch
  assert [str(u) for u in net.unfollowed] == [
      "cond at ControlFlowNet: computes with these channels inside a branch or loop body"]
  assert_kept_whole_is_reported(net)


def test_weights_computed_from_two_variables_are_named_after_the_kernel():
  _, _, _, net = trace_small(nets.WeightNormNet)
  # (the wrapped convolutions are created in the parent's scope: Conv_0, Conv_1; their scales under c1, c2)
  assert set(net.groups) == {"Conv_0", "Conv_1"} and net.unfollowed == []
  assert ("params/c1/Conv_0/kernel/scale", 0) in net.groups["Conv_0"].members


# -- one op's split whatever the modes; weights picked by the inputs (issue 26) -------------------------------------

class _WindowAttention(nn.Module):
  """A Swin-style block: windows cut by reshapes, a fused qkv split by ``reshape(..., 3, heads, dim).transpose``, a
  relative position bias, dropout on the attention weights."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, hh, ww, c = x.shape
    h = nn.LayerNorm(name="norm")(x).reshape(b, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    h = h.reshape(-1, 4, c)
    qkv = nn.Dense(3 * c, name="qkv")(h).reshape(h.shape[0], 4, 3, 2, c // 2).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias = self.param("rel_bias", nn.initializers.normal(0.02), (2, 4, 4))
    att = nn.Dropout(0.1, deterministic=not train)(jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) + bias[None], -1))
    o = nn.Dense(c, name="proj")((att @ v).transpose(0, 2, 1, 3).reshape(-1, 4, c))
    x = x + o.reshape(b, hh // 2, ww // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class _SwinNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return _WindowAttention(name="blk")(nn.Conv(8, (2, 2), strides=2, name="patch")(x), train)


@pytest.mark.parametrize("cls,shape", [(nets.FusedQKVNet, (5, 6)), (_SwinNet, (8, 8, 3))], ids=["qkv", "swin"])
def test_a_fused_qkv_split_is_the_same_however_many_modes_are_traced(cls, shape):
  model = cls()
  x = jax.random.normal(jax.random.key(0), (2,) + shape)
  variables = random_variables(model, x)
  train = {"train": True, "rngs": {"dropout": jax.random.key(1)}}
  seen = []
  for modes in ({"eval": {}}, {"eval": {}, "eval2": {}}, {"eval": {}, "train": train}):
    net = bp.trace_network(model, variables, x, modes=modes)
    assert net.unfollowed == [], net.coupling.summary()
    seen.append({n: (g.width, g.members) for n, g in net.groups.items()})
  assert seen[0] == seen[1] == seen[2]
  qkv = sorted(g.width for n, g in net.groups.items() if "qkv" in n)
  assert qkv == [2, 4], seen[0]  # heads and head dims


class _Experts(nn.Module):
  """A mixture-of-experts layer: per-token kernels picked from a stack of 3 by the inputs."""

  how: str
  hidden: int = 6
  embed: int = 4

  @nn.compact
  def __call__(self, x, idx):
    x = nn.Dense(self.embed, name="embed")(x)
    w = self.param("experts", nn.initializers.normal(0.5), (3, self.embed, self.hidden))
    if self.how == "index":
      h = jnp.einsum("bd,bdh->bh", x, w[idx])
    elif self.how == "take":
      h = jnp.einsum("bd,bdh->bh", x, jnp.take(w, idx, axis=0))
    elif self.how == "dynamic_slice":
      h = x @ jax.lax.dynamic_index_in_dim(w, idx[0], 0, keepdims=False)
    elif self.how == "static":
      h = x @ w[1]
    else:  # picks hidden channels by the inputs: not followable
      h = jnp.einsum("bd,bd->b", x, w[1][:, idx].T)[:, None] * jnp.ones((1, self.hidden))
    return nn.Dense(2, name="out")(nn.relu(h))


@pytest.mark.parametrize("how", ["index", "take", "dynamic_slice", "static"])
def test_gathered_expert_kernels_are_followed(how):
  x = jax.random.normal(jax.random.key(0), (5, 3))
  idx = jnp.asarray([0, 2, 1, 2, 0])
  model = _Experts(how)
  variables = random_variables(model, x, idx)
  net = bp.trace_network(model, variables, x, idx)
  assert {n: g.width for n, g in net.groups.items()} == {"embed": 4, "experts": 6}, net.coupling.summary()
  assert ("params/out/kernel", 0) in net.groups["experts"].members
  assert ("params/experts", 1) in net.groups["embed"].members
  assert_kept_whole_is_reported(net)
  # the pruned network is the same layer with 4 hidden channels and 3 embedding channels, the kept weights copied
  keep_h, keep_e = np.array([0, 2, 3, 5]), np.array([0, 1, 3])
  masks = bp.init_traced_masks(net)
  masks["channels"]["experts"] = jnp.zeros(6).at[keep_h].set(1.0)
  masks["channels"]["embed"] = jnp.zeros(4).at[keep_e].set(1.0)
  p = variables["params"]
  ref_params = {"embed": {"kernel": p["embed"]["kernel"][:, keep_e], "bias": p["embed"]["bias"][keep_e]},
                "experts": p["experts"][:, keep_e][:, :, keep_h],
                "out": {"kernel": p["out"]["kernel"][keep_h], "bias": p["out"]["bias"]}}
  small, small_vars = bp.materialize_traced(net, variables, masks)
  want = _Experts(how, hidden=4, embed=3).apply({"params": ref_params}, x, idx)
  for got in (bp.masked_apply(net, variables, masks, x, idx), small.apply(small_vars, x, idx)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert small_vars["params"]["experts"].shape == (3, 3, 4)


def test_expert_kernels_picked_along_their_channels_are_listed_as_kept_whole():
  x = jax.random.normal(jax.random.key(0), (5, 3))
  idx = jnp.asarray([0, 2, 1, 2, 0])
  model = _Experts("columns")
  net = bp.trace_network(model, random_variables(model, x, idx), x, idx)
  assert "experts" not in net.groups
  assert "gather" in net.coupling.fixed[("params/experts", 2)]
  assert any(u.op == "gather" for u in net.unfollowed)
  assert_kept_whole_is_reported(net)


class _InputScaledKernel(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.5), (3, 6))
    return nn.Dense(2, name="out")(nn.relu(x @ (w * jnp.mean(x))))  # a kernel computed from the inputs


def test_a_kernel_computed_from_the_inputs_is_listed_as_kept_whole():
  x = jax.random.normal(jax.random.key(0), (5, 3))
  model = _InputScaledKernel()
  net = bp.trace_network(model, random_variables(model, x), x)
  assert not net.groups
  assert {(u.op, u.where) for u in net.unfollowed} == {("variable", "params/w"), ("variable", "params/out/kernel")}
  assert "no layer the analysis follows" in net.coupling.fixed[("params/w", 1)]
  assert "no layer the analysis follows" in net.coupling.fixed[("params/out/kernel", 0)]
  assert_kept_whole_is_reported(net)
