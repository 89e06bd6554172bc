"""``make_predictor``: the deployed inference function computes what ``model.apply`` computes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bpcp_jax as bp
from tests.helpers import images, perturbed_variables, random_masks
from tests.nets import TwoInputNet


def test_predictor_matches_apply_dense_and_materialized():
  model = bp.create_model("resnet_v2_11")
  variables = perturbed_variables(model, jax.random.key(0))
  x = images(jax.random.key(1), 3)
  predict = bp.make_predictor(model, variables)
  np.testing.assert_allclose(predict(x), model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
  small, small_vars = bp.materialize(model, variables, random_masks(model, 3))
  np.testing.assert_allclose(bp.make_predictor(small, small_vars)(x), small.apply(small_vars, x, train=False),
                             rtol=1e-5, atol=1e-5)
  assert predict(x[:1]).shape == (1, 10)  # another batch size compiles anew


def test_predictor_holds_a_snapshot_of_the_weights():
  model = bp.create_model("resnet_v1_8")
  variables = perturbed_variables(model, jax.random.key(0))
  x = images(jax.random.key(1), 2)
  predict = bp.make_predictor(model, variables)
  before = np.asarray(predict(x))
  changed = jax.tree.map(lambda a: a * 2.0, variables)
  np.testing.assert_array_equal(predict(x), before)
  assert not np.allclose(bp.make_predictor(model, changed)(x), before)


def test_predictor_of_a_module_without_train_and_of_several_inputs():
  dense = nn.Dense(3)
  v = dense.init(jax.random.key(0), jnp.ones((2, 4)))
  x = jax.random.normal(jax.random.key(1), (2, 4))
  np.testing.assert_allclose(bp.make_predictor(dense, v)(x), dense.apply(v, x), rtol=1e-6)
  net = TwoInputNet()
  image, side = jnp.ones((2, 16, 16, 3)), jnp.ones((2, 1))
  v = net.init(jax.random.key(0), image, side)
  np.testing.assert_allclose(bp.make_predictor(net, v)(image, side), net.apply(v, image, side), rtol=1e-5,
                             atol=1e-6)
