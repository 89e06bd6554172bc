"""User networks as a user would write them, for the pipeline tests (``model=tests/user_models.py:make_vgg``).

Plain ``flax.linen`` classifiers that know nothing of bpcp_jax: a VGG-style network with
BatchNorm and dropout, and a small residual network with identity blocks.
"""

import flax.linen as nn
import jax.numpy as jnp


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
