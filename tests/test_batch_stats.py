"""bpcp_jax.training.batch_stats: BN recalibration after blocks and channels are removed."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from tests.conftest import REPO_ROOT
from tests.helpers import random_masks

USER_MODELS = os.path.join(REPO_ROOT, "tests", "user_models.py")


def test_recalibrated_statistics_are_those_of_the_pruned_network():
  """Recalibrated on many passes of one batch, the running statistics become that batch's: eval
  mode then gives train mode's logits for it, for the network with blocks and channels removed
  (and not before: the old statistics were accumulated with them in place)."""
  net = bp.FamilyNetwork.create("resnet_v2_20", 10)
  rng = np.random.default_rng(0)  # statistics far from what the pruned network sees
  variables = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape, np.float32), net.init(jax.random.PRNGKey(0)))
  variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.05, variables["batch_stats"])
  masks = random_masks(net.module(), 3)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3), jnp.float32)
  train_logits, _ = jax.jit(lambda v: net.apply(v, x, train=True, masks=masks))(variables)
  evaluate = jax.jit(lambda v: net.apply(v, x, train=False, masks=masks))
  before = evaluate(variables)
  recal = jax.jit(functools.partial(bp.recalibrate_batch_stats, net))
  new = recal(variables, jnp.broadcast_to(x, (100, *x.shape)), masks=masks)  # 0.9**100: 3e-5 of the old left
  after = evaluate(new)
  assert float(jnp.max(jnp.abs(before - train_logits))) > 0.1
  np.testing.assert_allclose(after, train_logits, atol=2e-4, rtol=2e-4)
  # the materialized network (a plain ResNet module, no masks) recalibrates to the same function
  small, small_vars = bp.materialize(net.module(), variables, masks)
  small_new = bp.recalibrate_batch_stats(small, small_vars, jnp.broadcast_to(x, (100, *x.shape)))
  small_logits = jax.jit(lambda v: small.apply(v, x, train=False))(small_new)
  np.testing.assert_allclose(small_logits, after, atol=1e-5, rtol=1e-5)
  assert jax.tree.all(jax.tree.map(np.array_equal, new["params"], variables["params"]))


def test_recalibration_is_one_train_mode_pass_per_batch_with_dropout_keys():
  """A user network with dropout and a removed block: the same as a loop of train-mode passes, each
  with its own part of the key."""
  net = bp.FlaxNetwork.from_factory(f"{USER_MODELS}:make_resnet", 10, (32, 32, 3))
  variables = net.init(jax.random.PRNGKey(0))
  gates = {b: jnp.float32(i != 1) for i, b in enumerate(net.block_names)}
  batches = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 32, 32, 3), jnp.float32)
  key = jax.random.PRNGKey(5)
  new = bp.recalibrate_batch_stats(net, variables, batches, block_gates=gates, rng=key)
  stats = variables["batch_stats"]
  apply = jax.jit(lambda v, x, k: net.apply(v, x, train=True, block_gates=gates, rng=k))
  for x, k in zip(batches, jax.random.split(key, 3)):
    _, stats = apply({**variables, "batch_stats": stats}, x, k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), new["batch_stats"], stats)
  assert not jax.tree.all(jax.tree.map(np.allclose, new["batch_stats"], variables["batch_stats"]))


def test_recalibration_names_bad_shapes_and_a_network_without_batch_norm():
  net = bp.FamilyNetwork.create("resnet_v2_20", 10)
  variables = net.init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"shape \(4, 32, 32, 3\); expected \[N, B, \*input_shape\] = \[N, B, 32, 32, 3\]"):
    bp.recalibrate_batch_stats(net, variables, jnp.zeros((4, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"shape \(2, 4, 28, 28, 3\)"):
    bp.recalibrate_batch_stats(net, variables, jnp.zeros((2, 4, 28, 28, 3)))
  with pytest.raises(ValueError, match="no 'batch_stats' .*collections: \\['params'\\]"):
    bp.recalibrate_batch_stats(net, {"params": variables["params"]}, jnp.zeros((2, 4, 32, 32, 3)))
  with pytest.raises(TypeError, match="network is a dict; expected a PrunableNetwork"):
    bp.recalibrate_batch_stats({}, variables, jnp.zeros((2, 4, 32, 32, 3)))
