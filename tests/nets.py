"""Small networks of shapes the paper's ResNets do not have, for the traced pruning tests.

Each comes with ``expected_macs(width)``: the multiply-accumulates per example computed by hand
from the kept width of every group (named after the layer that produces it), so the count
from the traced program is checked against an independent formula.
"""

import flax.linen as nn
import jax.numpy as jnp


def _bn(name, train):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)


class InceptionNet(nn.Module):
  """Parallel 1x1 / 1x1->3x3 / pool->1x1 branches concatenated, as in Inception-V3/V4."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(_bn("stem_bn", train)(nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
    b1 = nn.Conv(4, (1, 1), name="b1")(h)
    b2 = nn.Conv(6, (3, 3), name="b2b")(nn.relu(nn.Conv(4, (1, 1), name="b2a")(h)))
    b3 = nn.Conv(3, (1, 1), name="b3")(nn.avg_pool(h, (3, 3), (1, 1), padding="SAME"))
    h = nn.relu(_bn("mix_bn", train)(jnp.concatenate([b1, b2, b3], axis=-1)))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))

  @staticmethod
  def expected_macs(w, hw=16 * 16):
    return (hw * w["stem"] * 27 + hw * w["b1"] * w["stem"] + hw * w["b2a"] * w["stem"]
            + hw * w["b2b"] * w["b2a"] * 9 + hw * w["b3"] * w["stem"] + (w["b1"] + w["b2b"] + w["b3"]) * 5)


class MobileNet(nn.Module):
  """Depthwise-separable layers (one with channel multiplier 2) and an inverted residual block."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    def cbr(h, features, kernel, name, groups=1, stride=1, act=True):
      h = nn.Conv(features, kernel, strides=stride, feature_group_count=groups, use_bias=False, name=name)(h)
      h = _bn(name + "_bn", train)(h)
      return jnp.clip(h, 0.0, 6.0) if act else h

    h = cbr(x, 8, (3, 3), "stem", stride=2)
    h = cbr(h, 8, (3, 3), "dw1", groups=8)
    h = cbr(h, 16, (1, 1), "pw1")
    h = cbr(h, 32, (3, 3), "dw2", groups=16)  # multiplier 2
    h = cbr(h, 16, (1, 1), "pw2", act=False)
    r = cbr(h, 32, (1, 1), "expand")
    r = cbr(r, 32, (3, 3), "dw3", groups=32)
    h = h + cbr(r, 16, (1, 1), "project", act=False)
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))

  @staticmethod
  def expected_macs(w, hw=8 * 8, blocks=("project",)):
    macs = hw * w["stem"] * 27 + hw * w["stem"] * 9 + hw * w["pw1"] * w["stem"]
    macs += hw * 2 * w["pw1"] * 9 + hw * w["pw2"] * 2 * w["pw1"]
    if blocks:
      macs += hw * w["expand"] * w["pw2"] + hw * w["expand"] * 9 + hw * w["pw2"] * w["expand"]
    return macs + w["pw2"] * 5


class DenseNet(nn.Module):
  """A dense block: every layer reads the concatenation of all earlier outputs."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    for i in range(3):
      h = nn.Conv(4, (3, 3), use_bias=False, name=f"layer{i}")(nn.relu(_bn(f"bn{i}", train)(x)))
      x = jnp.concatenate([x, h], axis=-1)
    x = nn.relu(_bn("bn_final", train)(x))
    return nn.Dense(5, name="fc")(jnp.mean(x, axis=(1, 2)))

  @staticmethod
  def expected_macs(w, hw=16 * 16):
    widths = [w["stem"]]
    macs = hw * w["stem"] * 27
    for i in range(3):
      macs += hw * w[f"layer{i}"] * sum(widths) * 9
      widths.append(w[f"layer{i}"])
    return macs + sum(widths) * 5


class TwoInputNet(nn.Module):
  """An image and a scalar side input (e.g. a degradation level) whose embedding joins the features."""

  @nn.compact
  def __call__(self, image, side, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3), name="c1")(image))
    h = nn.relu(nn.Conv(16, (3, 3), strides=2, name="c2")(h))
    feat = jnp.mean(h, axis=(1, 2))
    feat = feat + nn.relu(nn.Dense(16, name="side")(side))
    return nn.Dense(5, name="fc")(feat)

  @staticmethod
  def expected_macs(w, hw=16 * 16):
    return hw * w["c1"] * 27 + (hw // 4) * w["c2"] * w["c1"] * 9 + w["c2"] * 1 + w["c2"] * 5


class UnfollowableNet(nn.Module):
  """A LayerNorm over channels and a slice of the channel axis: both must be reported, not pruned."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
    h = nn.LayerNorm(name="ln")(nn.Conv(8, (3, 3), name="c2")(h))
    h = nn.Conv(6, (3, 3), name="c3")(h)[..., :4]
    h = nn.relu(nn.Conv(6, (1, 1), name="c4")(h))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))
