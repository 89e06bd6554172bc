"""The one engine: both providers of ``PrunableNetwork`` behave alike, in the steps and in pruning.

The traced provider on a family network gives the family's groups, counts, masks and logits;
the steps run unchanged on a user network (dense, search, masked); distillation, block
controls and user weights (``init_from``) do what they say.
"""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpcp_jax as bp
from bpcp_jax.families.structure import declared_members
from bpcp_jax.training import steps
from bpcp_jax.training.optim import make_optimizer
from bpcp_jax.training.weights import WeightsError, load_weights
from tests.conftest import REPO_ROOT
from tests.helpers import perturbed_variables, random_masks

USER_MODELS = os.path.join(REPO_ROOT, "tests", "user_models.py")


def _family_pair(name="resnet_v2_11", seed=0):
  family = bp.FamilyNetwork.create(name, 10)
  model = family.module()
  variables = perturbed_variables(model, jax.random.PRNGKey(seed))
  traced = bp.FlaxNetwork(model, (32, 32, 3))
  return family, traced, model, variables


@pytest.mark.parametrize("name", ["resnet_v2_11", "resnet_v1_14"])
def test_traced_provider_on_a_family_equals_the_declared_one(name):
  family, traced, model, variables = _family_pair(name)
  # the same groups (matched by their member axes), blocks and counts
  by_members = {frozenset(m): g for g, m in declared_members(model.spec).items()}
  to_declared = {n: by_members[frozenset(g.members)] for n, g in traced.traced.groups.items()}
  assert sorted(to_declared.values()) == sorted(family.group_widths)
  assert {to_declared[n]: w for n, w in traced.group_widths.items()} == family.group_widths
  assert sorted(traced.block_names) == sorted(family.block_names)
  assert traced.counts() == family.counts()
  # the same random masks, expressed in each provider's names: same logits masked and materialized
  masks = random_masks(model, seed=3)
  tmasks = {"blocks": masks["blocks"], "channels": {n: masks["channels"][d] for n, d in to_declared.items()}}
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  def evaluate(net, v, m=None):  # jitted: one compilation, not one per op and shape
    return jax.jit(lambda v, m: net.apply(v, x, train=False, masks=m))(v, m)

  a, b = evaluate(family, variables, masks), evaluate(traced, variables, tmasks)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  small_f, vars_f = family.materialize(variables, masks)
  small_t, vars_t = traced.materialize(variables, tmasks)
  out_f = evaluate(small_f, vars_f)
  np.testing.assert_allclose(out_f, evaluate(small_t, vars_t), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out_f, a, atol=1e-5, rtol=1e-5)
  assert small_t.counts() == small_f.counts()


def _user(factory="make_resnet"):
  return bp.FlaxNetwork.from_factory(f"{USER_MODELS}:{factory}", 10, (32, 32, 3))


@pytest.mark.parametrize("mode", ["dense", "search", "masked"])
def test_train_step_runs_on_a_user_network_under_pmap(mode):
  from bpcp_jax.training import parallel

  net = _user()
  variables = net.init(jax.random.PRNGKey(0))
  tx = make_optimizer(0.05)
  masks = net.init_masks()
  channels = None
  if mode == "masked":
    channels = {g: jnp.asarray((np.arange(w) % 2 == 0).astype(np.float32)) for g, w in net.group_widths.items()}
  state = steps.create_train_state(variables, tx, jax.random.PRNGKey(1),
                                   gates=masks["blocks"] if mode != "dense" else None, channel_masks=channels)
  p_step = parallel.parallel_train_step(net, tx, mode=mode, gamma=0.1)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 10, 8)}
  state_r = parallel.replicate(state)
  for _ in range(2):
    state_r, metrics = p_step(state_r, parallel.shard_batch(batch))
  host = parallel.unreplicate(state_r)
  assert np.isfinite(np.asarray(metrics["loss"])).all()
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), host.params,
                       jax.device_get(variables["params"]))
  assert max(jax.tree.leaves(moved)) > 0
  # running statistics were updated, and are the same on every device
  stats = jax.tree.leaves(jax.device_get(state_r.batch_stats))
  assert all(np.array_equal(s[0], s[k]) for s in stats for k in range(1, s.shape[0]))
  if mode == "search":
    assert set(host.gates) == set(net.block_names)
    assert any(float(v) != 0.0 for v in host.gates.values())  # the logits were trained


