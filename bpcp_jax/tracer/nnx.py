"""Flax NNX networks: traced, pruned and materialized into a smaller NNX module of the user's classes.

``NnxNetwork(model)`` gives the tracer what it uses of a ``flax.linen`` module:
``apply(variables, *inputs, train=False, mutable=False, **call_kwargs)`` over ``nnx.split``/``nnx.merge``,
the variables being a nested dict ``{"params": ..., "batch_stats": ...}`` of the module's
``nnx.Param`` and ``nnx.BatchStat`` arrays (other state, such as dropout RNG streams, is held as
it was when the adapter was made). Eval mode runs ``model.eval()``, train mode ``model.train()``
(and passes the call's train switch of any common name, ``provider.train_switch``) and returns the
updated statistics under ``mutable=["batch_stats"]``; other keywords (``rngs``, extra inputs) go to
``__call__``. Every module call runs in a
``jax.named_scope`` of its attribute path, so the traced program says where each op runs.

``trace_nnx(model, *inputs)`` traces it in eval and train mode; masks, ``masked_apply``,
``count_traced`` and ``select_pruning`` then work unchanged on the variables dict.
``materialize_nnx`` slices the variables as ``materialize_traced`` does and writes them into a copy
of the module: each layer's shape attributes follow (``nnx.Linear``/``nnx.LinearGeneral``
``in_features``/``out_features``; ``nnx.Conv`` also ``feature_group_count`` and
``kernel_shape``; the norms' ``num_features``; ``nnx.GroupNorm``'s ``num_groups`` and ``group_size``
as the pruned program splits the channels, whole groups and positions in every group both pruned;
``nnx.Embed`` ``features``; ``nnx.MultiHeadAttention`` heads, the per-head query/key dimension and
the value's, the attention keeping the dense ``1/sqrt(head_dim)`` as the pruned program does,
``DenseScaleAttention``). A removed residual block is removed for real, in one of two ways
(``rebuild.removed_block_plan``, located from the trace):

- the module whose call returns ``x + f(x)``, with ``x`` from outside it, becomes ``Skipped``
  (returns its input);
- otherwise the modules that only the block's branch ``f`` uses become ``Zeroed`` (return zeros
  of the branch's shape) and the code around them still runs on ``x``: ``relu(x + f(x))`` (He et
  al.'s blocks) computes ``relu(x)``, each residual add of a pre-LN layer (``x = x + attn(ln1(x));
  x = x + mlp(ln2(x))``) is removed on its own, a projection shortcut is kept, as the traced
  program computes them.

The result is checked against the traced ``PrunedNetwork`` in every traced mode; what cannot be
materialized (a variable only the branch reads in the code of a module that stays, such as a layer
scale held as the layer's own parameter; a width computed in user code) raises ``RebuildError``
naming the module path and the reason. The pipeline then keeps the traced program
(``NnxFlaxNetwork``, below), as linen's ``rebuild`` falls back, so a run never stops there.

``recalibrate_nnx`` re-estimates the batch-norm statistics of such a module (``NnxTrainPass`` is the
train-mode forward it runs) with ``training/batch_stats.py``.

The plan has the linen format (``{"layers": {path: {attribute: value}}, "removed_blocks": [...]}``),
here with every layer's shape attributes and ``"zeroed": {path: {"shape", "follow", "dtype"}}``
when modules are zeroed, and rebuilds a checkpoint: ``narrow_nnx(factory(), plan, state)``. A
materialized module can be traced and pruned again (its zeroed modules follow the new widths); the
plan then covers both rounds.

``NnxFlaxNetwork`` is the pipeline's network for an NNX factory: ``FlaxNetwork`` over the
``NnxNetwork`` view, initialised from the factory and materialized by ``rebuild_nnx``, or, where
that raises, into ``NnxTracedNetwork`` (the traced program, said in one line; its description
replays the prunings from the factory).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bpcp_jax.tracer.provider import (TRAIN_SWITCHES, FlaxNetwork, call_factory, check_train_mode, mode_kwargs,
                                      train_switch)
from bpcp_jax.tracer.network import (PrunedNetwork, TracedNetwork, leaves_by_path, materialize_traced,
                                     prune_decision, trace_network)
from bpcp_jax.tracer.rebuild import (PLAN_FORMAT, RebuildError, RebuildReport, _Call, _check_plan, _concrete_inputs,
                                     _max_diff, _shapes, conv_groups, draws_random_numbers, fallback_summary,
                                     plan_summary, removed_block_plan)

COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class Skipped(nnx.Module):
  """A removed residual block: returns its first input."""

  def __call__(self, x, *args, **kwargs):
    return x


class Zeroed(nnx.Module):
  """A module only a removed block's branch used: returns zeros of ``shape`` (``dtype``), its axes
  listed in ``follow`` taken from the first argument's (the batch, for one), whatever it is called with."""

  def __init__(self, shape, follow=(), dtype="float32"):
    self.shape, self.follow, self.dtype = tuple(int(d) for d in shape), tuple(int(k) for k in follow), str(dtype)

  def __call__(self, *args, **kwargs):
    ref = next((a for a in (*args, *kwargs.values()) if hasattr(a, "shape")), None)
    shape = [ref.shape[k] if k in self.follow and ref is not None and k < len(ref.shape) else d
             for k, d in enumerate(self.shape)]
    return jnp.zeros(shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class DenseScaleAttention:
  """The ``attention_fn`` of a narrowed ``nnx.MultiHeadAttention`` whose per-head dimensions were
  pruned: scales the queries by ``sqrt(kept / depth)``, so that ``base``'s ``1/sqrt(kept)`` becomes
  the dense network's ``1/sqrt(depth)``, as in the pruned program (``base``: the module's own
  ``attention_fn``, which must scale by ``1/sqrt(query.shape[-1])``, as flax's does). With flax's
  own and a value dimension other than the query's, the weights (``dot_product_attention_weights``:
  masks, bias, dropout) are applied to the values here (flax's fused path takes one dimension)."""

  depth: int
  base: Any = nnx.dot_product_attention

  def __call__(self, query, key, value, *args, **kwargs):
    kept = query.shape[-1]
    if kept != self.depth:
      query = query * jnp.asarray(np.sqrt(kept / self.depth), query.dtype)
    if self.base is not nnx.dot_product_attention or value.shape[-1] == kept:
      return self.base(query, key, value, *args, **kwargs)
    from flax.nnx.nn.attention import dot_product_attention_weights

    bound = inspect.signature(nnx.dot_product_attention).bind(query, key, value, *args, **kwargs)
    given = dict(bound.arguments)
    value = given.pop("value")
    weights = dot_product_attention_weights(**given)  # [..., heads, q, k]
    heads, v_heads = weights.shape[-3], value.shape[-2]
    if heads == v_heads:
      return jnp.einsum("...hqk,...khd->...qhd", weights, value.astype(weights.dtype))
    weights = weights.reshape(weights.shape[:-3] + (v_heads, heads // v_heads) + weights.shape[-2:])
    out = jnp.einsum("...hgqk,...khd->...qhgd", weights, value.astype(weights.dtype))
    return out.reshape(out.shape[:-3] + (heads, out.shape[-1]))


def _path_key(col: str, path) -> str:
  return "/".join([col] + [str(p) for p in path])


def _collect(model, col: str) -> dict:
  """``{"conv": {"kernel": array}, "blocks": {"0": ...}}``: the values of ``model``'s variables of collection
  ``col`` (keys are strings, list indices too, as a checkpoint restores them)."""
  out: dict = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, COLLECTIONS[col]):
      d = out
      for part in path[:-1]:
        d = d.setdefault(str(part), {})
      d[str(path[-1])] = node.get_value()
  return out


def _write(model, leaves: Mapping, missing: Optional[list] = None, by_collection: bool = True) -> None:
  """Set the variables of ``model`` from ``leaves``: its Params and BatchStats from
  ``{"params/conv/kernel": array, ...}``, or (``by_collection=False``) every variable from
  ``{"conv/kernel": array, ...}`` (the layout of ``nnx.state(model)``). Paths not found go to
  ``missing`` (or are left as they are)."""
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Variable):
      continue
    if by_collection:
      col = next((c for c, cls in COLLECTIONS.items() if isinstance(node, cls)), None)
      if col is None:
        continue
      key = _path_key(col, path)
    else:
      key = "/".join(map(str, path))
    if key in leaves:
      node.set_value(jnp.asarray(leaves[key]))  # a NumPy array would be updated in place (BatchNorm)
    elif missing is not None:
      missing.append(key)


def placeholders(model: nnx.Module) -> nnx.Module:
  """``model`` (from ``nnx.eval_shape``, abstract) made concrete in place and returned: zeros for
  its variables, key 0 for its RNG streams; no initializer runs."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      v = node.get_value()
      if isinstance(node, nnx.RngKey):
        node.set_value(jnp.broadcast_to(jax.random.key(0), v.shape))
      elif isinstance(v, jax.ShapeDtypeStruct):
        node.set_value(jnp.asarray(np.zeros(v.shape, v.dtype)))
  return model


def _scope_name(path, model) -> str:
  return ".".join(map(str, path)) if path else type(model).__name__


def _scoped(model, recorder: Optional[dict]) -> None:
  """Make every module of ``model`` (a throwaway copy) run its ``__call__`` in a named scope of its
  path, recording ``{named-scope path: _Call}`` in ``recorder`` when given."""
  paths = {id(m): path for path, m in nnx.iter_modules(model)}
  stack: list = []
  derived: dict = {}
  for path, m in nnx.iter_modules(model):
    cls = type(m)
    if cls not in derived:
      def call(self, *args, _base=cls, **kwargs):
        path = paths.get(id(self), ())
        stack.append(_scope_name(path, self))
        try:
          if recorder is not None:
            key = "/".join(stack)
            rec = recorder.setdefault(key, _Call(tuple(path), "__call__", self))
            rec.count += 1
          with jax.named_scope(stack[-1]):
            return _base.__call__(self, *args, **kwargs)
        finally:
          stack.pop()
      derived[cls] = type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__,
                                                  "__qualname__": cls.__qualname__})
    m.__class__ = derived[cls]


@dataclasses.dataclass(eq=False)
class NnxNetwork:
  """An NNX module seen as ``apply(variables, *inputs, train=False, mutable=False, **call_kwargs)``;
  see the module docstring. Made from a snapshot of ``model`` (later changes to ``model`` are not seen)."""

  graphdef: Any
  state: Any

  @classmethod
  def of(cls, model: nnx.Module) -> "NnxNetwork":
    if not isinstance(model, nnx.Module):
      raise TypeError(f"expected a flax.nnx.Module, got {type(model).__qualname__}")
    return cls(*nnx.split(nnx.clone(model)))

  def merge(self, variables: Optional[Mapping] = None) -> nnx.Module:
    """A fresh copy of the module, with ``variables`` (the layout of ``variables()``) written in when given."""
    model = nnx.merge(self.graphdef, self.state, copy=True)
    if variables is not None:
      missing: list = []
      _write(model, leaves_by_path(variables), missing)
      if missing:
        raise ValueError(f"the variables given have no {missing[0]} (and {len(missing) - 1} more) of "
                         f"{type(model).__qualname__}")
    return model

  def variables(self) -> dict:
    """``{"params": ..., "batch_stats": ...}`` (the collections the module has) of nested dicts of arrays."""
    model = self.merge()
    out = {col: _collect(model, col) for col in COLLECTIONS}
    return {col: tree for col, tree in out.items() if tree}

  def module_class(self) -> type:
    """The class of the module (whose ``__call__`` the view calls)."""
    cls = getattr(self.graphdef.nodes[0], "type", None) if getattr(self.graphdef, "nodes", None) else None
    return cls if isinstance(cls, type) else type(self.merge())

  def switch_reaching(self, mode: Mapping) -> Optional[str]:
    """The train switch (``provider.train_switch``) the apply keywords ``mode`` pass to ``__call__``:
    one given by name, else the call's own when ``mode`` says ``train=``; ``None`` when none reaches it."""
    given = next((name for name, _ in TRAIN_SWITCHES if name in mode and name != "train"), None)
    switch = train_switch(self.module_class().__call__)
    return given or (switch[0] if switch is not None and "train" in mode else None)

  def takes_rngs(self) -> bool:
    """Whether ``__call__`` takes ``rngs`` (the NNX style ``self.dropout(x, rngs=rngs)``)."""
    try:
      return "rngs" in inspect.signature(self.module_class().__call__).parameters
    except (TypeError, ValueError):
      return False

  def has_dropout(self) -> bool:
    """Whether the module holds an ``nnx.Dropout`` of a rate above 0."""
    return any(isinstance(m, nnx.Dropout) and m.rate != 0 for _, m in nnx.iter_modules(self.merge()))

  def apply(self, variables, *inputs, train: Optional[bool] = None, mutable=False, rng: Optional[jax.Array] = None,
            rngs=None, _recorder: Optional[dict] = None, **call_kwargs):
    """``model(*inputs, **call_kwargs)`` on a copy with ``variables`` written in, after
    ``model.train()`` (``train=True``) or ``model.eval()``, and with the call's train switch
    (``provider.train_switch``: ``train``, ``training``, ``is_training`` or ``deterministic``) set
    to the mode when ``__call__`` takes one and ``call_kwargs`` do not set it themselves (a
    ``train`` left ``None`` then follows a switch given in ``call_kwargs``, else is ``False``).

    ``rng``: a key the copy's RNG streams (dropout) are reseeded from, one ``fold_in`` per stream;
    without one they draw as they are in the snapshot. ``rngs``: ``{name: key}`` (linen's form;
    ``{"dropout": key}`` is ``rng=key``; several keys reseed the streams of their names) or an
    ``nnx.Rngs`` (its streams' keys). When ``__call__`` takes ``rngs`` it gets ``nnx.Rngs`` of those
    keys (one key: the ``default`` stream, which serves every name), or ``nnx.Rngs(0)`` without
    keys (eval mode draws nothing). ``mutable``: collections to return the updated values of, as
    linen does. Raises ``ValueError`` for ``rng`` with ``rngs`` or an ``rngs`` that holds no keys."""
    keys = _rng_keys(rngs)
    if rng is not None:
      if keys:
        raise ValueError("give either rng= (one key) or rngs= ({name: key} or an nnx.Rngs), not both")
      keys = {"dropout": rng}
    keys = {name: k if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(k)
            for name, k in keys.items()}
    model = self.merge()
    _write(model, leaves_by_path(variables))
    switch = train_switch(type(model).__call__)
    if train is None:
      given = next(((name, in_train) for name, in_train in TRAIN_SWITCHES if name in call_kwargs), None)
      value = call_kwargs[given[0]] if given is not None else None
      train = isinstance(value, (bool, np.bool_)) and bool(value) == given[1]  # a traced switch: model.eval()
    model.train() if train else model.eval()
    if keys:
      streams = sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})
      first = keys.get("default", next(iter(keys.values())))
      if streams and len(keys) == 1:
        nnx.reseed(model, policy="match_shape", **{tag: jax.random.fold_in(first, i) for i, tag in enumerate(streams)})
      elif streams:
        nnx.reseed(model, policy="match_shape", **{tag: keys.get(tag, jax.random.fold_in(first, i))
                                                   for i, tag in enumerate(streams)})
    kwargs = dict(mode_kwargs(model, train)) if switch is not None and switch[0] not in call_kwargs else {}
    kwargs.update(call_kwargs)
    if "rngs" not in kwargs and self.takes_rngs():
      if not keys:
        kwargs["rngs"] = nnx.Rngs(0)
      elif len(keys) == 1:
        kwargs["rngs"] = nnx.Rngs(first)
      else:
        kwargs["rngs"] = nnx.Rngs(**{"default": first, **keys})
    _scoped(model, _recorder)
    out = model(*inputs, **kwargs)
    if not mutable:
      return out
    cols = list(COLLECTIONS) if mutable is True else [mutable] if isinstance(mutable, str) else list(mutable)
    return out, {col: _collect(model, col) for col in cols}


