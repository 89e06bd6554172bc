"""The pruned network as the user's own linen class: rebuilt == PrunedNetwork == masked, in eval and
train mode; methods, nn.tabulate, other batch sizes, init and a plan restored from JSON work; the
modules that cannot be rebuilt fall back to the PrunedNetwork with a warning naming them."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.tracer.rebuild import RebuildWarning

TRAIN = {"train": True, "mutable": ["batch_stats"]}


def _bn(train):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class VGG(nn.Module):
  """Conv-BN-ReLU-pool stages, a flatten, dropout and two dense layers."""

  widths: tuple = (8, 16)
  rate: float = 0.3

  @nn.compact
  def __call__(self, x, train: bool = False):
    for f in self.widths:
      x = nn.max_pool(nn.relu(_bn(train)(nn.Conv(f, (3, 3), use_bias=False)(x))), (2, 2), (2, 2))
    x = nn.Dropout(self.rate, deterministic=not train)(x.reshape((x.shape[0], -1)))
    x = nn.Dropout(self.rate, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(4)(x)


class Block(nn.Module):
  """``x + f(x)``; with ``project``, ``conv1x1(x) + f(x)``; with ``post_relu``, ``relu(x + f(x))``."""

  features: int
  project: bool = False
  post_relu: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(_bn(train)(nn.Conv(self.features, (3, 3), use_bias=False)(x)))
    h = _bn(train)(nn.Conv(self.features, (3, 3), use_bias=False)(h))
    shortcut = nn.Conv(self.features, (1, 1), name="shortcut")(x) if self.project else x
    return nn.relu(shortcut + h) if self.post_relu else shortcut + h


class ResNet(nn.Module):
  """A stem, residual blocks (``kinds``: "id", "proj" or "v1"), a pooled dense head, and a
  ``probs`` method."""

  kinds: tuple = ("id", "id", "id")

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(_bn(train)(nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
    for k in self.kinds:
      h = Block(8, project=k == "proj", post_relu=k == "v1")(h, train)
    return nn.Dense(5, name="head")(jnp.mean(h, axis=(1, 2)))

  def probs(self, x):
    return nn.softmax(self(x))


class SetupBlock(nn.Module):
  features: int

  def setup(self):
    self.conv1 = nn.Conv(self.features, (3, 3))
    self.conv2 = nn.Conv(self.features, (3, 3))

  def __call__(self, x):
    return x + self.conv2(nn.relu(self.conv1(x)))


class SetupNet(nn.Module):
  """setup()-style: layers and a list of blocks declared in setup, an ``embed`` method."""

  def setup(self):
    self.stem = nn.Conv(8, (3, 3))
    self.blocks = [SetupBlock(8) for _ in range(3)]
    self.head = nn.Dense(5)

  def embed(self, x):
    h = nn.relu(self.stem(x))
    for b in self.blocks:
      h = b(h)
    return jnp.mean(h, axis=(1, 2))

  def __call__(self, x):
    return self.head(self.embed(x))


class DepthwiseNet(nn.Module):
  """Depthwise convs (multiplier 1 and 2) between pointwise ones, in a residual block."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(_bn(train)(nn.Conv(8, (3, 3), use_bias=False)(x)))
    h = nn.Conv(8, (3, 3), feature_group_count=8, name="dw1")(h)
    h = nn.relu(nn.Conv(12, (1, 1), name="pw1")(h))
    h = nn.Conv(24, (3, 3), feature_group_count=12, name="dw2")(h)
    return nn.Dense(5)(jnp.mean(nn.Conv(16, (1, 1), name="pw2")(h), axis=(1, 2)))


class HardFlatten(nn.Module):
  """A flatten whose size is hard-coded."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    return nn.Dense(3)(h.reshape((h.shape[0], 4 * 4 * 6)))


class HardSplit(nn.Module):
  """A split of the channels at a hard-coded index, the halves going to different layers."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3))(x))
    a, b = jnp.split(h, [4], axis=-1)
    return nn.Dense(3)(jnp.mean(nn.Conv(4, (1, 1))(a) * nn.Conv(4, (1, 1))(b), axis=(1, 2)))


class Gate(nn.Module):
  """A layer of a type the library does not know: a width from an attribute, or from the input."""

  width: int = 0

  @nn.compact
  def __call__(self, x):
    return x * self.param("gate", nn.initializers.ones, (self.width or x.shape[-1],))[None, None, None]


