"""Measured cost of a network: latency at a batch size, beside its parameter and MAC counts."""

from __future__ import annotations

from typing import Any

import numpy as np

from bpcp_jax.families.counting import count_params_macs
from bpcp_jax.deploy.latency import measure_latency


def profile_network(model, variables, batch_sizes=(1, 128), repeats: int = 20, image_size: int = 32) -> dict[str, Any]:
  """Params, MACs, blocks and the deployed network's latency (median of ``repeats`` calls) at each
  batch size."""
  counts = count_params_macs(model)
  out: dict[str, Any] = {"params": counts["params"], "macs": counts["macs"], "blocks": counts["blocks"]}
  rng = np.random.default_rng(0)
  for b in batch_sizes:
    x = rng.standard_normal((b, image_size, image_size, 3), np.float32)
    ms = measure_latency(model, variables, x, repeats=repeats, min_time_s=0.0)
    out[f"latency_ms_b{b}"] = ms
    out[f"images_per_s_b{b}"] = b / (ms / 1e3)
  return out
