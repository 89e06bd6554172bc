"""The training and evaluation steps lower for GPU and TPU on this CPU (``jax.export``, platforms cuda and tpu).

Nothing CPU-only may slip into a step: a host callback (``jax.pure_callback``, ``io_callback``,
``jax.debug.print``) has no lowering for several platforms at once, and a custom call that is not one
of XLA's stable targets (a CPU-only kernel, say) is refused by ``jax.export``; either fails these
tests (the last test shows it with a callback and a foreign custom call planted in the step).

Each step is lowered in two forms, both with the static arguments ``bpcp_jax.training.parallel``
binds (``train_step_fn`` / ``eval_step_fn``) and the old state donated:
- ``jit``: one device, ``jax.jit``, no mapped axis (BN statistics local);
- ``pmap``: the form the training loop runs, the ``axis_name`` path (per-device batch; gradients,
  metrics and BN statistics averaged over the axis; a gate sample per device), written as
  ``jax.jit(jax.shard_map(..., check_vma=False))`` over a mesh of the 4 fake CPU devices. That is how
  jax (0.10) implements ``jax.pmap`` itself; ``jax.export`` takes only ``jax.jit`` functions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bpcp_jax as bp
from bpcp_jax.training import optim, parallel, steps

PLATFORMS = ("cuda", "tpu")
MODEL = "resnet_v2_11"  # one bottleneck block per stage: every layer kind, small programs
DEVICES = 4  # conftest's fake CPU devices
PER_DEVICE = 4


def _model(form, dtype=jnp.float32):
  return bp.create_model(MODEL, dtype=dtype, bn_axis_name=parallel.AXIS if form == "pmap" else None)


def _state(model, tx, masks: str):
  """The state's shapes and dtypes (``jax.eval_shape``: nothing is computed)."""

  def make():
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    m = bp.init_masks(model)
    return steps.create_train_state(variables, tx, jax.random.PRNGKey(1),
                                    gates=m["blocks"] if masks != "none" else None,
                                    channel_masks=m["channels"] if masks == "channels" else None)

  return jax.eval_shape(make)


def _batch(form, eval_batch=False):
  b = PER_DEVICE * (DEVICES if form == "pmap" else 1)
  batch = {"image": jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.uint8), "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
  if eval_batch:
    batch["weight"] = jax.ShapeDtypeStruct((b,), jnp.float32)
  return batch


def _export(fn, state, batch, form, donate=()):
  if form == "pmap":
    if not hasattr(jax, "shard_map"):
      pytest.skip(f"jax {jax.__version__} has no jax.shard_map")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), (parallel.AXIS,))
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(), check_vma=False)
  exported = jax.export.export(jax.jit(fn, donate_argnums=donate), platforms=PLATFORMS)(state, batch)
  assert exported.platforms == PLATFORMS
  text = exported.mlir_module()
  if form == "pmap":  # the axis path is in the program: cross-device means, one program per device
    assert exported.nr_devices == DEVICES
    assert "stablehlo.all_reduce" in text
  return exported, text


def _train_fn(model, tx, mode, form):
  network = model if isinstance(model, bp.PrunableNetwork) else bp.FamilyNetwork.of(model)
  return parallel.train_step_fn(network, tx, mode=mode, gamma=0.05, axis_name=parallel.AXIS if form == "pmap" else None)


@pytest.mark.parametrize("form", ["jit", "pmap"])
@pytest.mark.parametrize("mode", steps.MODES)
def test_train_step_lowers_for_gpu_and_tpu(mode, form):
  model, tx = _model(form), optim.make_optimizer(0.1)
  state = _state(model, tx, {"dense": "none", "search": "gates", "masked": "channels"}[mode])
  exported, _ = _export(_train_fn(model, tx, mode, form), state, _batch(form), form, parallel.DONATE)
  new_state, metrics = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  assert sorted(metrics) == ["accuracy", "ce", "loss"]
  same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), state, new_state)
  assert all(jax.tree.leaves(same))  # the new state has the old one's types: donation reuses its buffers


@pytest.mark.parametrize("mode", ["search", "masked"])
def test_user_network_train_step_lowers_for_gpu_and_tpu(mode):
  """A traced Flax network's masked/gated step (the tracer's interpreter inside the step) lowers too."""
  import os

  from tests.conftest import REPO_ROOT

  network = bp.FlaxNetwork.from_factory(os.path.join(REPO_ROOT, "tests", "user_models.py") + ":make_resnet", 10,
                                        (32, 32, 3))
  tx = optim.make_optimizer(0.1)

  def make():
    m = network.init_masks()
    return steps.create_train_state(network.init(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1),
                                    gates=m["blocks"], channel_masks=m["channels"] if mode == "masked" else None)

  exported, _ = _export(_train_fn(network, tx, mode, "pmap"), jax.eval_shape(make), _batch("pmap"), "pmap",
                        parallel.DONATE)
  assert exported.nr_devices == DEVICES


def test_bfloat16_search_step_lowers_for_gpu_and_tpu():
  model, tx = _model("pmap", jnp.bfloat16), optim.make_optimizer(0.1)
  _, text = _export(_train_fn(model, tx, "search", "pmap"), _state(model, tx, "gates"), _batch("pmap"), "pmap",
                    parallel.DONATE)
  assert "bf16" in text


@pytest.mark.parametrize("form", ["jit", "pmap"])
@pytest.mark.parametrize("masks", ["none", "gates", "channels"])
def test_eval_step_lowers_for_gpu_and_tpu(masks, form):
  model = _model(form)
  state = _state(model, optim.make_optimizer(0.1), masks)
  fn = parallel.eval_step_fn(bp.FamilyNetwork.of(model), axis_name=parallel.AXIS if form == "pmap" else None)
  exported, text = _export(fn, state, _batch(form, eval_batch=True), form)
  sums = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  assert sorted(sums) == ["correct", "count", "loss"] and all(a.shape == () for a in sums.values())
  if form == "pmap":
    assert "stablehlo.all_reduce" in text  # psum of the sums


@pytest.mark.parametrize("plant", ["host_callback", "cpu_custom_call"])
def test_a_cpu_only_op_in_a_step_fails_the_export(plant, monkeypatch):
  """The guard guards: a host callback or a custom call XLA does not promise to keep, planted in the
  train step (on the augmented images, outside the differentiated part), makes the export fail."""
  augment = steps.augment_batch

  def planted(key, images, positions):
    x = augment(key, images, positions)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    if plant == "host_callback":
      return jax.pure_callback(np.asarray, out, x)
    return jax.ffi.ffi_call("bpcp_cpu_only_kernel", out)(x)

  monkeypatch.setattr(steps, "augment_batch", planted)
  model, tx = _model("jit"), optim.make_optimizer(0.1)
  with pytest.raises((NotImplementedError, ValueError),
                     match="multi-platform lowering for python_callback|custom calls whose targets"):
    _export(_train_fn(model, tx, "dense", "jit"), _state(model, tx, "none"), _batch("jit"), "jit", parallel.DONATE)
