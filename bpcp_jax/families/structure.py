"""The layer table and channel groups of every family, derived from a spec in one place.

``layer_table(spec)`` lists every parameterised layer of a network in forward order with the
channel group it reads (``in_group``) and the group it writes (``out_group``). The Flax module,
the mask pytree, channel importance, materialization and MACs counting all read this table,
so a coupling rule lives here and nowhere else.

Channel groups:
- ``stem``: the stem conv's output.
- ``stage{s}``: the residual stream of stage ``s`` (every block's last conv output, the stage's
  shortcut conv output, and the input of every consumer: the next blocks, the next stage's
  entry block and shortcut, the head). A stage without a shortcut conv shares the stream of
  the stage before it (in ``resnet_v1`` the first stage shares the stem's group).
- ``stage{s}_block{i}_mid1`` / ``_mid2``: the channels inside one block.
The image (3 channels) and the logits belong to no group and are never pruned.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from bpcp_jax.families.spec import ArchSpec, block_name


@dataclasses.dataclass(frozen=True)
class Layer:
  """One parameterised layer. For BN, ``in_group == out_group`` (the channels it normalises)."""

  name: str
  kind: str  # "conv" | "bn" | "dense"
  in_group: Optional[str]
  out_group: Optional[str]
  in_channels: int
  out_channels: int
  kernel: int = 1
  stride: int = 1
  out_size: int = 1  # output height (= width) for a square input; for MACs
  block: Optional[str] = None  # the residual block this layer belongs to, if any


def stream_group(spec: ArchSpec, stage: int) -> str:
  """The group of stage ``stage``'s residual stream; ``stage == -1`` is the stem."""
  while stage >= 0 and not spec.stages[stage].shortcut:
    stage -= 1
  return "stem" if stage < 0 else f"stage{stage}"


def group_widths(spec: ArchSpec) -> dict[str, int]:
  """Width of every channel group, checking that merged groups agree."""
  widths = {"stem": spec.stem_width}
  for si, stage in enumerate(spec.stages):
    g = stream_group(spec, si)
    if g in widths and widths[g] != stage.width:
      raise ValueError(
          f"stage {si} has no shortcut conv, so its width must equal its input's "
          f"({widths[g]}), got {stage.width}"
      )
    widths[g] = stage.width
    for b in stage.blocks:
      for k, w in enumerate(b.widths):
        widths[f"{block_name(si, b.index)}_mid{k + 1}"] = w
  for g, w in widths.items():
    if w < 1:
      raise ValueError(f"channel group {g!r} has width {w}; every group keeps at least one channel")
  return widths


def layer_table(spec: ArchSpec, image_size: int = 32) -> list[Layer]:
  """Every parameterised layer of ``spec`` in forward order."""
  widths = group_widths(spec)
  table: list[Layer] = []
  add = table.append
  v1 = spec.family in ("resnet_v1", "resnet_v1_bottleneck")
  size = image_size

  add(Layer("stem_conv", "conv", None, "stem", 3, spec.stem_width, 3, 1, size))
  if v1:
    add(Layer("stem_bn", "bn", "stem", "stem", spec.stem_width, spec.stem_width, out_size=size))

  for si, stage in enumerate(spec.stages):
    prev, cur = stream_group(spec, si - 1), stream_group(spec, si)
    out_size = -(-size // stage.stride)
    if stage.shortcut:
      add(Layer(f"stage{si}_shortcut", "conv", prev, cur, widths[prev], widths[cur], 1, stage.stride, out_size))
      if spec.family == "resnet_v1":
        add(Layer(f"stage{si}_shortcut_bn", "bn", cur, cur, widths[cur], widths[cur], out_size=out_size))
    for b in stage.blocks:
      name = block_name(si, b.index)
      src = prev if b.index == 0 else cur
      stride = stage.stride if b.index == 0 else 1
      in_size = size if b.index == 0 else out_size
      mids = [f"{name}_mid{k + 1}" for k in range(len(b.widths))]
      L = lambda suffix, *a, **k: add(Layer(f"{name}_{suffix}", *a, block=name, **k))  # noqa: E731
      if spec.family == "resnet_v2":
        m1, m2 = mids
        L("bn1", "bn", src, src, widths[src], widths[src], out_size=in_size)
        L("conv1", "conv", src, m1, widths[src], widths[m1], 1, 1, in_size)
        L("bn2", "bn", m1, m1, widths[m1], widths[m1], out_size=in_size)
        L("conv2", "conv", m1, m2, widths[m1], widths[m2], 3, stride, out_size)
        L("bn3", "bn", m2, m2, widths[m2], widths[m2], out_size=out_size)
        L("conv3", "conv", m2, cur, widths[m2], widths[cur], 1, 1, out_size)
      elif spec.family == "resnet_v1_bottleneck":
        m1, m2 = mids
        L("conv1", "conv", src, m1, widths[src], widths[m1], 1, 1, in_size)
        L("bn1", "bn", m1, m1, widths[m1], widths[m1], out_size=in_size)
        L("conv2", "conv", m1, m2, widths[m1], widths[m2], 3, stride, out_size)
        L("bn2", "bn", m2, m2, widths[m2], widths[m2], out_size=out_size)
        L("conv3", "conv", m2, cur, widths[m2], widths[cur], 1, 1, out_size)
        L("bn3", "bn", cur, cur, widths[cur], widths[cur], out_size=out_size)
      else:  # resnet_v1, basic block
        (m1,) = mids
        L("conv1", "conv", src, m1, widths[src], widths[m1], 3, stride, out_size)
        L("bn1", "bn", m1, m1, widths[m1], widths[m1], out_size=out_size)
        L("conv2", "conv", m1, cur, widths[m1], widths[cur], 3, 1, out_size)
        L("bn2", "bn", cur, cur, widths[cur], widths[cur], out_size=out_size)
    size = out_size

  last = stream_group(spec, len(spec.stages) - 1)
  if spec.family == "resnet_v2":
    add(Layer("head_bn", "bn", last, last, widths[last], widths[last], out_size=size))
  add(Layer("head_fc", "dense", last, None, widths[last], spec.num_classes))
  return table


def layer_dict(spec: ArchSpec, image_size: int = 32) -> dict[str, Layer]:
  return {layer.name: layer for layer in layer_table(spec, image_size)}


def declared_members(spec: ArchSpec) -> dict[str, set]:
  """Every group's members as (variable path, axis) pairs: conv kernels (in axis 2, out axis 3),
  BN scale/bias/mean/var, the classifier's input axis. The form ``coupling.py`` traces."""
  groups: dict[str, set] = {}
  for layer in layer_table(spec):
    if layer.kind == "conv":
      if layer.in_group is not None:
        groups.setdefault(layer.in_group, set()).add((f"params/{layer.name}/kernel", 2))
      groups.setdefault(layer.out_group, set()).add((f"params/{layer.name}/kernel", 3))
    elif layer.kind == "bn":
      for col, leaf in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
        groups.setdefault(layer.out_group, set()).add((f"{col}/{layer.name}/{leaf}", 0))
    else:
      groups.setdefault(layer.in_group, set()).add((f"params/{layer.name}/kernel", 0))
  return groups
