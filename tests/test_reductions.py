"""Channel reductions written by hand follow the kept channels: the pruned network (masked and materialized) equals
the same architecture built at the kept width with the kept weights copied, in eval and train mode.

Each net is ``Dense(width) -> BatchNorm -> <a reduction over the width channels> -> Dense(3)``; the reference is the
same class at width 5 with the kept rows and columns of every variable copied (sliced here in NumPy, not by the
tracer). A sum divided by a literal that equals the number of elements it sums is a mean (its divisor follows the
kept count); divided by any other constant, or multiplied by one, the constant stays.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from tests.real_networks import BiTResNet, StdConv, random_variables

TRAIN = {"train": True, "mutable": ["batch_stats"]}
KEPT = np.array([0, 2, 3, 5, 7])  # 5 of 8 channels


def _layernorm(h, count, mod):
  mu = jnp.mean(h, -1, keepdims=True)
  var = jnp.mean(jnp.square(h - mu), -1, keepdims=True)
  g = mod.param("g", nn.initializers.ones, (h.shape[-1],))
  b = mod.param("b", nn.initializers.zeros, (h.shape[-1],))
  return (h - mu) * jax.lax.rsqrt(var + 1e-5) * g[None] + b[None]


def _rmsnorm(h, count, mod):
  scale = mod.param("scale", nn.initializers.ones, (h.shape[-1],))
  return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * scale[None]


# spelling -> f(h, count, module): a reduction over the channel axis of h (batch, width); ``count`` is the literal a
# hand-written divisor is written with (8 in the dense net, 5 in the reference: the count it stands for)
SPELLINGS = {
    "mean_keepdims": lambda h, c, m: h * h.mean(-1, keepdims=True),
    "mean": lambda h, c, m: h * h.mean(-1)[:, None],
    "var": lambda h, c, m: h * jnp.var(h, -1, keepdims=True),
    "var_ddof1": lambda h, c, m: h * jnp.var(h, -1, ddof=1, keepdims=True),
    "std": lambda h, c, m: h / jnp.std(h, -1, keepdims=True),
    "std_ddof1": lambda h, c, m: h / jnp.std(h, axis=-1, ddof=1)[:, None],
    "sum_literal": lambda h, c, m: h * (h.sum(-1, keepdims=True) / c),
    "sum_literal_flat": lambda h, c, m: h * (h.sum(-1) / c)[:, None],
    "sum_shape": lambda h, c, m: h * (h.sum(-1, keepdims=True) / h.shape[-1]),
    "rmsnorm": _rmsnorm,
    "layernorm": _layernorm,
    "softmax": lambda h, c, m: jax.nn.softmax(h, axis=-1),
    "sum_other_constant": lambda h, c, m: h * (h.sum(-1, keepdims=True) / 4.0),  # not the count: stays 4
    "sum_times_reciprocal": lambda h, c, m: h * (h.sum(-1, keepdims=True) * 0.125),  # a multiplication: stays
}


class ReduceNet(nn.Module):
  spelling: str
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(self.width, name="up")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(h)
    h = SPELLINGS[self.spelling](h, float(self.width), self)
    return nn.Dense(3, name="out")(h)


class StdConvNet(nn.Module):
  """Weight standardization written with jnp.mean / jnp.var over the kernel's window and inputs (BiT's StdConv)."""

  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(
        nn.Conv(self.width, (3, 3), name="up")(x)))
    h = nn.relu(StdConv(4, (3, 3), use_bias=False, name="std")(h))
    return nn.Dense(3, name="out")(jnp.mean(h, axis=(1, 2)))


def _slice_to(dense, small_shapes, kept):
  """``dense`` with every axis whose size differs in ``small_shapes`` cut to the positions ``kept``."""
  def cut(leaf, s):
    leaf = np.asarray(leaf)
    for k, (n, m) in enumerate(zip(leaf.shape, s.shape)):
      if n != m:
        leaf = np.take(leaf, kept, axis=k)
    return jnp.asarray(leaf)
  return jax.tree_util.tree_map(cut, dense, small_shapes)


def _close(got, want):
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def _check_against_reference(model, ref_model, x, group="up"):
  variables = random_variables(model, x)
  net = bp.trace_network(model, variables, x, modes={"eval": {}, "train": TRAIN})
  assert net.groups[group].width == 8 and not net.unfollowed, net.coupling.summary()
  masks = bp.init_traced_masks(net)
  keep = np.zeros(8, np.float32)
  keep[KEPT] = 1
  masks["channels"][group] = jnp.asarray(keep)
  ref_vars = _slice_to(variables, jax.eval_shape(ref_model.init, jax.random.key(0), x), KEPT)
  small, small_vars = bp.materialize_traced(net, variables, masks)
  want = ref_model.apply(ref_vars, x)
  _close(bp.masked_apply(net, variables, masks, x), want)
  _close(small.apply(small_vars, x), want)
  want, want_upd = ref_model.apply(ref_vars, x, **TRAIN)
  got, got_upd = bp.masked_apply(net, variables, masks, x, mode="train")
  _close(got, want)
  _close(_slice_to(got_upd["batch_stats"], want_upd["batch_stats"], KEPT), want_upd["batch_stats"])
  got, got_upd = small.apply(small_vars, x, **TRAIN)
  _close(got, want)
  _close(got_upd["batch_stats"], want_upd["batch_stats"])
  return net, variables, masks, small_vars


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_hand_written_channel_reduction_equals_the_architecture_at_the_kept_width(spelling):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  _check_against_reference(ReduceNet(spelling), ReduceNet(spelling, width=5), x)


def test_weight_standardization_equals_the_architecture_at_the_kept_width():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 5, 3)), jnp.float32)
  _check_against_reference(StdConvNet(), StdConvNet(width=5), x)


def test_the_repo_bit_net_rebuilt_at_the_kept_widths_equals_the_pruned_program():
  """BiT's StdConv (weight standardization written with jnp.mean / jnp.var): the narrowed class, built at the kept
  widths, computes what the pruned program does (before, its means kept the dense divisor: 0.04 apart)."""
  model = BiTResNet(width=4, stage_sizes=(1, 1), groups=2, num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = random_variables(model, x)
  net = bp.trace_network(model, variables, x)
  masks = bp.init_traced_masks(net)
  for name, g in net.groups.items():  # one of the two GroupNorm groups of every bottleneck and projection
    if "#" not in name and name != "root_conv":
      masks["channels"][name] = jnp.asarray([1.0, 0.0])
  _, small_vars = bp.materialize_traced(net, variables, masks)
  module, report = bp.rebuild(net, small_vars, masks)
  assert report.rebuilt and report.max_abs_diff["eval"] <= 1e-5, report


class _Norm(nn.Module):
  how: str

  @nn.compact
  def __call__(self, h):
    if self.how == "count":  # a channel count written as a constant: the dense width
      return h * (h.sum(-1, keepdims=True) / 8.0)
    return h / jnp.sqrt(float(h.shape[-1]))  # a constant computed from the width


class _HandNormNet(nn.Module):
  how: str

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="out")(_Norm(self.how, name="norm")(nn.Dense(8, name="up")(x)))


class _HandGroupNorm(nn.Module):
  """A GroupNorm written by hand, its groups of a size fixed in the code: a split that a narrower layer keeps
  when positions in every group are pruned, so it cannot follow the pruned program's."""

  group_size: int = 4

  @nn.compact
  def __call__(self, h):
    g = h.reshape(h.shape[:-1] + (h.shape[-1] // self.group_size, self.group_size))
    g = (g - g.mean(-1, keepdims=True)) * jax.lax.rsqrt(g.var(-1, keepdims=True) + 1e-5)
    return g.reshape(h.shape) * self.param("scale", nn.initializers.ones, (h.shape[-1],))[None]


class _GroupNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="out")(_HandGroupNorm(name="gn")(nn.Dense(8, name="up")(x)))


def _rebuild_problems(model, x, masks_for):
  variables = random_variables(model, x)
  net = bp.trace_network(model, variables, x)
  masks = masks_for(net)
  _, small_vars = bp.materialize_traced(net, variables, masks)
  with pytest.warns(bp.RebuildWarning):
    module, report = bp.rebuild(net, small_vars, masks)
  assert not report.rebuilt
  return report.problems


def _keep(group, kept):
  def masks_for(net):
    masks = bp.init_traced_masks(net)
    masks["channels"][group] = jnp.zeros(net.groups[group].width).at[np.asarray(kept)].set(1.0)
    return masks
  return masks_for


@pytest.mark.parametrize("how,expected", [
    ("count", r"^norm: a mean over channels \(div at norm\) divides by 5, the kept count, in the pruned program "
              r"and by 8 in the module's code"),
    ("width", r"^norm: sqrt at norm uses the constant 8 in the pruned program and 5 in the module's code \(a "
              r"constant computed from a width there\)")])
def test_a_rebuilt_module_that_disagrees_is_told_by_the_op_that_causes_it(how, expected):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  problems = _rebuild_problems(_HandNormNet(how), x, _keep("up", KEPT))
  assert re.search(expected, problems[0]), problems


def test_a_group_split_the_rebuilt_layer_makes_otherwise_is_named():
  """Equal positions kept in both groups of a hand-written GroupNorm whose group size is a constant: the pruned
  program keeps 2 groups of 2, the rebuilt layer splits the 4 channels into 1 group of 4; the message names the
  reshape that splits them, with both splits, not a guess (flax's nn.GroupNorm is narrowed to the pruned split:
  tests/test_rebuild_blocks.py)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  problems = _rebuild_problems(_GroupNormNet(), x, lambda net: _keep(
      next(n for n, g in net.groups.items() if g.width == 4), [0, 2])(net))
  assert re.search(r"^gn: reshape at gn has new_sizes=\(4, 2, 2\) in the pruned program and new_sizes=\(4, 1, 4\) "
                   r"in the module's code", problems[0]), problems
