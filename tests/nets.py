"""Small networks of shapes the paper's ResNets do not have, for the traced pruning tests.

The first ones come with ``expected_macs(width)``: the multiply-accumulates per example computed
by hand from the kept width of every group (named after the layer that produces it), so the
count from the traced program is checked against an independent formula. The later ones have
the shapes of reported failures (grouped convolutions, reshapes splitting a channel axis,
attention, size-1 gates, dropout, remat) and ``INPUT_SHAPES`` gives each one's input shape.
"""

import flax.linen as nn
import jax
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
    macs += hw * w["dw2"] * w["pw1"] * 9 + hw * w["pw2"] * w["dw2"] * w["pw1"]  # multiplier dw2 (2)
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
  """A LayerNorm over channels and a slice of the channel axis: both followed (the LayerNorm normalises the kept
  channels, the slice keeps the kept channels of its range)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
    h = nn.LayerNorm(name="ln")(nn.Conv(8, (3, 3), name="c2")(h))
    h = nn.Conv(6, (3, 3), name="c3")(h)[..., :4]
    h = nn.relu(nn.Conv(6, (1, 1), name="c4")(h))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))


# -- the shapes of the failures reported in issue 12: each must be followed or reported, never crash ------------------


class GroupedConvNet(nn.Module):
  """A grouped (not depthwise) convolution between two pointwise ones, as in RegNet / ResNeXt."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(_bn("bn1", train)(nn.Conv(8, (1, 1), use_bias=False, name="pw1")(x)))
    h = nn.relu(_bn("bn2", train)(nn.Conv(8, (3, 3), feature_group_count=2, use_bias=False, name="grouped")(h)))
    h = nn.relu(nn.Conv(6, (1, 1), name="pw2")(h))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))


class ChannelShuffleNet(nn.Module):
  """ShuffleNet's channel shuffle: (n, h, w, groups * per_group) -> (n, h, w, per_group, groups) -> flat."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (1, 1), feature_group_count=1, name="c1")(x))
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh, ww, 2, c // 2).transpose(0, 1, 2, 4, 3).reshape(n, hh, ww, c)
    h = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2, name="c2")(h))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))


class DepthToSpaceNet(nn.Module):
  """Depth-to-space (pixel shuffle): a channel axis split into (2, 2, c) whose first two factors become space."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh, ww, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * hh, 2 * ww, c // 4)
    h = nn.relu(nn.Conv(4, (3, 3), name="c2")(h))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))


class DenseToMapNet(nn.Module):
  """A dense layer's output viewed as a feature map (a generator's or decoder's first layer)."""

  @nn.compact
  def __call__(self, z, train: bool = False):
    h = nn.relu(nn.Dense(4 * 4 * 6, name="project")(z)).reshape(z.shape[0], 4, 4, 6)
    h = nn.relu(nn.Conv(4, (3, 3), name="c1")(h))
    return nn.Dense(5, name="fc")(h.reshape(z.shape[0], -1))


class GroupNormNet(nn.Module):
  """GroupNorm (two groups of four channels) between convolutions, with a residual block."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.GroupNorm(num_groups=2, name="gn1")(nn.Conv(8, (3, 3), name="c1")(x)))
    r = nn.relu(nn.GroupNorm(num_groups=2, name="gn2")(nn.Conv(8, (3, 3), name="c2")(h)))
    h = h + nn.GroupNorm(num_groups=2, name="gn3")(nn.Conv(8, (3, 3), name="c3")(r))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))


class FusedQKVNet(nn.Module):
  """Self-attention with one fused qkv projection split into (3, heads, head_dim), heads merged back by a reshape."""

  heads: int = 2
  head_dim: int = 4

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    n, length, _ = tokens.shape
    x = nn.Dense(8, name="embed")(tokens)
    qkv = nn.Dense(3 * self.heads * self.head_dim, name="qkv")(x).reshape(n, length, 3, self.heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(self.head_dim), axis=-1)
    o = jnp.einsum("nhqk,nkhd->nqhd", att, v).reshape(n, length, self.heads * self.head_dim)
    x = x + nn.Dense(8, name="proj")(o)
    return nn.Dense(5, name="fc")(jnp.mean(x, axis=1))


class DenseGeneralNet(nn.Module):
  """``nn.DenseGeneral`` with two output axes, read back by one contracting both."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.DenseGeneral((2, 3), name="split")(x))
    return nn.DenseGeneral(5, axis=(-2, -1), name="merge")(h)