def _rng_keys(rngs) -> dict:
  """``{name: key}`` of ``rngs``: ``None``, a mapping of keys, or an ``nnx.Rngs`` (its streams' keys)."""
  if rngs is None:
    return {}
  if isinstance(rngs, nnx.Rngs):
    keys = {name: s.key.get_value() for name, s in vars(rngs).items() if isinstance(s, nnx.RngStream)}
  elif isinstance(rngs, Mapping):
    keys = dict(rngs)
  else:
    raise ValueError(f"rngs= takes {{name: key}} or an nnx.Rngs, got {type(rngs).__name__}")
  bad = sorted(name for name, k in keys.items() if not hasattr(k, "dtype"))
  if bad or not keys:
    raise ValueError(f"rngs= holds no PRNG key{' for ' + ', '.join(map(repr, bad)) if bad else ''}: give "
                     "{'dropout': jax.random.key(0)} or nnx.Rngs(0)")
  return keys


def trace_nnx(model: nnx.Module, *example_inputs, modes: Optional[Mapping] = None) -> tuple[TracedNetwork, dict]:
  """``(net, variables)``: ``model`` traced by ``trace_network`` through ``NnxNetwork``.

  ``modes``: ``{name: apply keywords}`` (``NnxNetwork.apply``): ``train=`` (``model.train()``; a mode
  named ``"train"`` defaults to it unless it gives a train switch itself), ``mutable=``, ``rngs=``
  (``{name: key}`` or an ``nnx.Rngs``; the keys become inputs of the program, so ``masked_apply``
  takes ``rngs={name: key}`` for them) and any keyword of the module's ``__call__`` (a switch of any
  name, extra inputs), forwarded to it. Default: eval mode ``{}`` and train mode ``{"train": True}``,
  with ``mutable=["batch_stats"]`` when the module has batch statistics and ``rngs={"dropout": key}``
  when its ``__call__`` takes ``rngs``.

  Raises ``ValueError`` when the train mode of a module with BatchNorm or dropout computes exactly
  its eval mode and no known train switch reached its ``__call__`` (``provider.check_train_mode``).
  """
  adapter = NnxNetwork.of(model)
  variables = adapter.variables()
  if modes is None:
    train = {"train": True, **({"mutable": ["batch_stats"]} if "batch_stats" in variables else {})}
    if adapter.takes_rngs():
      train["rngs"] = {"dropout": jax.random.key(0)}
    modes = {"eval": {}, "train": train}
  else:
    modes = {name: dict(kw) for name, kw in modes.items()}
    for name, kw in modes.items():
      if kw.get("rngs") is not None:
        kw["rngs"] = _rng_keys(kw["rngs"])
      if name == "train" and "train" not in kw and not any(s in kw for s, _ in TRAIN_SWITCHES):
        kw["train"] = True
  net = trace_network(adapter, variables, *example_inputs, modes=modes)
  check_train_mode(net, example_inputs, type(model).__qualname__, modes_hint=True)
  return net, variables


