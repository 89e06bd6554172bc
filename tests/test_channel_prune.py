"""CP: criteria, coupled-group scores, global selection to channels or MACs, floors, rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.pruning.channel_prune import (CRITERIA, channel_importance, format_report, prune_channels,
                                    select_channels, zero_pruned_filters)
from tests.helpers import images, perturbed_variables


@pytest.fixture(scope="module")
def net():
  model = bp.create_model("resnet_v2_20")
  return model, perturbed_variables(model, jax.random.key(0))


def test_bn_scale_scores_a_stream_group_by_the_max_of_its_bns(net):
  model, variables = net
  scores = channel_importance(model, variables, "bn_scale")
  p = variables["params"]
  # stage 1's stream is normalised by the non-entry blocks' bn1 and by stage 2's entry bn1
  members = [p["stage1_block1_bn1"]["scale"], p["stage2_block0_bn1"]["scale"]]
  np.testing.assert_allclose(scores["stage1"], np.max(np.abs(np.stack(members)), axis=0), rtol=1e-6)
  mean = channel_importance(model, variables, "bn_scale", reduce="mean")
  np.testing.assert_allclose(mean["stage1"], np.mean(np.abs(np.stack(members)), axis=0), rtol=1e-6)
  np.testing.assert_allclose(scores["stage0_block1_mid2"], np.abs(p["stage0_block1_bn3"]["scale"]), rtol=1e-6)


def test_l1_scores_the_producing_filters(net):
  model, variables = net
  scores = channel_importance(model, variables, "l1", reduce="sum")
  p = variables["params"]
  producers = ["stage0_shortcut"] + [f"stage0_block{i}_conv3" for i in range(2)]
  want = sum(np.abs(np.asarray(p[n]["kernel"])).sum((0, 1, 2)) for n in producers)
  np.testing.assert_allclose(scores["stage0"], want, rtol=1e-5)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_hits_a_channel_target(net, criterion):
  model, variables = net
  masks, report = prune_channels(model, variables, 0.4, criterion, key=jax.random.key(0))
  total = sum(r["width"] for r in report)
  kept = sum(r["kept"] for r in report)
  assert kept == total - int(np.ceil(0.4 * total)) or kept == total - int(0.4 * total)
  for r in report:
    assert int(np.sum(masks["channels"][r["group"]])) == r["kept"] >= 1


def test_macs_target_and_round_to(net):
  model, variables = net
  dense = bp.count_params_macs(model)["macs"]
  masks, report = prune_channels(model, variables, 0.5, "l2", target="macs", round_to=8)
  macs = bp.count_params_macs(bp.pruned_spec(model.spec, masks))["macs"]
  assert 0.40 * dense < macs <= 0.5 * dense
  for r in report:
    assert r["kept"] % 8 == 0 or r["kept"] == r["width"]


def test_a_group_is_never_emptied_and_the_report_says_so(net):
  model, variables = net
  masks, report = prune_channels(model, variables, 0.99, "bn_scale")
  assert all(r["kept"] >= 1 for r in report)
  assert any(r["kept_to_avoid_empty"] for r in report)
  assert "kept to avoid emptying" in format_report(report)
  small, small_vars = bp.materialize(model, variables, masks)  # still a valid network
  assert small.apply(small_vars, images(jax.random.key(1)), train=False).shape == (4, 10)


def test_per_group_scope_prunes_every_group_alike(net):
  model, variables = net
  _, report = prune_channels(model, variables, 0.5, "l2", scope="per_group")
  for r in report:
    assert abs(r["kept"] - r["width"] / 2) <= 1


def test_removed_blocks_are_not_scored_and_earlier_cuts_stay(net):
  model, variables = net
  masks = bp.init_masks(model)
  masks["blocks"]["stage1_block1"] = jnp.asarray(-1.0)
  masks["channels"]["stage2"] = masks["channels"]["stage2"].at[:10].set(0.0)
  new, report = prune_channels(model, variables, 0.3, "l1", masks=masks)
  assert "stage1_block1_mid1" not in {r["group"] for r in report}
  assert float(jnp.sum(new["channels"]["stage2"][:10])) == 0.0
  assert bp.kept_blocks(new)["stage1_block1"] is False


def test_bad_arguments_are_named(net):
  model, variables = net
  with pytest.raises(ValueError, match="nope"):
    channel_importance(model, variables, "nope")
  with pytest.raises(ValueError, match="1.5"):
    prune_channels(model, variables, 1.5)
  with pytest.raises(ValueError, match="key"):
    channel_importance(model, variables, "random")


def test_sfp_soft_step_zeroes_the_producers(net):
  model, variables = net
  masks, _ = prune_channels(model, variables, 0.3, "l2", scope="per_group")
  soft = zero_pruned_filters(model, variables, masks)
  gone = np.flatnonzero(np.asarray(masks["channels"]["stage0"]) == 0)
  assert np.all(np.asarray(soft["params"]["stage0_block1_conv3"]["kernel"])[..., gone] == 0)
  kept = np.flatnonzero(np.asarray(masks["channels"]["stage0"]))
  np.testing.assert_array_equal(soft["params"]["stage0_shortcut"]["kernel"][..., kept],
                                variables["params"]["stage0_shortcut"]["kernel"][..., kept])
  # zeroing is invisible once the channels are masked: SFP's final removal loses nothing more
  x = images(jax.random.key(3))
  np.testing.assert_allclose(model.apply(soft, x, masks=masks), model.apply(variables, x, masks=masks),
                             rtol=1e-5, atol=1e-5)


def test_selection_is_deterministic(net):
  model, variables = net
  scores = channel_importance(model, variables, "cop")
  a, _ = select_channels(model, scores, 0.3)
  b, _ = select_channels(model, scores, 0.3)
  for g in a["channels"]:
    np.testing.assert_array_equal(a["channels"][g], b["channels"][g])
