"""bpcp_jax.training.batch_stats: BN recalibration after blocks and channels are removed."""

import functools
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bpcp_jax as bp
from tests.conftest import REPO_ROOT
from tests.helpers import perturbed_variables, random_masks

USER_MODELS = os.path.join(REPO_ROOT, "tests", "user_models.py")


def test_recalibrated_statistics_are_those_of_the_pruned_network():
  """Recalibrated on one batch (twice), the running statistics become that batch's: eval
  mode then gives train mode's logits for it, for the network with blocks and channels removed
  (and not before: the old statistics were accumulated with them in place)."""
  net = bp.FamilyNetwork.create("resnet_v2_11", 10, image_size=16)
  variables = perturbed_variables(net.module(), jax.random.PRNGKey(0))
  masks = random_masks(net.module(), 3, drop_blocks=0.5, drop_entry_blocks=False, single_channel_group=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3), jnp.float32)
  train_logits, _ = jax.jit(lambda v: net.apply(v, x, train=True, masks=masks))(variables)
  evaluate = jax.jit(lambda v: net.apply(v, x, train=False, masks=masks))
  before = evaluate(variables)
  recal = jax.jit(functools.partial(bp.recalibrate_batch_stats, net))
  new = recal(variables, jnp.broadcast_to(x, (2, *x.shape)), masks=masks)
  after = evaluate(new)
  assert float(jnp.max(jnp.abs(before - train_logits))) > 0.1
  np.testing.assert_allclose(after, train_logits, atol=2e-4, rtol=2e-4)
  # the materialized network (a plain ResNet module, no masks) recalibrates to the same function
  small, small_vars = bp.materialize(net.module(), variables, masks)
  small_new = bp.recalibrate_batch_stats(small, small_vars, jnp.broadcast_to(x, (2, *x.shape)))
  small_logits = jax.jit(lambda v: small.apply(v, x, train=False))(small_new)
  np.testing.assert_allclose(small_logits, after, atol=1e-5, rtol=1e-5)
  assert jax.tree.all(jax.tree.map(np.array_equal, new["params"], variables["params"]))


def test_recalibration_is_one_train_mode_pass_per_batch_with_dropout_keys():
  """average="momentum": for a user network with dropout and a removed block, the same as a loop of
  train-mode passes, each with its own part of the key."""
  net = bp.FlaxNetwork.from_factory(f"{USER_MODELS}:make_resnet", 10, (32, 32, 3))
  variables = net.init(jax.random.PRNGKey(0))
  gates = {b: jnp.float32(i != 1) for i, b in enumerate(net.block_names)}
  batches = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 32, 32, 3), jnp.float32)
  key = jax.random.PRNGKey(5)
  new = bp.recalibrate_batch_stats(net, variables, batches, block_gates=gates, rng=key, average="momentum")
  stats = variables["batch_stats"]
  apply = jax.jit(lambda v, x, k: net.apply(v, x, train=True, block_gates=gates, rng=k))
  for x, k in zip(batches, jax.random.split(key, 3)):
    _, stats = apply({**variables, "batch_stats": stats}, x, k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), new["batch_stats"], stats)
  assert not jax.tree.all(jax.tree.map(np.allclose, new["batch_stats"], variables["batch_stats"]))


def test_recalibration_names_bad_shapes_and_a_network_without_batch_norm():
  net = bp.FamilyNetwork.create("resnet_v2_20", 10)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(net.init, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match=r"shape \(4, 32, 32, 3\); expected \[N, B, \*input_shape\] = \[N, B, 32, 32, 3\]"):
    bp.recalibrate_batch_stats(net, variables, jnp.zeros((4, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"shape \(2, 4, 28, 28, 3\)"):
    bp.recalibrate_batch_stats(net, variables, jnp.zeros((2, 4, 28, 28, 3)))
  with pytest.raises(ValueError, match="no 'batch_stats' .*collections: \\['params'\\]"):
    bp.recalibrate_batch_stats(net, {"params": variables["params"]}, jnp.zeros((2, 4, 32, 32, 3)))
  with pytest.raises(TypeError, match="network is a dict; expected a PrunableNetwork"):
    bp.recalibrate_batch_stats({}, variables, jnp.zeros((2, 4, 32, 32, 3)))


class _ConvBN(nn.Module):
  """One conv and one BN at flax's default momentum (0.99), pooled to 3 logits."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(-3, -2)))


def _train_passes(module, variables, batches):
  apply = jax.jit(lambda s, x: module.apply({**variables, "batch_stats": s}, x, train=True, mutable=["batch_stats"]))
  stats = variables["batch_stats"]
  for x in batches:
    stats = apply(stats, x)[1]["batch_stats"]
  return stats


def test_recalibration_takes_frozen_variables_low_precision_statistics_and_lists_of_arrays():
  """Variables as flax.core.freeze gives them, statistics stored in bfloat16 and batches as a list of
  NumPy arrays: the same passes as the loop, the statistics back in their nesting and dtype; and
  ``m**N`` of the old statistics remain, at flax's default momentum as the docstring says."""
  module = _ConvBN()
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  batches = [np.asarray(x) for x in jax.random.normal(jax.random.PRNGKey(1), (3, 4, 8, 8, 3)) + 2.0]
  new = bp.recalibrate_batch_stats(module, flax.core.freeze(variables), batches, average="momentum")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), new["batch_stats"],
               _train_passes(module, variables, batches))
  low = {**variables, "batch_stats": jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables["batch_stats"])}
  assert {str(a.dtype) for a in jax.tree.leaves(bp.recalibrate_batch_stats(module, low, batches)["batch_stats"])} == {
      "bfloat16"}
  # 20 passes of one batch: 0.99**20 = 82% of the old mean remains
  one = bp.recalibrate_batch_stats(module, variables, np.broadcast_to(batches[0], (20, *batches[0].shape)),
                                  average="momentum")
  target = _train_passes(module, variables, batches[:1])["BatchNorm_0"]["mean"] / 0.01  # old mean is 0
  np.testing.assert_allclose(one["batch_stats"]["BatchNorm_0"]["mean"], (1 - 0.99**20) * target, rtol=1e-4)


