"""Measured cost of networks: latency at each batch size, beside their parameter and MAC counts.

``profile_networks`` times several networks side by side (``latency.interleaved_ms``: rounds
interleaved, the median and interquartile range reported), so their ratios are comparable;
``profile_network`` is the one-network case.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from bpcp_jax.deploy.latency import interleaved_ms, spread
from bpcp_jax.deploy.predictor import make_predictor

MIN_TIME_S = 0.05  # each latency sample calls the network for at least this long


def profile_networks(nets: Mapping[str, tuple[Any, Any]], batch_sizes=(1, 128), rounds: int = 20,
                     min_time_s: float = MIN_TIME_S):
  """Params, MACs, blocks and the deployed latency of every ``name: (network, variables)``, where a
  network is a ``PrunableNetwork`` (a family network or a traced Flax network).

  The networks are timed as deployed (``make_predictor`` of ``network.deployable()``) on random
  inputs of ``network.input_shape``, at every batch size, in ``rounds`` interleaved rounds. Returns
  ``(entries, samples)``: ``entries[name]`` holds ``params``, ``macs``, ``blocks``,
  ``latency_ms_b{B}`` (median ms), ``images_per_s_b{B}`` and ``latency_spread_ms``
  (``{"b{B}": {"median", "q25", "q75", "rounds"}}``); ``samples[name]["b{B}"]`` is the (rounds,) ms
  array, paired round by round across networks.
  """
  rng = np.random.default_rng(0)
  inputs = {}
  calls = {}
  for name, (network, variables) in nets.items():
    predict = make_predictor(network.deployable(), variables)
    for b in batch_sizes:
      shape = (b, *network.input_shape)
      if shape not in inputs:
        inputs[shape] = jax.device_put(rng.standard_normal(shape, np.float32))
      calls[(name, b)] = (predict, (inputs[shape],))
  measured = interleaved_ms(calls, rounds=rounds, min_time_s=min_time_s)
  entries, samples = {}, {}
  for name, (network, variables) in nets.items():
    counts = network.counts(variables)
    entry: dict[str, Any] = {"params": counts["params"], "macs": counts["macs"], "blocks": counts["blocks"],
                             "latency_spread_ms": {}}
    samples[name] = {}
    for b in batch_sizes:
      ms = measured[(name, b)]
      stats = spread(ms)
      entry[f"latency_ms_b{b}"] = stats["median"]
      entry[f"images_per_s_b{b}"] = b / (stats["median"] / 1e3)
      entry["latency_spread_ms"][f"b{b}"] = stats
      samples[name][f"b{b}"] = ms
    entries[name] = entry
  return entries, samples


def profile_network(network, variables, batch_sizes=(1, 128), repeats: int = 20) -> dict[str, Any]:
  """``profile_networks`` of one network: its entry (``repeats`` rounds)."""
  entries, _ = profile_networks({"net": (network, variables)}, batch_sizes, rounds=repeats)
  return entries["net"]
