"""Networks: exact counts, specs, initialisation, name validation, implementation choices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.families.spec import ArchSpec
from tests.helpers import images, perturbed_variables, random_masks


def test_resnet_v2_56_counts_match_original_code():
  model = bp.create_model("resnet_v2_56", num_classes=10)
  c = bp.count_params_macs(model)
  assert c["params"] == 590_426
  assert (c["conv_params"], c["bn_params"], c["fc_params"]) == (579_760, 8_096, 2_570)
  assert c["macs"] == 87_214_592
  assert c["blocks"] == 18
  variables = model.init(jax.random.key(0), images(jax.random.key(1), 1), train=False)
  assert bp.count_leaves(variables["params"]) == 590_426


def test_resnet_v1_56_is_the_standard_cifar_resnet():
  c = bp.count_params_macs(bp.create_model("resnet_v1_56"))
  assert 0.84e6 < c["params"] < 0.86e6
  assert 125e6 <= c["macs"] <= 127e6
  assert c["blocks"] == 27


@pytest.mark.parametrize("name", ["resnet_v2_20", "resnet_v1_bottleneck_29", "resnet_v1_20", "resnet_v1_32"])
def test_counter_equals_parameter_leaves(name):
  model = bp.create_model(name, num_classes=7)
  variables = model.init(jax.random.key(0), images(jax.random.key(1), 1), train=False)
  assert bp.count_leaves(variables["params"]) == bp.count_params_macs(model)["params"]
  table_names = {l.name for l in bp.layer_table(model.spec)}
  assert set(variables["params"]) == table_names
  out = model.apply(variables, images(jax.random.key(2), 3), train=False)
  assert out.shape == (3, 7) and out.dtype == jnp.float32


def test_bad_names_are_named_in_the_error():
  with pytest.raises(ValueError, match=r"57.*9n\+2"):
    bp.create_model("resnet_v2_57")
  with pytest.raises(ValueError, match=r"21.*6n\+2"):
    bp.create_model("resnet_v1_21")
  with pytest.raises(ValueError, match="resnet_v2, resnet_v1_bottleneck, resnet_v1"):
    bp.create_model("vgg_16")


def test_spec_round_trips_through_json():
  model = bp.create_model("resnet_v1_bottleneck_20")
  spec = model.spec
  assert ArchSpec.from_json(spec.to_json()) == spec
  assert hash(spec) == hash(ArchSpec.from_json(spec.to_json()))


def test_family_init_is_compiled_and_equals_the_op_by_op_init_and_lists_make_a_hashable_spec():
  # FamilyNetwork.init runs module.init as one jitted program with the module static; a spec
  # built by hand with lists is turned into tuples, so it is hashable and equal to the tuple one
  net = bp.FamilyNetwork.create("resnet_v1_8", 10, image_size=8)
  spec = net.spec
  listy = dataclasses.replace(spec, stages=[dataclasses.replace(st, blocks=[
      dataclasses.replace(b, widths=list(b.widths)) for b in st.blocks]) for st in spec.stages])
  assert listy == spec and hash(listy) == hash(spec)
  by_hand = bp.FamilyNetwork(listy, image_size=8)
  hash(by_hand.module())
  compiled = by_hand.init(jax.random.key(0))
  eager = net.module().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  assert jax.tree.structure(compiled) == jax.tree.structure(dict(eager))
  for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(dict(eager))):
    np.testing.assert_array_equal(a, b)


def test_original_init():
  model = bp.create_model("resnet_v2_56", init_style="original")
  v = model.init(jax.random.key(0), images(jax.random.key(1), 1), train=False)["params"]
  np.testing.assert_allclose(v["stage0_block0_bn1"]["scale"], 0.5)
  np.testing.assert_allclose(v["stage0_block0_bn1"]["bias"], 0.0)
  k = np.asarray(v["stage2_block3_conv2"]["kernel"])  # 3x3, 64 -> 64: std sqrt(2/(9*64))
  assert abs(k.std() - np.sqrt(2 / (9 * 64))) < 0.1 * np.sqrt(2 / (9 * 64))
  flax_default = bp.create_model("resnet_v2_56").init(jax.random.key(0), images(jax.random.key(1), 1), train=False)
  np.testing.assert_allclose(flax_default["params"]["stage0_block0_bn1"]["scale"], 1.0)


@pytest.mark.parametrize("name", ["resnet_v2_20", "resnet_v1_20"])
def test_einsum_1x1_equals_nn_conv(name):
  fast = bp.create_model(name, conv1x1="einsum")
  ref = bp.create_model(name, conv1x1="conv")
  x = images(jax.random.key(1))
  v = ref.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(v) == jax.tree.structure(fast.init(jax.random.key(0), x, train=False))
  np.testing.assert_allclose(fast.apply(v, x, train=False), ref.apply(v, x, train=False), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = bp.create_model("resnet_v2_20", dtype=jnp.bfloat16)
  x = images(jax.random.key(1))
  v = model.init(jax.random.key(0), x, train=False)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v))
  out = model.apply(v, x, train=False)
  ref = bp.create_model("resnet_v2_20").apply(v, x, train=False)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=0.1, atol=0.1)


def test_jit_and_plain_agree():
  model = bp.create_model("resnet_v1_bottleneck_20")
  x = images(jax.random.key(1))
  v = model.init(jax.random.key(0), x, train=False)
  masks = bp.init_masks(model)
  plain = model.apply(v, x, train=False, masks=masks)
  jitted = jax.jit(lambda v, x, m: model.apply(v, x, train=False, masks=m))(v, x, masks)
  np.testing.assert_allclose(plain, jitted, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain, model.apply(v, x, train=False), rtol=1e-5, atol=1e-6)


def test_masks_of_python_floats_lists_and_numpy_equal_array_masks():
  """Masks as a user writes them by hand (``masks["blocks"][b] = -1.0``, a list or NumPy channel
  mask) give the same network as jnp arrays, in eval and train mode; materialize already took them."""
  model = bp.create_model("resnet_v1_8")
  variables = perturbed_variables(model, jax.random.key(0))
  x = images(jax.random.key(1))
  masks = random_masks(model, 0)
  by_hand = {"blocks": {b: float(v) for b, v in masks["blocks"].items()},
             "channels": {g: (np.asarray(m).tolist() if i % 2 else np.asarray(m)) for i, (g, m) in
                          enumerate(masks["channels"].items())}}
  for train in (False, True):
    ref = model.apply(variables, x, train=train, masks=masks, mutable=["batch_stats"] if train else False)
    out = model.apply(variables, x, train=train, masks=by_hand, mutable=["batch_stats"] if train else False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out, ref)


@pytest.mark.parametrize("relu", [False, True])
def test_fused_batchnorm_matches_flax(relu):
  from bpcp_jax.families.layers import BatchNorm
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) * 3 + 1
  ours, ref = BatchNorm(use_running_average=False, relu=relu), nn.BatchNorm(use_running_average=False, momentum=0.9,
                                                                             epsilon=1e-5)
  v = ref.init(jax.random.key(1), x)
  v = {"params": {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1, 1, 6)}, "batch_stats": v["batch_stats"]}
  cot = jax.random.normal(jax.random.key(2), x.shape)

  def loss(mod, post):
    def f(params, x):
      y, upd = mod.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
      return jnp.sum(post(y) * cot), upd
    return f

  (l1, u1), g1 = jax.value_and_grad(loss(ours, lambda y: y), argnums=(0, 1), has_aux=True)(v["params"], x)
  post = nn.relu if relu else (lambda y: y)
  (l2, u2), g2 = jax.value_and_grad(loss(ref, post), argnums=(0, 1), has_aux=True)(v["params"], x)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((g1, u1)), jax.tree.leaves((g2, u2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  eval_ours = ours.clone(use_running_average=True).apply({"params": v["params"], **u1}, x)
  eval_ref = post(ref.clone(use_running_average=True).apply({"params": v["params"], **u2}, x))
  np.testing.assert_allclose(eval_ours, eval_ref, rtol=1e-5, atol=1e-5)


def test_fused_batchnorm_across_devices_matches_one_batch():
  from bpcp_jax.families.layers import BatchNorm

  n = jax.local_device_count()
  x = jax.random.normal(jax.random.key(0), (4 * n, 3, 3, 5))
  cot = jax.random.normal(jax.random.key(1), x.shape)
  params = {"scale": jnp.linspace(0.5, 1.5, 5), "bias": jnp.linspace(-1, 1, 5)}
  stats = {"mean": jnp.zeros(5), "var": jnp.ones(5)}

  def grads(mod, params, x, cot, axis=None):
    def f(p, x):
      y, _ = mod.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      return jnp.sum(y * cot)
    g = jax.grad(f, argnums=(0, 1))(params, x)
    return g if axis is None else (jax.lax.psum(g[0], axis), g[1])

  one = grads(BatchNorm(use_running_average=False, relu=True), params, x, cot)
  mapped = jax.pmap(lambda p, x, c: grads(BatchNorm(use_running_average=False, relu=True, axis_name="i"), p, x, c, "i"),
                    axis_name="i", in_axes=(None, 0, 0))(params, x.reshape(n, 4, 3, 3, 5), cot.reshape(n, 4, 3, 3, 5))
  np.testing.assert_allclose(mapped[1].reshape(x.shape), one[1], rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(mapped[0]), jax.tree.leaves(one[0])):
    np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5)
