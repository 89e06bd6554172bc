"""Measured cost of a network: latency at a batch size, beside its parameter and MAC counts."""

from __future__ import annotations

from typing import Any

import numpy as np

from bpcp_jax.deploy.latency import measure_latency


def profile_network(network, variables, batch_sizes=(1, 128), repeats: int = 20) -> dict[str, Any]:
  """Params, MACs, blocks and the deployed network's latency (median of ``repeats`` calls) at each
  batch size, for a ``PrunableNetwork`` (a family network or a traced Flax network)."""
  counts = network.counts(variables)
  out: dict[str, Any] = {"params": counts["params"], "macs": counts["macs"], "blocks": counts["blocks"]}
  rng = np.random.default_rng(0)
  model = network.deployable()
  for b in batch_sizes:
    x = rng.standard_normal((b, *network.input_shape), np.float32)
    ms = measure_latency(model, variables, x, repeats=repeats, min_time_s=0.0)
    out[f"latency_ms_b{b}"] = ms
    out[f"images_per_s_b{b}"] = b / (ms / 1e3)
  return out
