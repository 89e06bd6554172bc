"""The Flax module for the three CIFAR ResNet families, built from an ``ArchSpec``.

One module, ``ResNet``, runs any spec of any family. Called with ``masks`` it computes exactly
what the materialized (smaller) network will compute: every conv and dense layer reads its
input through the channel mask of the group it reads, so a removed channel is gone for every
consumer, even where BN and ReLU turned its zeros into a constant. Each residual block computes
``x + g * F(x)`` where ``g`` is the block's gate: a sampled straight-through gate during the
block search (``block_gates``), the decision ``logit >= 0`` under ``masks``, else 1.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from bpcp_jax.families import layers as L
from bpcp_jax.families.structure import layer_dict
from bpcp_jax.families.spec import ArchSpec, block_name

CONV1X1_IMPLS = ("einsum", "conv")


class ResNet(nn.Module):
  """A CIFAR ResNet of family ``spec.family`` (NHWC input, logits out, float32 logits).

  Attributes:
    spec: the architecture (blocks present and every group's width).
    dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); parameters stay float32.
    init_style: ``"flax"`` (Flax defaults) or ``"original"`` (the original code's init).
    bn_axis_name: when set, train-mode BN averages its batch statistics over this mapped axis
      (``jax.pmap(..., axis_name=...)``), so many devices compute what one device would.
    conv1x1: ``"einsum"`` (``layers.Conv1x1``: a matmul over the pixels, fast on CPU) or ``"conv"``
      (``nn.Conv``); same parameters.
  """

  spec: ArchSpec
  dtype: Any = jnp.float32
  init_style: str = "flax"
  bn_axis_name: Optional[str] = None
  conv1x1: str = "einsum"

  @nn.compact
  def __call__(
      self,
      x,
      train: bool = False,
      masks: Optional[Mapping[str, Any]] = None,
      block_gates: Optional[Mapping[str, Any]] = None,
  ):
    if self.init_style not in L.INIT_STYLES:
      raise ValueError(f"init_style {self.init_style!r} unknown; choose from {L.INIT_STYLES}")
    if self.conv1x1 not in CONV1X1_IMPLS:
      raise ValueError(f"conv1x1 {self.conv1x1!r} unknown; choose from {CONV1X1_IMPLS}")
    spec, table = self.spec, layer_dict(self.spec, image_size=x.shape[1])
    channel_masks = None if masks is None else masks["channels"]
    kinit = L.conv_kernel_init(self.init_style)

    def read(name, h):
      group = table[name].in_group
      if channel_masks is None or group is None:
        return h
      mask = jnp.asarray(channel_masks[group], h.dtype)  # an array, list or NumPy mask alike
      return h * mask.reshape((1,) * (h.ndim - 1) + mask.shape)

    def conv(name, h):
      layer = table[name]
      h = read(name, h)
      if layer.kernel == 1 and self.conv1x1 == "einsum":
        return L.Conv1x1(layer.out_channels, layer.stride, kinit, self.dtype, name=name)(h)
      pad = layer.kernel // 2
      return nn.Conv(
          layer.out_channels,
          (layer.kernel, layer.kernel),
          strides=(layer.stride, layer.stride),
          padding=((pad, pad), (pad, pad)),
          use_bias=False,
          kernel_init=kinit,
          dtype=self.dtype,
          name=name,
      )(h)

    def bn(name, h, relu=False):
      return L.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          epsilon=1e-5,
          relu=relu,
          dtype=self.dtype,
          scale_init=L.bn_scale_init(self.init_style),
          axis_name=self.bn_axis_name if train else None,
          name=name,
      )(h)

    def gate(name):
      if block_gates is not None:
        return block_gates[name]
      if masks is not None and name in masks["blocks"]:
        return (jnp.asarray(masks["blocks"][name]) >= 0).astype(self.dtype)  # a Python float logit too
      return None

    def gated(name, residual, branch):
      # a block's two summands, kept only when "intermediates" is mutable (pruning/block_controls.py)
      self.sow("intermediates", name, (residual, branch))
      g = gate(name)
      if g is not None:
        branch = branch * jnp.asarray(g, branch.dtype)
      return residual + branch

    relu = nn.relu
    v2 = spec.family == "resnet_v2"
    x = x.astype(self.dtype)
    x = conv("stem_conv", x)
    if not v2:
      x = bn("stem_bn", x, relu=True)

    for si, stage in enumerate(spec.stages):
      shortcut = None
      if stage.shortcut:
        shortcut = conv(f"stage{si}_shortcut", x)
        if spec.family == "resnet_v1":
          shortcut = bn(f"stage{si}_shortcut_bn", shortcut)
        if not stage.has_entry_block:
          # the entry block was removed: the stage still changes width and stride
          x = shortcut if v2 else relu(shortcut)
      for b in stage.blocks:
        name = block_name(si, b.index)
        residual = shortcut if (b.index == 0 and shortcut is not None) else x
        if v2:
          h = conv(f"{name}_conv1", bn(f"{name}_bn1", x, relu=True))
          h = conv(f"{name}_conv2", bn(f"{name}_bn2", h, relu=True))
          h = bn(f"{name}_bn3", h, relu=True)
          g = gate(name)
          if g is not None:
            # conv3 is linear without bias, so g * conv3(h) == conv3(g * h); gating its input (a
            # quarter of the stream's channels) makes the gate's extra passes 4x cheaper
            h = h * jnp.asarray(g, h.dtype)
          branch = conv(f"{name}_conv3", h)
          self.sow("intermediates", name, (residual, branch))
          x = residual + branch
        elif spec.family == "resnet_v1_bottleneck":
          h = bn(f"{name}_bn1", conv(f"{name}_conv1", x), relu=True)
          h = bn(f"{name}_bn2", conv(f"{name}_conv2", h), relu=True)
          h = bn(f"{name}_bn3", conv(f"{name}_conv3", h))
          x = relu(gated(name, residual, h))
        else:
          h = bn(f"{name}_bn1", conv(f"{name}_conv1", x), relu=True)
          h = bn(f"{name}_bn2", conv(f"{name}_conv2", h))
          x = relu(gated(name, residual, h))

    if v2:
      x = bn("head_bn", x, relu=True)
    x = jnp.mean(x, axis=(1, 2))
    fc = table["head_fc"]
    kernel_init, bias_init = L.dense_inits(self.init_style, fc.in_channels)
    x = nn.Dense(spec.num_classes, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init, name="head_fc")(
        read("head_fc", x)
    )
    return x.astype(jnp.float32)
