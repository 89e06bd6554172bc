"""Train and eval mode as the network's authors wrote them, and NNX weights as users save them.

- A train switch of any common name (``train``, ``training``, ``is_training``, ``deterministic``,
  or none: NNX's ``model.train()``) reaches the linen or NNX ``__call__`` (one rule,
  ``provider.train_switch``): the train mode moves the BatchNorm statistics.
- A train mode that computes exactly the eval mode of a network with BatchNorm or dropout is
  refused at trace time, naming the ``__call__`` without a known switch; a network with neither,
  or a known switch that leaves a frozen BatchNorm alone, is not.
- NNX modes carry call keywords (a switch of any name, extra inputs, ``rngs``); a ``__call__(x, *,
  rngs)`` is traced, masked == materialized in eval and train mode with the same key, and through
  ``NnxFlaxNetwork`` each train step's key draws its own dropout mask.
- ``load_weights`` (``init_from``) takes an orbax checkpoint of ``nnx.state(model)``, the msgpack of
  its ``to_pure_dict()`` and the state ``nnx.split`` gives, with the saved model's outputs.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bpcp_jax as bp
from bpcp_jax.tracer.nnx import NnxFlaxNetwork
from bpcp_jax.tracer.provider import mode_kwargs, train_switch
from bpcp_jax.training.weights import WeightsError, load_weights

X = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32) + 1.0


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _moved(updates, variables) -> bool:
  return not np.allclose(updates["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])


class _LinenTraining(nn.Module):
  """efficientnet-jax's spelling: a required ``training`` argument."""

  @nn.compact
  def __call__(self, x, training: bool):
    h = nn.BatchNorm(use_running_average=not training, name="bn")(nn.Dense(4, name="fc")(x))
    return nn.Dense(3, name="head")(nn.relu(h))


class _NnxSwitch(nnx.Module):
  """A BatchNorm whose mode comes from ``__call__``'s switch ``name`` (a ``str`` switch: ``mode="train"``)."""

  def __init__(self, rngs, name="training", frozen=False):
    self.fc, self.bn, self.head = nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)
    self.name, self.frozen = name, frozen

  def run(self, x, train):
    return self.head(nnx.relu(self.bn(self.fc(x), use_running_average=self.frozen or not train)))


class _Training(_NnxSwitch):
  def __call__(self, x, training=False):
    return self.run(x, training)


class _IsTraining(_NnxSwitch):
  def __call__(self, x, is_training=False):
    return self.run(x, is_training)


class _Deterministic(_NnxSwitch):
  def __call__(self, x, deterministic=True):
    return self.run(x, not deterministic)


class _Mode(_NnxSwitch):
  def __call__(self, x, mode="eval"):
    return self.run(x, mode == "train")


class _NoSwitch(nnx.Module):
  """No switch: NNX's ``model.train()`` alone sets the BatchNorm's mode."""

  def __init__(self, rngs):
    self.fc, self.bn = nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.fc(x))


def test_a_train_switch_of_any_common_name_reaches_a_linen_call():
  assert train_switch(_LinenTraining.__call__) == ("training", True)
  assert mode_kwargs(_Deterministic(nnx.Rngs(0)), True) == {"deterministic": False}
  assert mode_kwargs(_IsTraining(nnx.Rngs(0)), False) == {"is_training": False}
  assert mode_kwargs(_Mode(nnx.Rngs(0)), True) == {} and train_switch(_NoSwitch.__call__) is None
  # linen: the required `training` is passed in both modes; the train mode moves the statistics
  net = bp.FlaxNetwork(_LinenTraining(), (5,), label="mobilenet-like")
  variables = net.init(jax.random.key(0))
  _, stats = net.apply(variables, X, train=True, rng=jax.random.key(1))
  assert _moved({"batch_stats": stats}, variables)
  _, masked_stats = net.apply(variables, X, train=True, rng=jax.random.key(1), masks=net.init_masks())
  _close(masked_stats, stats)
  _close(bp.make_predictor(net.module, variables)(X), net.apply(variables, X, train=False))  # deployed: eval


