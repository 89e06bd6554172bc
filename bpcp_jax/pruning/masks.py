"""The mask pytree: one gate logit per residual block and one 0/1 vector per channel group.

``{"blocks": {"stage0_block0": logit, ...}, "channels": {"stem": [1., 0., ...], ...}}``

Block logits are trainable (the block search moves them; keep a block iff its logit >= 0);
channel vectors are 0/1 decisions made by channel pruning. Both are plain dicts of arrays, so
the whole pytree goes through ``jax.jit``, ``jax.pmap``, optax and orbax unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.families.resnet import ResNet
from bpcp_jax.families.structure import group_widths, stream_group
from bpcp_jax.families.spec import ArchSpec, BlockSpec, block_name

Masks = dict[str, dict[str, Any]]


def _spec_of(model_or_spec: Union[ResNet, ArchSpec]) -> ArchSpec:
  return model_or_spec.spec if isinstance(model_or_spec, ResNet) else model_or_spec


def init_masks(model_or_spec: Union[ResNet, ArchSpec]) -> Masks:
  """All blocks undecided (logit 0, kept) and every channel kept."""
  spec = _spec_of(model_or_spec)
  return full_masks(spec.block_names(), group_widths(spec))


def full_masks(block_names, widths: Mapping[str, int]) -> Masks:
  """Every named block kept (logit 0) and every channel of every group kept."""
  return {
      "blocks": {name: jnp.zeros((), jnp.float32) for name in block_names},
      "channels": {g: jnp.ones((w,), jnp.float32) for g, w in widths.items()},
  }


def check_masks(model_or_spec: Union[ResNet, ArchSpec], masks: Mapping[str, Any]) -> None:
  """Raise ``ValueError`` naming the first key or shape that does not fit the network."""
  spec = _spec_of(model_or_spec)
  check_mask_tree(masks, spec.block_names(), group_widths(spec))


def check_mask_tree(masks: Mapping[str, Any], block_names, widths: Mapping[str, int]) -> None:
  """Raise ``ValueError`` naming the first key or shape of ``masks`` that differs from the
  network's blocks and group widths."""
  if set(masks) != {"blocks", "channels"}:
    raise ValueError(f"masks must have exactly the keys 'blocks' and 'channels', got {sorted(masks)}")
  want_blocks, got_blocks = set(block_names), set(masks["blocks"])
  if want_blocks != got_blocks:
    raise ValueError(f"mask block keys do not match the network: missing {sorted(want_blocks - got_blocks)}, "
                     f"unexpected {sorted(got_blocks - want_blocks)}")
  if set(widths) != set(masks["channels"]):
    raise ValueError(f"mask channel groups do not match the network: missing "
                     f"{sorted(set(widths) - set(masks['channels']))}, unexpected "
                     f"{sorted(set(masks['channels']) - set(widths))}")
  for g, w in widths.items():
    shape = np.shape(masks["channels"][g])
    if shape != (w,):
      raise ValueError(f"channel mask {g!r} has shape {shape}, the network's group has {w} channels")


def kept_blocks(masks: Mapping[str, Any]) -> dict[str, bool]:
  """Block decisions: keep iff logit >= 0 (p >= 0.5)."""
  return {name: bool(np.asarray(logit) >= 0) for name, logit in masks["blocks"].items()}


def kept_indices(mask) -> np.ndarray:
  """Indices of the channels a 0/1 vector keeps."""
  return np.flatnonzero(np.asarray(mask) > 0.5)


def take_kept(x, indices: Sequence[Optional[np.ndarray]]):
  """``x`` with only ``indices[k]`` kept along axis ``k`` (``None``: the whole axis), in one gather.

  Concrete values (NumPy arrays, JAX arrays on one device or replicated) are sliced on the host
  and a JAX array goes back to its devices: slicing them with JAX op by op would compile one gather
  per array shape (about 30 ms each on a 2-core CPU: seconds for a ResNet). Traced values, typed
  PRNG keys and arrays sharded across devices take one ``jnp.take`` per sliced axis."""
  if all(i is None or len(i) == n for i, n in zip(indices, np.shape(x))):
    return x
  grid = np.ix_(*[np.arange(n) if i is None else np.asarray(i) for i, n in zip(indices, np.shape(x))])
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np.asarray(x)[grid]
  if (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_fully_replicated
      and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)):
    return jax.device_put(np.asarray(x)[grid], x.sharding)
  for k, i in enumerate(indices):
    if i is not None and len(i) != x.shape[k]:
      x = jnp.take(x, i, axis=k)
  return x


def live_groups(spec: ArchSpec, masks: Mapping[str, Any]) -> list[str]:
  """Channel groups that still exist once the removed blocks are gone."""
  keep = kept_blocks(masks)
  groups = ["stem"]
  for si, stage in enumerate(spec.stages):
    g = stream_group(spec, si)
    if g not in groups:
      groups.append(g)
    for b in stage.blocks:
      name = block_name(si, b.index)
      if keep[name]:
        groups += [f"{name}_mid{k + 1}" for k in range(len(b.widths))]
  return groups


def pruned_spec(spec: ArchSpec, masks: Mapping[str, Any]) -> ArchSpec:
  """The smaller spec the masks describe: removed blocks dropped, every group at its kept width."""
  check_masks(spec, masks)
  keep = kept_blocks(masks)
  width = {g: int(len(kept_indices(masks["channels"][g]))) for g in live_groups(spec, masks)}
  for g, w in width.items():
    if w == 0:
      raise ValueError(f"channel mask {g!r} keeps no channel; every group must keep at least one")
  stages = []
  for si, stage in enumerate(spec.stages):
    blocks = []
    for b in stage.blocks:
      name = block_name(si, b.index)
      if keep[name]:
        blocks.append(BlockSpec(b.index, tuple(width[f"{name}_mid{k + 1}"] for k in range(len(b.widths)))))
    stages.append(dataclasses.replace(stage, width=width[stream_group(spec, si)], blocks=tuple(blocks)))
  return dataclasses.replace(spec, stem_width=width["stem"], stages=tuple(stages))
