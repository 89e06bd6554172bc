"""The two summands of every residual block of a traced network: its residual (input or shortcut) and branch.

``block_io(net, variables, *inputs)`` evaluates the traced program of ``mode`` (eval by default) and returns
``{block: (residual, branch)}``, the values entering each block's residual add (``coupling.block_sites``), with
every block kept and no mask: what block-importance rules score (``pruning/block_controls.py``). One program
evaluation gives every block; jittable.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax

from bpcp_jax.tracer.network import TracedNetwork, _leaf, _rng_leaves, leaves_by_path
from bpcp_jax.tracer.program import run_program


def block_io(net: TracedNetwork, variables, *inputs, mode: str = "eval", rngs: Optional[Mapping] = None) -> dict:
  """``{block name: (residual, branch)}`` on ``inputs`` (arrays shaped as the traced ones, any batch size).

  Raises ``ValueError`` when ``mode`` draws random numbers and ``rngs`` does not name its streams."""
  program, coupling = net.traced(mode, inputs)
  sites = coupling.block_sites[program]
  names = sorted(sites)
  wanted = [sites[n].residual for n in names] + [sites[n].branch for n in names]
  leaves = leaves_by_path(variables)
  values = run_program(program, [_leaf(leaves, p) for p in program.var_paths], jax.tree_util.tree_leaves(inputs),
                       _rng_leaves(program, rngs, mode), outvars=wanted)
  return {n: (values[i], values[len(names) + i]) for i, n in enumerate(names)}
