"""Any Flax classifier as a ``PrunableNetwork``: its groups and blocks found by tracing it.

A ``FlaxNetwork`` wraps a ``flax.linen`` module that maps images ``[B, H, W, C]`` to logits,
the place it came from (a factory ``"path/to/file.py:make_model"`` or ``"package.module:make_model"``
and its keyword arguments), and the prunings applied to it since (kept channel positions per
group and kept blocks, each a plain JSON table), so a checkpoint rebuilds the network from the
factory alone. The trace (``trace_network``, an eval and a train mode) is taken on first use.

Train mode: a module whose ``__call__`` takes ``train`` gets ``train=True/False``, one that takes
``deterministic`` gets ``deterministic=not train``; ``batch_stats`` are updated in train mode and,
when the step is mapped over devices, averaged over them after the step (the network's own
BatchNorm normalises each device's batch, as flax's examples do unless ``axis_name`` is set);
dropout draws from the ``dropout`` stream of the key the step passes.

A factory that takes ``rngs`` returns a ``flax.nnx`` module: ``from_factory`` then gives its
subclass ``tracer.nnx.NnxFlaxNetwork``, which runs the module through the ``NnxNetwork`` view.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.pruning.network import PrunableNetwork


class ModelSourceError(ValueError):
  """A model factory that cannot be found, imported or called; the message names the file."""


def resolve_factory(ref: str):
  """The function ``ref`` names: ``"path/to/file.py:fn"`` or ``"package.module:fn"``."""
  if ":" not in ref:
    raise ModelSourceError(f"model {ref!r} is neither a family name (e.g. resnet_v2_56) nor a factory "
                           "'path/to/file.py:function' or 'package.module:function'")
  where, name = ref.rsplit(":", 1)
  if where.endswith(".py") or os.sep in where:
    path = os.path.abspath(where)
    if not os.path.isfile(path):
      raise ModelSourceError(f"model file not found: {where} (from model={ref!r})")
    mod_name = f"bpcp_user_model_{abs(hash(path))}"
    module = sys.modules.get(mod_name)
    if module is None:
      spec = importlib.util.spec_from_file_location(mod_name, path)
      module = importlib.util.module_from_spec(spec)
      sys.modules[mod_name] = module  # dataclass-based modules look their module up by name
      try:
        spec.loader.exec_module(module)
      except Exception as e:  # a broken file: say which one
        del sys.modules[mod_name]
        raise ModelSourceError(f"could not import model file {where}: {type(e).__name__}: {e}") from e
  else:
    try:
      module = importlib.import_module(where)
    except Exception as e:
      raise ModelSourceError(f"could not import model module {where!r} (from model={ref!r}): "
                             f"{type(e).__name__}: {e}") from e
  fn = getattr(module, name, None)
  if fn is None or not callable(fn):
    raise ModelSourceError(f"{where} defines no function {name!r} (from model={ref!r})")
  return fn


def call_factory(ref: str, num_classes: int, kwargs: Optional[Mapping] = None, rng=None):
  """``factory(num_classes=..., **kwargs)`` (``num_classes`` only if the factory takes it): a
  ``flax.linen`` module, or a ``flax.nnx`` module when the factory takes ``rngs``, which gets
  ``rngs=nnx.Rngs(rng)`` (``rng``: a PRNG key or an int seed). Without ``rng`` an NNX module is
  made by ``nnx.eval_shape`` with zeros for its variables (``tracer.nnx.placeholders``): its
  structure and shapes, without running (and compiling) its initializers."""
  import flax.linen as nn
  from flax import nnx

  fn = resolve_factory(ref)
  kwargs = dict(kwargs or {})
  try:
    params = inspect.signature(fn).parameters
    takes_classes = "num_classes" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
  except (TypeError, ValueError):
    params, takes_classes = {}, False
  if takes_classes:
    kwargs.setdefault("num_classes", num_classes)
  takes_rngs = "rngs" in params
  if rng is not None and not isinstance(rng, int) and not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # a raw jax.random.PRNGKey

  def make():
    module = fn(**kwargs, **({"rngs": nnx.Rngs(0 if rng is None else rng)} if takes_rngs else {}))
    if takes_rngs and not isinstance(module, nnx.Module):
      raise ModelSourceError(f"model factory {ref} takes 'rngs' but returned {type(module).__name__}, not a "
                             "flax.nnx Module (a flax.linen factory takes no rngs)")
    return module

  try:
    if takes_rngs and rng is None:
      from bpcp_jax.tracer.nnx import placeholders

      module = placeholders(nnx.eval_shape(make))
    else:
      module = make()
  except ModelSourceError:
    raise
  except Exception as e:
    raise ModelSourceError(f"model factory {ref} failed: {type(e).__name__}: {e}") from e
  if isinstance(module, nnx.Module) and not takes_rngs:
    raise ModelSourceError(f"model factory {ref} returned a flax.nnx Module ({type(module).__name__}) but takes no "
                           "'rngs' argument: write it as factory(num_classes=..., rngs=nnx.Rngs(0)) and build the "
                           "module with those rngs, so that the network can be initialised from a given key")
  if not isinstance(module, (nn.Module, nnx.Module)):
    raise ModelSourceError(f"model factory {ref} returned {type(module).__name__}, not a flax.linen Module "
                           "(nor a flax.nnx one)")
  return module


def mode_kwargs(module, train: bool) -> dict:
  """The keyword that switches ``module`` between train and eval mode, if it has one."""
  try:
    params = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return {}
  if "train" in params:
    return {"train": train}
  if "deterministic" in params:
    return {"deterministic": not train}
  return {}


@dataclasses.dataclass(eq=False)
class FlaxNetwork(PrunableNetwork):
  """A traced Flax classifier. ``prunings``: the decisions applied since ``source``, oldest first."""

  module: Any
  input_shape: tuple
  source: Optional[dict] = None  # {"factory": ref, "kwargs": {...}, "num_classes": n}
  prunings: tuple = ()
  label: str = "flax network"
  _traced: Any = dataclasses.field(default=None, repr=False)
  _var_shapes: Any = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    self.input_shape = tuple(int(d) for d in self.input_shape)

  @classmethod
  def from_factory(cls, ref: str, num_classes: int, input_shape, kwargs: Optional[Mapping] = None) -> "FlaxNetwork":
    """The network ``factory(num_classes=...)`` returns; a ``NnxFlaxNetwork`` when it is a
    ``flax.nnx`` module (``factory(num_classes=..., rngs=nnx.Rngs(0))``). A file reference is kept
    as an absolute path, so a checkpoint rebuilds it from any working directory."""
    import flax.linen as nn

    where, _, name = ref.rpartition(":")
    if where and (where.endswith(".py") or os.sep in where):
      ref = f"{os.path.abspath(where)}:{name}"
    module = call_factory(ref, num_classes, kwargs)
    source = {"factory": ref, "kwargs": dict(kwargs or {}), "num_classes": num_classes}
    if not isinstance(module, nn.Module):  # a flax.nnx module (call_factory checked)
      from bpcp_jax.tracer.nnx import NnxFlaxNetwork, NnxNetwork

      return NnxFlaxNetwork(NnxNetwork.of(module), tuple(input_shape), source, label=ref)
    return cls(module, tuple(input_shape), source, label=ref)

  @classmethod
  def from_description(cls, desc: Mapping[str, Any], **options) -> "FlaxNetwork":
    """The network a ``describe()`` output names: the factory's module narrowed by the stored plan
    when it was rebuilt as its own class, else the prunings replayed on the traced program."""
    src = desc["source"]
    net = cls.from_factory(src["factory"], src["num_classes"], desc["input_shape"], src.get("kwargs"))
    if desc.get("plan"):
      from bpcp_jax.tracer.rebuild import narrow

      return dataclasses.replace(net, module=narrow(net.module, desc["plan"]),
                                 prunings=tuple(dict(p) for p in desc.get("prunings", ())))
    for decision in desc.get("prunings", ()):
      net = net._apply_decision(decision)
    return net

  def describe(self) -> dict[str, Any]:
    """The factory, the prunings applied since (kept channels per group, kept blocks) and, when the
    pruned network is the user's class narrowed, its plan (widths per layer, removed blocks)."""
    from bpcp_jax.tracer.rebuild import plan_of

    if self.source is None:
      raise ValueError("this network was not made from a factory, so a checkpoint cannot rebuild it; "
                       "give the model as 'path/to/file.py:function'")
    return {"kind": "flax", "source": dict(self.source), "input_shape": list(self.input_shape),
            "prunings": [dict(p) for p in self.prunings], "plan": plan_of(self.module)}

  # -- the trace -----------------------------------------------------------------------------
  def _mode(self, train: bool) -> dict:
    """The keyword arguments of ``module.apply`` that select train or eval mode."""
    return mode_kwargs(self.module, train)

  def example(self, batch: int = 2):
    return jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.float32)

  def variable_shapes(self):
    if self._var_shapes is None:
      shapes = jax.eval_shape(lambda: self.module.init(
          {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((1, *self.input_shape)),
          **self._mode(False)))
      self._var_shapes = dict(shapes)
    return self._var_shapes

  @property
  def traced(self):
    if self._traced is None:
      from bpcp_jax.tracer.network import trace_network

      shapes = self.variable_shapes()
      unknown = sorted(set(shapes) - {"params", "batch_stats"})
      if unknown:
        raise ValueError(f"{self.label}: variable collections {unknown} are not supported "
                         "(only params and batch_stats)")
      modes = {"eval": self._mode(False),
               "train": {**self._mode(True), "mutable": ["batch_stats"] if "batch_stats" in shapes
                         else False, "rngs": {"dropout": jax.random.key(0)}}}
      self._traced = trace_network(self.module, shapes, self.example(), modes=modes)
    return self._traced

  # -- structure -----------------------------------------------------------------------------
  @property
  def block_names(self) -> list[str]:
    return list(self.traced.blocks)

  @property
  def group_widths(self) -> dict[str, int]:
    return {n: g.width for n, g in self.traced.groups.items()}

  # -- computing -----------------------------------------------------------------------------
  def init(self, rng) -> dict:
    rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1)}
    return dict(self.module.init(rngs, jnp.zeros((1, *self.input_shape)), **self._mode(False)))

  def apply(self, variables, x, *, train, masks=None, block_gates=None, rng=None, axis_name=None):
    has_stats = "batch_stats" in variables
    rngs = {"dropout": rng} if rng is not None else None
    if masks is None and block_gates is None:
      kw = self._mode(train)
      if not train:
        return self.module.apply(variables, x, **kw)
      out = self.module.apply(variables, x, **kw, rngs=rngs, mutable=["batch_stats"] if has_stats else False)
      logits, stats = (out[0], out[1].get("batch_stats", {})) if has_stats else (out, {})
    else:
      from bpcp_jax.tracer.network import masked_apply

      masks = self.init_masks() if masks is None else masks
      mode = "train" if train else "eval"
      from bpcp_jax.tracer.program import draws_random_numbers

      program = self.traced.traced(mode, (x,))[0]  # the program masked_apply runs (cached)
      draws = program.rng_names if train else ()
      if draws and rng is None:
        if draws_random_numbers(program):
          raise ValueError(f"{self.label}: the train mode draws random numbers ({', '.join(draws)}): pass rng=")
        rng = jax.random.key(0)  # a key the program takes but never reads
      key = rng  # typed or raw: the program takes either
      out = masked_apply(self.traced, variables, masks, x, mode=mode, block_gates=block_gates,
                         rngs={n: key for n in draws} or None)
      if not train:
        return out
      logits, stats = (out[0], out[1].get("batch_stats", {})) if has_stats else (out, {})
    if axis_name is not None and stats:
      stats = jax.lax.pmean(stats, axis_name)
    return logits.astype(jnp.float32), stats

  # -- pruning -------------------------------------------------------------------------------
  def _decision(self, masks) -> dict:
    return {"channels": {g: np.flatnonzero(np.asarray(m) > 0.5).tolist() for g, m in masks["channels"].items()},
            "blocks": {b: bool(np.asarray(v) >= 0) for b, v in masks["blocks"].items()}}

  def _masks_of(self, decision) -> dict:
    masks = self.init_masks()
    for g, kept in decision["channels"].items():
      m = np.zeros(self.group_widths[g], np.float32)
      m[np.asarray(kept, int)] = 1.0
      masks["channels"][g] = jnp.asarray(m)
    masks["blocks"] = {b: jnp.float32(1.0 if k else -1.0) for b, k in decision["blocks"].items()}
    return masks

  def _apply_decision(self, decision) -> "FlaxNetwork":
    from bpcp_jax.tracer.network import materialize_traced

    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.variable_shapes())
    masks = self._masks_of(decision)
    _, small_vars = materialize_traced(self.traced, zeros, masks)
    return self._smaller(small_vars, masks, decision)

  def _smaller(self, small_vars, masks, decision) -> "FlaxNetwork":
    """The pruned network as the user's own class, narrower (``tracer.rebuild``), or as the traced
    program (``PrunedNetwork``) when the class cannot be rebuilt, which is said once on stdout."""
    from bpcp_jax.tracer.rebuild import RebuildWarning, rebuild

    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RebuildWarning)  # said below, in one line
      module, report = rebuild(self.traced, small_vars, masks)
    if not report.rebuilt and jax.process_index() == 0:
      print(f"[materialize] {self.label}: kept as the traced program (PrunedNetwork), not rebuilt as "
            f"{type(self.module).__name__}: {'; '.join(report.problems)}", flush=True)
    return dataclasses.replace(self, module=module, prunings=self.prunings + (decision,), _traced=None,
                               _var_shapes=None)

  def materialize(self, variables, masks, opt_state=None):
    from bpcp_jax.tracer.network import materialize_traced

    if opt_state is not None:
      _, small_vars, small_opt = materialize_traced(self.traced, variables, masks, opt_state=opt_state)
    else:
      _, small_vars = materialize_traced(self.traced, variables, masks)
    net = self._smaller(small_vars, masks, self._decision(masks))
    return (net, small_vars) if opt_state is None else (net, small_vars, small_opt)

  def channel_importance(self, variables, criterion, *, reduce="max", key=None, masks=None):
    from bpcp_jax.pruning.speed_select import traced_importance

    return traced_importance(self.traced, variables, criterion, reduce=reduce, key=key)

  def select_channels(self, scores, prune_ratio, *, masks=None, **select_kwargs):
    from bpcp_jax.pruning.channel_prune import select_from_scores

    masks = self.init_masks() if masks is None else masks
    return select_from_scores(self.group_widths, scores, prune_ratio, masks=masks,
                              macs_of=lambda widths: self._macs_at(widths, masks), **select_kwargs)

  def _macs_at(self, widths: Mapping[str, int], masks) -> int:
    from bpcp_jax.tracer.network import count_traced_at

    return count_traced_at(self.traced, widths, {b: bool(np.asarray(v) >= 0) for b, v in masks["blocks"].items()})

  def select_speed(self, variables, *, criterion, reduce, key, **kwargs):
    from bpcp_jax.pruning.speed_select import select_pruning

    scores = self.channel_importance(variables, criterion, reduce=reduce, key=key)
    selection = select_pruning(self.traced, variables, importance=scores, **kwargs)
    report = [{"group": g, "width": w, "kept": int(np.sum(np.asarray(selection.masks["channels"][g]) > 0.5)),
               "kept_to_avoid_empty": False} for g, w in sorted(self.group_widths.items())]
    return selection.masks, report, selection

  # -- measuring and deploying --------------------------------------------------------------
  def counts(self, variables=None) -> dict[str, int]:
    from bpcp_jax.tracer.network import count_traced

    shapes = self.variable_shapes()
    params = int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes.get("params", {}))))
    _, macs = count_traced(self.traced, shapes)
    return {"params": params, "macs": int(macs), "blocks": len(self.block_names)}

  def deployable(self):
    return self.module

  def block_io(self, variables, x) -> dict:
    from bpcp_jax.tracer.block_io import block_io

    return block_io(self.traced, variables, x)
