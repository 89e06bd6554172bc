"""NNX materialization of networks written as public NNX code writes them.

He et al.'s basic block returning ``relu(x + f(x))`` (with and without a projection shortcut), a
pre-LN transformer layer with two residual adds in one module (``nnx.MultiHeadAttention``,
``nnx.LayerNorm``), ``nnx.GroupNorm`` with positions pruned in every group, attention with its
per-head query/key and value dimensions pruned: ``bp.materialize_nnx`` gives the module of the
user's classes, equal to ``bp.masked_apply`` in eval and train mode (outputs and BatchNorm
statistics) to 1e-5, and, where it can be built, to the same architecture built at the kept widths
with the weights copied. What cannot be narrowed (a layer scale held as the layer's own parameter)
raises ``RebuildError`` naming the variable, and the pipeline's network then keeps the traced
program, said in one line, and rebuilds from its description.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bpcp_jax as bp
from bpcp_jax.tracer import nnx as bnnx
from bpcp_jax.tracer.network import leaves_by_path
from tests.test_nnx import _close, _numpy_init, _run

FILE = os.path.abspath(__file__)


# -- networks, as public NNX code writes them ---------------------------------------------------------

class Basic(nnx.Module):
  """He et al.'s basic block: ``relu(shortcut + bn2(conv2(relu(bn1(conv1(x))))))``, the shortcut a
  strided 1x1 conv and BatchNorm when the stride or width changes."""

  def __init__(self, cin, mid, cout, rngs, stride=1):
    self.conv1 = nnx.Conv(cin, mid, (3, 3), strides=stride, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(mid, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(mid, cout, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs) if stride > 1 else None
    self.proj_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs) if stride > 1 else None

  def __call__(self, x):
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(shortcut + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))


class ResNet(nnx.Module):
  """Stem, basic blocks ``(mid, out, stride)``, global average pool, a dense head."""

  def __init__(self, rngs, stem=8, blocks=((8, 8, 1), (8, 8, 1), (8, 16, 2)), num_classes=5):
    self.stem = nnx.Conv(3, stem, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(stem, momentum=0.9, rngs=rngs)
    widths = [stem] + [b[1] for b in blocks]
    self.blocks = nnx.List([Basic(widths[i], m, c, rngs, s) for i, (m, c, s) in enumerate(blocks)])
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class Layer(nnx.Module):
  """A pre-LN transformer layer: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` in one module
  (``attn=False``/``mlp=False``: without that sub-block, for the reference networks)."""

  def __init__(self, d, rngs, heads=2, qkv=8, hidden=12, attn=True, mlp=True):
    self.use_attn, self.use_mlp = attn, mlp
    if attn:
      self.ln1 = nnx.LayerNorm(d, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(heads, d, qkv_features=qkv, decode=False, rngs=rngs)
    if mlp:
      self.ln2 = nnx.LayerNorm(d, rngs=rngs)
      self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
      self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

  def __call__(self, x):
    if self.use_attn:
      x = x + self.attn(self.ln1(x))
    if self.use_mlp:
      x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
    return x


class Transformer(nnx.Module):
  """Token embedding, pre-LN layers (keyword arguments per layer), a final LayerNorm, mean-pooled head."""

  def __init__(self, rngs, d=8, layers=({}, {}), num_classes=5):
    self.embed = nnx.Linear(6, d, rngs=rngs)
    self.layers = nnx.List([Layer(d, rngs, **kw) for kw in layers])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for layer in self.layers:
      x = layer(x)
    return self.head(jnp.mean(self.norm(x), axis=1))


class GroupNet(nnx.Module):
  """conv -> GroupNorm(c, num_groups=2) -> relu -> pool -> head."""

  def __init__(self, rngs, c=8):
    self.conv = nnx.Conv(3, c, (3, 3), rngs=rngs)
    self.gn = nnx.GroupNorm(c, num_groups=2, rngs=rngs)
    self.head = nnx.Linear(c, 5, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.mean(nnx.relu(self.gn(self.conv(x))), axis=(1, 2)))


class ScaledLayer(nnx.Module):
  """A pre-LN layer whose layer scales are the layer's own parameters (CaiT): a removed sub-block's
  ``gamma`` is read in the layer's own code, so the layer cannot lose it."""

  def __init__(self, d, rngs):
    self.ln1, self.fc = nnx.LayerNorm(d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
    self.gamma1 = nnx.Param(jnp.full((d,), 0.5))
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(d, 12, rngs=rngs), nnx.Linear(12, d, rngs=rngs)
    self.gamma2 = nnx.Param(jnp.full((d,), 0.5))

  def __call__(self, x):
    x = x + self.gamma1[None, None] * self.fc(self.ln1(x))
    return x + self.gamma2[None, None] * self.fc2(nnx.relu(self.fc1(self.ln2(x))))


class ScaledNet(nnx.Module):
  """4x4x3 images as 16 tokens of 3, a BatchNorm'd embedding, two ``ScaledLayer``s, a head."""

  def __init__(self, num_classes, rngs):
    self.embed, self.bn = nnx.Linear(3, 8, rngs=rngs), nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.layers = nnx.List([ScaledLayer(8, rngs) for _ in range(2)])
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.bn(self.embed(x.reshape(x.shape[0], -1, x.shape[-1])))
    for layer in self.layers:
      x = layer(x)
    return self.head(jnp.mean(x, axis=1))


def make_resnet(num_classes=5, rngs=None):
  return ResNet(rngs, stem=8, blocks=((6, 8, 1), (6, 12, 2)), num_classes=num_classes)


def make_scaled(num_classes=5, rngs=None):
  return ScaledNet(num_classes, rngs)


# -- helpers --------------------------------------------------------------------------------------

X = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
TOKENS = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)


def _keep(width, drop):
  m = np.ones(width, np.float32)
  m[list(drop)] = 0
  return m


def _state(model) -> dict:
  """``{"blocks/0/conv1/kernel": array, ...}``: the module's Params and BatchStats."""
  out = {}
  for kind in (nnx.Param, nnx.BatchStat):
    out.update(leaves_by_path(nnx.to_pure_dict(nnx.state(model, kind))))
  return out


def _copy_into(model, state: dict, rename=lambda path: path):
  """``model`` with ``state``'s arrays written in (paths renamed), every variable of it given."""
  leaves = {rename(p): v for p, v in state.items()}
  missing: list = []
  bnnx._write(model, leaves, missing, by_collection=False)
  assert not [m for m in missing if "rngs" not in m], missing
  return model


def _masked(net, variables, masks, x):
  """The masked network's eval output, train output and train statistics (sliced as materialized)."""
  evaluated = jax.jit(lambda v: bp.masked_apply(net, v, masks, x))(variables)
  out = jax.jit(lambda v: bp.masked_apply(net, v, masks, x, mode="train"))(variables)
  if "batch_stats" not in variables:
    return evaluated, out, {}
  out, updates = out
  _, stats = bp.materialize_traced(net, jax.tree.map(np.asarray, {**variables, **updates}), masks)
  return evaluated, out, stats["batch_stats"]


def _train_pass(model, x):
  """``model``'s train-mode output and its statistics after that pass (on a copy)."""
  model = nnx.clone(model)
  model.train()
  out = _run(model, x)
  return out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def _equal_in_both_modes(model, want, x, rename=lambda path: path):
  """``model`` called as users call it gives ``want`` (``_masked``); ``rename``: its statistics' paths
  to the masked network's."""
  evaluated, out, stats = want
  model.eval()
  _close(_run(model, x), evaluated)
  got_out, got_stats = _train_pass(model, x)
  _close(got_out, out)
  if stats:
    _close({rename(p): v for p, v in leaves_by_path(got_stats).items()}, leaves_by_path(stats))


# -- He blocks: relu(x + f(x)) ----------------------------------------------------------------------

def test_he_blocks_returning_relu_of_the_sum_are_removed_equal_the_network_without_them_and_prune_again():
  model = _numpy_init(lambda: ResNet(nnx.Rngs(0), blocks=((8, 8, 1), (8, 16, 2))))
  net, variables = bp.trace_nnx(model, X)
  assert list(net.blocks) == ["blocks/0", "blocks/1"]
  masks = bp.init_traced_masks(net)
  masks["blocks"]["blocks/0"] = -1.0
  masks["channels"]["stem"] = _keep(8, (1, 6))
  masks["channels"]["blocks/1/conv1"] = _keep(8, (2,))
  masks["channels"]["blocks/1/proj"] = _keep(16, (5, 9, 15))
  want = _masked(net, variables, masks, X)
  small, report = bp.materialize_nnx(net, variables, masks, X)
  assert type(small) is ResNet and type(small.blocks[0]) is Basic and max(report.max_abs_diff.values()) <= 1e-5
  assert sorted(report.plan["zeroed"]) == ["blocks/0/bn1", "blocks/0/bn2", "blocks/0/conv1", "blocks/0/conv2"]
  assert isinstance(small.blocks[0].conv1, bp.Zeroed) and not _state(small.blocks[0])  # its weights are gone
  _equal_in_both_modes(small, want, X)
  # the same architecture built at the kept widths, without block 0 (its input is a ReLU's: relu(x) = x)
  ref = _numpy_init(lambda: ResNet(nnx.Rngs(0), stem=6, blocks=((7, 13, 2),)))
  _copy_into(ref, _state(small), lambda p: p.replace("blocks/1/", "blocks/0/"))
  _equal_in_both_modes(ref, want, X, lambda p: p.replace("blocks/0/", "blocks/1/"))

  # traced and pruned again, the projection block removed: its shortcut stays (relu(proj(x) + 0)), the
  # zeroed modules of block 0 follow the narrower stem, and the plan holds both rounds
  net2, variables2 = bp.trace_nnx(small, X)
  assert list(net2.blocks) == ["blocks/1"]  # x + zeros is no residual block
  masks2 = bp.init_traced_masks(net2)
  masks2["blocks"]["blocks/1"] = -1.0
  masks2["channels"]["stem"] = _keep(6, (0, 4))
  masks2["channels"]["blocks/1/proj"] = _keep(13, (1, 2))
  smaller, report2 = bp.materialize_nnx(net2, variables2, masks2, X)
  assert isinstance(smaller.blocks[1].proj, nnx.Conv) and isinstance(smaller.blocks[1].conv2, bp.Zeroed)
  assert smaller.stem.out_features == 4 and smaller.blocks[1].proj.out_features == 11
  assert report2.plan["zeroed"]["blocks/0/bn2"]["shape"][-1] == 4
  _equal_in_both_modes(smaller, _masked(net2, variables2, masks2, X), X)
  # a checkpoint: the class, the plan as JSON and the state give the same module
  restored = bp.narrow_nnx(_numpy_init(lambda: ResNet(nnx.Rngs(0), blocks=((8, 8, 1), (8, 16, 2)))),
                           json.loads(json.dumps(report2.plan)), nnx.state(smaller))
  restored.eval()  # as smaller was left
  assert nnx.graphdef(restored) == nnx.graphdef(smaller)


# -- pre-LN transformer layers: two residual adds in one module ----------------------------------------

def test_attention_and_mlp_sub_blocks_of_one_layer_are_each_removed_and_equal_the_layer_without_them():
  model = _numpy_init(lambda: Transformer(nnx.Rngs(0)))
  net, variables = bp.trace_nnx(model, TOKENS)
  assert list(net.blocks) == ["layers/0", "layers/0_2", "layers/1", "layers/1_2"]
  masks = bp.init_traced_masks(net)
  masks["blocks"]["layers/0"] = -1.0  # the attention sub-block of layer 0
  masks["blocks"]["layers/1_2"] = -1.0  # the MLP sub-block of layer 1
  masks["channels"]["embed"] = _keep(8, (2, 5))
  masks["channels"]["layers/0/fc1"] = _keep(12, (0, 4, 7, 8, 11))
  masks["channels"]["layers/1/attn/query"] = _keep(2, (0,))  # a head
  want = _masked(net, variables, masks, TOKENS)
  small, report = bp.materialize_nnx(net, variables, masks, TOKENS)
  assert type(small.layers[0]) is Layer and isinstance(small.layers[0].attn, bp.Zeroed)
  assert isinstance(small.layers[1].fc1, bp.Zeroed) and small.layers[1].attn.num_heads == 1
  assert small.layers[0].fc1.out_features == 7 and small.embed.out_features == 6
  _equal_in_both_modes(small, want, TOKENS)
  ref = _numpy_init(lambda: Transformer(nnx.Rngs(0), d=6, layers=({"attn": False, "hidden": 7},
                                                                  {"heads": 1, "qkv": 4, "mlp": False})))
  _copy_into(ref, _state(small))
  _equal_in_both_modes(ref, want, TOKENS)


def test_attention_query_key_and_value_head_dimensions_are_narrowed_keeping_the_dense_scale():
  model = _numpy_init(lambda: Transformer(nnx.Rngs(0), layers=({"mlp": False},)))
  net, variables = bp.trace_nnx(model, TOKENS)
  masks = bp.init_traced_masks(net)
  masks["channels"]["layers/0/attn/query#2"] = _keep(4, (1,))  # per-head query/key dimension 4 -> 3
  masks["channels"]["layers/0/attn/value"] = _keep(4, (0, 3))  # per-head value dimension 4 -> 2
  small, report = bp.materialize_nnx(net, variables, masks, TOKENS)
  attn = small.layers[0].attn
  assert (attn.head_dim, attn.value.out_features, attn.out.in_features) == (3, (2, 2), (2, 2))
  assert attn.attention_fn == bnnx.DenseScaleAttention(4, nnx.dot_product_attention)
  _equal_in_both_modes(small, _masked(net, variables, masks, TOKENS), TOKENS)
  # an independent computation at the kept widths: softmax(q k / sqrt(4)) v, the dense scale
  p = {k: np.asarray(v, np.float64) for k, v in _state(small).items()}
  h = TOKENS @ p["embed/kernel"] + p["embed/bias"]
  ln = lambda x, s, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * s + b  # noqa: E731
  a = ln(h, p["layers/0/ln1/scale"], p["layers/0/ln1/bias"])
  q, k, v = (np.einsum("btd,dhk->bthk", a, p[f"layers/0/attn/{n}/kernel"]) + p[f"layers/0/attn/{n}/bias"]
             for n in ("query", "key", "value"))
  w = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4)
  w = np.exp(w - w.max(-1, keepdims=True))
  o = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)
  h = h + np.einsum("bqhd,hdo->bqo", o, p["layers/0/attn/out/kernel"]) + p["layers/0/attn/out/bias"]
  logits = ln(h, p["norm/scale"], p["norm/bias"]).mean(1) @ p["head/kernel"] + p["head/bias"]
  small.eval()
  np.testing.assert_allclose(_run(small, TOKENS), logits, rtol=1e-5, atol=1e-5)
  # a checkpoint restores the scale too
  restored = bp.narrow_nnx(_numpy_init(lambda: Transformer(nnx.Rngs(0), layers=({"mlp": False},))),
                           json.loads(json.dumps(report.plan)), nnx.state(small))
  restored.eval()
  assert nnx.graphdef(restored) == nnx.graphdef(small)


# -- GroupNorm: whole groups and positions in every group --------------------------------------------

@pytest.mark.parametrize("positions", [(0, 2), (0, 1, 3)])
def test_group_norm_keeps_its_groups_when_positions_in_every_group_are_pruned(positions):
  model = _numpy_init(lambda: GroupNet(nnx.Rngs(0)))
  net, variables = bp.trace_nnx(model, X)
  assert {n: g.width for n, g in net.groups.items()} == {"conv": 2, "conv#2": 4}  # groups x positions in a group
  masks = bp.init_traced_masks(net)
  masks["channels"]["conv#2"] = np.isin(np.arange(4), positions).astype(np.float32)
  want = _masked(net, variables, masks, X)
  small, _ = bp.materialize_nnx(net, variables, masks, X)
  n = 2 * len(positions)
  assert (small.gn.num_features, small.gn.num_groups, small.gn.group_size) == (n, 2, len(positions))
  _equal_in_both_modes(small, want, X)
  ref = _copy_into(_numpy_init(lambda: GroupNet(nnx.Rngs(0), c=n)), _state(small))
  _equal_in_both_modes(ref, want, X)


def test_select_pruning_selections_of_a_group_norm_network_materialize():
  model = _numpy_init(lambda: GroupNet(nnx.Rngs(0), c=16))
  net, variables = bp.trace_nnx(model, X)
  selection = bp.select_pruning(net, variables, criterion="random", cost="macs", macs_fraction=0.8, progress=False,
                                key=jax.random.key(0))
  kept = {g: int(np.sum(np.asarray(m) > 0.5)) for g, m in selection.masks["channels"].items()}
  assert kept == {"conv": 2, "conv#2": 6}, kept  # 12 channels: no group of the dense 8
  small, _ = bp.materialize_nnx(net, variables, selection.masks, X)
  assert (small.gn.num_groups, small.gn.group_size) == (kept["conv"], kept["conv#2"])
  _equal_in_both_modes(small, _masked(net, variables, selection.masks, X), X)


# -- what cannot be narrowed: named, and the pipeline keeps the traced program ------------------------------

def _jitted(network, masks=None):
  """``network.apply`` jitted: ``(eval output, (train output, statistics))``."""
  return (jax.jit(lambda v, x: network.apply(v, x, train=False, masks=masks)),
          jax.jit(lambda v, x: network.apply(v, x, train=True, masks=masks, rng=jax.random.key(1))))


def test_a_layer_scale_in_the_layers_own_code_is_named_and_the_pipeline_keeps_the_traced_program(capsys):
  net = bp.FlaxNetwork.from_factory(f"{FILE}:make_scaled", 3, (4, 4, 3))
  assert isinstance(net, bp.NnxFlaxNetwork) and len(net.block_names) == 4
  variables = bp.NnxNetwork.of(_numpy_init(lambda: make_scaled(3, nnx.Rngs(0)))).variables()
  masks = net.init_masks()
  masks["blocks"]["layers/0"] = -1.0
  masks["channels"]["embed"] = _keep(8, (1, 4))
  with pytest.raises(bp.RebuildError, match=r"layers/0: its variable params/layers/0/gamma1 is read only by a "
                                            r"removed block's branch"):
    bp.materialize_nnx(net.traced, variables, masks)
  capsys.readouterr()
  small, small_vars = net.materialize(variables, masks)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[materialize]")]
  assert len(lines) == 1 and "kept as the traced program" in lines[0] and "gamma1" in lines[0], lines
  assert isinstance(small, bp.NnxTracedNetwork) and isinstance(small.deployable(), bp.PrunedNetwork)
  assert len(small.block_names) == 3 and small.group_widths["embed"] == 6
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
  (evaluated, trained), (masked_eval, masked_train) = _jitted(small), _jitted(net, masks)
  _close(evaluated(small_vars, x), masked_eval(variables, x))
  (out, stats), (masked_out, masked_stats) = trained(small_vars, x), masked_train(variables, x)
  _close(out, masked_out)
  _, want = bp.materialize_traced(net.traced, {**variables, "batch_stats": masked_stats}, masks)
  _close(stats, want["batch_stats"])
  # what a checkpoint stores (kind nnx, no plan) replays the prunings: bp.load_network and --resume
  desc = json.loads(json.dumps(small.describe()))
  assert desc["kind"] == "nnx" and desc["plan"] is None and len(desc["prunings"]) == 1
  again = bp.network_from_description(desc)
  assert isinstance(again, bp.NnxTracedNetwork) and again.describe() == small.describe()
  _close(_jitted(again)[0](small_vars, x), evaluated(small_vars, x))
  # pruned again: still the traced program, still described by its prunings
  masks2 = small.init_masks()
  masks2["blocks"][small.block_names[-1]] = -1.0  # the MLP sub-block of layer 1
  smaller, smaller_vars = small.materialize(small_vars, masks2)
  _close(_jitted(smaller)[0](smaller_vars, x), _jitted(small, masks2)[0](small_vars, x))
  assert bp.network_from_description(smaller.describe()).describe() == smaller.describe()
  with pytest.raises(ValueError, match="only the network its factory makes can be initialised"):
    smaller.init(jax.random.key(0))


def test_the_pipelines_nnx_network_removes_a_he_block_and_rebuilds_from_its_description():
  net = bp.FlaxNetwork.from_factory(f"{FILE}:make_resnet", 3, (8, 8, 3))
  variables = bp.NnxNetwork.of(_numpy_init(lambda: make_resnet(3, nnx.Rngs(0)))).variables()
  masks = net.init_masks()
  masks["blocks"]["blocks/0"] = -1.0
  masks["channels"]["stem"] = _keep(8, (0, 5))
  small, small_vars = net.materialize(variables, masks)
  assert isinstance(small, bp.NnxFlaxNetwork) and sorted(small.plan["zeroed"])[0] == "blocks/0/bn1"
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  evaluated = _jitted(small)[0]
  _close(evaluated(small_vars, x), _jitted(net, masks)[0](variables, x))
  again = bp.network_from_description(json.loads(json.dumps(small.describe())))
  assert isinstance(again, bp.NnxFlaxNetwork) and again.describe() == small.describe()
  assert nnx.graphdef(again.module.merge()) == nnx.graphdef(small.module.merge())
