"""The architectures people prune, written here in plain ``flax.linen`` at small sizes.

Each follows the structure of its usual Flax / JAX implementation (flax's ImageNet ResNet, the
BiT ResNet-v2 of big_vision, ViT with ``nn.MultiHeadDotProductAttention``, ...), with every width
a constructor argument so the tests run them tiny and the benchmark at their real widths. Every
module takes ``(x, train=False)``; train mode uses batch statistics and draws dropout / drop-path
masks from the ``"dropout"`` rng. ``NETWORKS`` lists them with the small configuration the tests
use and the input shapes.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _bn(train: bool, axis_name: Optional[str] = None, epsilon: float = 1e-5):
  return partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=epsilon, axis_name=axis_name)


def drop_path(x, rate: float, train: bool, module: nn.Module):
  """Stochastic depth: the whole residual branch of an example is dropped with probability ``rate``."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0)


# -- ResNet v1 as in flax's ImageNet example ---------------------------------------------------------------------------

class ResNetBlock(nn.Module):
  filters: int
  conv: Any
  norm: Any
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters, (3, 3))(y))
    if residual.shape != y.shape:
      residual = self.norm(name="norm_proj")(self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual))
    return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
  filters: int
  conv: Any
  norm: Any
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters * 4, (1, 1))(y))
    if residual.shape != y.shape:
      residual = self.norm(name="norm_proj")(self.conv(self.filters * 4, (1, 1), self.strides,
                                                       name="conv_proj")(residual))
    return nn.relu(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block_cls: Any
  num_filters: int = 64
  num_classes: int = 1000
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = partial(nn.Conv, use_bias=False)
    norm = _bn(train, self.axis_name)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2 ** i, conv=conv, norm=norm, strides=strides)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=[3, 4, 6, 3], block_cls=BottleneckResNetBlock)


# -- BiT: ResNet-v2 with GroupNorm and weight-standardized convolutions ----------------------------------------------

class StdConv(nn.Conv):
  """A convolution whose kernel is standardized (zero mean, unit variance over its inputs and window) before use."""

  def param(self, name, *args, **kwargs):
    w = super().param(name, *args, **kwargs)
    if name == "kernel":
      w = (w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)) / jnp.sqrt(jnp.var(w, axis=(0, 1, 2), keepdims=True) + 1e-10)
    return w


class BiTUnit(nn.Module):
  """Pre-activation bottleneck unit: GN-ReLU-conv1x1, GN-ReLU-conv3x3 (stride), GN-ReLU-conv1x1."""

  features: int
  strides: tuple = (1, 1)
  groups: int = 32

  @nn.compact
  def __call__(self, x):
    gn = partial(nn.GroupNorm, num_groups=self.groups)
    out = nn.relu(gn(name="gn1")(x))
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = StdConv(self.features * 4, (1, 1), self.strides, use_bias=False, name="conv_proj")(out)
    out = StdConv(self.features, (1, 1), use_bias=False, name="conv1")(out)
    out = StdConv(self.features, (3, 3), self.strides, use_bias=False, name="conv2")(nn.relu(gn(name="gn2")(out)))
    out = StdConv(self.features * 4, (1, 1), use_bias=False, name="conv3")(nn.relu(gn(name="gn3")(out)))
    return out + residual


class BiTResNet(nn.Module):
  width: int = 64
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  groups: int = 32
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = StdConv(self.width, (7, 7), (2, 2), use_bias=False, name="root_conv")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = BiTUnit(self.width * 2 ** i, strides, self.groups, name=f"block{i + 1}_unit{j + 1}")(x)
    x = nn.relu(nn.GroupNorm(num_groups=self.groups, name="norm_pre_head")(x))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(jnp.mean(x, axis=(1, 2)))


# -- MobileNetV2, MobileNetV3, EfficientNet: inverted residuals, squeeze-excitation ----------------------------------

def _divisible(v: float, divisor: int = 8) -> int:
  return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
  reduced: int
  act: Callable = nn.relu
  gate: Callable = nn.sigmoid

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.act(nn.Conv(self.reduced, (1, 1), name="reduce")(s))
    return x * self.gate(nn.Conv(x.shape[-1], (1, 1), name="expand")(s))


