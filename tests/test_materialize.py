"""Materialization preserves the function: masked logits == materialized logits."""

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


def _check_equivalent(model, variables, masks, x, train=False):
  small, small_vars = bp.materialize(model, variables, masks)
  assert small.spec == bp.pruned_spec(model.spec, masks)
  if train:
    masked, _ = model.apply(variables, x, train=True, masks=masks, mutable=["batch_stats"])
    out, _ = small.apply(small_vars, x, train=True, mutable=["batch_stats"])
  else:
    masked = model.apply(variables, x, train=False, masks=masks)
    out = small.apply(small_vars, x, train=False)
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
  masked, upd = model.apply(variables, x, train=True, masks=masks, mutable=["batch_stats"])
  out, small_upd = small.apply(small_vars, x, train=True, mutable=["batch_stats"])
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
