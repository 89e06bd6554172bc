"""BP: straight-through gradient, penalty, decisions, and the gates moving under optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpcp_jax as bp
from bpcp_jax.pruning.block_search import gate_penalty, sample_gates, straight_through
from bpcp_jax.training.optim import make_optimizer
from tests.helpers import images, perturbed_variables


def _loss_of_gates(model, variables, x, y, gamma):
  def loss(gates):
    logits = model.apply(variables, x, train=False, block_gates=gates)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + gate_penalty(gates, gamma)
  return loss


def test_logit_gradient_is_gate_gradient_times_p_one_minus_p():
  model = bp.create_model("resnet_v2_11")
  variables = perturbed_variables(model, jax.random.key(0))
  x, y = images(jax.random.key(1), 8), jnp.arange(8) % 10
  names = model.spec.block_names()
  logits = {n: jnp.asarray(v, jnp.float32) for n, v in zip(names, np.linspace(-2, 2, len(names)))}
  key = jax.random.key(7)
  loss_of_gates = _loss_of_gates(model, variables, x, y, gamma=0.05)

  def loss_of_logits(lg):
    return loss_of_gates(sample_gates(key, lg))

  gates = jax.tree.map(lambda g: jax.lax.stop_gradient(g), sample_gates(key, logits))
  assert set(np.unique(np.asarray(list(gates.values())))) <= {0.0, 1.0}
  dl_dg = jax.jit(jax.grad(loss_of_gates))(gates)
  dl_da = jax.jit(jax.grad(loss_of_logits))(logits)
  for n in logits:
    p = jax.nn.sigmoid(logits[n])
    np.testing.assert_allclose(dl_da[n], dl_dg[n] * p * (1 - p), rtol=1e-5, atol=1e-8)
    assert abs(float(dl_dg[n])) > 0  # the branch is computed even when the gate is 0


def test_straight_through_value_is_the_sample():
  a, s = jnp.asarray([0.3, -0.2]), jnp.asarray([1.0, 0.0])
  np.testing.assert_array_equal(straight_through(a, s), s)
  g = jax.grad(lambda a: jnp.sum(straight_through(a, s) * jnp.asarray([2.0, 3.0])))(a)
  p = jax.nn.sigmoid(a)
  np.testing.assert_allclose(g, jnp.asarray([2.0, 3.0]) * p * (1 - p), rtol=1e-6)


def test_penalty_value_and_sign_gradient():
  gates = {"a": jnp.asarray(1.0), "b": jnp.asarray(0.0), "c": jnp.asarray(1.0)}
  assert float(gate_penalty(gates, 0.5)) == 1.0
  grads = jax.grad(lambda g: gate_penalty(g, 0.5))(gates)
  assert {k: float(v) for k, v in grads.items()} == {"a": 0.5, "b": 0.0, "c": 0.5}


def test_sampling_follows_the_probabilities_and_the_key():
  logits = {f"b{i}": jnp.asarray(v) for i, v in enumerate([-3.0, 0.0, 3.0])}
  draws = np.stack([[float(g) for _, g in sorted(sample_gates(jax.random.key(i), logits).items())]
                    for i in range(400)])
  np.testing.assert_allclose(draws.mean(0), jax.nn.sigmoid(jnp.asarray([-3.0, 0.0, 3.0])), atol=0.07)
  a = sample_gates(jax.random.key(3), logits)
  b = sample_gates(jax.random.key(3), logits)
  assert all(float(a[k]) == float(b[k]) for k in a)


def test_decision_is_logit_at_least_zero():
  assert bp.decide_blocks({"a": jnp.asarray(0.0), "b": jnp.asarray(-1e-6), "c": jnp.asarray(2.0)}) == {
      "a": True, "b": False, "c": True}


def _search(gamma, steps=25):
  """A tiny block search: ResNet-v2-11 on a fixed random batch, weights and gates by optax."""
  model = bp.create_model("resnet_v2_11")
  x, y = images(jax.random.key(1), 16), jnp.arange(16) % 10
  variables = model.init(jax.random.key(0), x, train=False)
  masks = bp.init_masks(model)
  trainable = {"params": variables["params"], "gates": masks["blocks"]}
  tx = make_optimizer(0.05, gate_learning_rate=1.0)
  opt_state = tx.init(trainable)
  stats = variables["batch_stats"]

  @jax.jit
  def step(trainable, opt_state, stats, key):
    def loss_fn(t):
      gates = sample_gates(key, t["gates"])
      logits, upd = model.apply({"params": t["params"], "batch_stats": stats}, x, train=True,
                                block_gates=gates, mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + gate_penalty(gates, gamma), upd["batch_stats"]
    grads, stats = jax.grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, stats

  treedef = jax.tree.structure(trainable)
  for i in range(steps):
    trainable, opt_state, stats = step(trainable, opt_state, stats, jax.random.key(100 + i))
    assert jax.tree.structure(trainable) == treedef  # the mask pytree keeps its structure
  return {k: float(v) for k, v in trainable["gates"].items()}


def test_large_gamma_removes_blocks_and_zero_gamma_does_not():
  heavy = _search(gamma=2.0)
  free = _search(gamma=0.0)
  assert all(v < 0 for v in heavy.values()), heavy
  assert sum(v >= 0 for v in free.values()) >= 2, free
  assert np.mean(list(free.values())) > np.mean(list(heavy.values())) + 0.5


def test_masks_keep_structure_through_jit_and_optax():
  model = bp.create_model("resnet_v1_bottleneck_11")
  masks = bp.init_masks(model)
  treedef = jax.tree.structure(masks)
  assert jax.tree.structure(jax.jit(lambda m: m)(masks)) == treedef
  tx = make_optimizer(0.1)
  trainable = {"params": {}, "gates": masks["blocks"]}
  state = tx.init(trainable)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), state, trainable)
  new = optax.apply_updates(trainable, updates)
  assert jax.tree.structure(new["gates"]) == jax.tree.structure(masks["blocks"])
  assert all(float(v) < 0 for v in new["gates"].values())  # a positive gradient lowers the logits
