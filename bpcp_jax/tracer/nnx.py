"""Flax NNX networks: traced, pruned and materialized into a smaller NNX module of the user's classes.

``NnxNetwork(model)`` gives the tracer what it uses of a ``flax.linen`` module:
``apply(variables, *inputs, train=False, mutable=False)`` over ``nnx.split``/``nnx.merge``, the
variables being a nested dict ``{"params": ..., "batch_stats": ...}`` of the module's
``nnx.Param`` and ``nnx.BatchStat`` arrays (other state, such as dropout RNG streams, is held as
it was when the adapter was made). Eval mode runs ``model.eval()``, train mode ``model.train()``
and returns the updated statistics under ``mutable=["batch_stats"]``. Every module call runs in a
``jax.named_scope`` of its attribute path, so the traced program says where each op runs.

``trace_nnx(model, *inputs)`` traces it in eval and train mode; masks, ``masked_apply``,
``count_traced`` and ``select_pruning`` then work unchanged on the variables dict.
``materialize_nnx`` slices the variables as ``materialize_traced`` does and writes them into a copy
of the module: each layer's shape attributes follow (``nnx.Linear``/``nnx.LinearGeneral``
``in_features``/``out_features``; ``nnx.Conv`` also ``feature_group_count`` and
``kernel_shape``; the norms' ``num_features``, ``nnx.GroupNorm``'s ``num_groups``; ``nnx.Embed``
``features``; ``nnx.MultiHeadAttention`` heads and features), and the module of each removed
residual block (the one whose call returns ``x + f(x)``, located from the trace as in
``rebuild.py``) is replaced by ``Skipped``, which returns its input. The result is checked against
the traced ``PrunedNetwork`` in every traced mode; what cannot be materialized raises
``RebuildError`` naming the module path and the reason.

``recalibrate_nnx`` re-estimates the batch-norm statistics of such a module (``NnxTrainPass`` is the
train-mode forward it runs) with ``training/batch_stats.py``.

The plan has the linen format (``{"layers": {path: {attribute: value}}, "removed_blocks": [...]}``),
here with every layer's shape attributes, and rebuilds a checkpoint: ``narrow_nnx(factory(), plan,
state)``. A materialized module can be traced and pruned again; the plan then covers both rounds.

``NnxFlaxNetwork`` is the pipeline's network for an NNX factory: ``FlaxNetwork`` over the
``NnxNetwork`` view, initialised from the factory and materialized by ``rebuild_nnx``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bpcp_jax.tracer.provider import FlaxNetwork, call_factory, mode_kwargs
from bpcp_jax.tracer.network import (PrunedNetwork, TracedNetwork, leaves_by_path, materialize_traced,
                                     prune_decision, trace_network)
from bpcp_jax.tracer.rebuild import (PLAN_FORMAT, conv_groups, draws_random_numbers, RebuildError, RebuildReport, _Call, _check_plan, _concrete_inputs,
                                     _max_diff, _shapes, removed_block_modules)

COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class Skipped(nnx.Module):
  """A removed residual block: returns its first input."""

  def __call__(self, x, *args, **kwargs):
    return x


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
  """An NNX module seen as ``apply(variables, *inputs, train=False, mutable=False)``; see the module
  docstring. Made from a snapshot of ``model`` (later changes to ``model`` are not seen)."""

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

  def apply(self, variables, *inputs, train: bool = False, mutable=False, rng: Optional[jax.Array] = None,
            rngs: Optional[Mapping] = None, _recorder: Optional[dict] = None):
    """``model(*inputs)`` on a copy with ``variables`` written in, after ``model.train()`` or
    ``model.eval()`` and with ``train=``/``deterministic=`` passed when ``__call__`` takes one (a
    module ported from linen may set its BatchNorms' mode from it). ``rng``: a key the copy's RNG
    streams (dropout) are reseeded from, one ``fold_in`` per stream; without one they draw as they
    are in the snapshot. ``rngs``: linen's form of it, ``{"dropout": key}`` (``rng`` = that key).
    ``mutable``: collections to return the updated values of, as linen does."""
    if rngs:
      if set(rngs) != {"dropout"} or rng is not None:
        raise ValueError(f"rngs= takes one key, {{'dropout': key}} (the key every RNG stream of the module is "
                         f"reseeded from), got {sorted(rngs)}{' and rng=' if rng is not None else ''}")
      rng = rngs["dropout"]
    model = self.merge()
    _write(model, leaves_by_path(variables))
    model.train() if train else model.eval()
    if rng is not None:
      streams = sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})
      if streams:
        nnx.reseed(model, policy="match_shape", **{tag: jax.random.fold_in(rng, i) for i, tag in enumerate(streams)})
    kwargs = mode_kwargs(model, train)
    _scoped(model, _recorder)
    out = model(*inputs, **kwargs)
    if not mutable:
      return out
    cols = list(COLLECTIONS) if mutable is True else [mutable] if isinstance(mutable, str) else list(mutable)
    return out, {col: _collect(model, col) for col in cols}


def trace_nnx(model: nnx.Module, *example_inputs, modes: Optional[Mapping] = None) -> tuple[TracedNetwork, dict]:
  """``(net, variables)``: ``model`` traced by ``trace_network`` through ``NnxNetwork``, in eval
  mode and (by default) train mode (``{"train": True, "mutable": ["batch_stats"]}`` when the
  module has batch statistics)."""
  adapter = NnxNetwork.of(model)
  variables = adapter.variables()
  if modes is None:
    train = {"train": True, **({"mutable": ["batch_stats"]} if "batch_stats" in variables else {})}
    modes = {"eval": {}, "train": train}
  return trace_network(adapter, variables, *example_inputs, modes=modes), variables


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
  ``train=True``/``deterministic=False`` when ``__call__`` takes one, as one compiled program per
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
                     "__call__ fix use_running_average=True (the mode set by model.train() and a train/"
                     "deterministic argument is not reaching its BatchNorms)?")
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


def _group_norm(m):
  attrs = _norm(m)
  if attrs:
    n = attrs["num_features"]
    if n % m.group_size:
      raise ValueError(f"{n} channels do not split into groups of {m.group_size}")
    attrs["num_groups"] = n // m.group_size
  return attrs


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
  q, k, o = _shape(m.query, "kernel"), _shape(m.key, "kernel"), _shape(m.out, "kernel")
  if q[-1] != m.head_dim:
    raise ValueError(f"the per-head dimension changes ({m.head_dim} -> {q[-1]}): the attention scale "
                     "1/sqrt(head_dim) of the materialized layer would differ from the pruned one")
  attrs = {"num_heads": q[-2], "qkv_features": q[-2] * q[-1], "in_features": q[0], "in_kv_features": k[0],
           "out_features": o[-1]}
  if getattr(m, "num_kv_heads", None) == m.num_heads:
    attrs["num_kv_heads"] = q[-2]
  return attrs


RULES = (
    (nnx.MultiHeadAttention, _attention), (nnx.ConvTranspose, _conv_transpose), (nnx.Conv, _conv),
    (nnx.LinearGeneral, _linear_general), (nnx.Linear, _linear), (nnx.Embed, _embed),
    (nnx.GroupNorm, _group_norm), (nnx.BatchNorm, _norm), (nnx.LayerNorm, _norm), (nnx.RMSNorm, _norm),
)


def _layer_widths(model, old_shapes: Mapping, problems: list, notes: list, groups: Optional[Mapping] = None) -> dict:
  """``{path: {attribute: value}}``: the shape attributes of every layer of a known type, from its
  (already written) variables (a complete table, so that it also rebuilds a module pruned twice);
  ``groups``: ``{path: feature_group_count}`` of the grouped convolutions as the pruned program runs them."""
  groups = groups or {}
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
      attrs = rule(m, groups.get(name)) if rule is _conv else rule(m)
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


def narrow_nnx(model: nnx.Module, plan: Mapping, variables: Optional[Mapping] = None) -> nnx.Module:
  """Narrow ``model`` in place by ``plan`` and return it: the removed blocks' modules become
  ``Skipped``, the listed attributes are set, and ``variables``, e.g. restored from a checkpoint,
  are written into its variables: either ``{"params": ..., "batch_stats": ...}`` nested dicts (as
  ``materialize_traced`` and ``trace_nnx`` give them) or the pruned module's own state
  (``nnx.state(pruned)`` or its ``nnx.to_pure_dict``, as one saves an NNX module). Raises
  ``ValueError`` when a path of the plan is not in ``model`` or ``variables`` misses one of its
  variables."""
  _check_plan(plan)
  if plan.get("class") not in (None, type(model).__qualname__):
    raise ValueError(f"the pruning plan was made for class {plan['class']!r}, not {type(model).__qualname__!r}")
  for path in plan["removed_blocks"]:
    try:
      parent, key = _locate(model, path)
      if isinstance(key, int):
        parent[key] = Skipped()
      else:
        getattr(parent, key)
        setattr(parent, key, Skipped())
    except (AttributeError, IndexError, ValueError) as err:
      raise ValueError(f"pruning plan removes block {path!r}, which {type(model).__qualname__} does not have ({err})")
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  for path, attrs in plan["layers"].items():
    if path not in modules:
      raise ValueError(f"pruning plan narrows layer {path!r}, which {type(model).__qualname__} does not have")
    for k, v in attrs.items():
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
  Raises ``RebuildError`` naming each module that cannot be materialized and why.
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
  removed, problems = removed_block_modules(net, masks, calls, inputs, _shapes(small_vars))
  notes: list = []
  plan = None
  if not problems:
    model = adapter.merge()
    cls = type(model)
    skipped = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, Skipped)]  # pruned before
    plan = {"format": PLAN_FORMAT, "class": cls.__qualname__, "layers": {}, "removed_blocks": sorted(skipped + removed)}
    missing: list = []
    narrow_nnx(model, plan)
    _write(model, leaves_by_path(small_vars), missing)
    if missing:
      problems.append(f"{missing[0]}: a variable the pruning dropped, though its module is not a removed block")
    groups = conv_groups(pruned.decision, inputs)  # keyed by the kernel's variable path: "blocks/0/conv1"
    plan["layers"] = _layer_widths(model, net.var_shapes, problems, notes, groups)
  diffs: dict = {}
  if not problems:
    model = narrow_nnx(adapter.merge(), plan, small_vars)  # what a checkpoint restores
    problems, diffs = _check(NnxNetwork.of(model), pruned, small_vars, inputs, net.modes, tol)
    problems += notes if problems else []
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
  - ``apply``: ``train=`` switches ``model.train()``/``model.eval()``; the dropout key reseeds the
    module's RNG streams (``NnxNetwork.apply``); statistics are averaged over ``axis_name`` as
    ``FlaxNetwork`` does.
  - ``materialize``: the smaller network as the user's NNX classes (``rebuild_nnx``, as
    ``materialize_nnx``); its ``plan`` and variable shapes are in ``describe()`` (kind ``"nnx"``), from
    which ``from_description`` narrows the factory's module again (``narrow_nnx``).
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
      other = [f"{'/'.join(map(str, path))} ({type(node).__name__})" for path, node in nnx.iter_graph(self.module.merge())
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

  def _smaller(self, small_vars, masks, decision) -> "NnxFlaxNetwork":
    model, report = rebuild_nnx(self.traced, small_vars, masks)
    return dataclasses.replace(self, module=NnxNetwork.of(model), plan=report.plan,
                               prunings=self.prunings + (decision,), _traced=None, _var_shapes=None)

  def describe(self) -> dict:
    desc = {**super().describe(), "kind": "nnx", "plan": copy.deepcopy(self.plan)}
    if self.plan is not None:
      desc["variable_shapes"] = {p: list(s.shape) for p, s in leaves_by_path(self.variable_shapes()).items()}
    return desc

  @classmethod
  def from_description(cls, desc: Mapping[str, Any], **options) -> "NnxFlaxNetwork":
    """The factory's module, narrowed by the stored plan (its variables zeros of the stored shapes,
    to be replaced by the checkpoint's)."""
    src = desc["source"]
    net = FlaxNetwork.from_factory(src["factory"], src["num_classes"], desc["input_shape"], src.get("kwargs"))
    if not isinstance(net, NnxFlaxNetwork):
      raise ValueError(f"model factory {src['factory']} returns a flax.linen module; the description is of a "
                       "flax.nnx one")
    if not desc.get("plan"):
      return net
    dense = leaves_by_path(net.module.variables())
    zeros = {p: np.zeros(shape, dense[p].dtype) for p, shape in desc["variable_shapes"].items()}
    model = narrow_nnx(net.module.merge(), desc["plan"], traverse_util.unflatten_dict(zeros, sep="/"))
    return dataclasses.replace(net, module=NnxNetwork.of(model), plan=copy.deepcopy(desc["plan"]),
                               prunings=tuple(dict(p) for p in desc.get("prunings", ())))
