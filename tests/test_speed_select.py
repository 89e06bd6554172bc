"""Speed-aware selection: targets met, round_to respected, results usable by both materializers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.latency import OpTimer, measure_latency
from bpcp_jax.speed_select import select_pruning, select_resnet, traced_importance
from tests import nets
from tests.helpers import perturbed_variables


@pytest.fixture(scope="module")
def mobilenet():
  model = nets.MobileNet()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.asarray(np.random.default_rng(1).normal(size=a.shape), a.dtype),
                                     variables)
  return model, variables, x, bp.trace_network(model, variables, x)


def test_importance_reads_bn_scales_through_the_coupling(mobilenet):
  _, variables, _, net = mobilenet
  scores = traced_importance(net, variables, "bn_scale")
  # group "pw1" is normalised by pw1_bn (16 channels) and dw2_bn (32 outputs, 2 per channel)
  pw1 = np.abs(np.asarray(variables["params"]["pw1_bn"]["scale"]))
  dw2 = np.abs(np.asarray(variables["params"]["dw2_bn"]["scale"])).reshape(16, 2)
  np.testing.assert_allclose(scores["pw1"], np.maximum(pw1, dw2.max(1)), rtol=1e-6)
  assert set(scores) == set(net.groups)
  with pytest.raises(ValueError, match="unknown criterion 'l7'"):
    traced_importance(net, variables, "l7")


@pytest.mark.parametrize("round_to", [1, 4])
def test_macs_target_is_met_and_widths_are_rounded(mobilenet, round_to):
  _, variables, x, net = mobilenet
  sel = select_pruning(net, variables, cost="macs", macs_fraction=0.5, round_to=round_to, progress=False)
  assert sel.target_met and sel.macs <= 0.5 * sel.dense_macs
  small, small_vars = bp.materialize_traced(net, variables, sel.masks)
  assert bp.count_traced(small, small_vars)[1] == sel.macs
  for name, g in net.groups.items():
    kept = int(np.sum(sel.masks["channels"][name]))
    assert kept == g.width or kept % round_to == 0, (name, kept)
  np.testing.assert_allclose(small.apply(small_vars, x), bp.masked_apply(net, variables, sel.masks, x), rtol=1e-5,
                             atol=1e-5)
  assert len(sel.table().splitlines()) == len(sel.history) + 2


def test_latency_budget_is_checked_by_measuring_the_materialized_network(mobilenet):
  _, variables, x, net = mobilenet
  dense_ms = min(measure_latency(*mobilenet[:2], x) for _ in range(3))  # the fastest: noise only slows
  budget = 0.8 * dense_ms
  sel = select_pruning(net, variables, cost="latency", latency_budget_ms=budget, round_to=4, timer=OpTimer(repeats=1),
                       progress=False)
  # the search stops only when a measurement of the materialized selection met the budget
  assert sel.target_met and sel.measured_ms is not None and sel.measured_ms <= budget
  if sel.dense_measured_ms > budget:  # on a noisy machine the dense network can measure under it
    assert sel.history and sel.timer.measured > 0
  else:
    assert not sel.history


def test_resnet_selection_gives_family_masks(tmp_path):
  model = bp.create_model("resnet_v2_11")
  variables = perturbed_variables(model, jax.random.key(3))
  masks, report, sel = select_resnet(model, variables, criterion="l1", cost="macs", macs_fraction=0.6, round_to=4,
                                     progress=False)
  small, _ = bp.materialize(model, variables, masks)
  assert bp.count_params_macs(small.spec)["macs"] == sel.macs <= 0.6 * sel.dense_macs
  assert {r["group"] for r in report} == set(masks["channels"])


def test_bad_targets_are_named(mobilenet):
  _, variables, _, net = mobilenet
  with pytest.raises(ValueError, match="exactly one target"):
    select_pruning(net, variables, macs_fraction=0.5, latency_budget_ms=1.0)
  with pytest.raises(ValueError, match="cost 'flops' unknown"):
    select_pruning(net, variables, cost="flops", macs_fraction=0.5)
  with pytest.raises(ValueError, match=r"macs_fraction must be in \(0, 1\]"):
    select_pruning(net, variables, cost="macs", macs_fraction=1.5)
