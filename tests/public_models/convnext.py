"""A small ConvNeXt written as public Flax code writes it, for tests/test_public_pipeline.py.

No BatchNorm (LayerNorm only, no ``batch_stats`` at all), drop path from its own ``"drop_path"``
random stream and dropout from ``"dropout"``, a ``deterministic`` switch, blocks imported from the
module beside this file (``from convnext_blocks import ...``, as a user's project does), and an
output object with a ``.logits`` field, as Hugging Face's Flax image classifiers return.
"""

from typing import Optional, Tuple

import flax
import flax.linen as nn
import jax.numpy as jnp
from convnext_blocks import ConvNeXtBlock


@flax.struct.dataclass
class ImageClassifierOutput:
  """Hugging Face's ``FlaxImageClassifierOutputWithNoAttention``, as written there."""

  logits: jnp.ndarray = None
  hidden_states: Optional[Tuple[jnp.ndarray, ...]] = None


class ConvNeXtForImageClassification(nn.Module):
  num_classes: int = 10
  dims: Tuple[int, ...] = (8, 16)
  depths: Tuple[int, ...] = (2, 1)
  drop_path_rate: float = 0.2
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, pixel_values, deterministic: bool = True):
    x = nn.Conv(self.dims[0], (4, 4), strides=4, name="stem")(pixel_values)
    x = nn.LayerNorm(epsilon=1e-6, name="stem_norm")(x)
    for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
      if i:
        x = nn.LayerNorm(epsilon=1e-6, name=f"down_norm{i}")(x)
        x = nn.Conv(dim, (2, 2), strides=2, name=f"down{i}")(x)
      for j in range(depth):
        x = ConvNeXtBlock(dim, self.drop_path_rate, name=f"stage{i}_block{j}")(x, deterministic)
    x = nn.LayerNorm(epsilon=1e-6, name="head_norm")(x.mean((1, 2)))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return ImageClassifierOutput(logits=nn.Dense(self.num_classes, name="classifier")(x))


def make_model(num_classes=10):
  return ConvNeXtForImageClassification(num_classes)
