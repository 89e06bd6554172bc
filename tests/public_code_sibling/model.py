"""A model file that imports a module beside it, as a user's project does (``--config.model=.../model.py:make_model``)."""

import flax.linen as nn
from my_blocks import Block


class Net(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), 2)(x))
    x = Block()(x, train)
    x = Block()(x, train)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def make_model(num_classes=10):
  return Net(num_classes)
