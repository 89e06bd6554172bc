"""Block-removal rules: the controls a learned block search (BP) has to beat, for any network with blocks.

``select_blocks(network, variables, method, n, seed=..., images=..., labels=...)`` gives block decisions as gate
logits (+1 keep, -1 remove) for ``n`` blocks removed by a rule:

- ``random``: drawn uniformly (a NumPy generator seeded with ``seed``);
- ``last``: the last blocks of every stage, spread over the stages (the deepest first);
- ``single_drop``: the ``n`` blocks whose removal *alone* raises the eval-mode cross-entropy on ``images`` /
  ``labels`` the least (greedy single-block drop, as in layer-dropping work);
- ``importance``: the ``n`` blocks that change their input the least on ``images``: block influence
  ``1 - cos(x, x + f(x))`` over the channel axis, averaged over examples and positions (ShortGPT's Block
  Influence, Men et al. 2024; the residual ``x`` being the block's input or shortcut output).

No rule removes every block of a stage (``network.block_stages()``): a stage keeps one block. ``block_scores``
gives the scores the two data-driven rules rank by (lower = removed first), so a report can show them. Any
``PrunableNetwork`` works: the families and traced linen/NNX networks (``block_io`` gives the summands).
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_METHODS = ("bp", "random", "last", "single_drop", "importance")
SCORED = ("single_drop", "importance")


def _stages(network) -> list[list[str]]:
  return [list(s) for s in network.block_stages() if s]


def _batches(images, labels, batch_size: int):
  for i in range(0, len(images), batch_size):
    yield images[i:i + batch_size], (None if labels is None else labels[i:i + batch_size])


def block_scores(network, variables, images, labels=None, *, rule: str, batch_size: int = 128) -> dict[str, float]:
  """``{block: score}`` by ``rule`` (lower = removed first), on ``images`` ``[N, *input_shape]`` (already
  normalised as the network is fed) and, for ``single_drop``, integer ``labels`` ``[N]``.

  ``single_drop``: eval-mode mean cross-entropy with the block alone removed minus the dense network's;
  ``importance``: mean block influence ``1 - cos(residual, residual + branch)``. Raises ``ValueError`` naming
  what is missing or mis-shaped."""
  if rule not in SCORED:
    raise ValueError(f"unknown scoring rule {rule!r}; choose from {', '.join(SCORED)}")
  images = np.asarray(images)
  if images.ndim != 1 + len(network.input_shape) or tuple(images.shape[1:]) != tuple(network.input_shape):
    raise ValueError(f"block scores: images of shape {images.shape}, the network takes "
                     f"[N, *{tuple(network.input_shape)}]")
  names = list(network.block_names)
  if rule == "single_drop":
    if labels is None or len(labels) != len(images):
      raise ValueError(f"block scores by single_drop need one label per image ({len(images)} images, "
                       f"{None if labels is None else len(labels)} labels)")
    base = network.init_masks()
    cases = [None] + names

    @jax.jit
    def losses(x, y, block_logits):
      masks = {"channels": base["channels"], "blocks": block_logits}
      logits = network.apply(variables, x, train=False, masks=masks).astype(jnp.float32)
      return jnp.sum(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    total = np.zeros(len(cases))
    for x, y in _batches(images, np.asarray(labels), batch_size):
      for k, removed in enumerate(cases):
        logits = {b: jnp.float32(-1.0 if b == removed else 1.0) for b in names}
        total[k] += float(losses(jnp.asarray(x), jnp.asarray(y, jnp.int32), logits))
    total /= len(images)
    return {b: float(total[k + 1] - total[0]) for k, b in enumerate(names)}

  io = jax.jit(lambda x: network.block_io(variables, x))
  sums = dict.fromkeys(names, 0.0)
  for x, _ in _batches(images, None, batch_size):
    for b, (res, branch) in io(jnp.asarray(x)).items():
      out = res + branch
      cos = jnp.sum(res * out, -1) / jnp.maximum(jnp.linalg.norm(res, axis=-1) * jnp.linalg.norm(out, axis=-1), 1e-12)
      sums[b] += float(jnp.sum(jnp.mean((1.0 - cos).reshape(len(x), -1), axis=1)))
  return {b: sums[b] / len(images) for b in names}


def _cap(stages, n):
  removable = sum(len(s) - 1 for s in stages)
  if not 0 <= n <= removable:
    raise ValueError(f"cannot remove {n} blocks: the network has {sum(map(len, stages))} in {len(stages)} "
                     f"stage(s) and each stage keeps one (at most {removable})")


def lowest_blocks(network, scores: Mapping[str, float], n: int) -> list[str]:
  """The ``n`` blocks of lowest score (ties: by name), never every block of a stage."""
  stages = _stages(network)
  _cap(stages, n)
  stage_of = {b: i for i, s in enumerate(stages) for b in s}
  left = {i: len(s) for i, s in enumerate(stages)}
  removed: list[str] = []
  for b in sorted(stage_of, key=lambda b: (scores[b], b)):
    if len(removed) == n:
      break
    if left[stage_of[b]] > 1:
      removed.append(b)
      left[stage_of[b]] -= 1
  return removed


def select_blocks(network, variables, method: str, num_remove: int, *, seed: int = 0, images=None,
                  labels=None, batch_size: int = 128) -> dict[str, jax.Array]:
  """Block decisions by a rule, the controls for BP: ``{block: logit}`` (+1 keep, -1 remove).

  ``method``: ``random``, ``last``, ``single_drop`` or ``importance`` (module docstring); the last two need
  ``images`` (and ``labels`` for ``single_drop``). Raises ``ValueError`` for an unknown method, missing data,
  or a ``num_remove`` that would empty a stage."""
  if method not in BLOCK_METHODS or method == "bp":
    raise ValueError(f"unknown block selection {method!r}; choose from "
                     f"{', '.join(m for m in BLOCK_METHODS if m != 'bp')}")
  stages = _stages(network)
  _cap(stages, num_remove)
  removed: list[str] = []
  if method in SCORED:
    if images is None:
      raise ValueError(f"block selection {method!r} scores blocks on data: give images= (and labels=)")
    removed = lowest_blocks(network, block_scores(network, variables, images, labels, rule=method,
                                                  batch_size=batch_size), num_remove)
  elif method == "random":
    rng = np.random.default_rng(seed)
    while len(removed) < num_remove:
      candidates = [b for s in stages for b in s if b not in removed and sum(x not in removed for x in s) > 1]
      removed.append(candidates[rng.integers(len(candidates))])
  else:
    left = [list(s) for s in stages]
    while len(removed) < num_remove:
      # the stage with the most blocks left gives up its last one (ties: the deepest stage)
      si = max(range(len(left)), key=lambda i: (len(left[i]), i))
      removed.append(left[si].pop())
  return {b: jnp.float32(-1.0 if b in removed else 1.0) for s in stages for b in s}