@dataclasses.dataclass(eq=False)
class NnxTrainPass:
  """What ``recalibrate_batch_stats`` runs of an NNX module: ``apply(variables, x, train=True,
  rng=None) -> (outputs, batch_stats)`` (``NnxNetwork.apply``), and ``check_variables``."""

  adapter: NnxNetwork
  input_shape: tuple
  label: str

  @classmethod
  def of(cls, model: nnx.Module, input_shape) -> "NnxTrainPass":
    return cls(NnxNetwork.of(model), tuple(input_shape), type(model).__qualname__)

  def check_variables(self, variables) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``variables`` has the module's layout and paths."""
    if not isinstance(variables, Mapping) or isinstance(variables, nnx.State):
      raise TypeError(f"{self.label}: variables are a {type(variables).__name__}; expected the nested dicts "
                      "bp.NnxNetwork.of(model).variables() gives (or call bp.recalibrate_nnx(model, batches))")
    want, got = set(leaves_by_path(self.adapter.variables())), set(leaves_by_path(variables))
    if want != got:
      raise ValueError(f"{self.label}: variables do not fit the module: missing {sorted(want - got)[:5]}, unknown "
                       f"{sorted(got - want)[:5]} (expected the layout bp.NnxNetwork.of(model).variables() gives)")

  def apply(self, variables, x, *, train, masks=None, block_gates=None, rng=None, axis_name=None):
    if masks is not None or block_gates is not None:
      raise ValueError(f"{self.label}: masks and block_gates are for traced networks; materialize the pruned "
                       "network with bp.materialize_nnx first, then recalibrate the smaller module")
    if axis_name is not None:
      raise ValueError(f"{self.label}: an NNX BatchNorm averages over the devices named by its own axis_name "
                       "attribute; call without axis_name")
    if not train:
      return self.adapter.apply(variables, x, rng=rng)
    out, cols = self.adapter.apply(variables, x, train=True, mutable=["batch_stats"], rng=rng)
    return out, cols["batch_stats"]


