"""Materialization preserves the function: masked logits == materialized logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpcp_jax as bp
from bpcp_jax.training.optim import make_optimizer
from tests.helpers import images, perturbed_variables, random_masks

CASES = [  # every family at two depths
    ("resnet_v2_11", 0), ("resnet_v2_20", 1),
    ("resnet_v1_bottleneck_11", 3), ("resnet_v1_bottleneck_20", 4),
    ("resnet_v1_8", 5), ("resnet_v1_14", 6),
]


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, x, masks=None, train=False):
  """``model.apply`` compiled once per network and mode (op by op, a ResNet's forward compiles an
  op per shape, seconds a network)."""
  if train:
    return model.apply(variables, x, train=True, masks=masks, mutable=["batch_stats"])
  return model.apply(variables, x, train=False, masks=masks)


def _check_equivalent(model, variables, masks, x, train=False):
  small, small_vars = bp.materialize(model, variables, masks)
  assert small.spec == bp.pruned_spec(model.spec, masks)
  masked, out = _apply(model, variables, x, masks, train=train), _apply(small, small_vars, x, train=train)
  if train:
    masked, out = masked[0], out[0]
  np.testing.assert_allclose(out, masked, rtol=1e-5, atol=1e-5 * float(jnp.abs(masked).max()))
  return small, small_vars


@pytest.mark.parametrize("name,seed", CASES)
def test_random_masks_materialize_exactly(name, seed):
  model = bp.create_model(name, num_classes=10)
  variables = perturbed_variables(model, jax.random.key(seed))
  x = images(jax.random.key(100 + seed))
  for k in range(3):  # several masks per network: entry blocks removed, one group cut to 1 channel
    masks = random_masks(model, seed * 10 + k, leave_one_block_in_stage=k % 3)
    small, small_vars = _check_equivalent(model, variables, masks, x)
    # no dead parameters: the counter equals the real arrays, and nothing but weights and stats is left
    assert bp.count_leaves(small_vars["params"]) == bp.count_params_macs(small)["params"]
    assert set(small_vars) == {"params", "batch_stats"}
    leaf_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(small_vars)]
    assert not any("mask" in p or "gate" in p for p in leaf_paths)
    assert small.spec.num_blocks == sum(bp.kept_blocks(masks).values())


@pytest.mark.parametrize("name", ["resnet_v2_20", "resnet_v1_bottleneck_20", "resnet_v1_20"])
def test_train_mode_outputs_and_stats_match(name):
  model = bp.create_model(name)
  variables = perturbed_variables(model, jax.random.key(1))
  masks = random_masks(model, 3)
  x = images(jax.random.key(2), 8)
  small, small_vars = bp.materialize(model, variables, masks)
  masked, upd = _apply(model, variables, x, masks, train=True)
  out, small_upd = _apply(small, small_vars, x, train=True)
  np.testing.assert_allclose(out, masked, rtol=1e-4, atol=1e-4 * float(jnp.abs(masked).max()))
  # updated running statistics of the kept channels agree too
  _, resliced = bp.materialize(model, {"params": variables["params"], **upd}, masks)
  for a, b in zip(jax.tree.leaves(resliced["batch_stats"]), jax.tree.leaves(small_upd["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_all_blocks_of_every_stage_removed_leaves_the_shortcuts():
  model = bp.create_model("resnet_v2_20")
  variables = perturbed_variables(model, jax.random.key(0))
  masks = bp.init_masks(model)
  masks["blocks"] = {k: jnp.asarray(-1.0) for k in masks["blocks"]}
  small, _ = _check_equivalent(model, variables, masks, images(jax.random.key(1)))
  assert small.spec.num_blocks == 0
  assert {l.name for l in bp.layer_table(small.spec)} == {
      "stem_conv", "stage0_shortcut", "stage1_shortcut", "stage2_shortcut", "head_bn", "head_fc"}


def test_all_ones_masks_return_the_same_network():
  model = bp.create_model("resnet_v1_bottleneck_20")
  variables = perturbed_variables(model, jax.random.key(0))
  small, small_vars = bp.materialize(model, variables, bp.init_masks(model))
  assert small.spec == model.spec
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(small_vars)):
    np.testing.assert_array_equal(a, b)


def test_pruning_a_pruned_network():
  model = bp.create_model("resnet_v2_20")
  variables = perturbed_variables(model, jax.random.key(0))
  x = images(jax.random.key(1))
  small, small_vars = _check_equivalent(model, variables, random_masks(model, 0, drop_entry_blocks=False), x)
  smaller, _ = _check_equivalent(small, small_vars, random_masks(small, 1, drop_blocks=0.3), x)
  assert bp.count_params_macs(smaller)["params"] < bp.count_params_macs(small)["params"]


def test_empty_group_is_refused_by_name():
  model = bp.create_model("resnet_v1_8")
  variables = perturbed_variables(model, jax.random.key(0))
  masks = bp.init_masks(model)
  masks["channels"]["stage1"] = jnp.zeros_like(masks["channels"]["stage1"])
  with pytest.raises(ValueError, match="stage1"):
    bp.materialize(model, variables, masks)


def test_optimizer_state_is_sliced_and_training_continues():
  model = bp.create_model("resnet_v2_11")
  variables = perturbed_variables(model, jax.random.key(0))
  masks = random_masks(model, 5, drop_entry_blocks=False)
  tx = make_optimizer(0.1)
  trainable = {"params": variables["params"], "gates": masks["blocks"]}
  opt_state = tx.init(trainable)
  grads = jax.tree.map(jnp.ones_like, trainable)
  _, opt_state = tx.update(grads, opt_state, trainable)  # non-zero momentum
  small, small_vars, small_opt = bp.materialize(model, variables, masks, opt_state=opt_state)
  small_masks = bp.materialize_masks(model, masks)
  small_trainable = {"params": small_vars["params"], "gates": small_masks["blocks"]}
  # the sliced state matches a fresh state's structure and shapes for the small network
  fresh = tx.init(small_trainable)
  assert jax.tree.structure(fresh) == jax.tree.structure(small_opt)
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(small_opt)):
    assert a.shape == b.shape
  # and its momentum is the big state's momentum on the kept channels
  big_mu = opt_state.inner_states["weights"].inner_state[1][0].trace["params"]["head_fc"]["kernel"]
  small_mu = small_opt.inner_states["weights"].inner_state[1][0].trace["params"]["head_fc"]["kernel"]
  keep = np.flatnonzero(np.asarray(masks["channels"]["stage2"]))
  np.testing.assert_array_equal(np.asarray(big_mu)[keep], small_mu)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, small_trainable), small_opt, small_trainable)
  optax.apply_updates(small_trainable, updates)


def test_take_kept_slices_concrete_values_on_the_host_and_traced_ones_with_jax():
  from bpcp_jax.pruning.masks import take_kept

  x = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
  idx = (None, np.array([0, 3]), np.array([1, 2, 5]))
  want = x[:, [0, 3]][:, :, [1, 2, 5]]
  np.testing.assert_array_equal(take_kept(x, idx), want)
  assert isinstance(take_kept(x, idx), np.ndarray)
  on_device = jax.device_put(jnp.asarray(x, jnp.bfloat16), jax.devices()[1])
  got = take_kept(on_device, idx)
  assert got.dtype == jnp.bfloat16 and got.devices() == {jax.devices()[1]}
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  replicated = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  got = take_kept(replicated, idx)
  assert got.sharding.is_fully_replicated and len(got.devices()) == len(jax.devices())
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(jax.jit(lambda a: take_kept(a, idx))(x), want)  # traced: jnp.take
  keys = jax.random.split(jax.random.key(0), 5)
  assert jnp.array_equal(jax.random.key_data(take_kept(keys, (np.array([1, 4]),))), jax.random.key_data(keys[np.array([1, 4])]))
  assert take_kept(x, (None, None, None)) is x
