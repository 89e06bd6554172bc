"""Architecture specs: which residual blocks exist and how wide every channel group is.

A spec is a plain, hashable (lists given for its sequences become tuples), JSON-serializable
description of one network of a family.
A pruned network is the same family with a smaller spec, so the spec is all a checkpoint
needs to rebuild the module. Blocks keep the index they had in the dense network, which keeps
parameter names and mask keys stable through pruning (``stage1_block4`` stays ``stage1_block4``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

FAMILIES = ("resnet_v2", "resnet_v1_bottleneck", "resnet_v1")
_BOTTLENECK_FAMILIES = ("resnet_v2", "resnet_v1_bottleneck")
_PLANES = (16, 32, 64)
_EXPANSION = {"resnet_v2": 4, "resnet_v1_bottleneck": 4, "resnet_v1": 1}
_STRIDES = (1, 2, 2)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One residual block: its index in the dense stage and its inner channel widths.

  Bottleneck blocks have two inner widths (after conv1 and after conv2); basic blocks one.
  Block ``index == 0`` is the stage's entry block: it carries the stage stride and runs beside
  the stage's shortcut conv.
  """

  index: int
  widths: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "widths", tuple(self.widths))


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage: residual-stream width, stride, projection shortcut, and its blocks."""

  width: int
  stride: int
  shortcut: bool
  blocks: tuple[BlockSpec, ...]

  def __post_init__(self):
    object.__setattr__(self, "blocks", tuple(self.blocks))

  @property
  def has_entry_block(self) -> bool:
    return bool(self.blocks) and self.blocks[0].index == 0


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """A whole network: family, stem width, stages and number of classes."""

  family: str
  stem_width: int
  stages: tuple[StageSpec, ...]
  num_classes: int
  dense_depth: int  # depth of the dense network this spec descends from (for names only)

  def __post_init__(self):
    # sequences become tuples, so that every spec is hashable (a static argument under jit)
    object.__setattr__(self, "stages", tuple(self.stages))
    if self.family not in FAMILIES:
      raise ValueError(f"unknown family {self.family!r}; known families: {', '.join(FAMILIES)}")

  @property
  def is_bottleneck(self) -> bool:
    return self.family in _BOTTLENECK_FAMILIES

  @property
  def num_blocks(self) -> int:
    return sum(len(s.blocks) for s in self.stages)

  def block_names(self) -> list[str]:
    return [block_name(si, b.index) for si, s in enumerate(self.stages) for b in s.blocks]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
    try:
      stages = tuple(
          StageSpec(
              width=int(s["width"]),
              stride=int(s["stride"]),
              shortcut=bool(s["shortcut"]),
              blocks=tuple(
                  BlockSpec(index=int(b["index"]), widths=tuple(int(w) for w in b["widths"]))
                  for b in s["blocks"]
              ),
          )
          for s in d["stages"]
      )
      return cls(
          family=str(d["family"]),
          stem_width=int(d["stem_width"]),
          stages=stages,
          num_classes=int(d["num_classes"]),
          dense_depth=int(d["dense_depth"]),
      )
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a valid architecture spec (missing or bad field {e})") from e

  @classmethod
  def from_json(cls, text: str) -> ArchSpec:
    return cls.from_dict(json.loads(text))


def block_name(stage: int, index: int) -> str:
  return f"stage{stage}_block{index}"


def depth_rule(family: str) -> tuple[int, int]:
  """(k, c) such that valid depths are k*n + c with n >= 1."""
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
  return (9, 2) if family in _BOTTLENECK_FAMILIES else (6, 2)


def blocks_per_stage(family: str, depth: int) -> int:
  k, c = depth_rule(family)
  if not isinstance(depth, int) or depth < k + c or (depth - c) % k:
    valid = ", ".join(str(k * n + c) for n in range(1, 7))
    raise ValueError(
        f"depth {depth} is not valid for {family}: depth must be {k}n+{c} with n >= 1 "
        f"(e.g. {valid}, ...)"
    )
  return (depth - c) // k


def dense_spec(family: str, depth: int, num_classes: int = 10) -> ArchSpec:
  """The unpruned CIFAR network of a family at a depth."""
  n = blocks_per_stage(family, depth)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  expansion = _EXPANSION[family]
  inner = 2 if family in _BOTTLENECK_FAMILIES else 1
  stages = []
  in_width = 16
  for planes, stride in zip(_PLANES, _STRIDES):
    width = planes * expansion
    stages.append(
        StageSpec(
            width=width,
            stride=stride,
            shortcut=stride != 1 or in_width != width,
            blocks=tuple(BlockSpec(index=i, widths=(planes,) * inner) for i in range(n)),
        )
    )
    in_width = width
  return ArchSpec(
      family=family, stem_width=16, stages=tuple(stages), num_classes=num_classes, dense_depth=depth
  )


_NAME_RE = re.compile(r"^(?P<family>[a-z0-9_]+?)_(?P<depth>\d+)$")


def parse_model_name(name: str) -> tuple[str, int]:
  """'resnet_v2_56' -> ('resnet_v2', 56), with errors naming what is wrong."""
  m = _NAME_RE.match(name.strip().lower())
  if not m:
    raise ValueError(
        f"model name {name!r} is not '<family>_<depth>'; known families: {', '.join(FAMILIES)} "
        "(e.g. 'resnet_v2_56')"
    )
  family, depth = m.group("family"), int(m.group("depth"))
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r} in {name!r}; known families: {', '.join(FAMILIES)}")
  blocks_per_stage(family, depth)
  return family, depth
