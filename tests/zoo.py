"""Networks written the way public code writes them, each in ``flax.linen`` AND ``flax.nnx``, for the pipeline.

Six architectures after their public definitions, tiny (CIFAR-sized 32x32 inputs, widths 8-32), every one
through ``bpcp-jax pipeline --config.model=tests/zoo.py:<factory>``:

- ``vit``: ViT (Dosovitskiy et al.; big_vision): patch embedding, a class token, learned positions, pre-LN
  encoder layers holding two residual adds each (attention with a fused qkv projection, MLP), dropout.
- ``mixer``: MLP-Mixer (Tolstikhin et al.): token-mixing MLP over the transposed patches, channel MLP, LayerNorm.
- ``convnext``: a ConvNeXt stage (Liu et al.): depthwise 7x7, LayerNorm over channels, inverted MLP, layer scale,
  drop-path.
- ``swin``: Swin-style windowed attention (Liu et al.): window partition by reshape, attention inside windows with
  ``MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention``, a shifted second block (``jnp.roll``), MLP.
- ``he_resnet``: He et al.'s basic block written ``relu(x + f(x))`` with BatchNorm, a projection shortcut at the
  stride-2 block.
- ``bit``: BiT (Kolesnikov et al.): pre-activation units with GroupNorm and weight-standardized convolutions
  written with ``jnp.mean``/``jnp.var``, no BatchNorm.

Linen modules take ``(x, train=False)``; NNX modules are switched by ``.train()``/``.eval()`` and draw dropout from
the ``rngs`` they were built with, as flax's NNX examples and jax-ml/bonsai write them. None has BatchNorm except
``he_resnet``. Layer scales are reshaped to the feature map's rank (``gamma.reshape(1, 1, 1, d)``) only because
the tests run with ``jax_numpy_rank_promotion="raise"``. Factories: ``make_<name>(num_classes=10)`` (linen) and
``make_nnx_<name>(num_classes=10, rngs=...)``.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

DIM = 16


# -- linen ------------------------------------------------------------------------------------------------------------

class LinenAttention(nn.Module):
  """Self-attention with one fused qkv projection, as big_vision and timm write it."""

  heads: int = 2

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads), axis=-1)
    return nn.Dense(d, name="proj")(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d))


class LinenEncoderLayer(nn.Module):
  """Pre-LN transformer layer: two residual adds in one module."""

  mlp_dim: int = 32
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x + nn.Dropout(self.dropout, deterministic=not train)(LinenAttention(name="attn")(nn.LayerNorm(name="ln1")(x)))
    y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(nn.LayerNorm(name="ln2")(x)))
    y = nn.Dense(x.shape[-1], name="fc2")(nn.Dropout(self.dropout, deterministic=not train)(y))
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class LinenViT(nn.Module):
  num_classes: int = 10
  depth: int = 2
  patch: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(DIM, (self.patch, self.patch), self.patch, padding="VALID", name="embedding")(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    for i in range(self.depth):
      x = LinenEncoderLayer(name=f"layer{i}")(x, train)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="norm")(x)[:, 0])


class LinenMixerBlock(nn.Module):
  tokens_mlp: int = 16
  channels_mlp: int = 32

  @nn.compact
  def __call__(self, x):
    y = jnp.swapaxes(nn.LayerNorm(name="ln_token")(x), 1, 2)
    y = nn.Dense(x.shape[1], name="token_fc2")(nn.gelu(nn.Dense(self.tokens_mlp, name="token_fc1")(y)))
    x = x + jnp.swapaxes(y, 1, 2)
    y = nn.Dense(x.shape[-1], name="channel_fc2")(nn.gelu(nn.Dense(self.channels_mlp, name="channel_fc1")(
        nn.LayerNorm(name="ln_channel")(x))))
    return x + y


class LinenMixer(nn.Module):
  num_classes: int = 10
  depth: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(DIM, (8, 8), 8, padding="VALID", name="stem")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for i in range(self.depth):
      x = LinenMixerBlock(name=f"block{i}")(x)
    x = nn.Dropout(0.1, deterministic=not train)(jnp.mean(nn.LayerNorm(name="pre_head_ln")(x), axis=1))
    return nn.Dense(self.num_classes, name="head")(x)


class LinenConvNeXtBlock(nn.Module):
  drop_path: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = x.shape[-1]
    h = nn.Conv(d, (7, 7), feature_group_count=d, name="dwconv")(x)
    h = nn.Dense(4 * d, name="pwconv1")(nn.LayerNorm(epsilon=1e-6, name="norm")(h))
    h = nn.Dense(d, name="pwconv2")(nn.gelu(h))
    h = h * self.param("gamma", nn.initializers.constant(0.5), (d,)).reshape(1, 1, 1, d)  # layer scale
    if train and self.drop_path > 0:  # stochastic depth, one draw per example
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.drop_path, (x.shape[0], 1, 1, 1))
      h = jnp.where(keep, h / (1 - self.drop_path), 0)
    return x + h


class LinenConvNeXt(nn.Module):
  num_classes: int = 10
  depth: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.LayerNorm(epsilon=1e-6, name="stem_norm")(nn.Conv(DIM, (4, 4), 4, name="stem")(x))
    for i in range(self.depth):
      x = LinenConvNeXtBlock(name=f"block{i}")(x, train)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(epsilon=1e-6, name="head_norm")(x.mean((1, 2))))


def window_partition(x, w):
  """``[B, H, W, C]`` -> ``[B * H/w * W/w, w*w, C]`` (Swin's window_partition)."""
  b, h, wd, c = x.shape
  x = x.reshape(b, h // w, w, wd // w, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, w * w, c)


def window_reverse(x, w, b, h, wd):
  c = x.shape[-1]
  x = x.reshape(b, h // w, wd // w, w, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, wd, c)


class LinenSwinBlock(nn.Module):
  window: int = 4
  shift: int = 0
  heads: int = 2

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.LayerNorm(name="norm1")(x)
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
    win = window_partition(y, self.window)
    win = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(win, win)
    y = window_reverse(win, self.window, b, h, w)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + y
    y = nn.Dense(c, name="fc2")(nn.gelu(nn.Dense(2 * c, name="fc1")(nn.LayerNorm(name="norm2")(x))))
    return x + y


class LinenSwin(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.LayerNorm(name="patch_norm")(nn.Conv(DIM, (4, 4), 4, padding="VALID", name="patch_embed")(x))
    x = LinenSwinBlock(shift=0, name="block0")(x)
    x = LinenSwinBlock(shift=2, name="block1")(x)
    x = nn.Dropout(0.1, deterministic=not train)(nn.LayerNorm(name="norm")(x).mean((1, 2)))
    return nn.Dense(self.num_classes, name="head")(x)


class LinenBasicBlock(nn.Module):
  """He et al.'s basic block as flax's examples write it, ending in ``relu(residual + y)``."""

  filters: int
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.relu(bn(name="bn1")(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False, name="conv1")(x)))
    y = bn(name="bn2")(nn.Conv(self.filters, (3, 3), use_bias=False, name="conv2")(y))
    residual = x
    if residual.shape != y.shape:
      residual = bn(name="proj_bn")(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="proj")(x))
    return nn.relu(residual + y)


class LinenHeResNet(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), (2, 2), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
    x = LinenBasicBlock(8, name="block0")(x, train)
    x = LinenBasicBlock(8, name="block1")(x, train)
    x = LinenBasicBlock(16, (2, 2), name="block2")(x, train)
    x = LinenBasicBlock(16, name="block3")(x, train)
    return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def standardize(w, axes=(0, 1, 2), eps=1e-5):
  """BiT's weight standardization, written with ``jnp.mean``/``jnp.var`` over a kernel's input axes."""
  return (w - jnp.mean(w, axis=axes, keepdims=True)) / jnp.sqrt(jnp.var(w, axis=axes, keepdims=True) + eps)


class StdConv(nn.Conv):
  def param(self, name, *args, **kwargs):
    w = super().param(name, *args, **kwargs)
    return standardize(w) if name == "kernel" else w


class LinenBiTUnit(nn.Module):
  features: int
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    gn = partial(nn.GroupNorm, num_groups=2)
    out = nn.relu(gn(name="gn1")(x))
    residual = x
    if x.shape[-1] != self.features or self.strides != (1, 1):
      residual = StdConv(self.features, (1, 1), self.strides, use_bias=False, name="conv_proj")(out)
    out = StdConv(self.features, (3, 3), self.strides, use_bias=False, name="conv1")(out)
    out = StdConv(self.features, (3, 3), use_bias=False, name="conv2")(nn.relu(gn(name="gn2")(out)))
    return out + residual


class LinenBiT(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = StdConv(8, (3, 3), (2, 2), use_bias=False, name="root")(x)
    x = LinenBiTUnit(8, name="unit0")(x)
    x = LinenBiTUnit(8, name="unit1")(x)
    x = LinenBiTUnit(16, (2, 2), name="unit2")(x)
    x = LinenBiTUnit(16, name="unit3")(x)
    x = nn.relu(nn.GroupNorm(num_groups=2, name="pre_head_gn")(x))
    return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


# -- nnx --------------------------------------------------------------------------------------------------------------

class NnxAttention(nnx.Module):
  def __init__(self, dim, heads, rngs):
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads), axis=-1)
    return self.proj(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d))