class GatedNet(nn.Module):
  from_input: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3))(x))
    h = Gate(0 if self.from_input else 8)(h)
    return nn.Dense(3)(jnp.mean(nn.Conv(6, (3, 3))(h), axis=(1, 2)))


def _random_variables(model, inputs, seed):
  """Variables of ``model`` drawn with NumPy (kernels scaled by fan-in, positive vectors, so that
  statistics and biases are non-trivial): no initializer is compiled. Everything that runs in
  these tests is jitted: one compilation costs much less than one per eager op."""
  rng = np.random.default_rng(seed)
  inputs = inputs if isinstance(inputs, tuple) else (inputs,)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(seed), *inputs))
  return jax.tree_util.tree_map(
      lambda s: (rng.uniform(0.5, 1.5, s.shape) if len(s.shape) == 1
                 else rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32), shapes)


def _setup(model, shape=(4, 8, 8, 3), train=True, seed=0):
  """Input, NumPy variables and the traced network."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  variables = _random_variables(model, x, seed)
  modes = {"eval": {}}
  if train:
    modes["train"] = {**TRAIN, "rngs": {"dropout": jax.random.key(7)}}
  return x, variables, bp.trace_network(model, variables, x, modes=modes)


def _masks(net, seed, remove=()):
  rng = np.random.default_rng(seed)
  masks = bp.init_traced_masks(net)
  for name, g in net.groups.items():
    keep = rng.random(g.width) < 0.6
    keep[rng.integers(g.width)] = True
    masks["channels"][name] = keep.astype(np.float32)
  for name in remove:
    masks["blocks"][name] = np.float32(-1.0)
  return masks


def _close(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(y).max())))


def _apply(module, variables, x, **kw):
  return jax.jit(lambda v, x: module.apply(v, x, **kw))(variables, x)


def _masked(net, variables, masks, x, mode="eval"):
  rngs = net.modes[mode].get("rngs")  # the keys the rebuilt module is called with
  return jax.jit(lambda v, x: bp.masked_apply(net, v, masks, x, mode=mode, rngs=rngs))(variables, x)


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def _rebuilt(model, remove=(), seed=0, **setup):
  """Trace, prune, rebuild; check rebuilt == PrunedNetwork == masked in eval and train mode."""
  x, variables, net = _setup(model, **setup)
  masks = _masks(net, seed, remove)
  _, small_vars = bp.materialize_traced(net, variables, masks)
  rebuilt, report = bp.rebuild(net, small_vars, masks, x)
  assert report.rebuilt and not report.problems, report
  assert isinstance(rebuilt, type(model)) and not isinstance(rebuilt, bp.PrunedNetwork)
  # each removed block: its module skipped, or the modules only its branch uses zeroed
  assert set(report.plan["removed_blocks"]) <= set(remove), report.plan
  assert not remove or report.plan["removed_blocks"] or report.plan.get("zeroed"), report.plan
  # rebuild compared it with the PrunedNetwork (outputs and updated statistics); here with the masked network
  assert set(report.max_abs_diff) == set(net.modes) and max(report.max_abs_diff.values()) <= 1e-5
  _close(_apply(rebuilt, small_vars, x), _masked(net, variables, masks, x))
  if "train" in net.modes:
    out, upd = _apply(rebuilt, small_vars, x, **net.modes["train"])
    masked, masked_upd = _masked(net, variables, masks, x, mode="train")
    _close(out, masked)
    # the updated statistics are the masked network's, sliced like the variables
    _, want = bp.materialize_traced(net, {**variables, **masked_upd}, masks)
    _close(upd["batch_stats"], want["batch_stats"])
  created = jax.eval_shape(lambda: rebuilt.init(jax.random.key(1), x))
  assert _shapes(created) == _shapes(small_vars)
  return x, variables, net, masks, small_vars, rebuilt, report


def test_vgg_with_batchnorm_and_dropout():
  # without random ops, the train mode compares exactly (outputs and updated statistics)
  _, _, _, _, _, _, report = _rebuilt(VGG(rate=0.0))
  assert report.plan["layers"], "nothing was narrowed"
  # with dropout, a narrowed Dropout draws its own mask: eval exact, train mode in shapes, and
  # dropout draws from the rngs given at call time
  model = VGG()
  x, variables, net = _setup(model)
  masks = _masks(net, 0)
  _, small_vars = bp.materialize_traced(net, variables, masks)
  rebuilt, report = bp.rebuild(net, small_vars, masks, x)
  assert report.rebuilt and not report.problems, report
  assert isinstance(rebuilt, VGG) and set(report.max_abs_diff) == {"eval"}
  x7 = np.random.default_rng(3).normal(size=(7, 8, 8, 3)).astype(np.float32)
  _close(jax.jit(rebuilt.apply)(small_vars, x7), _masked(net, variables, masks, x7))
  run = jax.jit(lambda v, x, key: rebuilt.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}))
  a, upd = run(small_vars, x7, jax.random.key(1))
  b, _ = run(small_vars, x7, jax.random.key(2))
  assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-3
  assert _shapes(upd["batch_stats"]) == _shapes(small_vars["batch_stats"])


def test_resnet_identity_blocks_removed_methods_tabulate_and_json_plan():
  x, variables, net, masks, small_vars, rebuilt, report = _rebuilt(ResNet(), remove=("Block_0", "Block_2"))
  assert not {"Block_0", "Block_2"} & set(small_vars["params"])
  probs = _apply(rebuilt, small_vars, x, method=ResNet.probs)
  logits = np.asarray(_masked(net, variables, masks, x))
  _close(probs, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  _close(_apply(rebuilt, small_vars, x, method="probs"), probs)
  table = nn.tabulate(rebuilt, jax.random.key(0), console_kwargs={"width": 300, "force_terminal": False})(x)
  assert "Block_1/Conv_0" in table and f"kernel: float32[3,3,3,{int(masks['channels']['stem'].sum())}]" in table
  # a checkpoint: the class (a factory) and the plan as JSON give the same network
  restored = bp.narrow(ResNet(), json.loads(json.dumps(report.plan)))
  assert bp.plan_of(restored) == report.plan
  _close(_apply(restored, small_vars, x, **TRAIN), _apply(rebuilt, small_vars, x, **TRAIN))
  assert _shapes(jax.eval_shape(lambda: restored.init(jax.random.key(3), x[:2]))) == _shapes(small_vars)


def test_setup_style_module_and_its_methods():
  x, variables, net, masks, small_vars, rebuilt, report = _rebuilt(SetupNet(), remove=("blocks_1",), train=False)
  assert report.plan["removed_blocks"] == ["blocks_1"]
  _close(_apply(rebuilt, small_vars, x, method="embed"), _apply(rebuilt, small_vars, x, method=SetupNet.embed))
  # the rebuilt network pruned again: its plan, from the original class, has both rounds
  net2 = bp.trace_network(rebuilt, small_vars, x)
  masks2 = _masks(net2, 1, remove=("blocks_2",))
  _, smaller_vars = bp.materialize_traced(net2, small_vars, masks2)
  smaller, report2 = bp.rebuild(net2, smaller_vars, masks2, x)
  assert report2.rebuilt and report2.plan["removed_blocks"] == ["blocks_1", "blocks_2"]
  _close(_apply(bp.narrow(SetupNet(), report2.plan), smaller_vars, x), _masked(net2, small_vars, masks2, x))


def test_depthwise_group_counts_follow_the_kept_channels():
  x, variables, net, masks, small_vars, rebuilt, report = _rebuilt(DepthwiseNet())
  layers = report.plan["layers"]
  assert layers["dw1"]["feature_group_count"] == small_vars["params"]["dw1"]["kernel"].shape[-1]
  assert layers["dw2"]["feature_group_count"] == small_vars["params"]["dw2"]["kernel"].shape[-1] // 2


def test_unknown_layer_taking_its_width_from_the_input_is_rebuilt():
  *_, report = _rebuilt(GatedNet(from_input=True), train=False)
  assert report.assumed and "Gate_0" in report.assumed[0]


def test_attention_heads_narrowed_from_the_variables():
  """num_heads/qkv_features from the pruned shapes; dropping heads 1 and 3 equals zeroing their
  rows of the output projection in the dense layer."""
  from bpcp_jax.tracer.rebuild import layer_widths

  class Att(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name="att")(x)

  model, x = Att(), np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
  variables = _random_variables(model, x, 1)
  keep = np.array([0, 2])
  att = variables["params"]["att"]
  small = {"params": {"att": {n: {"kernel": att[n]["kernel"][:, keep], "bias": att[n]["bias"][keep]}
                              for n in ("query", "key", "value")}}}
  small["params"]["att"]["out"] = {"kernel": att["out"]["kernel"][keep], "bias": att["out"]["bias"]}
  plan = {"format": bp.PLAN_FORMAT, "class": Att.__qualname__, "removed_blocks": [],
          "layers": layer_widths(model, variables, small, x)}
  assert plan["layers"]["att"] == {"num_heads": 2, "qkv_features": 8}
  zeroed = jax.tree_util.tree_map(np.copy, variables)
  zeroed["params"]["att"]["out"]["kernel"][np.array([1, 3])] = 0.0
  _close(_apply(bp.narrow(model, plan), small, x), _apply(model, zeroed, x))


def test_layer_types_narrowed_from_the_variables():
  """ConvTranspose, GroupNorm (a whole group cut), Embed and DenseGeneral widths from hand-sliced
  variables; equal to the dense network with the cut channels' weights downstream zeroed."""
  from bpcp_jax.tracer.rebuild import layer_widths

  class Net(nn.Module):
    @nn.compact
    def __call__(self, image, tokens):
      h = nn.ConvTranspose(8, (3, 3), name="up")(image)
      h = nn.GroupNorm(num_groups=4, name="gn")(h)
      e = nn.DenseGeneral((2, 3), name="proj")(nn.Embed(10, 6, name="embed")(tokens))
      return (nn.Dense(3, name="head")(jnp.mean(h, axis=(1, 2)))
              + nn.Dense(3, name="tok")(e.reshape(e.shape[:2] + (-1,))).sum(1))

  model = Net()
  image = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
  tokens = np.array([[1, 2, 3], [4, 5, 9]], np.int32)
  variables = _random_variables(model, (image, tokens), 0)
  p = variables["params"]
  keep_c = np.array([0, 1, 4, 5, 6, 7])  # the GroupNorm's group 1 cut
  keep_e, keep_g = np.array([0, 2, 3, 5]), np.array([0, 2])  # embedding features; the DenseGeneral's last axis
  small = {"params": {
      "up": {"kernel": p["up"]["kernel"][..., keep_c], "bias": p["up"]["bias"][keep_c]},
      "gn": {"scale": p["gn"]["scale"][keep_c], "bias": p["gn"]["bias"][keep_c]},
      "head": {"kernel": p["head"]["kernel"][keep_c], "bias": p["head"]["bias"]},
      "embed": {"embedding": p["embed"]["embedding"][:, keep_e]},
      "proj": {"kernel": p["proj"]["kernel"][keep_e][..., keep_g], "bias": p["proj"]["bias"][:, keep_g]},
      "tok": {"kernel": p["tok"]["kernel"].reshape(2, 3, 3)[:, keep_g].reshape(4, 3), "bias": p["tok"]["bias"]}}}
  layers = layer_widths(model, variables, small, image, tokens)
  assert layers == {"up": {"features": 6}, "gn": {"num_groups": 3}, "embed": {"features": 4},
                    "proj": {"features": [2, 2]}}
  zeroed = jax.tree_util.tree_map(np.copy, variables)
  zeroed["params"]["head"]["kernel"][[2, 3]] = 0.0
  zeroed["params"]["embed"]["embedding"][:, [1, 4]] = 0.0
  zeroed["params"]["tok"]["kernel"][[1, 4]] = 0.0  # (2, 3) features flattened: [i, 1] is row 3 * i + 1
  plan = {"format": bp.PLAN_FORMAT, "class": Net.__qualname__, "layers": layers, "removed_blocks": []}
  run = lambda m, v: jax.jit(lambda v: m.apply(v, image, tokens))(v)  # noqa: E731
  _close(run(bp.narrow(model, plan), small), run(model, zeroed))