def test_masked_train_mode_draws_dropout_from_the_steps_key():
  """The VGG has dropout: masked train mode draws from the key given (raw, as the steps carry it),
  and refuses to run without one rather than repeating one mask every step."""
  net = _user("make_vgg")
  variables = net.init(jax.random.PRNGKey(0))
  masks = net.init_masks()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  run = jax.jit(lambda key: net.apply(variables, x, train=True, masks=masks, rng=key)[0])
  a, b, c = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
  assert np.array_equal(a, b) and float(jnp.abs(a - c).max()) > 1e-4
  plain = net.apply(variables, x, train=True, rng=jax.random.PRNGKey(1))[0]  # the module's own dropout
  np.testing.assert_allclose(a, plain, atol=1e-5)
  with pytest.raises(ValueError, match="draws random numbers"):
    net.apply(variables, x, train=True, masks=masks)


def test_distillation_from_an_identical_teacher_adds_no_loss():
  net = _user("make_vgg")
  variables = net.init(jax.random.PRNGKey(0))
  tx = optax.sgd(0.0)
  state = steps.create_train_state(variables, make_optimizer(0.0), jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 10, 4)}
  kw = dict(network=net, tx=make_optimizer(0.0), augment=False)
  del tx
  _, plain = steps.train_step(state, batch, **kw)
  # eval-mode teacher on the same weights: train-mode BN and dropout make the student differ a little
  _, distilled = steps.train_step(state, batch, variables, distill=steps.Distillation(net, 4.0, 1.0), **kw)
  assert np.isfinite(float(distilled["loss"]))
  assert float(distilled["ce"]) == pytest.approx(float(plain["ce"]), rel=1e-6)
  # the KL term alone: zero for equal logits, positive otherwise, T^2-scaled
  logits = jax.random.normal(jax.random.PRNGKey(2), (5, 10))
  assert float(steps.distillation_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
  other = logits + jax.random.normal(jax.random.PRNGKey(3), (5, 10))
  p, q = jax.nn.softmax(other / 2.0), jax.nn.softmax(logits / 2.0)
  want = 4.0 * float(jnp.mean(jnp.sum(p * (jnp.log(p) - jnp.log(q)), -1)))
  assert float(steps.distillation_loss(logits, other, 2.0)) == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match="teacher_variables"):
    steps.train_step(state, batch, distill=steps.Distillation(net, 4.0, 1.0), **kw)


@pytest.mark.parametrize("method", ["random", "last"])
def test_block_controls_never_empty_a_stage(method):
  family = bp.FamilyNetwork.create("resnet_v2_29", 10)  # 3 blocks per stage
  for n in range(0, 7):
    for seed in range(4 if method == "random" else 1):
      logits = bp.select_blocks(family, None, method, n, seed=seed)
      removed = [b for b, v in logits.items() if float(v) < 0]
      assert len(removed) == n
      for stage in family.block_stages():
        assert any(float(logits[b]) >= 0 for b in stage)
  assert [b for b, v in bp.select_blocks(family, None, "last", 3).items() if float(v) < 0] == [
      "stage0_block2", "stage1_block2", "stage2_block2"]
  assert bp.select_blocks(family, None, "random", 4, seed=1) == bp.select_blocks(family, None, "random", 4, seed=1)
  with pytest.raises(ValueError, match="at most 6"):
    bp.select_blocks(family, None, "random", 7)


