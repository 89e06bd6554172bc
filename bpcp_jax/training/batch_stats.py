"""Batch-norm recalibration: the running statistics of a network whose structure changed (residual
blocks removed, channels pruned) re-estimated from a few training batches, with no training.

Removing a residual block changes the input of every later layer, so the running means and
variances that batch normalization accumulated with the block in place no longer describe what
those layers see. Judged in eval mode without recalibration, a removal is judged mostly by how
far off those statistics are. Re-estimating them with forward passes in train mode (BN
recalibration, as one-shot architecture searches and "BN adaptation" in pruning tools do) is the
cheap fix; on ResNet-v2-56 with 8 blocks removed it is the difference between a removal that looks
random and one that is judged by what it removes (``experiments/bp_protocol.py ablate``).
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def recalibrate_batch_stats(network, variables: Mapping, batches, *, masks: Optional[Mapping] = None,
                            block_gates: Optional[Mapping] = None, rng: Optional[jax.Array] = None,
                            axis_name: Optional[str] = None, average: str = "exact") -> dict:
  """``variables`` with ``batch_stats`` re-estimated on ``batches``; the parameters are untouched.

  ``network``: a ``PrunableNetwork``, a family ``ResNet`` (e.g. ``bp.materialize``'s), any
  ``flax.linen`` module whose ``__call__`` takes ``train`` or ``deterministic``, or a ``flax.nnx``
  module with ``variables`` in the layout ``bp.NnxNetwork.variables()`` gives (``bp.recalibrate_nnx``
  returns the module itself recalibrated). A module has no declared input shape: its inputs are
  taken to be ``batches.shape[2:]``. ``batches``: one floating-point array
  ``[N, B, *network.input_shape]``, network inputs preprocessed as in training (augmented training
  images are best: the statistics are then those the weights were trained with). ``masks`` /
  ``block_gates``: the structure to recalibrate for, as ``network.apply`` takes them (e.g. gates of
  0 for the removed blocks). ``rng``: a key, split per batch, for networks with dropout.
  ``axis_name``: under ``pmap``/``shard_map``, the mapped axis the batch statistics are averaged
  over (as in ``network.apply``), so every device ends with the same statistics.

  ``average="exact"`` (the default): the new statistics are the equal-weight mean of the N
  batches' statistics, the old ones forgotten (as PyTorch's ``torch.optim.swa_utils.update_bn``,
  which sets ``momentum=None``), whatever the layers' momentum, 0 included. It assumes what flax's
  ``BatchNorm`` and the families' layers do: each running statistic is an exponential moving
  average ``new = m * old + (1 - m) * batch`` that the train-mode forward does not read; ``m`` is
  read off per element from a pass from the old statistics and three from 0, D and 2 D (D 2**21 to
  2**22 times above the statistic: float32's precision at any magnitude), N + 4 passes in all, the
  three as one ``vmap`` (which computes a forward that reads no statistic once). A statistic that is
  not such an average with ``0 <= m < 1`` keeps its value, and is held at it in every pass, so that
  the averages after it are fed by the forward the network computes: one a pass leaves unchanged (a
  ``BatchNorm`` frozen with ``use_running_average=True``), a spectral norm's power-iteration state.
  One that is a moving average and also read by the train-mode forward (batch renormalization's)
  needs ``average="momentum"``. A layer called twice in one forward (a shared BatchNorm) updates
  twice a pass: its result weights the two calls' statistics ``m : 1``, as training does.
  ``average="momentum"``: N passes, each moving the running statistics by the layers' momentum,
  as training would: ``m**N`` of the old statistics remain (the families' ``m = 0.9``: 40 batches
  leave 1.5%; ``flax.linen.BatchNorm``'s default ``m = 0.99``: 67%, and 1% takes 459 batches).

  Pure and jittable with ``network`` closed over, e.g.
  ``jax.jit(functools.partial(recalibrate_batch_stats, network))``; the passes run in one
  ``lax.scan``. The statistics keep the nesting (frozen dicts come back as dicts) and dtypes they
  had.

  Raises ``ValueError`` naming the shapes when ``batches`` is not ``[N, B, *input_shape]`` (for a
  plain module: when it has fewer than 3 dimensions or its output is not ``[B, ...]``), and when
  ``variables`` has no ``batch_stats`` (a network without batch normalization has nothing to
  recalibrate); ``TypeError`` naming the dtype for batches that are not floating point (e.g. uint8
  images not yet normalized), for an ``rng`` that is not a key, and naming the type of a
  ``network`` it cannot run; ``ValueError`` for another ``average``.
  """
  import flax

  batches = jnp.asarray(batches)
  shape = tuple(batches.shape)
  if len(shape) < 3:
    raise ValueError(f"recalibrate_batch_stats: batches have shape {shape}; expected [N, B, *input_shape] (N batches "
                     "of B inputs each)")
  if rng is not None and not (jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key)
                              or (jnp.result_type(rng) == jnp.uint32 and np.ndim(rng) == 1)):
    raise TypeError(f"recalibrate_batch_stats: rng has shape {np.shape(rng)} and dtype {jnp.result_type(rng)}; "
                    "expected a key (jax.random.key or jax.random.PRNGKey)")
  network = _as_network(network, shape[2:])
  if hasattr(network, "check_variables"):  # an NNX module's: its own layout, named paths
    network.check_variables(variables)
  want = tuple(network.input_shape)
  if len(shape) != len(want) + 2 or shape[2:] != want or not shape[0] or not shape[1]:
    raise ValueError(f"recalibrate_batch_stats: batches have shape {shape}; expected [N, B, *input_shape] = "
                     f"[N, B, {', '.join(map(str, want))}] with N, B > 0 for {getattr(network, 'label', network)}")
  if not jnp.issubdtype(batches.dtype, jnp.floating):
    raise TypeError(f"recalibrate_batch_stats: batches are {batches.dtype}; expected floating-point network "
                    "inputs, preprocessed as in training (images scaled and normalized)")
  if not variables.get("batch_stats"):
    raise ValueError(f"recalibrate_batch_stats: variables have no 'batch_stats' (collections: {sorted(variables)}); "
                     "a network without batch normalization has no running statistics to recalibrate")
  if average not in ("exact", "momentum"):
    raise ValueError(f"recalibrate_batch_stats: average={average!r}; expected 'exact' or 'momentum'")
  old = flax.core.unfreeze(variables["batch_stats"])
  keys = None if rng is None else jax.random.split(rng, shape[0])

  def step(stats, x, key):  # one train-mode pass: the running statistics after it
    logits, new = network.apply({**variables, "batch_stats": stats}, x, train=True, masks=masks,
                                block_gates=block_gates, rng=key, axis_name=axis_name)
    first = (jax.tree.leaves(logits) or [None])[0]  # outputs may be a tuple or dict of arrays
    if np.shape(first)[:1] != shape[1:2]:
      raise ValueError(f"recalibrate_batch_stats: {getattr(network, 'label', network)} maps a batch of shape "
                       f"{shape[1:]} to an output of shape {np.shape(first)}, not [{shape[1]}, ...]; batches must "
                       "be [N, B, *input_shape]")
    return jax.tree.map(lambda a, b: a.astype(b.dtype), new, stats)

  if average == "momentum":
    stats, _ = jax.lax.scan(lambda st, xk: (step(st, *xk), None), old, (batches, keys))
    return {**variables, "batch_stats": stats}
  # exact, on the statistics as one float32 vector. Statistics a pass from the old ones leaves as they
  # are (a frozen BatchNorm's, which the train-mode forward reads) are held at their values in every
  # pass. An update new = m * start + (1 - m) * batch moves by m * D from start = 0 to start = D, and
  # as much again to 2 D; D, a power of two 2**21 to 2**22 times above the statistic, gives m to
  # float32's precision however large the statistics are. Equal steps (to float32's rounding) with
  # 0 <= m < 1 make a moving average, and so do steps equal to within 4e-6 D with 0.001 <= m < 1 (a
  # statistic the forward reads, put at 0, D and 2 D, changes the batch statistics after it). The
  # statistics that are not moving averages (such a read one: a spectral norm's power-iteration
  # vector) keep their values and are held at them in the N passes, where the moving averages start
  # from 0: the batch statistics are those of the forward the network computes.
  flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), old))

  def flat_step(v, x, key):
    return ravel_pytree(step(unravel(v), x, key))[0]

  key0 = None if keys is None else keys[0]
  at_old = flat_step(flat, batches[0], key0)
  held = at_old == flat
  top = jax.lax.bitcast_convert_type(jnp.maximum(jnp.maximum(jnp.abs(at_old), jnp.abs(flat)), 1.0), jnp.int32)
  big = 2.0 ** 22 * jax.lax.bitcast_convert_type(top & 0x7F800000, jnp.float32)  # its power of two, times 2**22
  s0, s1, s2 = jax.vmap(lambda c: flat_step(jnp.where(held, flat, c * big), batches[0], key0))(jnp.arange(3.0))
  m = (s1 - s0) / big
  dev = jnp.abs((s2 - s1) - (s1 - s0))
  steps = (((dev <= 2.0 ** -20 * (jnp.abs(s0) + jnp.abs(s1) + jnp.abs(s2))) & (m >= 0.0))
           | ((dev <= 4e-6 * big) & (m >= 1e-3)))
  ema = ~held & steps & (1.0 - m > 1e-6) & jnp.isfinite(s0) & jnp.isfinite(s1) & jnp.isfinite(s2)
  start = jnp.where(ema, 0.0, flat)
  total, _ = jax.lax.scan(lambda t, xk: (t + flat_step(start, *xk), None), jnp.zeros_like(flat), (batches, keys))
  ema = ema & jnp.isfinite(total)
  new = unravel(total / (shape[0] * jnp.where(ema, 1.0 - m, 1.0)))
  return {**variables, "batch_stats": jax.tree.map(lambda e, n, o: jnp.where(e > 0, n.astype(o.dtype), o),
                                                   unravel(ema.astype(jnp.float32)), new, old)}


def _as_network(network, input_shape):
  """A ``PrunableNetwork`` for ``network`` (which may be a plain Flax module)."""
  import flax.linen as nn
  from flax import nnx

  from bpcp_jax.families.provider import FamilyNetwork
  from bpcp_jax.families.resnet import ResNet
  from bpcp_jax.pruning.network import PrunableNetwork
  from bpcp_jax.tracer.provider import FlaxNetwork

  if isinstance(network, PrunableNetwork):
    return network
  if isinstance(network, ResNet):
    return FamilyNetwork.of(network, image_size=input_shape[0] if input_shape else 32)
  if isinstance(network, nn.Module):
    return FlaxNetwork(network, input_shape, label=type(network).__name__)
  from bpcp_jax.tracer.nnx import NnxTrainPass

  if isinstance(network, NnxTrainPass):
    return network
  if isinstance(network, nnx.Module):
    return NnxTrainPass.of(network, input_shape)
  raise TypeError(f"recalibrate_batch_stats: network is a {type(network).__name__}; expected a PrunableNetwork "
                  "(bp.FamilyNetwork, bp.FlaxNetwork), a flax.linen module or a flax.nnx module")
