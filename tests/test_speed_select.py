"""Speed-aware selection: targets met, round_to respected, results usable by both materializers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.deploy.latency import OpTimer, measure_latency
from bpcp_jax.pruning.speed_select import select_pruning, select_resnet, traced_importance
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
  with pytest.raises(ValueError, match="unknown channel criterion 'l7'"):
    traced_importance(net, variables, "l7")


def test_random_criterion_draws_from_the_key_given(mobilenet):
  _, variables, _, net = mobilenet
  with pytest.raises(ValueError, match="needs a PRNG key"):
    select_pruning(net, variables, criterion="random", cost="macs", macs_fraction=0.5, progress=False)
  a, b, c = (select_pruning(net, variables, criterion="random", cost="macs", macs_fraction=0.5, progress=False,
                            key=jax.random.key(k)) for k in (0, 0, 1))
  assert a.target_met and a.macs <= 0.5 * a.dense_macs
  same = all(np.array_equal(a.masks["channels"][g], b.masks["channels"][g]) for g in net.groups)
  other = all(np.array_equal(a.masks["channels"][g], c.masks["channels"][g]) for g in net.groups)
  assert same and not other


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


class FakeClock:
  """A deterministic ``measure``: a fixed overhead plus time per MAC of the materialized network.

  Tests give the search per-layer predictions (``SizeTimer``) that disagree with this clock, so it
  has to rescale and check again, as it would on a device it predicts badly."""

  def __init__(self, overhead_ms, ms_per_mmac):
    self.overhead_ms, self.ms_per_mmac, self.calls = overhead_ms, ms_per_mmac, []

  def __call__(self, model, variables, *inputs):
    ms = self.overhead_ms + self.ms_per_mmac * bp.count_traced(model, variables)[1] / 1e6
    self.calls.append(ms)
    return ms


class SizeTimer(OpTimer):
  """Deterministic per-layer predictions: a fixed cost per layer plus one proportional to its size."""

  elementwise_ms = 1e-7

  def cost(self, prim, params, in_shapes, in_dtypes):
    self.measured += 1
    return 0.002 + 1e-7 * float(np.prod(in_shapes[0])) * in_shapes[1][-1]


def test_latency_budget_stops_only_on_a_measurement_that_meets_it(mobilenet):
  _, variables, _, net = mobilenet
  dense_mmacs = bp.count_traced(net, variables)[1] / 1e6
  # 2 ms dense, 0.6 ms of it fixed: the size-proportional predictions are too optimistic, so the
  # first check misses and the search rescales and prunes further
  clock = FakeClock(overhead_ms=0.6, ms_per_mmac=1.4 / dense_mmacs)
  sel = select_pruning(net, variables, cost="latency", latency_budget_ms=1.0, round_to=4, timer=SizeTimer(),
                       measure=clock, progress=False)
  assert clock.calls[0] == sel.dense_measured_ms > 1.0  # the dense network misses the budget
  assert sel.target_met and sel.measured_ms == clock.calls[-1] <= 1.0
  assert len(clock.calls) >= 3 and all(ms > 1.0 for ms in clock.calls[:-1])  # every earlier check missed it
  assert sel.history and sel.macs < sel.dense_macs
  # what was measured is what the masks give
  small, small_vars = bp.materialize_traced(net, variables, sel.masks)
  assert clock(small, small_vars) == sel.measured_ms


def test_unreachable_latency_budget_is_reported_not_met(mobilenet):
  _, variables, _, net = mobilenet
  # the fixed overhead alone is over the budget
  clock = FakeClock(overhead_ms=5.0, ms_per_mmac=1.0 / (bp.count_traced(net, variables)[1] / 1e6))
  sel = select_pruning(net, variables, cost="latency", latency_budget_ms=4.0, round_to=4, timer=SizeTimer(),
                       measure=clock, max_checks=3, progress=False)
  assert not sel.target_met
  assert len(clock.calls) <= 1 + 3  # the dense measurement and at most max_checks checks
  assert sel.measured_ms is None or sel.measured_ms > 4.0


def test_latency_budget_with_real_measurements_reports_what_it_measured(mobilenet):
  _, variables, x, net = mobilenet
  # a tiny network on a shared CPU: whether 0.8x is reached depends on noise, what is reported must not
  budget = 0.8 * measure_latency(*mobilenet[:2], x)
  sel = select_pruning(net, variables, cost="latency", latency_budget_ms=budget, round_to=4, timer=OpTimer(repeats=1),
                       max_checks=3, progress=False)
  assert sel.dense_measured_ms > 0 and sel.timer.measured > 0
  if sel.measured_ms is not None:
    assert sel.target_met == (sel.measured_ms <= budget)
    small, small_vars = bp.materialize_traced(net, variables, sel.masks)
    np.testing.assert_allclose(small.apply(small_vars, x), bp.masked_apply(net, variables, sel.masks, x), rtol=1e-5,
                               atol=1e-5)
  else:
    assert not sel.target_met


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


def test_bn_scale_fallback_is_in_the_unit_of_the_scales():
  """A group without normalisation is scored by mean-1 filter norms; next to BN scales that L1
  sparsity drove to about 0.1 those must be rescaled, or a global search cuts only the normalised
  group (before: 'conv' 16 -> 6, 'plain' untouched)."""
  model, x = nets.HalfNormalisedNet(), jnp.ones((1, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  bn = 0.1 * (0.5 + np.random.default_rng(0).uniform(size=16))
  variables["params"]["bn"]["scale"] = jnp.asarray(bn, jnp.float32)
  net = bp.trace_network(model, variables, x)
  scores = traced_importance(net, variables, "bn_scale")
  np.testing.assert_allclose(scores["conv"], bn, rtol=1e-6)
  l1 = traced_importance(net, variables, "l1")["plain"]
  np.testing.assert_allclose(scores["plain"], l1 * bn.mean(), rtol=1e-6)  # same order, the scales' mean
  sel = select_pruning(net, variables, cost="macs", macs_fraction=0.5, progress=False)
  widths = {g: int(np.sum(sel.masks["channels"][g])) for g in net.groups}
  assert sel.target_met and all(8 <= w < 16 for w in widths.values()), widths
