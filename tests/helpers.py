"""Shared test helpers: random masks that exercise every pruning corner, perturbed variables."""

import jax
import jax.numpy as jnp
import numpy as np

import bpcp_jax as bp


def perturbed_variables(model, key, batch=2):
  """Initialised variables with non-trivial BN statistics and biases (so masks matter)."""
  x = jnp.zeros((batch, 32, 32, 3), jnp.float32)
  variables = model.init(key, x, train=False)
  k1, k2, k3 = jax.random.split(key, 3)
  params = jax.tree.map(lambda a, k=k1: a + 0.2 * jax.random.normal(k, a.shape), variables["params"])
  stats = variables["batch_stats"]
  leaves, treedef = jax.tree.flatten(stats)
  keys = jax.random.split(k2, len(leaves))
  leaves = [jnp.abs(l + 0.3 * jax.random.normal(k, l.shape)) + 0.05 for l, k in zip(leaves, keys)]
  return {"params": params, "batch_stats": jax.tree.unflatten(treedef, leaves)}


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