class AttentionNet(nn.Module):
  """Flax's multi-head attention and an MLP, pre-LayerNorm residual blocks (a one-layer ViT encoder)."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    x = nn.Dense(8, name="embed")(tokens)
    y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(nn.LayerNorm(name="ln1")(x))
    x = x + y
    y = nn.Dense(8, name="mlp_in")(nn.LayerNorm(name="ln2")(x))
    x = x + nn.Dense(8, name="mlp_out")(nn.gelu(y))
    return nn.Dense(5, name="fc")(jnp.mean(nn.LayerNorm(name="ln_out")(x), axis=1))


class GateNet(nn.Module):
  """Operands that are compatible with any kept subset: a spatial gate broadcast over channels, a where with a scalar,
  an average pool dividing by a (1, H, W, 1) count, a dropout mask (train mode) before a dense layer."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
    h = h * nn.sigmoid(nn.Conv(1, (3, 3), name="gate")(h))
    h = nn.Conv(8, (3, 3), name="c2")(h)
    h = jnp.where(h > 0, h, 0.0)
    h = nn.avg_pool(h, (3, 3), padding="SAME", count_include_pad=False)
    h = nn.Conv(6, (1, 1), name="c3")(h)
    h = nn.Dropout(0.5, deterministic=not train)(jnp.mean(h, axis=(1, 2)))
    return nn.Dense(5, name="fc")(h)


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Conv(8, (3, 3), name="c2")(nn.relu(nn.Conv(8, (3, 3), name="c1")(x)))


class RematNet(nn.Module):
  """Residual blocks under ``nn.remat`` (gradient checkpointing)."""

  remat: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = nn.remat(_Residual) if self.remat else _Residual
    h = nn.Conv(8, (3, 3), name="stem")(x)
    h = block(name="block0")(h)
    h = block(name="block1")(h)
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))


class WeightNormNet(nn.Module):
  """Weights computed from two variables before use: weight normalisation (kernel / |kernel| * scale)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.WeightNorm(nn.Conv(8, (3, 3)), name="c1")(x))
    h = nn.relu(nn.WeightNorm(nn.Conv(6, (3, 3)), name="c2")(h))
    return nn.Dense(5, name="fc")(jnp.mean(h, axis=(1, 2)))


class SortNet(nn.Module):
  """A sort along the channel axis: no kept subset gives the same result, so it must be reported."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
    h = jnp.sort(nn.Conv(6, (3, 3), name="c2")(h), axis=-1)
    return nn.Dense(5, name="fc")(jnp.mean(nn.Conv(4, (1, 1), name="c3")(h), axis=(1, 2)))


# per-example input shape of each network (the image networks take (8, 8, 3))
INPUT_SHAPES = {DenseToMapNet: (6,), FusedQKVNet: (5, 6), DenseGeneralNet: (4,), AttentionNet: (5, 6)}


@jax.custom_vjp
def _clipped_relu(x):
  return jnp.clip(x, 0.0, 6.0)


_clipped_relu.defvjp(lambda x: (_clipped_relu(x), x), lambda x, g: (jnp.where((x > 0) & (x < 6), g, 0.0),))


class ControlFlowNet(nn.Module):
  """Sub-programs: a custom_vjp activation, jax.checkpoint, a cond, a scan and a while loop that pass the
  channels through unchanged (followed), and a cond that computes with them (reported)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = _clipped_relu(nn.Conv(8, (3, 3), name="c1")(x))
    h = jax.checkpoint(lambda a: nn.relu(a) * 2.0)(h)
    count = jnp.sum(x) > 0
    h, n = jax.lax.cond(count, lambda a: (a, 1.0), lambda a: (a, 2.0), h)
    _, h = jax.lax.fori_loop(0, 2, lambda i, c: (c[0] + 1, c[1]), (0, h))  # a scan
    _, h = jax.lax.while_loop(lambda c: c[0] < jnp.sum(x) + 2, lambda c: (c[0] + 1.0, c[1]), (0.0, h))
    h = nn.Conv(6, (3, 3), name="c2")(h) * n
    h = jax.lax.cond(count, lambda a: a, lambda a: a * 0.5, h)
    return nn.Dense(5, name="fc")(jnp.mean(nn.Conv(4, (1, 1), name="c3")(h), axis=(1, 2)))


class HalfNormalisedNet(nn.Module):
  """A conv without normalisation feeding a conv with BatchNorm: bn_scale scores one group by its
  BN scales and falls back to filter norms for the other."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="plain")(x))
    x = nn.Conv(16, (3, 3), use_bias=False, name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
    return nn.Dense(10, name="head")(x.mean((1, 2)))
