"""The blocks of ``model.py`` beside it: a model file that imports its neighbour (``from my_blocks import ...``)."""

import flax.linen as nn


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(x.shape[-1], (3, 3))(x)))
    return x + nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(x.shape[-1], (3, 3))(h))