def test_nnx_train_switch_of_any_name_moves_the_batchnorm_statistics():
  """Each spelling's train mode moves the statistics as the module's own train-mode call does."""
  for cls in (_Training, _IsTraining, _Deterministic, _NoSwitch):
    model = cls(nnx.Rngs(0))
    traced, variables = bp.trace_nnx(model, X)
    out, updates = jax.jit(lambda v: bp.masked_apply(traced, v, bp.init_traced_masks(traced), X, mode="train"))(
        variables)
    assert _moved(updates, variables), cls.__name__
    own = nnx.clone(model)
    own.train()
    want = own(X, **{_Training: {"training": True}, _IsTraining: {"is_training": True},
                     _Deterministic: {"deterministic": False}}.get(cls, {}))
    _close(out, want)
    _close(updates["batch_stats"], bp.NnxNetwork.of(own).variables()["batch_stats"])


def test_a_train_mode_equal_to_eval_is_refused_naming_the_call_without_a_switch():
  with pytest.raises(ValueError, match=r"^_Mode: its train mode computes exactly its eval mode although it has "
                     r"BatchNorm .*found no train switch \(train, training, is_training, deterministic\) in "
                     r"_Mode.__call__\(x, mode='eval'\).*modes=.*'mode'"):
    bp.trace_nnx(_Mode(nnx.Rngs(0)), X)
  # the switch given as a call keyword of the mode: traced, the statistics move
  traced, variables = bp.trace_nnx(_Mode(nnx.Rngs(0)), X, modes={
      "eval": {}, "train": {"mode": "train", "mutable": ["batch_stats"]}})
  assert _moved(bp.masked_apply(traced, variables, bp.init_traced_masks(traced), X, mode="train")[1], variables)

  class LinenMode(nn.Module):
    @nn.compact
    def __call__(self, x, mode: str = "eval"):
      return nn.Dense(3)(nn.Dropout(0.5, deterministic=mode != "train")(nn.Dense(4)(x)))

  with pytest.raises(ValueError, match=r"^lin: .* although it has dropout .*"
                     r"LinenMode.__call__\(x, mode: str = 'eval'\)"):
    bp.FlaxNetwork(LinenMode(), (5,), label="lin").traced
  # neither BatchNorm nor dropout: train == eval is right; a known switch with a frozen BatchNorm: chosen
  assert bp.FlaxNetwork(nn.Dense(3), (5,)).block_names == []
  bp.trace_nnx(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), X)
  bp.trace_nnx(_Training(nnx.Rngs(0), frozen=True), X)


class _CallRngs(nnx.Module):
  """The NNX style in which ``__call__`` requires its random streams: dropout on the input."""

  def __init__(self, rngs):
    self.drop = nnx.Dropout(0.5)
    self.fc, self.bn, self.head = nnx.Linear(5, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, *, rngs, scale=1.0):
    return self.head(nnx.relu(self.bn(self.fc(self.drop(x, rngs=rngs))))) * scale


