"""Measured latency on the device that runs this process: whole networks and single layers.

``measure_latency`` times a network as it is deployed (``predictor.make_predictor``: median of
several calls, after a warm-up, with the result blocked on). ``interleaved_ms`` times several
calls side by side in rounds (each round times every call once, so a load that drifts during
the measurement hits all of them alike); ``spread`` and ``paired_ratio`` summarise its samples
as a median with its interquartile range. ``OpTimer`` times one primitive of
a traced program at given shapes, in isolation, and remembers every shape it has timed: the
per-layer cost table that speed-aware selection reads. Times are in milliseconds.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.deploy.predictor import make_predictor


def _sample_ms(fn: Callable, args: Sequence, min_time_s: float) -> float:
  """ms per call of ``fn(*args)``, calling it until at least ``min_time_s`` passed (so fast calls
  are not dominated by timer resolution)."""
  n, start = 0, time.perf_counter()
  while True:
    jax.block_until_ready(fn(*args))
    n += 1
    elapsed = time.perf_counter() - start
    if elapsed >= min_time_s:
      return elapsed / n * 1e3


def time_call(fn: Callable, *args, repeats: int = 5, min_time_s: float = 0.05) -> float:
  """Median wall time of ``fn(*args)`` in ms over ``repeats`` samples (warmed up first; each
  sample loops until at least ``min_time_s`` passed)."""
  jax.block_until_ready(fn(*args))
  return float(np.median([_sample_ms(fn, args, min_time_s) for _ in range(repeats)]))


def interleaved_ms(calls: Mapping[str, tuple[Callable, Sequence]], rounds: int = 20,
                   min_time_s: float = 0.05) -> dict[str, np.ndarray]:
  """Per-round ms of every ``name: (fn, args)``, timed side by side.

  Every call is warmed up (compiled) first. Round ``r`` then takes one sample of each call
  (``_sample_ms``), in the given order on even rounds and reversed on odd ones, so load that
  drifts during the measurement and the position within a round affect every call alike.
  Returns ``{name: (rounds,) ms}``; sample ``r`` of two calls come from the same round, so their
  ratio is a paired measurement (``paired_ratio``).
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  names = list(calls)
  samples: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      fn, args = calls[name]
      samples[name].append(_sample_ms(fn, args, min_time_s))
  return {n: np.asarray(v) for n, v in samples.items()}


def spread(samples) -> dict[str, float]:
  """``{"median", "q25", "q75", "rounds"}`` of a sample (the median and its interquartile range)."""
  x = np.asarray(samples, np.float64)
  q25, med, q75 = np.percentile(x, [25, 50, 75])
  return {"median": float(med), "q25": float(q25), "q75": float(q75), "rounds": int(x.size)}


def paired_ratio(numerator, denominator) -> dict[str, float]:
  """``spread`` of the per-round ratios of two ``interleaved_ms`` samples (e.g. a speed-up:
  dense ms / pruned ms, round by round)."""
  return spread(np.asarray(numerator, np.float64) / np.asarray(denominator, np.float64))


def measure_latency(model, variables, *inputs, repeats: int = 5, min_time_s: float = 0.1, **apply_kwargs) -> float:
  """Median latency (ms) of the deployed network on the default device: ``make_predictor``'s
  compiled eval-mode apply with the weights fixed inside it, called on ``inputs``."""
  predict = make_predictor(model, variables, **apply_kwargs)
  inputs = jax.device_put(inputs)  # time the network, not a host-to-device copy
  return time_call(predict, *inputs, repeats=repeats, min_time_s=min_time_s)


def _params_key(params: dict) -> tuple:
  return tuple(sorted((k, repr(v)) for k, v in params.items()))


class OpTimer:
  """Times single primitives (convolutions, dot products, elementwise work) at given shapes.

  ``cost(eqn, in_shapes, params)`` returns the measured ms of ``eqn.prim`` applied to random
  inputs of ``in_shapes`` (cached by primitive, parameters and shapes). ``elementwise_ms`` is the
  measured cost of one element of fused elementwise work (a BN+ReLU epilogue), which
  per-channel work such as BN and ReLU is charged with.
  """

  def __init__(self, repeats: int = 3, min_time_s: float = 0.02, seed: int = 0):
    self.repeats, self.min_time_s = repeats, min_time_s
    self.table: dict = {}
    self.rng = np.random.default_rng(seed)
    self.measured = 0
    self._elementwise = None

  def cost(self, prim, params: dict, in_shapes: list, in_dtypes: list) -> float:
    key = (prim.name, _params_key(params), tuple(map(tuple, in_shapes)), tuple(map(str, in_dtypes)))
    if key not in self.table:
      args = [jnp.asarray(self.rng.normal(size=s), d) for s, d in zip(in_shapes, in_dtypes)]
      fn = jax.jit(lambda *a: prim.bind(*a, **params))
      self.table[key] = time_call(fn, *args, repeats=self.repeats, min_time_s=self.min_time_s)
      self.measured += 1
    return self.table[key]

  @property
  def elementwise_ms(self) -> float:
    """ms per element of a fused scale-shift-ReLU over a (32, 32, 32, 64) tensor."""
    if self._elementwise is None:
      x = jnp.asarray(self.rng.normal(size=(32, 32, 32, 64)), jnp.float32)
      s = jnp.asarray(self.rng.normal(size=(1, 1, 1, 64)), jnp.float32)
      fn = jax.jit(lambda x, s: jnp.maximum(x * s + s, 0.0))
      self._elementwise = time_call(fn, x, s, repeats=self.repeats, min_time_s=self.min_time_s) / x.size
    return self._elementwise

  def summary(self) -> dict[str, Any]:
    return {"ops_timed": self.measured, "elementwise_ns_per_element": self.elementwise_ms * 1e6}