@functools.partial(jax.jit, static_argnames=("graphdef", "input_shape", "label", "average"))
def _recalibrated(graphdef, state, batches, rng, *, input_shape, label, average):
  """``(statistics, moved)``: the re-estimated batch statistics of the module
  ``nnx.merge(graphdef, state)``, and whether a train-mode pass updates its statistics at all (one
  pass on the first batch from the statistics shifted by 1, which no batch average equals unless the
  ``BatchNorm`` does not update them); one compiled program per module structure, batch shape and
  ``average``."""
  from bpcp_jax.training.batch_stats import recalibrate_batch_stats

  net = NnxTrainPass(NnxNetwork(graphdef, state), input_shape, label)
  variables = net.adapter.variables()
  shifted = {**variables, "batch_stats": jax.tree.map(lambda s: s + 1, variables["batch_stats"])}
  probe = net.apply(shifted, batches[0], train=True)[1]
  moved = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(jax.tree.leaves(probe),
                                                               jax.tree.leaves(shifted["batch_stats"]))]))
  return recalibrate_batch_stats(net, variables, batches, rng=rng, average=average)["batch_stats"], moved


def recalibrate_nnx(model: nnx.Module, batches, *, rng: Optional[jax.Array] = None,
                    average: str = "exact") -> nnx.Module:
  """A **copy** of ``model`` with its ``nnx.BatchStat`` statistics re-estimated on ``batches``
  ``[N, B, *input_shape]`` (floating point, preprocessed as in training), the parameters untouched;
  ``model`` itself is left as it was (keep the result: ``model = bp.recalibrate_nnx(model, b)``).
  What ``bp.recalibrate_batch_stats`` does for Flax modules (see it for ``average`` and a layer
  called twice): the passes call ``model(x)`` on copies after ``model.train()``, passing
  its train switch (``train=True``, ``training=True``, ``deterministic=False``, ...) when ``__call__`` takes
  one, as one compiled program per
  module structure and batch shape. ``rng``: a key split per batch, reseeding the module's RNG
  streams (dropout); without one, every batch sees the same dropout masks (those the streams give
  now). Use it on ``bp.materialize_nnx``'s smaller module: with blocks removed, the old statistics
  no longer describe what later layers see.

  Raises ``ValueError`` when the module has no ``nnx.BatchStat``, when a train-mode pass does not
  update the statistics (a ``__call__`` that fixes ``use_running_average=True``), and for batches
  the module does not run on (naming their shape); ``TypeError`` for integer batches or an ``rng`` that is not a key."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"recalibrate_nnx: expected a flax.nnx.Module, got {type(model).__qualname__}")
  adapter = NnxNetwork.of(model)
  label = type(model).__qualname__
  if "batch_stats" not in adapter.variables():
    raise ValueError(f"recalibrate_nnx: {label} has no nnx.BatchStat variables (no batch normalization): "
                     "nothing to recalibrate")
  batches = jnp.asarray(batches)
  if batches.ndim >= 3 and jnp.issubdtype(batches.dtype, jnp.floating):  # else recalibrate_batch_stats says why
    try:
      jax.eval_shape(lambda: adapter.apply(adapter.variables(), batches[0]))
    except Exception as e:
      raise ValueError(f"recalibrate_nnx: {label} does not run on one batch batches[i] of shape "
                       f"{tuple(batches.shape[1:])} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       "batches must be [N batches, B, *input_shape], e.g. batches[None] for a single batch") from e
  new, moved = _recalibrated(adapter.graphdef, adapter.state, batches, rng, input_shape=tuple(batches.shape[2:]),
                             label=label, average=average)
  if not moved:
    raise ValueError(f"recalibrate_nnx: no running statistic of {label} changed in a train-mode pass; does its "
                     "__call__ fix use_running_average=True (the mode set by model.train() and a train switch "
                     "train/training/is_training/deterministic is not reaching its BatchNorms)?")
  out = adapter.merge()
  _write(out, leaves_by_path({"batch_stats": new}))
  return out


def _record_calls(adapter: NnxNetwork, variables, inputs, modes: Mapping) -> dict:
  calls: dict = {}
  for kw in modes.values():
    found: dict = {}
    jax.eval_shape(lambda v, x, kw=kw: adapter.apply(v, *x, _recorder=found, **kw), _shapes(variables), tuple(inputs))
    for key, call in found.items():
      rec = calls.setdefault(key, call)
      rec.count = max(rec.count, call.count)
  return calls


# -- widths ---------------------------------------------------------------------------------------

def _shape(module, name):
  v = vars(module).get(name)
  return tuple(int(d) for d in np.shape(v.get_value())) if isinstance(v, nnx.Variable) else None


def _norm(m):
  width = _shape(m, "scale") or _shape(m, "bias") or _shape(m, "mean")
  return {} if width is None else {"num_features": width[-1]}


def _group_norm(m, run: Optional[tuple] = None):
  """``num_features``, ``num_groups`` and ``group_size``; ``run``: ``(groups, size)`` as the pruned
  program reshapes the channels (whole groups and positions in every group may both be pruned)."""
  attrs = _norm(m)
  n = attrs.get("num_features")
  if run is not None:
    groups, size = run
    if n is not None and groups * size != n:
      raise ValueError(f"{n} channels, but the pruned program splits them into {groups} groups of {size}")
  elif n is None:
    return attrs
  elif n % m.group_size:
    raise ValueError(f"{n} channels do not split into groups of {m.group_size}")
  else:
    groups, size = n // m.group_size, m.group_size
  return {"num_features": groups * size, "num_groups": groups, "group_size": size}


def _norm_groups(decision, calls: Mapping, inputs) -> dict:
  """``{module path: (num_groups, group_size)}`` of each ``nnx.GroupNorm`` as the pruned program runs
  it (``rebuild.group_norm_splits``, as for linen's)."""
  from bpcp_jax.tracer.rebuild import group_norm_splits

  return group_norm_splits(decision, calls, inputs, cls=nnx.GroupNorm)


def _linear(m):
  k = _shape(m, "kernel")
  return {"in_features": k[0], "out_features": k[1]}


def _linear_general(m):
  k = _shape(m, "kernel")
  nb, nin = len(m.batch_axis), len(m.in_features)
  return {"in_features": k[nb:nb + nin], "out_features": k[nb + nin:]}


def _conv(m, groups_run: Optional[int] = None):
  k = _shape(m, "kernel")
  groups = m.feature_group_count
  if groups > 1 and groups_run is not None:  # as the pruned program convolves
    groups = groups_run
  elif groups > 1:  # no program: the group count follows the output width (multiplier fixed)
    if (groups * k[-1]) % m.out_features:
      raise ValueError(f"feature_group_count={groups} does not divide the kept width {k[-1]} into equal groups")
    groups = groups * k[-1] // m.out_features
  return {"in_features": k[-2] * groups, "out_features": k[-1], "feature_group_count": groups, "kernel_shape": k}


def _conv_transpose(m):
  k = _shape(m, "kernel")
  return {"in_features": k[-2], "out_features": k[-1], "kernel_shape": k}


def _embed(m):
  e = _shape(m, "embedding")
  if e[0] != m.num_embeddings:
    raise ValueError(f"the vocabulary changes ({m.num_embeddings} -> {e[0]})")
  return {"features": e[-1]}


def _attention(m):
  """Heads, the per-head query/key dimension (``head_dim``; the value's is its projection's own
  ``out_features``) and the in/out widths; when the query/key dimension changes, ``attention_depth``:
  the dense one, whose ``1/sqrt`` the attention keeps (``DenseScaleAttention``, as the pruned program;
  also when the value's dimension differs from the query's)."""
  q, k, v, o = (_shape(getattr(m, n), "kernel") for n in ("query", "key", "value", "out"))
  attrs = {"num_heads": q[-2], "head_dim": q[-1], "qkv_features": q[-2] * q[-1], "in_features": q[0],
           "in_kv_features": k[0], "out_features": o[-1]}
  if getattr(m, "num_kv_heads", None) is not None:
    attrs["num_kv_heads"] = k[-2]
  depth = m.attention_fn.depth if isinstance(m.attention_fn, DenseScaleAttention) else m.head_dim
  if q[-1] != depth or v[-1] != q[-1]:
    attrs["attention_depth"] = depth
  return attrs


RULES = (
    (nnx.MultiHeadAttention, _attention), (nnx.ConvTranspose, _conv_transpose), (nnx.Conv, _conv),
    (nnx.LinearGeneral, _linear_general), (nnx.Linear, _linear), (nnx.Embed, _embed),
    (nnx.GroupNorm, _group_norm), (nnx.BatchNorm, _norm), (nnx.LayerNorm, _norm), (nnx.RMSNorm, _norm),
)


def _layer_widths(model, old_shapes: Mapping, problems: list, notes: list, groups: Optional[Mapping] = None,
                  norm_groups: Optional[Mapping] = None) -> dict:
  """``{path: {attribute: value}}``: the shape attributes of every layer of a known type, from its
  (already written) variables (a complete table, so that it also rebuilds a module pruned twice);
  ``groups``: ``{path: feature_group_count}`` of the grouped convolutions as the pruned program runs them;
  ``norm_groups``: ``{path: (num_groups, group_size)}`` of the GroupNorms (``_norm_groups``)."""
  groups, norm_groups = groups or {}, norm_groups or {}
  old = {k: tuple(v.shape) for k, v in leaves_by_path(old_shapes).items()}
  layers = {}
  for path, m in nnx.iter_modules(model):
    name = "/".join(map(str, path))
    rule = next((r for cls, r in RULES if isinstance(m, cls)), None)
    if rule is None:
      changed = [f"{k} {old.get(_path_key(c, path + (k,)))} -> {_shape(m, k)}" for k, v in vars(m).items()
                 for c, cls in COLLECTIONS.items()
                 if isinstance(v, cls) and old.get(_path_key(c, path + (k,))) not in (None, _shape(m, k))]
      if changed:
        notes.append(f"{name or '<top>'}: a layer type whose widths this does not know ({type(m).__qualname__}: "
                     f"{', '.join(changed)}), assumed to take them from its input")
      continue
    try:
      attrs = (rule(m, groups.get(name)) if rule is _conv else rule(m, norm_groups.get(name)) if rule is _group_norm
               else rule(m))
    except ValueError as err:
      problems.append(f"{name or '<top>'}: {err}")
      continue
    if attrs:
      layers[name] = {k: _json(v) for k, v in attrs.items()}
  return dict(sorted(layers.items()))


def _json(value):
  return [int(x) for x in value] if isinstance(value, (tuple, list)) else value


# -- narrowing ------------------------------------------------------------------------------------

def _locate(model, path: str):
  """``(parent, key)`` of the module at ``path`` ("blocks/0/conv")."""
  parts = path.split("/")
  node = model
  for part in parts[:-1]:
    node = node[int(part)] if isinstance(node, (list, nnx.List)) else getattr(node, part)
  last = parts[-1]
  return node, int(last) if isinstance(node, (list, nnx.List)) else last


def _replace(model, path: str, new: nnx.Module, what: str) -> None:
  try:
    parent, key = _locate(model, path)
    if isinstance(key, int):
      parent[key] = new
    else:
      getattr(parent, key)
      setattr(parent, key, new)
  except (AttributeError, IndexError, ValueError) as err:
    raise ValueError(f"pruning plan {what} {path!r}, which {type(model).__qualname__} does not have ({err})")


def narrow_nnx(model: nnx.Module, plan: Mapping, variables: Optional[Mapping] = None) -> nnx.Module:
  """Narrow ``model`` in place by ``plan`` and return it: the removed blocks' modules become
  ``Skipped``, those of ``plan["zeroed"]`` (``{path: {"shape", "follow", "dtype"}}``, the modules only
  removed branches used) ``Zeroed``, the listed attributes are set (``attention_depth`` of an
  ``nnx.MultiHeadAttention`` wraps its ``attention_fn`` in ``DenseScaleAttention``), and
  ``variables``, e.g. restored from a checkpoint, are written into its variables: either
  ``{"params": ..., "batch_stats": ...}`` nested dicts (as ``materialize_traced`` and ``trace_nnx``
  give them) or the pruned module's own state
  (``nnx.state(pruned)`` or its ``nnx.to_pure_dict``, as one saves an NNX module). Raises
  ``ValueError`` when a path of the plan is not in ``model`` or ``variables`` misses one of its
  variables."""
  _check_plan(plan)
  if plan.get("class") not in (None, type(model).__qualname__):
    raise ValueError(f"the pruning plan was made for class {plan['class']!r}, not {type(model).__qualname__!r}")
  for path in plan["removed_blocks"]:
    _replace(model, path, Skipped(), "removes block")
  for path, spec in plan.get("zeroed", {}).items():
    if not isinstance(spec, Mapping) or "shape" not in spec:
      raise ValueError(f"pruning plan zeroes module {path!r} with {spec!r}; expected {{'shape': [...], 'follow': "
                       "[...], 'dtype': ...}")
    _replace(model, path, Zeroed(spec["shape"], spec.get("follow", ()), spec.get("dtype", "float32")),
             "zeroes module")
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  for path, attrs in plan["layers"].items():
    if path not in modules:
      raise ValueError(f"pruning plan narrows layer {path!r}, which {type(model).__qualname__} does not have")
    for k, v in attrs.items():
      if k == "attention_depth":
        base = getattr(modules[path], "attention_fn", None)
        base = base.base if isinstance(base, DenseScaleAttention) else base
        modules[path].attention_fn = DenseScaleAttention(int(v), base)
      else:
        setattr(modules[path], k, tuple(v) if isinstance(v, list) else v)
  if variables is not None:
    if isinstance(variables, nnx.State):
      variables = nnx.to_pure_dict(variables)
    missing: list = []
    _write(model, leaves_by_path(variables), missing, by_collection=set(variables) <= set(COLLECTIONS))
    if missing:
      raise ValueError(f"the variables given have no {missing[0]} (and {len(missing) - 1} more) of the narrowed module")
  return model


def materialize_nnx(net: TracedNetwork, variables, masks: Mapping, *example_inputs,
                    tol: float = 1e-5) -> tuple[nnx.Module, RebuildReport]:
  """``(module, report)``: a smaller NNX module of the user's classes for ``masks``.

  ``net`` and ``variables`` come from ``trace_nnx``. The module's variables are those of
  ``materialize_traced`` (removed blocks and channels gone); ``report.plan`` rebuilds it with
  ``narrow_nnx``. Checked against the ``PrunedNetwork`` on ``example_inputs`` (default: random,
  shaped like the traced ones) in eval and train mode, outputs and updated statistics to ``tol``.
  A removed block's module becomes ``Skipped`` when it returns ``x + f(x)``, else the modules only its
  branch uses become ``Zeroed`` (``relu(x + f(x))`` then computes ``relu(x)``; each add of a pre-LN
  layer goes on its own; see the module docstring). Raises ``RebuildError`` naming each module that
  cannot be materialized and why (the pipeline's ``NnxFlaxNetwork`` then keeps the traced program).
  """
  if not isinstance(net.model, NnxNetwork):
    raise TypeError(f"materialize_nnx needs a network traced by trace_nnx, got one of {type(net.model).__qualname__}")
  inputs = _concrete_inputs(net, example_inputs)
  # sliced as NumPy arrays (no gather compiled per leaf shape), then back on the device
  _, small_vars = materialize_traced(net, jax.tree_util.tree_map(np.asarray, variables), masks, *inputs)
  return rebuild_nnx(net, jax.tree_util.tree_map(jnp.asarray, small_vars), masks, *inputs, tol=tol)


def rebuild_nnx(net: TracedNetwork, small_vars, masks: Mapping, *example_inputs,
                tol: float = 1e-5) -> tuple[nnx.Module, RebuildReport]:
  """``(module, report)`` as ``materialize_nnx`` gives them, from the smaller variables
  ``materialize_traced(net, variables, masks)`` gives (``rebuild`` for NNX modules): ``small_vars``
  written into the narrowed module, which is checked against the ``PrunedNetwork`` on them."""
  adapter = net.model
  if not isinstance(adapter, NnxNetwork):
    raise TypeError(f"rebuild_nnx needs a network traced by trace_nnx, got one of {type(adapter).__qualname__}")
  inputs = _concrete_inputs(net, example_inputs)
  pruned = PrunedNetwork(prune_decision(net, masks), _shapes(small_vars))
  calls = _record_calls(adapter, net.var_shapes, inputs, net.modes)
  model = adapter.merge()
  before = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, (Skipped, Zeroed))}
  zeroed_before = {p: {"shape": list(m.shape), "follow": list(m.follow), "dtype": m.dtype}
                   for p, m in before.items() if isinstance(m, Zeroed)}  # pruned before
  removed, zeroed, problems, hints = removed_block_plan(net, masks, calls, inputs, _shapes(small_vars), zeroed_before)
  notes: list = []
  plan = None
  if not problems:
    cls = type(model)
    skipped = [p for p, m in before.items() if isinstance(m, Skipped)]
    plan = {"format": PLAN_FORMAT, "class": cls.__qualname__, "layers": {},
            "removed_blocks": sorted(set(skipped) | set(removed)), **({"zeroed": zeroed} if zeroed else {})}
    missing: list = []
    narrow_nnx(model, plan)
    _write(model, leaves_by_path(small_vars), missing)
    if missing:
      problems.append(f"{missing[0]}: a variable the pruning dropped, though its module is not a removed block")
    groups = conv_groups(pruned.decision, inputs)  # keyed by the kernel's variable path: "blocks/0/conv1"
    plan["layers"] = _layer_widths(model, net.var_shapes, problems, notes, groups,
                                   _norm_groups(pruned.decision, calls, inputs))
  diffs: dict = {}
  if not problems:
    model = narrow_nnx(adapter.merge(), plan, small_vars)  # what a checkpoint restores
    problems, diffs = _check(NnxNetwork.of(model), pruned, small_vars, inputs, net.modes, tol)
    problems += hints + notes if problems else []
  if problems:
    raise RebuildError(problems)
  return model, RebuildReport(True, copy.deepcopy(plan), [], diffs, notes)