def test_nnx_call_requiring_rngs_is_traced_materialized_and_draws_per_step_keys():
  model = _CallRngs(nnx.Rngs(0))
  traced, variables = bp.trace_nnx(model, X)
  masks = bp.init_traced_masks(traced)
  (group,) = [g for g in traced.groups if g.startswith("fc")]
  masks["channels"][group] = np.array([1, 0, 1, 1, 0, 1, 1, 0], np.float32)
  small, _ = bp.materialize_nnx(traced, variables, masks, X)
  assert small.fc.out_features == 5
  masked = jax.jit(lambda v, k, mode: bp.masked_apply(traced, v, masks, X, mode=mode, rngs={"dropout": k}),
                   static_argnames="mode")
  key = jax.random.key(7)
  small.eval()
  _close(small(X, rngs=nnx.Rngs(0)), bp.masked_apply(traced, variables, masks, X))
  small.train()
  out, updates = masked(variables, key, "train")
  _close(small(X, rngs=nnx.Rngs(key)), out)
  _close(bp.NnxNetwork.of(small).variables()["batch_stats"]["bn"], {
      k: np.asarray(v)[np.flatnonzero(masks["channels"][group])] for k, v in updates["batch_stats"]["bn"].items()})
  assert float(jnp.max(jnp.abs(masked(variables, jax.random.key(8), "train")[0] - out))) > 1e-3
  # extra call keywords and an nnx.Rngs in a mode are forwarded
  scaled, _ = bp.trace_nnx(model, X, modes={"eval": {"scale": 2.0, "rngs": nnx.Rngs(0)}})
  _close(bp.masked_apply(scaled, variables, bp.init_traced_masks(scaled), X, rngs={"default": key}),
         2.0 * bp.masked_apply(traced, variables, bp.init_traced_masks(traced), X))

  # through the pipeline's network: the train step's key reaches __call__ as nnx.Rngs, eval gets a fixed one
  net = NnxFlaxNetwork(bp.NnxNetwork.of(model), (5,), label="call-rngs")
  step = jax.jit(lambda v, k, m: net.apply(v, X, train=True, rng=k, masks=m))
  a, stats = step(variables, jax.random.key(1), None)
  b, _ = step(variables, jax.random.key(2), None)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3 and _moved({"batch_stats": stats}, variables)
  _close(step(variables, jax.random.key(1), net.init_masks()), (a, stats))
  _close(net.apply(variables, X, train=False), net.apply(variables, X, train=False, masks=net.init_masks()))


class _Saved(nnx.Module):
  def __init__(self, rngs):
    self.fc, self.bn = nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
    self.drop, self.head = nnx.Dropout(0.5, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.fc(x)))
    for b in self.blocks:
      h = h + b(h)
    return self.head(self.drop(h))


def test_init_from_takes_nnx_weights_as_users_save_them(tmp_path):
  import orbax.checkpoint as ocp

  model = _Saved(nnx.Rngs(0))
  model.train()
  model(X)  # moved statistics, so that loading them is seen
  model.eval()
  like = bp.NnxNetwork.of(_Saved(nnx.Rngs(1))).variables()  # what the pipeline initialises
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(tmp_path / "state"), nnx.state(model))
  _, split_state = nnx.split(model)
  ckpt.save(str(tmp_path / "split"), split_state)
  ckpt.save(str(tmp_path / "params"), nnx.split(model, nnx.Param, ...)[1])
  ckpt.wait_until_finished()
  (tmp_path / "pure.msgpack").write_bytes(flax.serialization.to_bytes(
      nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))))
  (tmp_path / "params.msgpack").write_bytes(flax.serialization.msgpack_serialize(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  want = model(X)
  view = bp.NnxNetwork.of(model)
  for name in ("state", "split", "pure.msgpack"):
    loaded = load_weights(str(tmp_path / name), like)
    _close(loaded, view.variables())
    _close(view.apply(loaded, X), want)
  for name in ("params", "params.msgpack"):  # the parameters alone: the statistics stay as initialised
    loaded = load_weights(str(tmp_path / name), like)
    _close(loaded["params"], view.variables()["params"])
    _close(loaded["batch_stats"], like["batch_stats"])
  # a file of another network: refused naming the variable and both shapes
  other = bp.NnxNetwork.of(nnx.Linear(5, 3, rngs=nnx.Rngs(0))).variables()
  other = {"params": {"fc": other["params"]}}
  with pytest.raises(WeightsError, match=r"pure\.msgpack: variable params\['fc'\]\['bias'\] has shape \(4,\), "
                     r"the network's has shape \(3,\)"):
    load_weights(str(tmp_path / "pure.msgpack"), other)
  with pytest.raises(WeightsError, match=r"state has variable bn/mean.* that the network does not have"):
    load_weights(str(tmp_path / "state"), {"params": like["params"]})