class _BNFirst(nn.Module):
  """BN on the input itself (flax's default momentum, 0.99), then a dense layer and a second BN."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(3)(x))


def test_exact_average_is_the_mean_of_the_batch_statistics_whatever_the_momentum():
  """The default: the running statistics become the equal-weight mean of the batches' own, the old
  ones forgotten, at momentum 0.99 and 0.5 alike (a momentum pass would keep 97% of the old at 0.99)."""
  module = _BNFirst()
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
  variables["batch_stats"] = jax.tree.map(lambda a: a + 7.0, variables["batch_stats"])  # far off
  batches = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 5)) * jnp.array([1.0, 2.0, 0.5])[:, None, None] + 1.5
  new = bp.recalibrate_batch_stats(module, variables, batches)["batch_stats"]
  np.testing.assert_allclose(new["BatchNorm_0"]["mean"], batches.mean(1).mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["BatchNorm_0"]["var"], batches.var(1).mean(0), rtol=1e-5, atol=1e-5)
  # the second BN: the mean over the batches of what one momentum pass from 0 moves by, over (1 - 0.5)
  zero = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  per_batch = [_train_passes(module, {**variables, "batch_stats": zero}, [x])["BatchNorm_1"] for x in batches]
  for k in ("mean", "var"):
    np.testing.assert_allclose(new["BatchNorm_1"][k], np.mean([b[k] for b in per_batch], 0) / 0.5, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="average='ema'; expected 'exact' or 'momentum'"):
    bp.recalibrate_batch_stats(module, variables, batches, average="ema")


class _ReadStatistics(nn.Module):
  """Statistics the train-mode forward reads: a BN frozen with use_running_average=True and a
  spectral norm's power-iteration state (its u, and the sigma it gives); then a BN."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=True, name="frozen")(x)
    x = nn.SpectralNorm(nn.Dense(4))(x, update_stats=train)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)


def test_exact_average_holds_the_statistics_the_forward_reads():
  """The frozen BN and the spectral norm keep their values, and the BN after them is recalibrated
  from the forward the network computes with those values (the statistics of each batch from a
  train-mode pass with its own statistics at 0), not one with them at 0 or 2**21."""
  module = _ReadStatistics()
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
  variables["params"] = jax.tree.map(lambda a: 3.0 * a, variables["params"])  # sigma 3, not 1
  variables["batch_stats"]["frozen"] = {"mean": jnp.arange(5.0), "var": jnp.arange(1.0, 6.0)}
  batches = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 5)) + 3.0
  new = jax.jit(functools.partial(bp.recalibrate_batch_stats, module))(variables, batches)["batch_stats"]
  for name in ("frozen", "SpectralNorm_0"):
    jax.tree.map(np.testing.assert_array_equal, new[name], variables["batch_stats"][name])
  zero = {**variables["batch_stats"], "bn": jax.tree.map(jnp.zeros_like, variables["batch_stats"]["bn"])}
  per_batch = jax.jit(jax.vmap(lambda x: module.apply({**variables, "batch_stats": zero}, x, train=True,
                                                     mutable=["batch_stats"])[1]["batch_stats"]["bn"]))(batches)
  for k in ("mean", "var"):
    np.testing.assert_allclose(new["bn"][k], per_batch[k].mean(0) / 0.1, rtol=1e-5, atol=1e-5)
  assert float(np.max(np.abs(new["bn"]["mean"]))) > 0.1