def _check(small: NnxNetwork, reference, small_vars, inputs, modes: Mapping, tol: float) -> tuple[list, dict]:
  want = {k: tuple(v.shape) for k, v in leaves_by_path(small_vars).items()}
  got = {k: tuple(np.shape(v)) for k, v in leaves_by_path(small.variables()).items()}
  for p in sorted(set(want) | set(got)):
    if want.get(p) != got.get(p):
      return [f"{p}: the materialized module has shape {got.get(p)}, the pruned variables {want.get(p)}"], {}
  problems, diffs = [], {}
  own_vars = small.variables()
  for mode, kw in modes.items():
    if mode not in ("eval", "train"):
      continue
    ref_kw = {"train": mode == "train", "mutable": kw.get("mutable", False)}
    if kw.get("rngs"):  # random ops draw from the keys given at call time, in both
      ref_kw["rngs"] = kw["rngs"]
    ref = jax.jit(lambda v, x: reference.apply(v, *x, **ref_kw))(small_vars, tuple(inputs))
    try:
      out = jax.jit(lambda v, x, kw=kw: small.apply(v, *x, **kw))(own_vars, tuple(inputs))
    except Exception as err:  # noqa: BLE001 - any failure of user code means: not materializable
      problems.append(f"<top>: the materialized module fails in {mode} mode: {type(err).__name__}: "
                      f"{str(err).splitlines()[0]}")
      continue
    if draws_random_numbers(reference.decision.net, mode, tuple(inputs)):
      # a narrowed nnx.Dropout draws its own mask (the pruned program: at full width, sliced)
      if _shapes(out) != _shapes(ref):
        problems.append(f"<top>: in {mode} mode the materialized module returns other shapes than the pruned program")
      continue
    diffs[mode] = _max_diff(leaves_by_path({"out": out}), leaves_by_path({"out": ref}))
    if not diffs[mode] <= tol:
      problems.append(f"<top>: in {mode} mode the materialized module differs from the pruned program by "
                      f"{diffs[mode]:.3g} (a width or constant computed in the module's code)")
  return problems, diffs


