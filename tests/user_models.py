"""User networks as a user would write them, for the pipeline tests (``model=tests/user_models.py:make_vgg``).

Plain ``flax.linen`` classifiers that know nothing of bpcp_jax: a VGG-style network with
BatchNorm and dropout, and a small residual network with identity blocks; and a ``flax.nnx`` one
(``make_nnx_resnet(num_classes=..., rngs=...)``).
"""

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class VGG(nn.Module):
  """conv-BN-ReLU x2, pool, conv-BN-ReLU x2, pool, dropout, dense."""

  num_classes: int = 10
  widths: tuple = (8, 8, 16, 16)

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class Block(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(self.width, (3, 3))(x)))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(x.shape[-1], (3, 3))(h))
    return nn.relu(x + h)


class ResNetLike(nn.Module):
  """A stem and three identity residual blocks."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(8, (3, 3))(x)))
    for _ in range(3):
      x = Block(6)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def make_vgg(num_classes=10):
  return VGG(num_classes=num_classes)


def make_resnet(num_classes=10):
  return ResNetLike(num_classes=num_classes)


# -- a flax.nnx network: factory(num_classes=..., rngs=...) ---------------------------------------

class NnxBlock(nnx.Module):
  def __init__(self, width, hidden, rngs):
    self.conv1 = nnx.Conv(width, hidden, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(hidden, width, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))


class NnxResNet(nnx.Module):
  """A stride-2 stem, two identity residual blocks ``x + f(x)``, dropout and a linear head."""

  def __init__(self, num_classes, rngs, dropout=0.2):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(8, 6, rngs) for _ in range(2)])
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(self.drop(jnp.mean(nnx.relu(x), axis=(1, 2))))


def make_nnx_resnet(num_classes=10, rngs=None, dropout=0.2):
  return NnxResNet(num_classes, rngs, dropout)


def make_nnx_resnet_without_rngs(num_classes=10):
  """Refused: an NNX factory takes ``rngs`` (here the module is built abstractly, only to be cheap)."""
  return nnx.eval_shape(lambda: NnxResNet(num_classes, nnx.Rngs(0)))
