"""BP, the block search: Bernoulli gates with a straight-through gradient and a sparsity penalty.

Every step samples ``g_i ~ Bernoulli(sigmoid(a_i))`` with an explicit PRNG key; block ``i``
computes ``x + g_i * F_i(x)``; the loss adds ``gamma * sum_i |g_i|``. The gradient reaching the
logit is the paper's straight-through estimate ``dL/da_i = dL/dg_i * p_i * (1 - p_i)``. Keep a
block iff ``p_i >= 0.5`` (``a_i >= 0``).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

# the rules a search is compared with (random, last, single drop, importance) live in block_controls.py
from bpcp_jax.pruning.block_controls import BLOCK_METHODS, select_blocks  # noqa: F401


@jax.custom_vjp
def straight_through(logit, sample):
  """Returns ``sample``; its gradient to ``logit`` is the incoming one times p(1-p)."""
  return sample


def _st_fwd(logit, sample):
  return sample, jax.nn.sigmoid(logit)


def _st_bwd(p, g):
  return g * p * (1.0 - p), jnp.zeros_like(g)


straight_through.defvjp(_st_fwd, _st_bwd)


def gate_probabilities(block_logits: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: jax.nn.sigmoid(v) for k, v in block_logits.items()}


def sample_gates(key: jax.Array, block_logits: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """One 0/1 gate per block, drawn from sigmoid(logit), differentiable to the logits (ST)."""
  names = sorted(block_logits)
  if not names:
    return {}
  logits = jnp.stack([jnp.asarray(block_logits[n], jnp.float32) for n in names])
  samples = jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(jnp.float32)
  gates = straight_through(logits, samples)
  return {n: gates[i] for i, n in enumerate(names)}


def hard_gates(block_logits: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The decision as 0/1 gates (keep iff logit >= 0), for evaluation during the search."""
  return {k: (v >= 0).astype(jnp.float32) for k, v in block_logits.items()}


def gate_penalty(gates: Mapping[str, jax.Array], gamma: float) -> jax.Array:
  """``gamma * sum |g|``. Its gradient is ``gamma * sign(g)`` (0 at g = 0), as PyTorch's L1 loss
  in the original code; ``jnp.abs`` would give 1 at 0 and push dropped blocks further down."""
  if not gates:
    return jnp.zeros((), jnp.float32)
  g = jnp.stack([gates[k] for k in sorted(gates)])
  return gamma * jnp.sum(g * jax.lax.stop_gradient(jnp.sign(g)))


def decide_blocks(block_logits: Mapping[str, jax.Array]) -> dict[str, bool]:
  """Keep block iff p >= 0.5."""
  return {k: bool(v >= 0) for k, v in block_logits.items()}