def test_user_weights_load_from_msgpack_and_orbax_and_mismatches_are_named(tmp_path):
  net = _user("make_vgg")
  variables = jax.device_get(net.init(jax.random.PRNGKey(0)))
  trained = jax.tree.map(lambda a: np.asarray(a) + 1.0, variables)
  path = tmp_path / "vgg.msgpack"
  path.write_bytes(flax.serialization.to_bytes(trained))
  loaded = load_weights(str(path), variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, trained)
  params_only = tmp_path / "params.msgpack"  # the params alone: BN statistics stay as given
  params_only.write_bytes(flax.serialization.to_bytes(trained["params"]))
  loaded = load_weights(str(params_only), variables)
  jax.tree.map(np.testing.assert_array_equal, loaded["params"], trained["params"])
  jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], variables["batch_stats"])
  import orbax.checkpoint as ocp

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(tmp_path / "orbax"), trained)
  ckpt.wait_until_finished()
  loaded = load_weights(str(tmp_path / "orbax"), variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, trained)
  # errors name the file and the variable with both shapes
  other = _user("make_resnet").init(jax.random.PRNGKey(0))
  with pytest.raises(WeightsError, match=r"vgg\.msgpack.*no variable"):
    load_weights(str(path), jax.device_get(other))
  wide = jax.tree.map(np.asarray, variables)
  wide["params"]["Conv_0"]["kernel"] = np.zeros((3, 3, 3, 9), np.float32)
  with pytest.raises(WeightsError, match=r"Conv_0.*kernel.*\(3, 3, 3, 8\).*\(3, 3, 3, 9\)"):
    load_weights(str(path), wide)
  with pytest.raises(WeightsError, match="no such file"):
    load_weights(str(tmp_path / "missing.msgpack"), variables)
  (tmp_path / "junk.bin").write_bytes(b"not msgpack at all \x00\x01")
  with pytest.raises(WeightsError, match="junk.bin"):
    load_weights(str(tmp_path / "junk.bin"), variables)


def test_factory_errors_name_the_file(tmp_path):
  from bpcp_jax.tracer.provider import ModelSourceError

  with pytest.raises(ModelSourceError, match="not found.*nope.py"):
    bp.FlaxNetwork.from_factory("nope.py:make", 10, (32, 32, 3))
  with pytest.raises(ModelSourceError, match="defines no function 'missing'"):
    bp.FlaxNetwork.from_factory(f"{USER_MODELS}:missing", 10, (32, 32, 3))
  bad = tmp_path / "bad.py"
  bad.write_text("import flax.linen as nn\ndef make(num_classes):\n  raise RuntimeError('boom')\n"
                 "def notmodule():\n  return 3\n")
  with pytest.raises(ModelSourceError, match="bad.py:make failed: RuntimeError: boom"):
    bp.FlaxNetwork.from_factory(f"{bad}:make", 10, (32, 32, 3))
  with pytest.raises(ModelSourceError, match="returned int, not a flax.linen Module"):
    bp.FlaxNetwork.from_factory(f"{bad}:notmodule", 10, (32, 32, 3))
  broken = tmp_path / "broken.py"
  broken.write_text("this is not python\n")
  with pytest.raises(ModelSourceError, match="could not import model file .*broken.py"):
    bp.FlaxNetwork.from_factory(f"{broken}:make", 10, (32, 32, 3))


def test_description_rebuilds_a_pruned_user_network():
  net = _user()
  variables = net.init(jax.random.PRNGKey(0))
  masks = net.init_masks()
  names = net.block_names
  masks["blocks"][names[1]] = jnp.float32(-1.0)
  g = sorted(net.group_widths)[0]
  m = np.ones(net.group_widths[g], np.float32)
  m[::2] = 0
  masks["channels"][g] = jnp.asarray(m)
  small, small_vars = net.materialize(variables, masks)
  again = bp.network_from_description(small.describe())
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  np.testing.assert_allclose(again.apply(small_vars, x, train=False), small.apply(small_vars, x, train=False),
                             atol=1e-6)
  assert again.counts() == small.counts()
  assert len(again.block_names) == len(names) - 1