class NnxEncoderLayer(nnx.Module):
  def __init__(self, dim, mlp_dim, rngs, dropout=0.1):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = NnxAttention(dim, 2, rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    x = x + self.drop(self.attn(self.ln1(x)))
    return x + self.drop(self.fc2(self.drop(nnx.gelu(self.fc1(self.ln2(x))))))


class NnxViT(nnx.Module):
  def __init__(self, num_classes, rngs, depth=2, patch=8, tokens=16):
    self.embedding = nnx.Conv(3, DIM, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, DIM)))
    self.pos_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens + 1, DIM)))
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.layers = nnx.List([NnxEncoderLayer(DIM, 32, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.embedding(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([jnp.tile(self.cls[...], (b, 1, 1)), x], axis=1) + self.pos_embedding[...]
    x = self.drop(x)
    for layer in self.layers:
      x = layer(x)
    return self.head(self.norm(x)[:, 0])


class NnxMixerBlock(nnx.Module):
  def __init__(self, tokens, dim, rngs):
    self.ln_token = nnx.LayerNorm(dim, rngs=rngs)
    self.token_fc1 = nnx.Linear(tokens, 16, rngs=rngs)
    self.token_fc2 = nnx.Linear(16, tokens, rngs=rngs)
    self.ln_channel = nnx.LayerNorm(dim, rngs=rngs)
    self.channel_fc1 = nnx.Linear(dim, 32, rngs=rngs)
    self.channel_fc2 = nnx.Linear(32, dim, rngs=rngs)

  def __call__(self, x):
    y = jnp.swapaxes(self.ln_token(x), 1, 2)
    x = x + jnp.swapaxes(self.token_fc2(nnx.gelu(self.token_fc1(y))), 1, 2)
    return x + self.channel_fc2(nnx.gelu(self.channel_fc1(self.ln_channel(x))))


class NnxMixer(nnx.Module):
  def __init__(self, num_classes, rngs, depth=2):
    self.stem = nnx.Conv(3, DIM, (8, 8), strides=8, padding="VALID", rngs=rngs)
    self.blocks = nnx.List([NnxMixerBlock(16, DIM, rngs) for _ in range(depth)])
    self.pre_head_ln = nnx.LayerNorm(DIM, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(DIM, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for block in self.blocks:
      x = block(x)
    return self.head(self.drop(jnp.mean(self.pre_head_ln(x), axis=1)))


class NnxConvNeXtBlock(nnx.Module):
  def __init__(self, dim, rngs, drop_path=0.1):
    self.dwconv = nnx.Conv(dim, dim, (7, 7), feature_group_count=dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.pwconv1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.pwconv2 = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.gamma = nnx.Param(jnp.full((dim,), 0.5))
    # stochastic depth as NNX code writes it: a dropout that drops whole examples
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)

  def __call__(self, x):
    h = self.pwconv2(nnx.gelu(self.pwconv1(self.norm(self.dwconv(x)))))
    return x + self.drop_path(h * self.gamma[...].reshape(1, 1, 1, -1))  # layer scale


class NnxConvNeXt(nnx.Module):
  def __init__(self, num_classes, rngs, depth=2):
    self.stem = nnx.Conv(3, DIM, (4, 4), strides=4, rngs=rngs)
    self.stem_norm = nnx.LayerNorm(DIM, epsilon=1e-6, rngs=rngs)
    self.blocks = nnx.List([NnxConvNeXtBlock(DIM, rngs) for _ in range(depth)])
    self.head_norm = nnx.LayerNorm(DIM, epsilon=1e-6, rngs=rngs)
    self.head = nnx.Linear(DIM, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem_norm(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(self.head_norm(x.mean((1, 2))))


class NnxSwinBlock(nnx.Module):
  def __init__(self, dim, rngs, shift=0, window=4, heads=2):
    self.shift, self.window = shift, window
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm1(x)
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
    y = window_reverse(self.attn(window_partition(y, self.window)), self.window, b, h, w)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + y
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NnxSwin(nnx.Module):
  def __init__(self, num_classes, rngs):
    self.patch_embed = nnx.Conv(3, DIM, (4, 4), strides=4, padding="VALID", rngs=rngs)
    self.patch_norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.block0 = NnxSwinBlock(DIM, rngs, shift=0)
    self.block1 = NnxSwinBlock(DIM, rngs, shift=2)
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(DIM, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.block1(self.block0(self.patch_norm(self.patch_embed(x))))
    return self.head(self.drop(self.norm(x).mean((1, 2))))


class NnxBasicBlock(nnx.Module):
  """He et al.'s basic block as public NNX code writes it: ``nnx.relu(residual + y)``."""

  def __init__(self, cin, cout, rngs, strides=1):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=strides, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    project = strides != 1 or cin != cout
    self.proj = nnx.Conv(cin, cout, (1, 1), strides=strides, use_bias=False, rngs=rngs) if project else None
    self.proj_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs) if project else None

  def __call__(self, x):
    y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
    residual = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(residual + y)


class NnxHeResNet(nnx.Module):
  def __init__(self, num_classes, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([NnxBasicBlock(8, 8, rngs), NnxBasicBlock(8, 8, rngs), NnxBasicBlock(8, 16, rngs, 2),
                            NnxBasicBlock(16, 16, rngs)])
    self.head = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean((1, 2)))


class NnxStdConv(nnx.Conv):
  """A convolution whose kernel is standardized before use (BiT's StdConv as NNX code writes it)."""

  def __call__(self, x):
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    return jax.lax.conv_general_dilated(x, standardize(self.kernel[...]), strides, "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class NnxBiTUnit(nnx.Module):
  def __init__(self, cin, cout, rngs, strides=1):
    self.gn1 = nnx.GroupNorm(cin, num_groups=2, rngs=rngs)
    project = cin != cout or strides != 1
    self.conv_proj = NnxStdConv(cin, cout, (1, 1), strides=strides, use_bias=False, rngs=rngs) if project else None
    self.conv1 = NnxStdConv(cin, cout, (3, 3), strides=strides, use_bias=False, rngs=rngs)
    self.gn2 = nnx.GroupNorm(cout, num_groups=2, rngs=rngs)
    self.conv2 = NnxStdConv(cout, cout, (3, 3), use_bias=False, rngs=rngs)

  def __call__(self, x):
    out = nnx.relu(self.gn1(x))
    residual = x if self.conv_proj is None else self.conv_proj(out)
    return self.conv2(nnx.relu(self.gn2(self.conv1(out)))) + residual


class NnxBiT(nnx.Module):
  def __init__(self, num_classes, rngs):
    self.root = NnxStdConv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.units = nnx.List([NnxBiTUnit(8, 8, rngs), NnxBiTUnit(8, 8, rngs), NnxBiTUnit(8, 16, rngs, 2),
                           NnxBiTUnit(16, 16, rngs)])
    self.pre_head_gn = nnx.GroupNorm(16, num_groups=2, rngs=rngs)
    self.head = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.root(x)
    for unit in self.units:
      x = unit(x)
    return self.head(nnx.relu(self.pre_head_gn(x)).mean((1, 2)))


# -- factories --------------------------------------------------------------------------------------------------------

LINEN = {"vit": LinenViT, "mixer": LinenMixer, "convnext": LinenConvNeXt, "swin": LinenSwin,
         "he_resnet": LinenHeResNet, "bit": LinenBiT}
NNX = {"vit": NnxViT, "mixer": NnxMixer, "convnext": NnxConvNeXt, "swin": NnxSwin, "he_resnet": NnxHeResNet,
       "bit": NnxBiT}


def make_vit(num_classes=10):
  return LinenViT(num_classes)


def make_mixer(num_classes=10):
  return LinenMixer(num_classes)


def make_convnext(num_classes=10):
  return LinenConvNeXt(num_classes)


def make_swin(num_classes=10):
  return LinenSwin(num_classes)


def make_he_resnet(num_classes=10):
  return LinenHeResNet(num_classes)


def make_bit(num_classes=10):
  return LinenBiT(num_classes)


def make_nnx_vit(num_classes=10, rngs=None):
  return NnxViT(num_classes, rngs)


def make_nnx_mixer(num_classes=10, rngs=None):
  return NnxMixer(num_classes, rngs)


def make_nnx_convnext(num_classes=10, rngs=None):
  return NnxConvNeXt(num_classes, rngs)


def make_nnx_swin(num_classes=10, rngs=None):
  return NnxSwin(num_classes, rngs)


def make_nnx_he_resnet(num_classes=10, rngs=None):
  return NnxHeResNet(num_classes, rngs)


def make_nnx_bit(num_classes=10, rngs=None):
  return NnxBiT(num_classes, rngs)
