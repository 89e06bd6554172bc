"""A residual ``flax.nnx`` network without BatchNorm (LayerNorm, no ``batch_stats``), for test_public_pipeline.py."""

from flax import nnx


class Block(nnx.Module):
  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.conv1 = nnx.Conv(dim, dim, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(dim, dim, (3, 3), rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)

  def __call__(self, x):
    return x + self.conv2(self.dropout(nnx.gelu(self.conv1(self.norm(x)))))


class Net(nnx.Module):
  def __init__(self, num_classes: int, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=4, rngs=rngs)
    self.blocks = nnx.List([Block(8, rngs) for _ in range(2)])
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean((1, 2)))


def make_model(num_classes=10, rngs=None):
  return Net(num_classes, rngs)