# -- in the pipeline ------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class NnxFlaxNetwork(FlaxNetwork):
  """A ``flax.nnx`` classifier as a ``PrunableNetwork``: ``FlaxNetwork`` run on the module's
  ``NnxNetwork`` view (``module``), so the pipeline, masks, block search, channel selection and
  counting work as for a linen module. ``FlaxNetwork.from_factory`` makes one when the factory,
  called as ``factory(num_classes=..., rngs=nnx.Rngs(0))``, returns an ``nnx.Module``.

  - ``init(rng)``: the variables (``NnxNetwork.variables()`` layout) of ``factory(..., rngs=nnx.Rngs(rng))``;
    only for the dense network (a narrowed one has no initializer of its own).
  - ``apply``: ``train=`` switches ``model.train()``/``model.eval()`` and the call's train switch of
    any common name; the step's dropout key reseeds the module's RNG streams and, when ``__call__``
    takes ``rngs``, is given to it as ``nnx.Rngs(key)`` (eval mode: a fixed ``nnx.Rngs(0)``;
    ``NnxNetwork.apply``); statistics are averaged over ``axis_name`` as ``FlaxNetwork`` does.
  - ``materialize``: the smaller network as the user's NNX classes (``rebuild_nnx``, as
    ``materialize_nnx``); its ``plan`` and variable shapes are in ``describe()`` (kind ``"nnx"``), from
    which ``from_description`` narrows the factory's module again (``narrow_nnx``). When the classes
    cannot be narrowed (``RebuildError``), the smaller network is the traced program instead
    (``NnxTracedNetwork``, a ``PrunedNetwork``), as ``FlaxNetwork`` falls back for linen, said in one
    line on stdout: a run never stops there. Its description (kind ``"nnx"``, no plan) rebuilds it
    by replaying the prunings on the factory's network.
  - ``deployable()``: the ``NnxNetwork`` view (``apply(variables, x)`` in eval mode, what
    ``make_predictor`` runs); ``deployable().merge(variables)`` is the ``nnx.Module`` itself.

  Variables other than ``nnx.Param``, ``nnx.BatchStat`` and RNG streams are refused (``ValueError``
  naming them): the view would hold them fixed.
  """

  plan: Optional[dict] = None  # the materialize plan (rebuild_nnx), None for the factory's network

  def _mode(self, train: bool) -> dict:
    return {"train": train}

  def variable_shapes(self):
    if self._var_shapes is None:
      known = (*COLLECTIONS.values(), nnx.RngState)
      other = [f"{'/'.join(map(str, path))} ({type(node).__name__})"
               for path, node in nnx.iter_graph(self.module.merge())
               if isinstance(node, nnx.Variable) and not isinstance(node, known)]
      if other:
        raise ValueError(f"{self.label}: variables {', '.join(other[:5])} are not supported (only nnx.Param, "
                         "nnx.BatchStat and RNG streams)")
      self._var_shapes = _shapes(self.module.variables())
    return self._var_shapes

  def init(self, rng) -> dict:
    if self.plan is not None or self.source is None:
      raise ValueError(f"{self.label}: only the network its factory makes can be initialised (this one is "
                       f"{'materialized' if self.plan is not None else 'not made from a factory'})")
    src = self.source
    return NnxNetwork.of(call_factory(src["factory"], src["num_classes"], src.get("kwargs"), rng=rng)).variables()

  def _smaller(self, small_vars, masks, decision, say: bool = False) -> FlaxNetwork:
    """The pruned network as the user's NNX classes, narrowed (``rebuild_nnx``), or as the traced
    program (``NnxTracedNetwork``) when they cannot be; ``say`` (materialization): that is said in one
    line on stdout (the first reason, and how many more)."""
    try:
      model, report = rebuild_nnx(self.traced, small_vars, masks)
    except Exception as err:  # noqa: BLE001 - whatever stops the rebuild, the traced program carries the run
      problems = err.problems if isinstance(err, RebuildError) else [f"{type(err).__name__}: {err}"]
      if say and jax.process_index() == 0:
        print(f"[materialize] {self.label}: kept as the traced program (PrunedNetwork), not rebuilt as "
              f"{type(self.module.merge()).__name__}: "
              f"{fallback_summary(problems, 'bp.materialize_nnx raises them all')}", flush=True)
      return NnxTracedNetwork(PrunedNetwork(prune_decision(self.traced, masks), _shapes(small_vars)), self.input_shape,
                              self.source, self.prunings + (decision,), self.label, output=self.output,
                              _streams=self._streams, _axes=self._axes)
    if say and jax.process_index() == 0:
      print(f"[materialize] {self.label}: rebuilt as your own {type(model).__name__}, narrowed "
            f"({plan_summary(report.plan)})", flush=True)
    return dataclasses.replace(self, module=NnxNetwork.of(model), plan=report.plan,
                               prunings=self.prunings + (decision,), _traced=None, _var_shapes=None)

  def describe(self) -> dict:
    desc = {**super().describe(), "kind": "nnx", "plan": copy.deepcopy(self.plan)}
    if self.plan is not None:
      desc["variable_shapes"] = {p: list(s.shape) for p, s in leaves_by_path(self.variable_shapes()).items()}
    return desc

  @classmethod
  def from_description(cls, desc: Mapping[str, Any], **options) -> FlaxNetwork:
    """The factory's module, narrowed by the stored plan (its variables zeros of the stored shapes,
    to be replaced by the checkpoint's); without a plan, the prunings replayed on the factory's
    network (the traced program, ``NnxTracedNetwork``, where the run kept that)."""
    src = desc["source"]
    net = FlaxNetwork.from_factory(src["factory"], src["num_classes"], desc["input_shape"], src.get("kwargs"),
                                   output=src.get("output", "auto"))
    if not isinstance(net, NnxFlaxNetwork):
      raise ValueError(f"model factory {src['factory']} returns a flax.linen module; the description is of a "
                       "flax.nnx one")
    if not desc.get("plan"):
      for decision in desc.get("prunings", ()):
        net = net._apply_decision(dict(decision))
      return net
    dense = leaves_by_path(net.module.variables())
    zeros = {p: np.zeros(shape, dense[p].dtype) for p, shape in desc["variable_shapes"].items()}
    model = narrow_nnx(net.module.merge(), desc["plan"], traverse_util.unflatten_dict(zeros, sep="/"))
    return dataclasses.replace(net, module=NnxNetwork.of(model), plan=copy.deepcopy(desc["plan"]),
                               prunings=tuple(dict(p) for p in desc.get("prunings", ())))


@dataclasses.dataclass(eq=False)
class NnxTracedNetwork(FlaxNetwork):
  """An NNX factory's network pruned as the traced program (``module``: a ``PrunedNetwork``), what
  ``NnxFlaxNetwork`` becomes when ``rebuild_nnx`` cannot narrow its classes: a ``FlaxNetwork`` of
  that linen module, pruned again the same way. ``describe()`` keeps kind ``"nnx"`` without a plan,
  so ``NnxFlaxNetwork.from_description`` replays the prunings from the factory (``bp.load_network``,
  ``--resume``); ``deployable()`` is the ``PrunedNetwork``."""

  def _smaller(self, small_vars, masks, decision, say: bool = False) -> "NnxTracedNetwork":
    module = PrunedNetwork(prune_decision(self.traced, masks), _shapes(small_vars))
    return dataclasses.replace(self, module=module, prunings=self.prunings + (decision,), _traced=None,
                               _var_shapes=None)

  def init(self, rng) -> dict:
    raise ValueError(f"{self.label}: only the network its factory makes can be initialised (this one is materialized)")

  def describe(self) -> dict:
    return {**super().describe(), "kind": "nnx", "plan": None}
