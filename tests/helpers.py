"""Shared test helpers: random masks that exercise every pruning corner, perturbed variables."""

import jax
import jax.numpy as jnp
import numpy as np

import bpcp_jax as bp


def perturbed_variables(model, key, batch=2):
  """Variables of ``model`` with non-trivial values everywhere (so masks matter): kernels of the
  initializers' scale plus noise, BN scales near 1, biases, means and variances away from their
  init. Drawn with numpy at the shapes ``model.init`` gives (traced, not run): a ResNet's own
  initializers compile one random-number program per weight shape, ~15 s a network here."""
  shapes = jax.eval_shape(lambda: model.init(key, jnp.zeros((batch, 32, 32, 3), jnp.float32), train=False))
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    noise = rng.standard_normal(shape)
    if name == "kernel":
      value = noise * np.sqrt(1.0 / np.prod(shape[:-1]) + 0.04)
    elif name in ("scale", "var"):
      value = np.abs(1.0 + 0.3 * noise) + 0.05
    elif name == "mean":
      value = 0.3 * noise
    else:
      value = 0.2 * noise
    return jnp.asarray(value, leaf.dtype)

  return {col: jax.tree_util.tree_map_with_path(draw, shapes[col]) for col in ("params", "batch_stats")}


def random_masks(model, seed, *, drop_blocks=0.4, keep_channels=0.6, single_channel_group=True,
                 drop_entry_blocks=True, leave_one_block_in_stage=None):
  """Random blocks removed (optionally every entry block, or all but one block of a stage) and
  random channels removed in every group, one group cut to a single channel."""
  rng = np.random.default_rng(seed)
  masks = bp.init_masks(model)
  for name in masks["blocks"]:
    drop = rng.random() < drop_blocks or (drop_entry_blocks and name.endswith("_block0"))
    masks["blocks"][name] = jnp.asarray(-1.0 - rng.random() if drop else rng.random(), jnp.float32)
  if leave_one_block_in_stage is not None:
    stage_blocks = [n for n in masks["blocks"] if n.startswith(f"stage{leave_one_block_in_stage}_")]
    survivor = stage_blocks[rng.integers(len(stage_blocks))]
    for n in stage_blocks:
      masks["blocks"][n] = jnp.asarray(0.5 if n == survivor else -0.5, jnp.float32)
  groups = sorted(masks["channels"])
  single = groups[rng.integers(len(groups))] if single_channel_group else None
  for g in groups:
    w = masks["channels"][g].shape[0]
    m = (rng.random(w) < keep_channels).astype(np.float32)
    if g == single:
      m[:] = 0
    m[rng.integers(w)] = 1.0
    masks["channels"][g] = jnp.asarray(m)
  return masks


def images(key, n=4):
  return jax.random.normal(key, (n, 32, 32, 3), jnp.float32)


def random_traced_masks(net, seed, *, keep_channels=0.5, drop_blocks=0.7):
  """Random masks for a traced network: each channel kept with probability ``keep_channels`` (at
  least one per group), each block removed with probability ``drop_blocks``."""
  rng = np.random.default_rng(seed)
  masks = bp.init_traced_masks(net)
  for name, g in net.groups.items():
    keep = rng.random(g.width) < keep_channels
    keep[rng.integers(g.width)] = True
    masks["channels"][name] = jnp.asarray(keep, jnp.float32)
  for name in net.blocks:
    masks["blocks"][name] = jnp.float32(-1.0 if rng.random() < drop_blocks else 1.0)
  return masks