# -- what cannot be rebuilt falls back to the PrunedNetwork ----------------------------------------

def _falls_back(model, match, remove=(), train=False):
  x, variables, net = _setup(model, train=train)
  masks = _masks(net, 0, remove)
  for g in net.groups:  # make sure every group is narrowed
    masks["channels"][g] = np.asarray(masks["channels"][g])
    masks["channels"][g][:2] = (0.0, 1.0)
  small, small_vars = bp.materialize_traced(net, variables, masks)
  with pytest.warns(RebuildWarning, match=match):
    module, report = bp.rebuild(net, small_vars, masks, x)
  assert isinstance(module, bp.PrunedNetwork) and not report.rebuilt and report.problems
  _close(_apply(module, small_vars, x), _masked(net, variables, masks, x))
  return report


def test_removed_block_with_projection_shortcut_is_rebuilt():
  """The modules of its branch are zeroed, its shortcut stays: ``shortcut(x) + 0``."""
  *_, report = _rebuilt(ResNet(kinds=("id", "proj")), remove=("Block_1",))
  assert report.plan["removed_blocks"] == [] and sorted(report.plan["zeroed"]) == [
      "Block_1/BatchNorm_0", "Block_1/BatchNorm_1", "Block_1/Conv_0", "Block_1/Conv_1"]
  _rebuilt(ResNet(kinds=("id", "proj")), remove=("Block_0",))  # the same network, its identity block removed


