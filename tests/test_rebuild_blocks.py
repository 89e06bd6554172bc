"""Linen networks whose removed blocks are not ``x + f(x)`` modules, rebuilt as the user's own class.

He et al.'s basic block returning ``relu(shortcut + f(x))`` (with and without a projection shortcut),
a pre-LN transformer layer with two residual adds in one module, ``nn.GroupNorm`` with positions
pruned in every group, and ``nn.MultiHeadDotProductAttention`` with its per-head query/key and value
dimensions pruned: ``bp.rebuild`` gives (a subclass of) the user's class, its removed branch's
modules returning zeros (``plan["zeroed"]``), equal to ``bp.masked_apply`` in eval and train mode
(outputs and BatchNorm statistics) to 1e-5 and to the same architecture built at the kept widths
without the removed branch, the weights copied; ``bp.narrow(Net(), plan)`` restores it. What still
cannot be rebuilt (a layer scale held as the layer's own parameter) falls back to the traced program,
said in one line on materialization, linen and NNX alike.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from tests.test_rebuild import _close, _random_variables

FILE = os.path.abspath(__file__)
X = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
TOKENS = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)


# -- networks, as public linen code writes them -------------------------------------------------------

def _bn(train, name):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)


class Basic(nn.Module):
  """He et al.'s basic block: ``relu(shortcut + bn2(conv2(relu(bn1(conv1(x))))))``, the shortcut a
  strided 1x1 conv and BatchNorm when the block is strided (``branch=False``: the shortcut alone,
  ``relu(shortcut)``, for the reference networks)."""

  mid: int
  out: int
  stride: int = 1
  branch: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    shortcut = x
    if self.stride > 1:
      shortcut = _bn(train, "proj_bn")(nn.Conv(self.out, (1, 1), strides=self.stride, use_bias=False, name="proj")(x))
    if not self.branch:
      return nn.relu(shortcut)
    h = nn.relu(_bn(train, "bn1")(nn.Conv(self.mid, (3, 3), strides=self.stride, use_bias=False, name="conv1")(x)))
    h = _bn(train, "bn2")(nn.Conv(self.out, (3, 3), use_bias=False, name="conv2")(h))
    return nn.relu(shortcut + h)


class ResNet(nn.Module):
  """Stem, basic blocks ``(mid, out, stride[, branch])`` named ``block{first + i}``, pool, dense head."""

  stem: int = 8
  blocks: tuple = ((8, 8, 1), (8, 16, 2))
  first: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(_bn(train, "bn")(nn.Conv(self.stem, (3, 3), use_bias=False, name="stem")(x)))
    for i, b in enumerate(self.blocks):
      x = Basic(*b, name=f"block{self.first + i}")(x, train)
    return nn.Dense(5, name="head")(jnp.mean(x, axis=(1, 2)))


class Layer(nn.Module):
  """A pre-LN transformer layer: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` in one module
  (``attn=False``/``mlp=False``: without that sub-block, for the reference networks)."""

  heads: int = 2
  qkv: int = 8
  hidden: int = 12
  attn: bool = True
  mlp: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.attn:
      attn = nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.qkv, name="attn")
      x = x + attn(nn.LayerNorm(name="ln1")(x))
    if self.mlp:
      x = x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(nn.LayerNorm(name="ln2")(x))))
    return x


class Transformer(nn.Module):
  """Token embedding, pre-LN layers (``Layer`` fields per layer, as pairs), a final LayerNorm, a mean-pooled head."""

  d: int = 8
  layers: tuple = ((), ())

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.d, name="embed")(x)
    for i, fields in enumerate(self.layers):
      x = Layer(**dict(fields), name=f"layer{i}")(x, train)
    return nn.Dense(5, name="head")(jnp.mean(nn.LayerNorm(name="norm")(x), axis=1))


class GroupNet(nn.Module):
  """conv -> GroupNorm(num_groups=groups or group_size=size) -> relu -> pool -> head."""

  c: int = 8
  groups: int = 2
  size: int = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.GroupNorm(num_groups=self.groups, group_size=self.size, name="gn")(nn.Conv(self.c, (3, 3), name="conv")(x))
    return nn.Dense(5, name="head")(jnp.mean(nn.relu(h), axis=(1, 2)))


class ScaledLayer(nn.Module):
  """A pre-LN layer whose layer scales are its own parameters (CaiT): a removed sub-block's ``gamma`` is
  read in the layer's own code, so the layer cannot lose it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = x.shape[-1]
    g1, g2 = (self.param(n, nn.initializers.constant(0.5), (d,)) for n in ("gamma1", "gamma2"))
    x = x + g1[None, None] * nn.Dense(d, name="fc")(nn.LayerNorm(name="ln1")(x))
    return x + g2[None, None] * nn.Dense(d, name="fc2")(nn.relu(nn.Dense(12, name="fc1")(nn.LayerNorm(name="ln2")(x))))


class ScaledNet(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8, name="embed")(x.reshape(x.shape[0], -1, x.shape[-1]))
    for i in range(2):
      x = ScaledLayer(name=f"layer{i}")(x, train)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


def make_scaled(num_classes=3):
  return ScaledNet(num_classes)


# -- helpers --------------------------------------------------------------------------------------

def _keep(width, drop):
  m = np.ones(width, np.float32)
  m[list(drop)] = 0
  return m


def _traced(model, x):
  variables = _random_variables(model, x, 0)
  train = {"train": True, **({"mutable": ["batch_stats"]} if "batch_stats" in variables else {})}
  return variables, bp.trace_network(model, variables, x, modes={"eval": {}, "train": train})


def _masked(net, variables, masks, x):
  """The masked network's eval output, train output and train statistics (sliced as materialized)."""
  both = lambda v: (bp.masked_apply(net, v, masks, x), bp.masked_apply(net, v, masks, x, mode="train"))  # noqa: E731
  evaluated, out = jax.jit(both)(variables)
  if "batch_stats" not in variables:
    return evaluated, out, None
  out, updates = out
  _, stats = bp.materialize_traced(net, jax.tree.map(np.asarray, {**variables, **updates}), masks)
  return evaluated, out, stats["batch_stats"]


def _equal_in_both_modes(module, variables, want, x):
  """``module`` (a linen module) gives ``want`` (``_masked``) in eval and train mode (one compilation)."""
  evaluated, out, stats = want
  mutable = ["batch_stats"] if stats is not None else False
  got_eval, got = jax.jit(lambda v: (module.apply(v, x), module.apply(v, x, train=True, mutable=mutable)))(variables)
  _close(got_eval, evaluated)
  if stats is None:
    _close(got, out)
  else:
    _close(got[0], out)
    _close(got[1]["batch_stats"], stats)


def _rebuilt(model, x, masks_of):
  """Trace, prune, rebuild: ``(net, variables, masks, small_vars, small, report, want)``, the rebuilt module
  the user's class, checked equal to the masked network in both modes."""
  variables, net = _traced(model, x)
  masks = masks_of(net)
  _, small_vars = bp.materialize_traced(net, variables, masks)
  small, report = bp.rebuild(net, small_vars, masks, x)
  assert report.rebuilt and not report.problems, report
  assert issubclass(type(small), type(model)) and not isinstance(small, bp.PrunedNetwork)
  assert max(report.max_abs_diff.values()) <= 1e-5 and set(report.max_abs_diff) == {"eval", "train"}
  want = _masked(net, variables, masks, x)
  _equal_in_both_modes(small, small_vars, want, x)
  return net, variables, masks, small_vars, small, report, want


def _reference(model, small_vars, x):
  """``model`` (built at the kept widths) creates exactly ``small_vars``' variables: the weights copy."""
  shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)  # noqa: E731
  assert shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), x))) == shapes(small_vars)
  return model


def _restored(model, plan, small_vars, want, x):
  """``bp.narrow(model, plan)`` with the plan through JSON: a checkpoint's network, creating ``small_vars``' shapes
  and (``want`` given) equal to it."""
  restored = bp.narrow(model, json.loads(json.dumps(plan)))
  assert bp.plan_of(restored) == plan
  if want is None:
    _reference(restored, small_vars, x)
  else:
    _equal_in_both_modes(restored, small_vars, want, x)


# -- He blocks: relu(x + f(x)) ----------------------------------------------------------------------

def _masks(blocks, channels, net_blocks=None, net_groups=None):
  """Masks removing ``blocks`` and dropping ``{group: positions}``; the traced blocks and group widths checked."""
  def masks_of(net):
    assert net_blocks is None or list(net.blocks) == net_blocks, list(net.blocks)
    assert net_groups is None or {n: g.width for n, g in net.groups.items()} == net_groups
    masks = bp.init_traced_masks(net)
    masks["blocks"].update({b: np.float32(-1.0) for b in blocks})
    masks["channels"].update({g: _keep(net.groups[g].width, drop) for g, drop in channels.items()})
    return masks
  return masks_of


def test_he_block_returning_relu_of_the_sum_is_removed_and_equals_the_network_without_it():
  _, _, _, small_vars, small, report, want = _rebuilt(ResNet(), X, _masks(
      ["block0"], {"stem": (1, 6), "block1/conv1": (2,), "block1/proj": (5, 9, 15)}))
  assert report.plan["removed_blocks"] == [] and sorted(report.plan["zeroed"]) == [
      "block0/bn1", "block0/bn2", "block0/conv1", "block0/conv2"]
  assert "block0" not in small_vars["params"]  # its weights are gone
  assert jax.eval_shape(small.apply, small_vars, X[:3]).shape == (3, 5)  # its zeros follow the batch
  # the same architecture at the kept widths without block 0 (its input is a ReLU's: relu(x) = x)
  _equal_in_both_modes(_reference(ResNet(stem=6, blocks=((7, 13, 2),), first=1), small_vars, X), small_vars, want, X)
  _restored(ResNet(), report.plan, small_vars, None, X)


def test_he_block_with_a_projection_shortcut_keeps_the_shortcut_and_prunes_again():
  net, variables, _, small_vars, small, report, want = _rebuilt(ResNet(), X, _masks(
      ["block1"], {"stem": (0,), "block0/conv1": (3,), "block1/proj": (1, 2)}))
  assert sorted(report.plan["zeroed"]) == ["block1/bn1", "block1/bn2", "block1/conv1", "block1/conv2"]
  assert set(small_vars["params"]["block1"]) == {"proj", "proj_bn"}
  ref = ResNet(stem=7, blocks=((7, 7, 1), (1, 14, 2, False)))  # relu(proj_bn(proj(x)) + 0)
  _equal_in_both_modes(_reference(ref, small_vars, X), small_vars, want, X)

  # traced and pruned again, block 0 removed: block 1's zeroed modules follow the narrower projection, and
  # the plan (from the original class) holds both rounds
  train = {"train": True, "mutable": ["batch_stats"]}
  net2 = bp.trace_network(small, small_vars, X, modes={"eval": {}, "train": train})
  assert list(net2.blocks) == ["block0"]  # relu(proj(x) + zeros) is no residual block
  masks2 = _masks(["block0"], {"stem": (0, 4), "block1/proj": (3,)})(net2)
  _, smaller_vars = bp.materialize_traced(net2, small_vars, masks2)
  smaller, report2 = bp.rebuild(net2, smaller_vars, masks2, X)
  assert report2.rebuilt and issubclass(type(smaller), ResNet), report2
  assert report2.plan["zeroed"]["block1/bn2"]["shape"][-1] == 13 and "block0/conv1" in report2.plan["zeroed"]
  want2 = _masked(net2, small_vars, masks2, X)
  _equal_in_both_modes(smaller, smaller_vars, want2, X)
  ref2 = ResNet(stem=5, blocks=((1, 13, 2, False),), first=1)
  _equal_in_both_modes(_reference(ref2, smaller_vars, X), smaller_vars, want2, X)
  _restored(ResNet(), report2.plan, smaller_vars, want2, X)


# -- pre-LN transformer layers: two residual adds in one module ----------------------------------------

def test_attention_and_mlp_sub_blocks_of_one_layer_are_each_removed_and_equal_the_layer_without_them():
  _, _, _, small_vars, small, report, want = _rebuilt(Transformer(), TOKENS, _masks(
      ["layer0", "layer1_2"],  # the attention sub-block of layer 0, the MLP sub-block of layer 1
      {"embed": (2, 5), "layer0/fc1": (0, 4, 7, 8, 11), "layer1/attn/query": (0,)},  # and a head of layer 1
      net_blocks=["layer0", "layer0_2", "layer1", "layer1_2"]))
  assert sorted(report.plan["zeroed"]) == ["layer0/attn", "layer0/ln1", "layer1/fc1", "layer1/fc2", "layer1/ln2"]
  assert report.plan["layers"]["layer1/attn"]["num_heads"] == 1
  ref = Transformer(d=6, layers=((("attn", False), ("hidden", 7)), (("heads", 1), ("qkv", 4), ("mlp", False))))
  _equal_in_both_modes(_reference(ref, small_vars, TOKENS), small_vars, want, TOKENS)
  _restored(Transformer(), report.plan, small_vars, None, TOKENS)


def test_attention_query_key_and_value_head_dimensions_are_narrowed_keeping_the_dense_scale():
  model = Transformer(layers=((("mlp", False),),))
  _, _, _, small_vars, small, report, want = _rebuilt(model, TOKENS, _masks(
      [], {"layer0/attn/query#2": (1,), "layer0/attn/value": (0, 3)}))  # per-head q/k 4 -> 3, value 4 -> 2
  layers = report.plan["layers"]
  assert layers["layer0/attn"] == {"qkv_features": 6, "attention_depth": 4}
  assert (layers["layer0/attn/query"], layers["layer0/attn/value"]) == ({"features": [2, 3]}, {"features": [2, 2]})
  # an independent computation at the kept widths: softmax(q k / sqrt(4)) v, the dense scale
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), small_vars["params"])
  def ln(x, q):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * q["scale"] + q["bias"]

  h = TOKENS @ p["embed"]["kernel"] + p["embed"]["bias"]
  a, att = ln(h, p["layer0"]["ln1"]), p["layer0"]["attn"]
  q, k, v = (np.einsum("btd,dhk->bthk", a, att[n]["kernel"]) + att[n]["bias"] for n in ("query", "key", "value"))
  w = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4)
  w = np.exp(w - w.max(-1, keepdims=True))
  o = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)
  h = h + np.einsum("bqhd,hdo->bqo", o, att["out"]["kernel"]) + att["out"]["bias"]
  logits = ln(h, p["norm"]).mean(1) @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(want[0], logits, rtol=1e-5, atol=1e-5)  # the masked network's, which the rebuilt equals
  np.testing.assert_allclose(want[1], logits, rtol=1e-5, atol=1e-5)
  _restored(Transformer(layers=((("mlp", False),),)), report.plan, small_vars, want, TOKENS)


# -- GroupNorm: positions in every group ----------------------------------------------------------------

@pytest.mark.parametrize("spelling, positions", [("num_groups", (0, 2)), ("group_size", (0, 1, 3))])
def test_group_norm_keeps_its_groups_when_positions_in_every_group_are_pruned(spelling, positions):
  fields = {"groups": 2} if spelling == "num_groups" else {"groups": None, "size": 4}
  _, _, _, small_vars, small, report, want = _rebuilt(GroupNet(**fields), X, _masks(
      [], {"conv#2": [k for k in range(4) if k not in positions]},
      net_groups={"conv": 2, "conv#2": 4}))  # groups x positions in a group
  n = 2 * len(positions)
  assert report.plan["layers"].get("gn", {}) == ({} if spelling == "num_groups" else {"group_size": len(positions)})
  ref = GroupNet(c=n, **({"groups": 2} if spelling == "num_groups" else {"groups": None, "size": len(positions)}))
  _equal_in_both_modes(_reference(ref, small_vars, X), small_vars, want, X)


# -- what still cannot be rebuilt: one line on materialization ---------------------------------------------

def _materialize_lines(capsys, network, variables, masks):
  capsys.readouterr()
  small, small_vars = network.materialize(variables, masks)
  return small, small_vars, [line for line in capsys.readouterr().out.splitlines() if line.startswith("[materialize]")]


def test_a_class_that_cannot_be_rebuilt_is_said_in_one_line_on_materialization_only(capsys):
  network = bp.FlaxNetwork.from_factory(f"{FILE}:make_scaled", 3, (4, 4, 3))
  assert network.block_names == ["layer0", "layer0_2", "layer1", "layer1_2"]
  variables = _random_variables(ScaledNet(), np.zeros((2, 4, 4, 3), np.float32), 0)
  masks = network.init_masks()
  masks["blocks"]["layer0"] = masks["blocks"]["layer1"] = -1.0  # both attention sub-blocks: gamma1 of each
  small, small_vars, lines = _materialize_lines(capsys, network, variables, masks)
  assert len(lines) == 1 and isinstance(small.module, bp.PrunedNetwork), lines
  assert lines[0].startswith("[materialize] ") and "not rebuilt as ScaledNet: layer0: its variable " in lines[0]
  assert "params/layer0/gamma1" in lines[0] and lines[0].endswith("(and 1 more: bp.rebuild reports them all)"), lines
  # pruned again, the traced program stays one, silently; a checkpoint's description replays it silently
  masks2 = small.init_masks()
  masks2["blocks"][small.block_names[-1]] = -1.0
  smaller, smaller_vars, lines = _materialize_lines(capsys, small, small_vars, masks2)
  assert not lines and isinstance(smaller.module, bp.PrunedNetwork)
  again = bp.network_from_description(json.loads(json.dumps(smaller.describe())))
  assert "[materialize]" not in capsys.readouterr().out and isinstance(again.module, bp.PrunedNetwork)


def test_an_nnx_class_that_cannot_be_materialized_is_said_in_one_line(capsys):
  from flax import nnx

  from tests import test_nnx_materialize as nnx_nets
  from tests.test_nnx import _numpy_init

  network = bp.FlaxNetwork.from_factory(f"{nnx_nets.FILE}:make_scaled", 3, (4, 4, 3))
  variables = bp.NnxNetwork.of(_numpy_init(lambda: nnx_nets.make_scaled(3, nnx.Rngs(0)))).variables()
  masks = network.init_masks()
  masks["blocks"]["layers/0"] = masks["blocks"]["layers/1"] = -1.0
  small, _, lines = _materialize_lines(capsys, network, variables, masks)
  assert len(lines) == 1 and isinstance(small, bp.NnxTracedNetwork), lines
  assert "not rebuilt as ScaledNet: layers/0: its variable params/layers/0/gamma1" in lines[0], lines
  assert lines[0].endswith("(and 1 more: bp.materialize_nnx raises them all)"), lines
  bp.network_from_description(json.loads(json.dumps(small.describe())))
  assert "[materialize]" not in capsys.readouterr().out


class DropBlock(nn.Module):
  """``relu(x + dropout(fc2(relu(fc1(x)))))``: a removed branch whose dropout reads a key before the array it is
  called with (``branch=False``: ``relu(x)``, the reference)."""

  branch: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not self.branch:
      return nn.relu(x)
    h = nn.Dense(x.shape[-1], name="fc2")(nn.relu(nn.Dense(8, name="fc1")(x)))
    return nn.relu(x + nn.Dropout(0.3, deterministic=not train)(h))


class DropNet(nn.Module):
  branches: tuple = (True, True)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6, name="embed")(x)
    for i, b in enumerate(self.branches):
      x = DropBlock(b, name=f"block{i}")(x, train)
    return nn.Dense(3, name="head")(x.mean(1))


def test_a_removed_branch_with_dropout_runs_at_any_batch_size_as_the_network_without_it():
  model, x = DropNet(), TOKENS  # traced at batch 4
  variables = _random_variables(model, x, 0)
  modes = {"eval": {}, "train": {"train": True, "rngs": {"dropout": jax.random.key(0)}}}
  net = bp.trace_network(model, variables, x, modes=modes)
  masks = bp.init_traced_masks(net)
  masks["blocks"]["block1"] = -1.0
  _, small_vars = bp.materialize_traced(net, variables, masks)
  small, report = bp.rebuild(net, small_vars, masks, x)
  assert report.rebuilt and "block1/Dropout_0" in report.plan["zeroed"], report
  reference = DropNet(branches=(True, False))
  for batch in (1, 7):  # other batch sizes than the traced one: the zeros follow the input's batch
    xb = np.random.default_rng(batch).normal(size=(batch, 5, 6)).astype(np.float32)
    _close(small.apply(small_vars, xb), reference.apply(small_vars, xb))
    key = {"dropout": jax.random.key(3)}
    _close(small.apply(small_vars, xb, train=True, rngs=key), reference.apply(small_vars, xb, train=True, rngs=key))
