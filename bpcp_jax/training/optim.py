"""Optimizers and learning-rate schedules, all optax.

The trainable pytree is ``{"params": <model params>, "gates": <block logits>}``: the weights
get SGD with momentum and weight decay, the gate logits their own SGD with momentum and no
weight decay (``optax.multi_transform``), updated in the same step. During dense training and
fine-tuning ``gates`` is an empty dict.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import optax

SCHEDULES = ("step", "cosine", "constant")


def lr_schedule(
    base_lr: float,
    total_steps: int,
    kind: str = "step",
    milestones: tuple[float, ...] = (0.5, 0.75),
    factor: float = 0.1,
) -> optax.Schedule:
  """``step``: x``factor`` at each milestone (fractions of the run); ``cosine``; ``constant``."""
  if kind == "step":
    bounds = {max(1, int(round(m * total_steps))): factor for m in milestones}
    return optax.piecewise_constant_schedule(base_lr, bounds)
  if kind == "cosine":
    return optax.cosine_decay_schedule(base_lr, max(1, total_steps))
  if kind == "constant":
    return optax.constant_schedule(base_lr)
  raise ValueError(f"unknown lr schedule {kind!r}; choose from {', '.join(SCHEDULES)}")


def make_optimizer(
    learning_rate: Union[float, optax.Schedule],
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    gate_learning_rate: Optional[Union[float, optax.Schedule]] = None,
    gate_momentum: float = 0.9,
) -> optax.GradientTransformation:
  """SGD for the weights (decay on every model parameter, as the original) and for the gates."""
  gate_lr = learning_rate if gate_learning_rate is None else gate_learning_rate
  # plain floats become constant schedules so the state's structure never depends on the choice
  learning_rate, gate_lr = (optax.constant_schedule(v) if isinstance(v, (int, float)) else v
                            for v in (learning_rate, gate_lr))
  weights = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))
  gates = optax.sgd(gate_lr, momentum=gate_momentum)

  def labels(trainable):
    return {
        "params": jax.tree.map(lambda _: "weights", trainable["params"]),
        "gates": jax.tree.map(lambda _: "gates", trainable["gates"]),
    }

  return optax.multi_transform({"weights": weights, "gates": gates}, labels)
