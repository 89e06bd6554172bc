"""Networks as particular public code writes them, each with the habit that once broke the pipeline.

- ``make_flax_imagenet_resnet``: flax's ``examples/imagenet`` ResNet (``models.py``): BatchNorm with
  ``axis_name="batch"`` (written for ``pmap``), ``__call__(x, train: bool = True)``, ``relu(residual + y)``.
- ``make_convnext_drop_path``: a ConvNeXt block whose stochastic depth draws from its own ``"drop_path"`` stream.
- ``make_training_switch``: efficientnet-jax's style: a required positional switch ``__call__(x, training)``.
- ``make_output_object``: returns an output object with a ``.logits`` field, as Hugging Face's Flax models do.
- ``make_nnx_training``: an NNX network whose ``__call__(x, training=False)`` switches BatchNorm and dropout.
- ``make_nnx_call_rngs``: an NNX network whose ``__call__(x, *, rngs)`` requires its random streams at call time.
- ``public_code_sibling/model.py:make_model``: a model file importing a module beside it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


# -- flax examples/imagenet models.py, at a tiny width -----------------------------------------------------------------

class ResNetBlock(nn.Module):
  filters: int
  conv: Any
  norm: Any
  act: Any
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  stage_sizes: tuple = (2, 2)
  num_classes: int = 10
  num_filters: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                   axis_name="batch")
    x = conv(self.num_filters, (3, 3), (1, 1), padding=[(1, 1), (1, 1)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.num_filters * 2 ** i, strides=strides, conv=conv, norm=norm, act=nn.relu)(x)
    x = jnp.mean(x, axis=(1, 2))
    return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


def make_flax_imagenet_resnet(num_classes=10):
  return ResNet(num_classes=num_classes)


# -- a ConvNeXt block with its own drop-path stream ---------------------------------------------------------------------

class DropPath(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.make_rng("drop_path"), 1.0 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class ConvNeXtBlock(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    h = nn.Conv(d, (7, 7), feature_group_count=d)(x)
    h = nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm(epsilon=1e-6)(h))))
    h = h * self.param("gamma", nn.initializers.constant(0.5), (d,)).reshape(1, 1, 1, d)
    return x + DropPath(0.5)(h, deterministic)


class ConvNeXtDropPath(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.LayerNorm(epsilon=1e-6)(nn.Conv(16, (4, 4), 4)(x))
    for _ in range(2):
      x = ConvNeXtBlock()(x, deterministic)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def make_convnext_drop_path(num_classes=10):
  return ConvNeXtDropPath(num_classes)


# -- efficientnet-jax style: a required `training` switch ---------------------------------------------------------------

class TrainingSwitchBlock(nn.Module):
  @nn.compact
  def __call__(self, x, training: bool):
    bn = partial(nn.BatchNorm, use_running_average=not training, momentum=0.9)
    h = nn.swish(bn()(nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)))
    return x + bn()(nn.Conv(x.shape[-1], (3, 3), use_bias=False)(h))


class TrainingSwitchNet(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, training):
    x = nn.swish(nn.BatchNorm(use_running_average=not training, momentum=0.9)(nn.Conv(8, (3, 3), 2)(x)))
    x = TrainingSwitchBlock()(x, training)
    x = TrainingSwitchBlock()(x, training)
    x = nn.Dropout(0.3, deterministic=not training)(x.mean((1, 2)))
    return nn.Dense(self.num_classes)(x)


def make_training_switch(num_classes=10):
  return TrainingSwitchNet(num_classes)


# -- an output object with a `.logits` field ----------------------------------------------------------------------------

@flax.struct.dataclass
class ImageClassifierOutput:
  logits: jax.Array
  hidden_states: Any = None


class OutputObjectNet(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), 2)(x))
    for _ in range(2):
      x = x + nn.Conv(8, (3, 3))(nn.relu(nn.LayerNorm()(x)))
    pooled = x.mean((1, 2))
    return ImageClassifierOutput(logits=nn.Dense(self.num_classes)(nn.Dropout(0.2, deterministic=not train)(pooled)),
                                 hidden_states=(x,))


def make_output_object(num_classes=10):
  return OutputObjectNet(num_classes)


# -- NNX: a `training=` switch --------------------------------------------------------------------------------------------

class NnxTrainingBlock(nnx.Module):
  def __init__(self, width, rngs):
    self.conv1 = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)

  def __call__(self, x, training=False):
    h = nnx.relu(self.bn1(self.conv1(x), use_running_average=not training))
    return x + self.bn2(self.conv2(h), use_running_average=not training)


class NnxTrainingNet(nnx.Module):
  def __init__(self, num_classes, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([NnxTrainingBlock(8, rngs) for _ in range(2)])
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x, training=False):
    x = nnx.relu(self.bn(self.stem(x), use_running_average=not training))
    for block in self.blocks:
      x = block(x, training=training)
    return self.head(self.drop(x.mean((1, 2)), deterministic=not training))


def make_nnx_training(num_classes=10, rngs=None):
  return NnxTrainingNet(num_classes, rngs)


# -- NNX: `__call__(x, *, rngs)` ----------------------------------------------------------------------------------------

class NnxCallRngsNet(nnx.Module):
  def __init__(self, num_classes, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
    self.convs = nnx.List([nnx.Conv(8, 8, (3, 3), rngs=rngs) for _ in range(2)])
    self.norms = nnx.List([nnx.LayerNorm(8, rngs=rngs) for _ in range(2)])
    self.drop = nnx.Dropout(0.3)  # no stream of its own: the call gives it one
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x, *, rngs: nnx.Rngs):
    x = nnx.relu(self.stem(x))
    for conv, norm in zip(self.convs, self.norms):
      x = x + conv(nnx.relu(norm(x)))
    return self.head(self.drop(x.mean((1, 2)), rngs=rngs))


def make_nnx_call_rngs(num_classes=10, rngs=None):
  return NnxCallRngsNet(num_classes, rngs)