class _TwoInputBNs(nn.Module):
  """Two BNs on the input itself, at momentum 0 (the running statistics are the last batch's) and 0.9."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return (nn.BatchNorm(use_running_average=not train, momentum=0.0)(x)
            + nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))


def test_exact_average_at_momentum_zero_and_with_large_statistics():
  """Inputs of variance 1e10 (unnormalized data) and a momentum of 0: the statistics are still the
  mean over the batches of each one's mean and (biased) variance."""
  module = _TwoInputBNs()
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  batches = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 16, 3))) * 1e5 + 3e5
  new = jax.jit(functools.partial(bp.recalibrate_batch_stats, module))(variables, batches)["batch_stats"]
  want = {"mean": batches.astype(np.float64).mean(1).mean(0), "var": batches.astype(np.float64).var(1).mean(0)}
  for layer in ("BatchNorm_0", "BatchNorm_1"):
    for k in ("mean", "var"):
      np.testing.assert_allclose(new[layer][k], want[k], rtol=1e-4)


def test_recalibration_refuses_unnormalized_images_unbatched_inputs_and_other_objects():
  module = _ConvBN()
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(TypeError, match="batches are uint8; expected floating-point"):
    bp.recalibrate_batch_stats(module, variables, np.zeros((2, 4, 8, 8, 3), np.uint8))
  # [B, H, W, C] without N: a plain module has no input shape to check against, its output has
  with pytest.raises(ValueError, match=r"_ConvBN maps a batch of shape \(8, 8, 3\) to an output of shape \(3,\)"):
    bp.recalibrate_batch_stats(module, variables, np.zeros((4, 8, 8, 3), np.float32))
  with pytest.raises(TypeError, match="network is a method; expected a PrunableNetwork .* or a flax.nnx module"):
    bp.recalibrate_batch_stats(module.apply, variables, np.zeros((2, 4, 8, 8, 3), np.float32))
  # an NNX module: masks are for traced networks, the materialized module is what is recalibrated
  bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="BatchNorm: masks and block_gates are for traced networks; .*materialize_nnx"):
    bp.recalibrate_batch_stats(bn, bp.NnxNetwork.of(bn).variables(), np.zeros((2, 4, 2), np.float32), masks={})
  with pytest.raises(ValueError, match="Linear has no nnx.BatchStat variables"):
    bp.recalibrate_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), np.zeros((2, 4, 2), np.float32))


def test_recalibration_averages_the_statistics_over_the_mapped_axis():
  """Under a mapped axis every device ends with the same statistics: the mean of what each would
  recalibrate to alone (a pass's update is linear in the batch statistics)."""
  net = bp.FlaxNetwork(_ConvBN(), (8, 8, 3))
  variables = net.init(jax.random.PRNGKey(0))
  batches = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 8, 8, 3)) * jnp.array([1.0, 3.0])[:, None, None, None,
                                                                                                 None, None]
  alone = jax.vmap(lambda b: bp.recalibrate_batch_stats(net, variables, b)["batch_stats"])(batches)
  mapped = jax.vmap(lambda b: bp.recalibrate_batch_stats(net, variables, b, axis_name="d")["batch_stats"],
                    axis_name="d")(batches)
  jax.tree.map(lambda a, m: np.testing.assert_allclose(m, np.broadcast_to(a.mean(0), a.shape), rtol=1e-5, atol=1e-6),
               alone, mapped)
  assert not np.allclose(alone["BatchNorm_0"]["var"][0], alone["BatchNorm_0"]["var"][1])


def test_materialized_networks_recalibrate_at_their_own_input_size_without_a_dropout_key():
  """The traced program materialized (``PrunedNetwork``) of a network without dropout needs no key
  and recalibrates to the masked network's statistics; a materialized family ResNet recalibrates on
  16x16 images as its FamilyNetwork does."""
  net = bp.FlaxNetwork.from_factory(f"{USER_MODELS}:make_resnet", 10, (8, 8, 3))
  variables = net.init(jax.random.PRNGKey(0))
  masks = net.init_masks()
  masks["channels"] = {g: m.at[1].set(0.0) for g, m in masks["channels"].items()}
  masks["blocks"][net.block_names[1]] = jnp.float32(-1.0)
  batches = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 8, 8, 3))
  small, small_vars = bp.materialize_traced(net.traced, variables, masks)
  assert isinstance(small, bp.PrunedNetwork)
  got = bp.recalibrate_batch_stats(small, small_vars, batches)["batch_stats"]
  masked = bp.recalibrate_batch_stats(net, variables, batches, masks=masks)
  want = bp.materialize_traced(net.traced, masked, masks)[1]["batch_stats"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  # a materialized family ResNet takes the image size of its FamilyNetwork (traced only: the numbers
  # are those of the first test)
  family = bp.FamilyNetwork.create("resnet_v2_11", 10, image_size=16)
  fam_vars = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(family.init, jax.random.PRNGKey(0)))
  x = jax.ShapeDtypeStruct((1, 2, 16, 16, 3), jnp.float32)
  resnet, res_vars = bp.materialize(family.module(), fam_vars, random_masks(family.module(), 1))
  out = jax.eval_shape(functools.partial(bp.recalibrate_batch_stats, resnet), res_vars, x)
  assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, res_vars)