class InvertedResidual(nn.Module):
  """Expand 1x1 (to ``width``; none when ``width`` is the input's) - depthwise kxk (stride) - optional
  squeeze-excitation - project 1x1, with a residual (and drop-path) when the shapes allow."""

  out: int
  width: int
  kernel: int = 3
  strides: int = 1
  act: Callable = nn.relu6
  se_reduced: int = 0
  se_act: Callable = nn.relu
  se_gate: Callable = nn.sigmoid
  drop_rate: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, x):
    norm = _bn(self.train)
    cin = x.shape[-1]
    h = x
    if self.width != cin:
      h = self.act(norm(name="expand_bn")(nn.Conv(self.width, (1, 1), use_bias=False, name="expand_conv")(h)))
    h = nn.Conv(self.width, (self.kernel, self.kernel), self.strides, feature_group_count=self.width, use_bias=False,
                name="dw_conv")(h)
    h = self.act(norm(name="dw_bn")(h))
    if self.se_reduced:
      h = SqueezeExcite(self.se_reduced, act=self.se_act, gate=self.se_gate, name="se")(h)
    h = norm(name="project_bn")(nn.Conv(self.out, (1, 1), use_bias=False, name="project_conv")(h))
    if self.strides == 1 and cin == self.out:
      h = x + drop_path(h, self.drop_rate, self.train, self)
    return h


