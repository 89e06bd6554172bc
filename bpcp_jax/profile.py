"""Measured cost of a network: latency at a batch size, beside its parameter and MAC counts."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from bpcp_jax.counting import count_params_macs
from bpcp_jax.predictor import make_predictor


def measure_latency(model, variables, batch_size: int, *, repeats: int = 20, warmup: int = 3,
                    image_size: int = 32) -> dict[str, float]:
  """Median wall time of the deployed forward pass (``make_predictor``: jitted, eval mode, weights
  compiled in): ``{"ms": ..., "images_per_s": ...}``."""
  predict = make_predictor(model, variables)
  x = jax.device_put(np.random.default_rng(0).standard_normal((batch_size, image_size, image_size, 3),
                                                                np.float32))
  for _ in range(warmup):
    jax.block_until_ready(predict(x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(predict(x))
    times.append(time.perf_counter() - t0)
  ms = float(np.median(times) * 1e3)
  return {"ms": ms, "images_per_s": batch_size / (ms / 1e3)}


def profile_network(model, variables, batch_sizes=(1, 128), repeats: int = 20) -> dict[str, Any]:
  """Params, MACs, blocks and latency at each batch size."""
  counts = count_params_macs(model)
  out: dict[str, Any] = {"params": counts["params"], "macs": counts["macs"], "blocks": counts["blocks"]}
  for b in batch_sizes:
    lat = measure_latency(model, variables, b, repeats=repeats)
    out[f"latency_ms_b{b}"] = lat["ms"]
    out[f"images_per_s_b{b}"] = lat["images_per_s"]
  return out
