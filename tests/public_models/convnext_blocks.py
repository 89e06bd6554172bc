"""The blocks of ``convnext.py``, imported from it as a sibling module (``from convnext_blocks import ...``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
  """Stochastic depth, as timm-style Flax ConvNeXts write it: its own ``"drop_path"`` random stream."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.make_rng("drop_path"), 1.0 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class ConvNeXtBlock(nn.Module):
  """Depthwise 7x7 conv, LayerNorm, MLP (4x), layer scale, drop path: ``x + drop_path(gamma * f(x))``."""

  dim: int
  drop_path: float = 0.0
  layer_scale: float = 0.1

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    h = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim, name="dwconv")(x)
    h = nn.LayerNorm(epsilon=1e-6, name="norm")(h)
    h = nn.gelu(nn.Dense(4 * self.dim, name="pwconv1")(h))
    h = nn.Dense(self.dim, name="pwconv2")(h)
    h = h * self.param("gamma", nn.initializers.constant(self.layer_scale), (self.dim,)).reshape(1, 1, 1, -1)
    return x + DropPath(self.drop_path)(h, deterministic)