class MobileNetV2(nn.Module):
  width: float = 1.0
  num_classes: int = 1000
  # (expansion, output channels, repeats, stride)
  config: Sequence = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))
  last: int = 1280

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _bn(train)
    x = nn.Conv(_divisible(32 * self.width), (3, 3), 2, use_bias=False, name="stem_conv")(x)
    x = nn.relu6(norm(name="stem_bn")(x))
    for i, (t, c, n, s) in enumerate(self.config):
      for j in range(n):
        x = InvertedResidual(_divisible(c * self.width), x.shape[-1] * t, strides=s if j == 0 else 1, train=train,
                             name=f"block{i}_{j}")(x)
    x = nn.relu6(norm(name="head_bn")(nn.Conv(self.last, (1, 1), use_bias=False, name="head_conv")(x)))
    x = nn.Dropout(0.2, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(self.num_classes, name="classifier")(x)


class MobileNetV3Small(nn.Module):
  width: float = 1.0
  num_classes: int = 1000
  # (kernel, expanded width, out, squeeze-excitation, hard-swish, stride)
  config: Sequence = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                      (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                      (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                      (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))
  last: int = 1024

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _bn(train)
    x = nn.Conv(_divisible(16 * self.width), (3, 3), 2, use_bias=False, name="stem_conv")(x)
    x = nn.hard_swish(norm(name="stem_bn")(x))
    for i, (k, exp, out, se, hs, s) in enumerate(self.config):
      width = _divisible(exp * self.width)
      x = InvertedResidual(_divisible(out * self.width), width, kernel=k, strides=s,
                           act=nn.hard_swish if hs else nn.relu, se_reduced=_divisible(width / 4) if se else 0,
                           se_gate=nn.hard_sigmoid, train=train, name=f"block{i}")(x)
    x = nn.Conv(_divisible(576 * self.width), (1, 1), use_bias=False, name="head_conv")(x)
    x = jnp.mean(nn.hard_swish(norm(name="head_bn")(x)), axis=(1, 2))
    x = nn.Dropout(0.2, deterministic=not train)(nn.hard_swish(nn.Dense(self.last, name="pre_logits")(x)))
    return nn.Dense(self.num_classes, name="classifier")(x)


class EfficientNet(nn.Module):
  """EfficientNet-B0 (width and depth 1.0): MBConv blocks with squeeze-excitation (a quarter of the block's input),
  swish, drop-path growing with depth."""

  width: float = 1.0
  num_classes: int = 1000
  # (expansion, kernel, stride, output channels, repeats)
  config: Sequence = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                      (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
  last: int = 1280
  drop_path: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _bn(train)
    x = nn.swish(norm(name="stem_bn")(nn.Conv(_divisible(32 * self.width), (3, 3), 2, use_bias=False,
                                              name="stem_conv")(x)))
    total, k = sum(r for *_, r in self.config), 0
    for i, (t, kernel, s, c, n) in enumerate(self.config):
      for j in range(n):
        cin = x.shape[-1]
        x = InvertedResidual(_divisible(c * self.width), cin * t, kernel=kernel, strides=s if j == 0 else 1,
                             act=nn.swish, se_reduced=max(1, cin // 4), se_act=nn.swish,
                             drop_rate=self.drop_path * k / total, train=train, name=f"block{i}_{j}")(x)
        k += 1
    x = nn.swish(norm(name="head_bn")(nn.Conv(_divisible(self.last * self.width), (1, 1), use_bias=False,
                                              name="head_conv")(x)))
    x = nn.Dropout(0.2, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(self.num_classes, name="classifier")(x)


# -- ConvNeXt: depthwise 7x7, LayerNorm over channels, inverted MLP, layer scale, drop-path --------------------------

class ConvNeXtBlock(nn.Module):
  dim: int
  drop_rate: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim, name="dwconv")(x)
    h = nn.Dense(4 * self.dim, name="pwconv1")(nn.LayerNorm(epsilon=1e-6, name="norm")(h))
    h = nn.Dense(self.dim, name="pwconv2")(nn.gelu(h))
    h = h * self.param("gamma", nn.initializers.constant(1e-6), (self.dim,)).reshape(1, 1, 1, self.dim)
    return x + drop_path(h, self.drop_rate, self.train, self)


class ConvNeXt(nn.Module):
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  num_classes: int = 1000
  drop_path: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    total, k = sum(self.depths), 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if i == 0:
        x = nn.LayerNorm(epsilon=1e-6, name="stem_norm")(nn.Conv(dim, (4, 4), 4, name="stem_conv")(x))
      else:
        x = nn.Conv(dim, (2, 2), 2, name=f"down{i}_conv")(nn.LayerNorm(epsilon=1e-6, name=f"down{i}_norm")(x))
      for j in range(depth):
        x = ConvNeXtBlock(dim, self.drop_path * k / total, train, name=f"stage{i}_block{j}")(x)
        k += 1
    x = nn.LayerNorm(epsilon=1e-6, name="head_norm")(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(self.num_classes, name="head")(x)


# -- DenseNet ----------------------------------------------------------------------------------------------------------

class DenseNet(nn.Module):
  """Dense blocks of BN-ReLU-conv1x1 (4k) - BN-ReLU-conv3x3 (k) layers, each concatenated to its input;
  transitions BN-ReLU-conv1x1 (half) - 2x2 average pool."""

  growth: int = 32
  blocks: Sequence[int] = (6, 12, 24, 16)
  stem: int = 64
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _bn(train)
    x = nn.Conv(self.stem, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False, name="conv0")(x)
    x = nn.max_pool(nn.relu(norm(name="norm0")(x)), (3, 3), (2, 2), padding="SAME")
    for i, n in enumerate(self.blocks):
      for j in range(n):
        h = nn.Conv(4 * self.growth, (1, 1), use_bias=False, name=f"block{i}_layer{j}_conv1")(
            nn.relu(norm(name=f"block{i}_layer{j}_norm1")(x)))
        h = nn.Conv(self.growth, (3, 3), use_bias=False, name=f"block{i}_layer{j}_conv2")(
            nn.relu(norm(name=f"block{i}_layer{j}_norm2")(h)))
        x = jnp.concatenate([x, h], axis=-1)
      if i < len(self.blocks) - 1:
        x = nn.Conv(x.shape[-1] // 2, (1, 1), use_bias=False, name=f"transition{i}_conv")(
            nn.relu(norm(name=f"transition{i}_norm")(x)))
        x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(norm(name="norm_final")(x))
    return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


# -- Inception-v3 block set --------------------------------------------------------------------------------------------

class BasicConv(nn.Module):
  features: int
  kernel: tuple
  strides: int = 1
  padding: Any = "SAME"
  train: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding, use_bias=False, name="conv")(x)
    return nn.relu(_bn(self.train, epsilon=1e-3)(name="bn")(x))


class InceptionV3Blocks(nn.Module):
  """The stem, then one block of each kind: A (1x1 / 5x5 / double 3x3 / pool), B (grid reduction), C (factorized 1x7
  and 7x1), D (reduction), E (expanded 1x3 + 3x1 filter banks); average pools exclude padding from their count."""

  width: int = 32  # 32 as in Inception-v3's stem
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.width
    c = partial(BasicConv, train=train)
    pool = partial(nn.avg_pool, window_shape=(3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)
    x = c(w, (3, 3), 2, "VALID", name="stem1")(x)
    x = c(2 * w, (3, 3), name="stem2")(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    # A
    b1 = c(2 * w, (1, 1), name="a_1x1")(x)
    b5 = c(2 * w, (5, 5), name="a_5x5")(c(w + w // 2, (1, 1), name="a_5x5_reduce")(x))
    b3 = c(3 * w, (3, 3), name="a_3x3b")(c(3 * w, (3, 3), name="a_3x3a")(c(2 * w, (1, 1), name="a_3x3_reduce")(x)))
    bp = c(w, (1, 1), name="a_pool")(pool(x))
    x = jnp.concatenate([b1, b5, b3, bp], axis=-1)
    # B: grid reduction
    b3 = c(12 * w, (3, 3), 2, name="b_3x3")(x)
    bd = c(3 * w, (3, 3), 2, name="b_3x3b")(c(3 * w, (3, 3), name="b_3x3a")(c(2 * w, (1, 1), name="b_reduce")(x)))
    x = jnp.concatenate([b3, bd, nn.max_pool(x, (3, 3), (2, 2), padding="SAME")], axis=-1)
    # C: factorized 7x7
    b1 = c(6 * w, (1, 1), name="c_1x1")(x)
    b7 = c(6 * w, (7, 1), name="c_7x1")(c(4 * w, (1, 7), name="c_1x7")(c(4 * w, (1, 1), name="c_7_reduce")(x)))
    bp = c(6 * w, (1, 1), name="c_pool")(pool(x))
    x = jnp.concatenate([b1, b7, bp], axis=-1)
    # D: reduction
    b3 = c(10 * w, (3, 3), 2, name="d_3x3")(c(6 * w, (1, 1), name="d_3x3_reduce")(x))
    x = jnp.concatenate([b3, nn.max_pool(x, (3, 3), (2, 2), padding="SAME")], axis=-1)
    # E: expanded filter banks
    b1 = c(10 * w, (1, 1), name="e_1x1")(x)
    r = c(12 * w, (1, 1), name="e_3x3_reduce")(x)
    b3 = jnp.concatenate([c(12 * w, (1, 3), name="e_1x3")(r), c(12 * w, (3, 1), name="e_3x1")(r)], axis=-1)
    bp = c(6 * w, (1, 1), name="e_pool")(pool(x))
    x = jnp.concatenate([b1, b3, bp], axis=-1)
    x = nn.Dropout(0.5, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(self.num_classes, name="fc")(x)


# -- RegNetY: grouped convolutions, squeeze-excitation -----------------------------------------------------------------

class RegNetBlock(nn.Module):
  width: int
  group_width: int
  strides: int = 1
  se: bool = True
  train: bool = False

  @nn.compact
  def __call__(self, x):
    norm = _bn(self.train)
    h = nn.relu(norm(name="bn1")(nn.Conv(self.width, (1, 1), use_bias=False, name="conv1")(x)))
    h = nn.Conv(self.width, (3, 3), self.strides, feature_group_count=self.width // self.group_width, use_bias=False,
                name="conv2")(h)
    h = nn.relu(norm(name="bn2")(h))
    if self.se:
      h = SqueezeExcite(max(1, x.shape[-1] // 4), name="se")(h)
    h = norm(name="bn3", scale_init=nn.initializers.zeros)(nn.Conv(self.width, (1, 1), use_bias=False,
                                                                    name="conv3")(h))
    if x.shape != h.shape:
      x = norm(name="bn_proj")(nn.Conv(self.width, (1, 1), self.strides, use_bias=False, name="conv_proj")(x))
    return nn.relu(x + h)


class RegNetY(nn.Module):
  """RegNetY-400MF widths and depths by default (group width 8)."""

  widths: Sequence[int] = (48, 104, 208, 440)
  depths: Sequence[int] = (1, 3, 6, 6)
  group_width: int = 8
  stem: int = 32
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(_bn(train)(name="stem_bn")(nn.Conv(self.stem, (3, 3), 2, use_bias=False, name="stem_conv")(x)))
    for i, (w, d) in enumerate(zip(self.widths, self.depths)):
      for j in range(d):
        x = RegNetBlock(w, self.group_width, 2 if j == 0 else 1, train=train, name=f"stage{i}_block{j}")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


# -- VGG with dropout ----------------------------------------------------------------------------------------------

class VGG(nn.Module):
  """Stacks of 3x3 convolutions and max pools, flattened into two dropout-regularised dense layers."""

  config: Sequence = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # VGG-11
  hidden: int = 4096
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, v in enumerate(self.config):
      x = nn.max_pool(x, (2, 2), (2, 2)) if v == "M" else nn.relu(nn.Conv(v, (3, 3), name=f"conv{i}")(x))
    x = x.reshape(x.shape[0], -1)
    for i in range(2):
      x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(self.hidden, name=f"fc{i}")(x)))
    return nn.Dense(self.num_classes, name="classifier")(x)


# -- ViT -------------------------------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, x):
    drop = partial(nn.Dropout, self.dropout, deterministic=not self.train)
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
    x = x + drop()(y)
    y = nn.Dense(self.mlp_dim, name="mlp_in")(nn.LayerNorm(name="ln2")(x))
    y = nn.Dense(x.shape[-1], name="mlp_out")(drop()(nn.gelu(y)))
    return x + drop()(y)


class ViT(nn.Module):
  """Patch embedding, a class token and learned position embeddings, pre-LayerNorm encoder blocks (ViT-B/16 by
  default), a head on the class token."""

  patch: int = 16
  hidden: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.1
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.hidden, (self.patch, self.patch), self.patch, padding="VALID", name="embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_dim, self.dropout, train, name=f"encoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


def random_variables(model, *inputs, seed=0):
  """Variables of ``model``'s shapes drawn in NumPy (``model.init`` compiles its random ops for seconds): kernels
  normal with variance 1/fan-in, normalisation scales small (as a zero-initialised residual branch is early in
  training), variances near 1, biases and means near 0: none of them trivial, so a wrongly sliced leaf shows in
  the outputs."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if len(s.shape) >= 2:
      value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name == "var":
      value = 1.0 + 0.2 * np.abs(rng.normal(size=s.shape))
    elif name in ("scale", "gamma"):
      value = 0.1 + 0.05 * np.abs(rng.normal(size=s.shape))
    else:
      value = 0.2 * rng.normal(size=s.shape)
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


# name -> (small module for the tests, real-size module for the benchmark, the tests' input shape (a batch), the real
# input shape of one example). The tests' batch and image size are those at which the small network's own jitted and
# eager train-mode outputs agree to 1e-6 (deep networks in train mode need enough values per BatchNorm channel).
NETWORKS = {
    "resnet18": (ResNet18(num_filters=4, num_classes=5), ResNet18(), (4, 64, 64, 3), (224, 224, 3)),
    "resnet50": (ResNet50(num_filters=2, num_classes=5), ResNet50(), (8, 128, 128, 3), (224, 224, 3)),
    "bit_resnet": (BiTResNet(width=4, stage_sizes=(1, 1, 1, 1), groups=2, num_classes=5), BiTResNet(),
                   (4, 64, 64, 3), (224, 224, 3)),
    "mobilenet_v2": (MobileNetV2(width=0.25, config=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)), last=32,
                                 num_classes=5), MobileNetV2(), (4, 64, 64, 3), (224, 224, 3)),
    "mobilenet_v3": (MobileNetV3Small(width=0.25, config=MobileNetV3Small.config[:5], last=32, num_classes=5),
                     MobileNetV3Small(), (4, 64, 64, 3), (224, 224, 3)),
    "efficientnet_b0": (EfficientNet(width=0.25, config=((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 1)),
                                     last=32, num_classes=5), EfficientNet(), (4, 64, 64, 3), (224, 224, 3)),
    "convnext": (ConvNeXt(depths=(1, 2), dims=(8, 16), num_classes=5), ConvNeXt(), (4, 64, 64, 3), (224, 224, 3)),
    "densenet": (DenseNet(growth=4, blocks=(2, 2), stem=8, num_classes=5), DenseNet(), (4, 64, 64, 3), (224, 224, 3)),
    "inception_v3": (InceptionV3Blocks(width=2, num_classes=5), InceptionV3Blocks(), (4, 96, 96, 3), (299, 299, 3)),
    "regnet": (RegNetY(widths=(8, 16), depths=(1, 2), group_width=4, stem=8, num_classes=5), RegNetY(),
               (4, 64, 64, 3), (224, 224, 3)),
    "vgg": (VGG(config=(4, "M", 8, "M", 16, 16, "M"), hidden=16, num_classes=5), VGG(), (4, 64, 64, 3), (224, 224, 3)),
    "vit": (ViT(patch=8, hidden=16, depth=2, heads=2, mlp_dim=32, num_classes=5), ViT(), (4, 64, 64, 3), (224, 224, 3)),
}
