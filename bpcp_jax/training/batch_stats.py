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


def recalibrate_batch_stats(network, variables: Mapping, batches, *, masks: Optional[Mapping] = None,
                            block_gates: Optional[Mapping] = None, rng: Optional[jax.Array] = None,
                            axis_name: Optional[str] = None, average: str = "exact") -> dict:
  """``variables`` with ``batch_stats`` re-estimated on ``batches``; the parameters are untouched.

  ``network``: a ``PrunableNetwork``, a family ``ResNet`` (e.g. ``bp.materialize``'s) or any
  ``flax.linen`` module whose ``__call__`` takes ``train`` or ``deterministic`` (a module has no
  declared input shape: its inputs are taken to be ``batches.shape[2:]``). ``batches``: one
  floating-point array ``[N, B, *network.input_shape]``, network inputs preprocessed as in training
  (augmented training images are best: the statistics are then those the weights were trained
  with). ``masks`` / ``block_gates``: the structure to recalibrate for, as ``network.apply`` takes
  them (e.g. gates of 0 for the removed blocks). ``rng``: a key, split per batch, for networks with
  dropout. ``axis_name``: under ``pmap``/``shard_map``, the mapped axis the batch statistics are
  averaged over (as in ``network.apply``), so every device ends with the same statistics.

  ``average="exact"`` (the default): the new statistics are the equal-weight mean of the N
  batches' statistics, the old ones forgotten (as PyTorch's ``torch.optim.swa_utils.update_bn``,
  which sets ``momentum=None``), whatever the layers' momentum. It assumes what flax's
  ``BatchNorm`` and the families' layers do: each running statistic is an exponential moving
  average ``new = m * old + (1 - m) * batch``; ``m`` is read off per element from two extra passes
  (N + 2 in all). A statistic that is not such an average with ``0.001 <= m < 1`` (one a pass
  leaves unchanged, a spectral norm's power-iteration state, which depends on the weights only)
  keeps its value.
  ``average="momentum"``: N passes, each moving the running statistics by the layers' momentum,
  as training would: ``m**N`` of the old statistics remain (the families' ``m = 0.9``: 40 batches
  leave 1.5%; ``flax.linen.BatchNorm``'s default ``m = 0.99``: 67%, and 1% takes 459 batches).

  Pure and jittable with ``network`` closed over, e.g.
  ``jax.jit(functools.partial(recalibrate_batch_stats, network))``; the passes run in one
  ``lax.scan``. The statistics keep the nesting (frozen dicts come back as dicts) and dtypes they
  had.

  Raises ``ValueError`` naming the shapes when ``batches`` is not ``[N, B, *input_shape]`` (for a
  plain module: when its output is not ``[B, ...]``), and when ``variables`` has no
  ``batch_stats`` (a network without batch normalization has nothing to recalibrate);
  ``TypeError`` naming the dtype for batches that are not floating point (e.g. uint8 images not
  yet normalized) and naming the type of a ``network`` it cannot run (e.g. an ``nnx.Module``);
  ``ValueError`` for another ``average``.
  """
  import flax

  batches = jnp.asarray(batches)
  shape = tuple(batches.shape)
  network = _as_network(network, shape[2:])
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
    if np.shape(logits)[:1] != shape[1:2]:
      raise ValueError(f"recalibrate_batch_stats: {getattr(network, 'label', network)} maps a batch of shape "
                       f"{shape[1:]} to an output of shape {np.shape(logits)}, not [{shape[1]}, ...]; batches must "
                       "be [N, B, *input_shape]")
    return jax.tree.map(lambda a, b: a.astype(b.dtype), new, stats)

  if average == "momentum":
    stats, _ = jax.lax.scan(lambda st, xk: (step(st, *xk), None), old, (batches, keys))
    return {**variables, "batch_stats": stats}
  # exact: an update new = m * old + (1 - m) * batch gives (1 - m) * batch from old = 0, and m * D more
  # from old = D (a power of two far above any statistic: m exact to float32's precision); the batch
  # statistics are then averaged with equal weights. A third pass, from 2 D, tells the statistics
  # that are such an average from those that are not (a spectral norm's power-iteration vector,
  # which depends on the weights only): those keep their values.
  f32 = jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), old)
  big = 2.0 ** 20
  key0 = None if keys is None else keys[0]
  first, at_d, at_2d = (step(jax.tree.map(lambda z, c=c: z + c, f32), batches[0], key0) for c in (0.0, big, 2 * big))
  rest = (batches[1:], None if keys is None else keys[1:])
  total, _ = jax.lax.scan(lambda t, xk: (jax.tree.map(jnp.add, t, step(f32, *xk)), None), first, rest)

  def mean(t, s0, s1, s2, o):
    m = (s1 - s0) / big
    ema = ((jnp.abs((s2 - s0) - 2 * (s1 - s0)) <= 4e-6 * big) & (m >= 1e-3) & (1.0 - m > 1e-6)
           & jnp.isfinite(s0) & jnp.isfinite(t))
    return jnp.where(ema, t / (shape[0] * jnp.where(ema, 1.0 - m, 1.0)), o).astype(o.dtype)

  return {**variables, "batch_stats": jax.tree.map(mean, total, first, at_d, at_2d, old)}


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
  hint = ("; an NNX module updates its statistics in place when called after model.train()"
          if isinstance(network, nnx.Module) else "")
  raise TypeError(f"recalibrate_batch_stats: network is a {type(network).__name__}; expected a PrunableNetwork "
                  f"(bp.FamilyNetwork, bp.FlaxNetwork) or a flax.linen module{hint}")
