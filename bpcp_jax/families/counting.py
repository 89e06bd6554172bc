"""Parameter and MAC counts for any spec or network, with a per-layer table.

What is counted: parameters are conv kernels, BN scale and bias (not the running statistics)
and the FC weight and bias. MACs are the multiply-accumulates of convolutions and the FC
layer at the given input size; BN, ReLU, additions and pooling are not counted (thop, which the
original code used, also counts BN and pooling, which is why it reports 91.56M for
ResNet-v2-56 where this counter gives 87,214,592).
"""

from __future__ import annotations

from typing import Any, Union

import jax
import numpy as np

from bpcp_jax.families.resnet import ResNet
from bpcp_jax.families.structure import layer_table
from bpcp_jax.families.spec import ArchSpec


def layer_counts(layer) -> tuple[int, int]:
  """(params, MACs) of one layer-table row."""
  if layer.kind == "conv":
    params = layer.kernel * layer.kernel * layer.in_channels * layer.out_channels
    return params, params * layer.out_size * layer.out_size
  if layer.kind == "bn":
    return 2 * layer.out_channels, 0
  return layer.in_channels * layer.out_channels + layer.out_channels, layer.in_channels * layer.out_channels


def count_params_macs(model_or_spec: Union[ResNet, ArchSpec], image_size: int = 32) -> dict[str, Any]:
  """Counts for a network: ``params``, ``macs``, per-kind parameter totals and ``layers`` rows."""
  spec = model_or_spec.spec if isinstance(model_or_spec, ResNet) else model_or_spec
  rows, totals = [], {"conv": 0, "bn": 0, "dense": 0}
  macs = 0
  for layer in layer_table(spec, image_size):
    p, m = layer_counts(layer)
    totals[layer.kind] += p
    macs += m
    rows.append({"layer": layer.name, "kind": layer.kind, "in": layer.in_channels, "out": layer.out_channels,
                 "kernel": layer.kernel, "stride": layer.stride, "out_size": layer.out_size, "params": p, "macs": m})
  return {
      "params": sum(totals.values()),
      "macs": macs,
      "conv_params": totals["conv"],
      "bn_params": totals["bn"],
      "fc_params": totals["dense"],
      "blocks": spec.num_blocks,
      "layers": rows,
  }


def count_leaves(params) -> int:
  """Number of scalars in a parameter pytree (to check a count against the real arrays)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def layer_report(model_or_spec, image_size: int = 32) -> str:
  """A markdown table of the per-layer counts."""
  c = count_params_macs(model_or_spec, image_size)
  lines = ["| layer | kind | in | out | k | s | params | MACs |", "|---|---|---|---|---|---|---|---|"]
  for r in c["layers"]:
    lines.append(f"| {r['layer']} | {r['kind']} | {r['in']} | {r['out']} | {r['kernel']} | {r['stride']} "
                 f"| {r['params']:,} | {r['macs']:,} |")
  lines.append(f"| **total** | | | | | | **{c['params']:,}** | **{c['macs']:,}** |")
  return "\n".join(lines)
