"""Networks as particular public code writes them, each with the habit that once broke the pipeline.

- ``make_training_switch``: efficientnet-jax's style: a required positional switch ``__call__(x, training)``.
- ``make_output_object``: returns an output object with a ``.logits`` field, as Hugging Face's Flax models do.
- ``make_nnx_training``: an NNX network whose ``__call__(x, training=False)`` switches BatchNorm and dropout.
- ``make_nnx_call_rngs``: an NNX network whose ``__call__(x, *, rngs)`` requires its random streams at call time.
- ``public_code_sibling/model.py:make_model``: a model file importing a module beside it.

flax's ``examples/imagenet`` ResNet (BatchNorm ``axis_name="batch"``) and a ConvNeXt drawing from its own
``"drop_path"`` stream are in ``tests/public_models/`` (``imagenet_resnet.py``, ``convnext.py``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


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
