"""Pure training and evaluation steps, and the state they carry.

``train_step`` covers the three kinds of training the method needs: ``dense`` (plain
training), ``search`` (BP: sampled straight-through gates, gamma penalty, gate logits updated
by optax in the same step) and ``masked`` (fine-tuning under fixed masks). Each step is a pure
function of ``(state, batch)``; ``jax.jit`` / ``jax.pmap`` are applied where the steps are
called (``bpcp_jax.training.parallel``). Inside a mapped axis (``axis_name``) the gradients, loss,
metrics and BN batch statistics are averaged over devices, and every device draws its own gate
sample from the step key folded with its index. Augmentation keys are folded with each
example's global position in the batch, so the images a step sees do not depend on how many
devices share the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from bpcp_jax.training import data
from bpcp_jax.pruning.block_search import gate_penalty, hard_gates, sample_gates

MODES = ("dense", "search", "masked")


@flax.struct.dataclass
class TrainState:
  """Everything a stage needs to continue exactly: weights, stats, optimizer, masks, step, key."""

  step: jax.Array
  params: Any
  batch_stats: Any
  gates: Any  # block logits being searched ({} when not searching)
  channel_masks: Any  # fixed 0/1 vectors per group ({} when none)
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key of the stage

  @property
  def trainable(self):
    return {"params": self.params, "gates": self.gates}

  def masks(self) -> Optional[dict]:
    if not self.gates and not self.channel_masks:
      return None
    return {"blocks": self.gates, "channels": self.channel_masks}


def create_train_state(variables, tx: optax.GradientTransformation, rng, *, gates=None, channel_masks=None,
                       opt_state=None) -> TrainState:
  gates = {} if gates is None else dict(gates)
  trainable = {"params": variables["params"], "gates": gates}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      gates=gates,
      channel_masks={} if channel_masks is None else dict(channel_masks),
      opt_state=tx.init(trainable) if opt_state is None else opt_state,
      rng=jnp.asarray(rng, jnp.uint32),
  )


def _example_positions(local_batch: int, axis_name: Optional[str]):
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
  return offset + jnp.arange(local_batch)


def augment_batch(key, images_uint8, positions):
  """Per-example augmentation keyed by the example's global position in the batch."""
  keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(positions)
  return jax.vmap(lambda k, im: data.augment(k, im[None])[0])(keys, images_uint8)


def bn_scale_l1(params) -> jax.Array:
  """Sum of |scale| over every normalisation layer (a rank-1 ``scale`` leaf): network slimming's
  sparsity term."""
  total = jnp.zeros((), jnp.float32)
  for name, layer in params.items():
    if not isinstance(layer, Mapping):
      continue
    if "scale" in layer and jnp.ndim(layer["scale"]) == 1:
      total = total + jnp.sum(jnp.abs(layer["scale"]))
    else:
      total = total + bn_scale_l1({k: v for k, v in layer.items() if isinstance(v, Mapping)})
  return total


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Knowledge distillation from a teacher network (Hinton et al., 2015): the loss becomes
  ``(1 - weight) * CE + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``."""

  teacher: Any  # a PrunableNetwork, run in eval mode
  temperature: float
  weight: float = 0.5


def distillation_loss(student_logits, teacher_logits, temperature: float) -> jax.Array:
  """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
  t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def train_step(state: TrainState, batch, teacher_variables=None, *, network, tx: optax.GradientTransformation,
               mode: str = "dense", gamma: float = 0.0, bn_l1: float = 0.0, augment: bool = True,
               axis_name: Optional[str] = None, distill: Optional[Distillation] = None, gate_seed: int = 0):
  """One optimisation step. ``batch``: ``{"image": uint8 [B,H,W,C], "label": int [B]}`` (per device).

  ``gate_seed``: the search's own seed for its gate samples (0: the stage key alone, as before it
  existed), so that searches differing only in it draw independent gates from the same data order,
  augmentation and dropout keys.

  ``teacher_variables``: the teacher's variables when ``distill`` is set (an argument, so the
  teacher is neither compiled into the step nor saved in the state's checkpoints).
  """
  if mode not in MODES:
    raise ValueError(f"unknown train mode {mode!r}; choose from {MODES}")
  if (distill is None) != (teacher_variables is None):
    raise ValueError("give both distill and teacher_variables, or neither")
  step_key = jax.random.fold_in(state.rng, state.step)
  images, labels = batch["image"], batch["label"]
  positions = _example_positions(images.shape[0], axis_name)
  x = augment_batch(jax.random.fold_in(step_key, 0), images, positions) if augment else data.normalize(images)
  gate_key = jax.random.fold_in(step_key, 1)
  if gate_seed:
    gate_key = jax.random.fold_in(gate_key, gate_seed)
  dropout_key = jax.random.fold_in(step_key, 2)
  if axis_name is not None:
    gate_key = jax.random.fold_in(gate_key, jax.lax.axis_index(axis_name))
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
  teacher_logits = None
  if distill is not None:
    teacher_logits = jax.lax.stop_gradient(distill.teacher.apply(teacher_variables, x, train=False))

  def loss_fn(trainable):
    masks, gates = None, None
    if mode == "search":
      gates = sample_gates(gate_key, trainable["gates"])
      if state.channel_masks:
        masks = {"blocks": trainable["gates"], "channels": state.channel_masks}
    elif mode == "masked":
      masks = {"blocks": trainable["gates"], "channels": state.channel_masks}
    logits, batch_stats = network.apply(
        {"params": trainable["params"], "batch_stats": state.batch_stats}, x, train=True,
        masks=masks, block_gates=gates, rng=dropout_key, axis_name=axis_name)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss = ce
    if distill is not None:
      loss = (1.0 - distill.weight) * ce + distill.weight * distillation_loss(logits, teacher_logits,
                                                                               distill.temperature)
    if mode == "search":
      loss = loss + gate_penalty(gates, gamma)
    if bn_l1:
      loss = loss + bn_l1 * bn_scale_l1(trainable["params"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (batch_stats, ce, accuracy)

  (loss, (batch_stats, ce, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  if mode != "search":  # the decided gates stay where the search left them
    grads = {**grads, "gates": jax.tree.map(jnp.zeros_like, grads["gates"])}
  metrics = {"loss": loss, "ce": ce, "accuracy": accuracy}
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  new_state = state.replace(step=state.step + 1, params=trainable["params"], gates=trainable["gates"],
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch, *, network, axis_name: Optional[str] = None):
  """Sums over the batch: correct predictions, cross-entropy, examples (``batch["weight"]`` masks padding).

  Under masks the gates are the decisions (keep iff logit >= 0)."""
  masks = state.masks()
  if masks is not None and not masks["channels"]:
    masks = None
  gates = hard_gates(state.gates) if state.gates else None
  logits = network.apply({"params": state.params, "batch_stats": state.batch_stats}, data.normalize(batch["image"]),
                         train=False, masks=masks, block_gates=gates if masks is None else None)
  weight = batch.get("weight", jnp.ones(batch["label"].shape, jnp.float32))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  sums = {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * weight),
          "loss": jnp.sum(ce * weight), "count": jnp.sum(weight)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums
