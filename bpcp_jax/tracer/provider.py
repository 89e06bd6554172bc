"""Any Flax classifier as a ``PrunableNetwork``: its groups and blocks found by tracing it.

A ``FlaxNetwork`` wraps a ``flax.linen`` module that maps images ``[B, H, W, C]`` to logits,
the place it came from (a factory ``"path/to/file.py:make_model"`` or ``"package.module:make_model"``
and its keyword arguments), and the prunings applied to it since (kept channel positions per
group and kept blocks, each a plain JSON table), so a checkpoint rebuilds the network from the
factory alone. The trace (``trace_network``, an eval and a train mode) is taken on first use.
A model file is imported with its own folder on the import path, so it may import the modules
beside it (``from my_blocks import Block``), also when a checkpoint is loaded from elsewhere.

Train mode: a module whose ``__call__`` takes ``train``, ``training`` or ``is_training`` gets it
``True/False``, one that takes ``deterministic`` gets ``deterministic=not train`` (``train_switch``,
the rule NNX modules follow too, and ``mode_kwargs``); a train mode that computes exactly the eval
mode of a network with BatchNorm or dropout is refused when traced, naming the ``__call__``
(``check_train_mode``); ``batch_stats`` are updated
in train mode when the network has any and, when the step is mapped over devices, averaged over
them after the step (the network's own BatchNorm normalises each device's batch, as flax's
examples do unless ``axis_name`` is set). Random numbers: every stream the network draws from
(``dropout``, ``drop_path``, ...: found while tracing, from flax's error for a missing stream)
gets a key of its own from the key the step passes (``dropout`` that key, any other one
``fold_in(key, crc32(name))``). Named axes: the axis names the network's collectives use
(``BatchNorm(axis_name="batch")``, found while tracing, from jax's error for an unbound name)
are bound while tracing and listed in ``axis_names``; the training steps are mapped over that
axis. Outputs: ``output`` says where the logits are in what the module returns
(``output_logits``): ``"auto"`` takes an array as it is and an output object's ``.logits`` (a
dict's ``"logits"``); a field, key or index path (``"logits"``, ``"0"``, ``"out.logits"``) says it
explicitly. An output it cannot read is an error when the network is traced, before training.

A factory that takes ``rngs`` returns a ``flax.nnx`` module: ``from_factory`` then gives its
subclass ``tracer.nnx.NnxFlaxNetwork``, which runs the module through the ``NnxNetwork`` view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
import zlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.pruning.network import PrunableNetwork


class ModelSourceError(ValueError):
  """A model factory that cannot be found, imported or called; the message names the file."""


def _model_file(ref: str) -> Optional[str]:
  """The absolute path of the file ``ref`` (``"path/to/file.py:fn"``) names; None for a module name."""
  where = ref.rsplit(":", 1)[0]
  return os.path.abspath(where) if ":" in ref and (where.endswith(".py") or os.sep in where) else None


@contextlib.contextmanager
def importable_beside(path: Optional[str]):
  """``path``'s folder first on ``sys.path`` for the duration (as ``python path`` has it), so a
  model file imports the modules beside it; the path is left as it was afterwards."""
  folder = os.path.dirname(path) if path else None
  added = folder is not None and folder not in sys.path
  if added:
    sys.path.insert(0, folder)
  try:
    yield
  finally:
    if added and folder in sys.path:
      sys.path.remove(folder)


def resolve_factory(ref: str):
  """The function ``ref`` names: ``"path/to/file.py:fn"`` or ``"package.module:fn"``. A file is
  imported with its folder on the import path (``from my_blocks import Block`` beside it works).

  Raises ``ModelSourceError`` naming the file or module that cannot be found or imported."""
  if ":" not in ref:
    raise ModelSourceError(f"model {ref!r} is neither a family name (e.g. resnet_v2_56) nor a factory "
                           "'path/to/file.py:function' or 'package.module:function'")
  where, name = ref.rsplit(":", 1)
  path = _model_file(ref)
  if path is not None:
    if not os.path.isfile(path):
      raise ModelSourceError(f"model file not found: {where} (from model={ref!r})")
    mod_name = f"bpcp_user_model_{abs(hash(path))}"
    module = sys.modules.get(mod_name)
    if module is None:
      spec = importlib.util.spec_from_file_location(mod_name, path)
      module = importlib.util.module_from_spec(spec)
      sys.modules[mod_name] = module  # dataclass-based modules look their module up by name
      try:
        with importable_beside(path):
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
    import difflib

    functions = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
    close = difflib.get_close_matches(name, functions, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else (f"; it defines {', '.join(functions[:8])}" if functions
                                                          else "")
    raise ModelSourceError(f"{where} defines no function {name!r} (from model={ref!r}){hint}")
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
    with importable_beside(_model_file(ref)):  # a factory may import its neighbours when called
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


# the names a train/eval switch goes by in public Flax code, with the value each takes in train mode
TRAIN_SWITCHES = (("train", True), ("training", True), ("is_training", True), ("deterministic", False))


def train_switch(fn) -> Optional[tuple[str, bool]]:
  """``(name, value in train mode)`` of the keyword of ``fn`` (a ``__call__``, linen or NNX) that
  switches it between train and eval mode: the first of ``train``, ``training``, ``is_training``
  (``True`` in train mode) and ``deterministic`` (``False``) it takes by name; ``None`` when it takes
  none of them (an NNX module then follows ``model.train()``/``model.eval()`` alone)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return None
  for name, in_train in TRAIN_SWITCHES:
    p = params.get(name)
    if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
      return name, in_train
  return None


def mode_kwargs(module, train: bool) -> dict:
  """``{switch: value}``: the keyword that puts ``module`` (its class's ``__call__``) in train or
  eval mode (``train_switch``), e.g. ``{"training": True}`` or ``{"deterministic": False}`` for
  ``train=True``; ``{}`` when it has none."""
  switch = train_switch(type(module).__call__)
  return {} if switch is None else {switch[0]: train == switch[1]}


def _signature(fn) -> str:
  """``"(x, mode='eval')"``: the parameters of the method ``fn`` after ``self``."""
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return "(...)"
  return f"({', '.join(str(p) for p in params[1:])})"


def _depends_on_inputs(program, ids) -> bool:
  """Whether any of the value ids ``ids`` of ``program`` is computed from its (non-variable) inputs."""
  tainted = set(program.input_ids)
  for e in program.eqns:
    if any(isinstance(v, int) and v in tainted for v in e.ins):
      tainted.update(e.outs)
  return any(isinstance(v, int) and v in tainted for v in ids)


def _linen_has_dropout(module, var_shapes, inputs, eval_kwargs) -> bool:
  """Whether ``module`` calls an ``nn.Dropout`` of a rate above 0 (seen in an abstract eval-mode call)."""
  import flax.linen as nn

  found = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout) and not (isinstance(context.module.rate, (int, float))
                                                       and context.module.rate == 0):
      found.append(True)
    return next_fun(*args, **kwargs)

  kw = {k: v for k, v in eval_kwargs.items() if k not in ("rngs", "mutable")}
  try:
    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda v, x: module.apply(v, *x, **kw), var_shapes, tuple(inputs))
  except Exception:  # noqa: BLE001 - the trace itself ran; an unknown answer is no refusal
    return False
  return bool(found)


def check_train_mode(net, inputs, label: str, modes_hint: bool = False) -> None:
  """Refuse a traced ``net`` (``TracedNetwork``) whose ``"train"`` mode computes exactly its
  ``"eval"`` mode although it has BatchNorm statistics or dropout, when no train switch of a known
  name (``TRAIN_SWITCHES``) reached its ``__call__``: no batch statistic is computed from the
  inputs and no random number is drawn. Raises ``ValueError`` naming the ``__call__`` signature in
  which no switch was found (``modes_hint``: say that ``modes=`` may pass it). A network with neither has
  train == eval legitimately, and one whose known switch leaves them alone (a frozen BatchNorm) chose it."""
  if "train" not in net.modes or "eval" not in net.modes:
    return
  kw = net.modes["train"]
  model = net.model
  nnx_view = hasattr(model, "switch_reaching")  # tracer.nnx.NnxNetwork
  if nnx_view:
    switch, call = model.switch_reaching(kw), model.module_class().__call__
  else:
    call = type(model).__call__
    switch = next((name for name, _ in TRAIN_SWITCHES if name in kw), None)
  if switch is not None:
    return
  program = net.traced("train", inputs)[0]
  from bpcp_jax.tracer.program import draws_random_numbers

  if draws_random_numbers(program):
    return
  out = jax.tree_util.tree_unflatten(program.out_tree, program.outvars)
  stats = out[1].get("batch_stats", {}) if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping) \
      else {}
  if _depends_on_inputs(program, jax.tree_util.tree_leaves(stats)):
    return
  has_bn = "batch_stats" in net.var_shapes
  has_dropout = model.has_dropout() if nnx_view else _linen_has_dropout(model, net.var_shapes, inputs,
                                                                       net.modes["eval"])
  if not (has_bn or has_dropout):
    return
  what = " and ".join(w for w, has in (("BatchNorm", has_bn), ("dropout", has_dropout)) if has)
  names = ", ".join(name for name, _ in TRAIN_SWITCHES)
  how = ""
  if modes_hint:
    try:
      params = list(inspect.signature(call).parameters.values())[2:]
    except (TypeError, ValueError):
      params = []
    name = next((p.name for p in params if p.default is not p.empty and p.name != "rngs"), "your_switch")
    how = f", or pass it in modes= (e.g. modes={{'eval': {{}}, 'train': {{{name!r}: <its train-mode value>}}}})"
  raise ValueError(f"{label}: its train mode computes exactly its eval mode although it has {what} (no "
                   f"statistic moves, no random number is drawn): found no train switch ({names}) in "
                   f"{call.__qualname__}{_signature(call)}; name its switch one of these{how}")


# the errors that name what a trace lacks: a random stream (flax linen's; PrunedNetwork's) or a named axis (jax's)
_MISSING_STREAM = (re.compile(r'needs PRNG for "([^"]+)"'), re.compile(r"draws random numbers from '([^']+)'"))
_UNBOUND_AXIS = re.compile(r"unbound axis name: ([^\s.,;:]+)")
MAX_DISCOVERIES = 16  # streams and axes found one trace at a time; more than this is not a network's


def stream_keys(rng, names) -> dict:
  """``{name: key}`` for every random stream in ``names``, each independent, all from ``rng`` (a
  typed or raw key): ``dropout`` gets ``rng`` itself, any other stream ``fold_in(rng, crc32(name))``."""
  return {n: rng if n == "dropout" else jax.random.fold_in(rng, zlib.crc32(n.encode()) & 0x7FFFFFFF)
          for n in names}


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (Mapping, tuple, list))


def output_logits(out, output: str = "auto", label: str = "the network"):
  """The logits in what a network returns (``out``), as ``output`` says.

  ``"auto"``: an array as it is, else an object's ``.logits`` field (Hugging Face's Flax outputs)
  or a dict's ``"logits"`` key. Otherwise a path of fields, keys and tuple indices separated by
  dots: ``"logits"``, ``"0"`` (a tuple's first item), ``"out.logits"``. Works on arrays and on
  ``jax.ShapeDtypeStruct`` alike. Raises ``ValueError`` naming the output's type and the setting
  (``model_output``) that says where the logits are."""
  if output in ("", "auto"):
    if _is_array(out):
      return out
    if not isinstance(out, Mapping) and hasattr(out, "logits"):
      return out.logits
    if isinstance(out, Mapping) and "logits" in out:
      return out["logits"]
    raise ValueError(f"{label} returns {_describe_output(out)}, not an array of logits: set model_output to the "
                     "field, key or index that holds them (e.g. --config.model_output=0 for a tuple's first item, "
                     "=logits for a field or key of that name)")
  value = out
  for part in str(output).split("."):
    if isinstance(value, (tuple, list)) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
      value = value[int(part)]
    elif isinstance(value, Mapping) and part in value:
      value = value[part]
    elif not isinstance(value, Mapping) and not _is_array(value) and hasattr(value, part):
      value = getattr(value, part)
    else:
      raise ValueError(f"{label}: model_output={output!r}, but {_describe_output(value)} has no field, key or item "
                       f"{part!r}")
  if not _is_array(value):
    raise ValueError(f"{label}: model_output={output!r} gives {_describe_output(value)}, not an array of logits")
  return value


def _describe_output(x) -> str:
  """``"a tuple of 2 items"``, ``"a dict with keys ['a', 'b']"``, ``"a FlaxOutput (fields logits, pooled)"``."""
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)} items"
  if isinstance(x, Mapping):
    return f"a {type(x).__name__} with keys {sorted(map(str, x))[:8]}"
  fields = [f.name for f in dataclasses.fields(x)] if dataclasses.is_dataclass(x) else []
  return f"a {type(x).__name__}" + (f" (fields {', '.join(fields[:8])})" if fields else "")


