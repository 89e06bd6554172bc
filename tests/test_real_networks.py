"""The real-network suite: every architecture of ``tests/real_networks.py``, at a small size, traced in eval
and train mode, pruned by random masks (masked == materialized to 1e-5, outputs and updated batch
statistics) and by ``select_pruning`` to half its MACs; the fraction of conv/dense kernel parameters that
can be pruned is printed and pinned.

The inputs are 4 images of 64x64 (8 of 128x128 for ResNet-50, 4 of 96x96 for Inception): there every
network's own jitted and eager train-mode outputs agree to 1e-6 (checked by the slow test at the end). With
fewer values per BatchNorm channel, train mode is ill-conditioned (BatchNorm's variance E[x^2] - E[x]^2): with
32x32 images ResNet-18's jitted and eager outputs differ by 3e-6, ResNet-50's by 2e-5 at 4 of 64x64.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.tracer.network import prunable_fraction
from tests.helpers import random_traced_masks
from tests.real_networks import NETWORKS, random_variables
from tests.test_coupling import assert_kept_whole_is_reported

# name -> (fraction of the kernel parameters that pruning can remove, ops reported as keeping channels whole)
PINNED = {name: (1.0, []) for name in NETWORKS}


# the tests compare two compiled programs with each other: XLA's cheapest backend optimization level compiles these
# networks 2-3x faster
fast_jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _train_kwargs(variables):
  kw = {"train": True, "rngs": {"dropout": jax.random.key(2)}}
  return {**kw, "mutable": ["batch_stats"]} if "batch_stats" in variables else kw


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def case(request):
  name = request.param
  model, _, shape, _ = NETWORKS[name]
  x = jax.random.normal(jax.random.key(1), shape)
  variables = random_variables(model, x)
  net = bp.trace_network(model, variables, x, modes={"eval": {}, "train": _train_kwargs(variables)})
  return name, model, variables, x, net


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


def _random_masks(net, seed):
  return random_traced_masks(net, seed, keep_channels=0.6, drop_blocks=0.5)


def test_trace_in_train_mode_keeps_the_eval_groups_and_pins_the_prunable_fraction(case):
  name, model, variables, x, net = case
  eval_net = bp.trace_network(model, variables, x)
  assert {n: g.members for n, g in net.groups.items()} == {n: g.members for n, g in eval_net.groups.items()}
  assert set(net.blocks) == set(eval_net.blocks)
  fraction = prunable_fraction(net)
  print(f"{name}: {len(net.groups)} groups, {len(net.blocks)} blocks, {fraction:.1%} of kernel parameters prunable, "
        f"unfollowed: {[str(u) for u in net.unfollowed]}")
  assert (round(fraction, 4), [str(u) for u in net.unfollowed]) == PINNED[name]
  assert_kept_whole_is_reported(net)


def test_masked_equals_materialized_in_eval_and_train_mode(case):
  _, _, variables, x, net = case
  masks = _random_masks(net, 0)
  small, small_vars = bp.materialize_traced(net, variables, masks)
  rngs = {"dropout": jax.random.key(5)}
  mutable = ["batch_stats"] if "batch_stats" in variables else False

  @fast_jit
  def masked(variables, masks, x, rngs):
    return (bp.masked_apply(net, variables, masks, x),
            bp.masked_apply(net, variables, masks, x, mode="train", rngs=rngs))

  @fast_jit
  def materialized(small_vars, x, rngs):
    return small.apply(small_vars, x), small.apply(small_vars, x, train=True, mutable=mutable, rngs=rngs)

  (want_eval, want_train), (got_eval, got_train) = masked(variables, masks, x, rngs), materialized(small_vars, x, rngs)
  _close(got_eval, want_eval)
  if mutable:
    (got_train, got_stats), (want_train, want_stats) = got_train, want_train
    _, want_small = bp.materialize_traced(net, {**variables, **want_stats}, masks)
    jax.tree_util.tree_map(_close, got_stats["batch_stats"], want_small["batch_stats"])
  _close(got_train, want_train)


def test_select_pruning_to_half_the_macs(case):
  _, _, variables, x, net = case
  sel = bp.select_pruning(net, variables, cost="macs", macs_fraction=0.5, progress=False)
  assert sel.target_met and sel.macs <= 0.5 * sel.dense_macs
  small, small_vars = bp.materialize_traced(net, variables, sel.masks)
  assert bp.count_traced(small, small_vars)[1] == sel.macs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_batch_is_large_enough_for_exact_train_mode(name):
  """At the tests' input shape, the original network's jitted and eager train-mode outputs agree to 1e-6."""
  model, _, shape, _ = NETWORKS[name]
  x = jax.random.normal(jax.random.key(1), shape)
  variables = random_variables(model, x)
  kw = _train_kwargs(variables)
  jitted = jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)
  eager = model.apply(variables, x, **kw)
  for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * max(1.0, float(jnp.abs(b).max())))