class TopLevelAdd(nn.Module):
  """A residual add written in the top-level module's own code."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    h = h + nn.Conv(8, (3, 3), name="c2")(nn.relu(nn.Conv(8, (3, 3), name="c1")(h)))
    return nn.Dense(3)(jnp.mean(h, axis=(1, 2)))


def test_removed_block_not_returned_by_its_own_module_is_rebuilt():
  """``relu(x + f(x))`` and an add in the top module's own code: the branch's modules return zeros."""
  *_, report = _rebuilt(ResNet(kinds=("v1", "id")), remove=("Block_0",))
  assert report.plan["removed_blocks"] == [] and "Block_0/Conv_1" in report.plan["zeroed"]
  (block,) = _setup(TopLevelAdd(), train=False)[2].blocks
  *_, report = _rebuilt(TopLevelAdd(), remove=(block,), train=False)
  assert sorted(report.plan["zeroed"]) == ["c1", "c2"]


def test_hard_coded_widths_fall_back():
  report = _falls_back(HardFlatten(), "<top>: init of the narrowed class fails.*reshape")
  assert report.plan["layers"]  # it was planned, then refuted by the check
  _falls_back(HardSplit(), r"Conv_\d: init of the narrowed class")


def test_unknown_layer_with_a_width_attribute_falls_back():
  report = _falls_back(GatedNet(from_input=False), "Gate_0.*does not know")
  assert report.assumed


class _Encoder(nn.Module):
  @nn.compact
  def features(self, x):  # reached through a method other than __call__
    return nn.relu(nn.Conv(16, (3, 3), feature_group_count=8, name="dw")(x))


class _MethodNet(nn.Module):
  def setup(self):
    self.stem, self.enc, self.head = nn.Conv(8, (3, 3)), _Encoder(), nn.Dense(3)

  def __call__(self, x, train: bool = False):
    return self.head(self.enc.features(nn.relu(self.stem(x))).mean((1, 2)))


class _DepthwiseBlock(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(16, (3, 3), feature_group_count=8, name="dw")(nn.relu(x))
    return x + nn.Conv(8, (1, 1), name="project")(nn.relu(h))


class _RematNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="stem")(x)
    x = nn.remat(_DepthwiseBlock)(name="block")(x, train)
    return nn.Dense(3)(x.mean((1, 2)))


@pytest.mark.parametrize("model, dw", [(_MethodNet(), "enc/dw"), (_RematNet(), "block/dw")])
def test_grouped_conv_counts_follow_the_kernels_module(model, dw):
  """A depthwise multiplier pruned 2 -> 1 and input channels 8 -> 6: the rebuilt class convolves in
  6 groups, whether the conv is reached through another method or inside nn.remat."""
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  variables = _random_variables(model, x, 0)
  net = bp.trace_network(model, variables, x)
  masks = bp.init_traced_masks(net)
  masks["channels"][dw] = jnp.asarray([1.0, 0.0])
  masks["channels"]["stem"] = masks["channels"]["stem"].at[:2].set(0.0)
  _, small_vars = bp.materialize_traced(net, variables, masks)
  rebuilt, report = bp.rebuild(net, small_vars, masks, x)
  assert report.rebuilt and not report.problems, report
  assert report.plan["layers"][dw] == {"features": 6, "feature_group_count": 6}
  _close(_apply(rebuilt, small_vars, x), _masked(net, variables, masks, x))