@dataclasses.dataclass(eq=False)
class FlaxNetwork(PrunableNetwork):
  """A traced Flax classifier. ``prunings``: the decisions applied since ``source``, oldest first.
  ``output``: where the logits are in what ``module`` returns (``output_logits``). ``rng_streams`` and
  ``axis_names``: the random streams and named axes the network uses, found while tracing."""

  module: Any
  input_shape: tuple
  source: Optional[dict] = None  # {"factory": ref, "kwargs": {...}, "num_classes": n}
  prunings: tuple = ()
  label: str = "flax network"
  output: str = "auto"
  _traced: Any = dataclasses.field(default=None, repr=False)
  _var_shapes: Any = dataclasses.field(default=None, repr=False)
  # what earlier traces found (kept by a pruned copy, which draws from the same streams)
  _streams: tuple = dataclasses.field(default=("dropout",), repr=False)
  _axes: tuple = dataclasses.field(default=(), repr=False)

  def __post_init__(self):
    self.input_shape = tuple(int(d) for d in self.input_shape)

  @classmethod
  def from_factory(cls, ref: str, num_classes: int, input_shape, kwargs: Optional[Mapping] = None,
                   output: str = "auto") -> "FlaxNetwork":
    """The network ``factory(num_classes=...)`` returns; a ``NnxFlaxNetwork`` when it is a
    ``flax.nnx`` module (``factory(num_classes=..., rngs=nnx.Rngs(0))``). A file reference is kept
    as an absolute path, so a checkpoint rebuilds it from any working directory. ``output``: where
    the logits are in the module's output (``output_logits``; kept in the description unless "auto")."""
    import flax.linen as nn

    where, _, name = ref.rpartition(":")
    if where and (where.endswith(".py") or os.sep in where):
      ref = f"{os.path.abspath(where)}:{name}"
    module = call_factory(ref, num_classes, kwargs)
    source = {"factory": ref, "kwargs": dict(kwargs or {}), "num_classes": num_classes}
    output = str(output or "auto")
    if output != "auto":
      source["output"] = output
    if not isinstance(module, nn.Module):  # a flax.nnx module (call_factory checked)
      from bpcp_jax.tracer.nnx import NnxFlaxNetwork, NnxNetwork

      return NnxFlaxNetwork(NnxNetwork.of(module), tuple(input_shape), source, label=ref, output=output)
    return cls(module, tuple(input_shape), source, label=ref, output=output)

  @classmethod
  def from_description(cls, desc: Mapping[str, Any], **options) -> "FlaxNetwork":
    """The network a ``describe()`` output names: the factory's module narrowed by the stored plan
    when it was rebuilt as its own class, else the prunings replayed on the traced program."""
    src = desc["source"]
    net = cls.from_factory(src["factory"], src["num_classes"], desc["input_shape"], src.get("kwargs"),
                           output=src.get("output", "auto"))
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
      # streams other than these fall back to "params" while initialising (flax's rule)
      shapes = jax.eval_shape(lambda: self.module.init(
          {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((1, *self.input_shape)),
          **self._mode(False)))
      self._var_shapes = dict(shapes)
    return self._var_shapes

  @property
  def has_batch_stats(self) -> bool:
    """Whether the network has batch statistics (then its train mode returns their new values)."""
    return bool(jax.tree_util.tree_leaves(self.variable_shapes().get("batch_stats", {})))

  @property
  def rng_streams(self) -> tuple:
    """The random streams the network is given (``dropout`` and every one it draws from)."""
    _ = self.traced
    return self._streams

  @property
  def axis_names(self) -> tuple:
    """The named axes the network's collectives use (``BatchNorm(axis_name=...)``), in trace order;
    its train mode runs under them (the pipeline maps its steps over that axis)."""
    return tuple(n for n, _ in self.traced.axis_env)

  @property
  def traced(self):
    if self._traced is None:
      from bpcp_jax.tracer.network import trace_network

      shapes = self.variable_shapes()
      unknown = sorted(set(shapes) - {"params", "batch_stats"})
      if unknown:
        raise ValueError(f"{self.label}: variable collections {unknown} are not supported "
                         "(only params and batch_stats)")
      streams, axes = list(self._streams), dict(self._axes)
      for _ in range(MAX_DISCOVERIES):
        modes = {"eval": self._mode(False),
                 "train": {**self._mode(True), "mutable": ["batch_stats"] if self.has_batch_stats else False,
                           "rngs": {n: jax.random.key(0) for n in streams}}}
        try:
          traced = trace_network(self.module, shapes, self.example(), modes=modes, axis_env=tuple(axes.items()))
          break
        except ValueError as err:  # a stream or an axis the network needs: given, and traced again
          text = str(err)
          stream = next((m.group(1) for r in _MISSING_STREAM for m in [r.search(text)] if m), None)
          axis = _UNBOUND_AXIS.search(text)
          if stream is not None and stream not in streams:
            streams.append(stream)
          elif axis is not None and axis.group(1) not in axes:
            axes[axis.group(1)] = jax.device_count()
          else:
            raise
      else:
        raise ValueError(f"{self.label}: tracing still needs more random streams or named axes after "
                         f"{MAX_DISCOVERIES} (streams {streams}, axes {sorted(axes)})")
      check_train_mode(traced, (self.example(),), self.label)
      self._check_output(traced)
      self._streams, self._axes = tuple(streams), tuple(axes.items())
      self._traced = traced
    return self._traced

  def _check_output(self, traced) -> None:
    """Refuse, before any training, an output in which ``output_logits`` finds no logits ``[B, classes]``."""
    example = self.example()
    program = traced.traced("eval", (example,))[0]
    from bpcp_jax.tracer.network import abstract_like

    leaves = [abstract_like(program.avals[o]) if isinstance(o, int) else abstract_like(o.value)
              for o in program.outvars]
    out = jax.tree_util.tree_unflatten(program.out_tree, leaves)
    logits = output_logits(out, self.output, self.label)
    if len(logits.shape) != 2 or logits.shape[0] != example.shape[0]:
      raise ValueError(f"{self.label}: its logits are shaped {tuple(logits.shape)} for a batch of {example.shape[0]}, "
                       "not [batch, classes]" + ("" if self.output != "auto" else
                                                 "; set model_output to where the logits are in its output"))

  def logits(self, out):
    """The logits in ``out``, what the module returns (``output_logits`` with this network's ``output``)."""
    return output_logits(out, self.output, self.label)

  # -- structure -----------------------------------------------------------------------------
  @property
  def block_names(self) -> list[str]:
    return list(self.traced.blocks)

  @property
  def group_widths(self) -> dict[str, int]:
    return {n: g.width for n, g in self.traced.groups.items()}

  # -- computing -----------------------------------------------------------------------------
  def init(self, rng) -> dict:
    """Fresh variables; every random stream of the network gets its own key from ``rng``."""
    extra = stream_keys(jax.random.fold_in(rng, 1), self.rng_streams)
    rngs = {**extra, "params": rng}
    return dict(self.module.init(rngs, jnp.zeros((1, *self.input_shape)), **self._mode(False)))

  def apply(self, variables, x, *, train, masks=None, block_gates=None, rng=None, axis_name=None):
    """See ``PrunableNetwork.apply``; the logits are read from the module's output as ``output``
    says. ``rng`` gives every random stream its own key (``stream_keys``). ``variables`` may hold an
    empty ``batch_stats`` (the train step passes one): whether the train mode returns statistics is
    the network's own property (``has_batch_stats``), not the variables'."""
    has_stats = self.has_batch_stats
    rngs = stream_keys(rng, self.rng_streams) if rng is not None else None
    if masks is None and block_gates is None:
      kw = self._mode(train)
      if not train:
        return self.logits(self.module.apply(variables, x, **kw))
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
      # typed or raw: the program takes either
      out = masked_apply(self.traced, variables, masks, x, mode=mode, block_gates=block_gates,
                         rngs=stream_keys(rng, draws) or None)
      if not train:
        return self.logits(out)
      logits, stats = (out[0], out[1].get("batch_stats", {})) if has_stats else (out, {})
    if axis_name is not None and stats:
      stats = jax.lax.pmean(stats, axis_name)
    return self.logits(logits).astype(jnp.float32), stats

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

  def _smaller(self, small_vars, masks, decision, say: bool = False) -> "FlaxNetwork":
    """The pruned network as the user's own class, narrower (``tracer.rebuild``), or as the traced
    program (``PrunedNetwork``) when the class cannot be rebuilt; ``say`` (materialization): that
    fallback is said in one line on stdout (the first reason, and how many more). A network already
    the traced program stays one, silently."""
    from bpcp_jax.tracer.network import PrunedNetwork, prune_decision
    from bpcp_jax.tracer.rebuild import RebuildWarning, _shapes, fallback_summary, plan_summary, rebuild

    if isinstance(self.module, PrunedNetwork):  # fell back before: said then
      module = PrunedNetwork(prune_decision(self.traced, masks), _shapes(small_vars))
    else:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RebuildWarning)  # said below, in one line
        module, report = rebuild(self.traced, small_vars, masks)
      if say and jax.process_index() == 0:
        if report.rebuilt:
          print(f"[materialize] {self.label}: rebuilt as your own {type(self.module).__name__}, narrowed "
                f"({plan_summary(report.plan)})", flush=True)
        else:
          print(f"[materialize] {self.label}: kept as the traced program (PrunedNetwork), not rebuilt as "
                f"{type(self.module).__name__}: {fallback_summary(report.problems, 'bp.rebuild reports them all')}",
                flush=True)
    return dataclasses.replace(self, module=module, prunings=self.prunings + (decision,), _traced=None,
                               _var_shapes=None)  # its streams and axes are the original's

  def materialize(self, variables, masks, opt_state=None):
    from bpcp_jax.tracer.network import materialize_traced

    if opt_state is not None:
      _, small_vars, small_opt = materialize_traced(self.traced, variables, masks, opt_state=opt_state)
    else:
      _, small_vars = materialize_traced(self.traced, variables, masks)
    net = self._smaller(small_vars, masks, self._decision(masks), say=True)
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
