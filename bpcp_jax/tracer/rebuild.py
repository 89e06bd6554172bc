"""The pruned network as the user's own ``flax.linen`` class, narrower.

``materialize_traced`` gives a ``PrunedNetwork``, an interpreter of the traced program. Here the
pruned network is instead an instance of (a subclass made on the fly of) the user's own module
class, with the same fields: its methods run inside ``flax.linen.intercept_methods`` with an
interceptor that, before each call of a flax layer, sets the layer's width attributes from a
*plan*, and skips the removed residual blocks. Methods, submodules, ``nn.tabulate``, ``init``
and any batch size then work as for any Flax module.

A plan is a plain JSON-serialisable table::

    {"format": "bpcp_jax.plan/1", "class": "Net",
     "layers": {"Block_0/Conv_1": {"features": 12}, "dw": {"features": 24, "feature_group_count": 24}},
     "removed_blocks": ["Block_1"]}

``layers`` maps a module path (as in the variables, "" for the top module) to the attributes
that differ from the dense network; each width is derived from the pruned variables' shapes
(``features`` of ``nn.Dense``/``nn.Conv``/``nn.ConvTranspose``/``nn.Embed``/``nn.DenseGeneral``,
depthwise ``feature_group_count``, ``num_heads``/``qkv_features``/``out_features`` of
``nn.MultiHeadDotProductAttention``, ``num_groups`` of ``nn.GroupNorm``; norms take their width
from their input). ``removed_blocks`` lists the modules whose ``__call__`` returns ``x + f(x)``
for a residual block the masks remove: they return their first input instead. Which module that
is comes from the trace: the add runs directly in that module (its named scope), its output is
the module's output, and its other operand comes from outside the module.

A layer of a type not listed whose variables change shape is assumed to take its widths from
its input (``report.assumed``). ``rebuild`` makes the plan, narrows the class and checks the
result against the traced ``PrunedNetwork`` (``init`` shapes, then outputs and updated
collections in every traced mode); when the class cannot be rebuilt (a width hard-coded in user
code, a removed block with a projection shortcut or whose add is not its module's output, a
layer whose widths do not follow its input) it warns, naming the module path and the reason,
and returns the ``PrunedNetwork``. Blocks are located through the named scopes Flax opens
around module calls (``flax_profile``, on by default). A rebuilt network traced and pruned
again gets a plan holding both rounds, from the original class.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np

from bpcp_jax.tracer.network import (PrunedNetwork, TracedNetwork, abstract_like, example_inputs_of,
                                     _shrink, prune_decision)
from bpcp_jax.tracer.program import Lit
from bpcp_jax.tracer.program import draws_random_numbers as program_draws

PLAN_FORMAT = "bpcp_jax.plan/1"
CONTRACTIONS = ("conv_general_dilated", "dot_general")


class RebuildWarning(UserWarning):
  """The pruned network could not be rebuilt as the user's class; the traced program is used."""


class RebuildError(ValueError):
  """Raised by ``pruning_plan`` when some module cannot be narrowed; ``problems`` lists each
  ``"<module path>: <reason>"``."""

  def __init__(self, problems):
    self.problems = list(problems)
    super().__init__("the network cannot be rebuilt as its own class:\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass
class RebuildReport:
  """What ``rebuild`` did. ``rebuilt``: the module returned is the user's class (else the
  ``PrunedNetwork``); ``problems``: ``"<module path>: <reason>"`` for each reason it is not;
  ``max_abs_diff``: per traced mode, the largest difference between the rebuilt module and the
  ``PrunedNetwork`` (outputs and updated collections) on the example inputs (a mode that draws
  random numbers, e.g. dropout in train mode, is compared in shapes only: a narrowed dropout layer
  draws its own mask); ``assumed``: layers
  of types it does not know whose widths were taken to follow their inputs (checked)."""

  rebuilt: bool
  plan: Optional[dict]
  problems: list
  max_abs_diff: dict
  assumed: list = dataclasses.field(default_factory=list)

  def __str__(self):
    head = "rebuilt as the user's class" if self.rebuilt else "not rebuilt; using the traced PrunedNetwork"
    lines = [head] + [f"  {p}" for p in self.problems]
    lines += [f"  {mode}: max |rebuilt - traced| = {d:.3g}" for mode, d in self.max_abs_diff.items()]
    return "\n".join(lines)


# -- which modules the network calls, and where ---------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Call:
  path: tuple
  method: str
  module: Any
  count: int = 0


def _scope_name(module, method: str) -> str:
  """The ``jax.named_scope`` Flax opens around a method call (``flax.linen.module._derive_profiling_name``)."""
  return (module.name or type(module).__name__) + ("" if method == "__call__" else f".{method}")


def record_calls(model, var_shapes, inputs, modes: Mapping) -> dict:
  """``{named-scope path: _Call}`` of every module method call of ``model.apply`` in each mode,
  found by abstract evaluation; ``count`` is the largest number of calls in one mode."""
  calls: dict = {}
  for kwargs in modes.values():
    counts: dict = {}
    stack: list = []

    def recorder(next_fun, args, kw, context):
      m = context.module
      stack.append(_scope_name(m, context.method_name))
      try:
        if m.scope is not None and context.method_name != "setup":
          key = "/".join(stack)
          calls.setdefault(key, _Call(tuple(m.path), context.method_name, m))
          counts[key] = counts.get(key, 0) + 1
        return next_fun(*args, **kw)
      finally:
        stack.pop()

    with nn.intercept_methods(recorder):
      jax.eval_shape(lambda v, x, kw=kwargs: model.apply(v, *x, **kw), var_shapes, tuple(inputs))
    for key, n in counts.items():
      calls[key].count = max(calls[key].count, n)
  return calls


# -- widths from the pruned variables' shapes ----------------------------------------------------

class _Cannot(Exception):
  """A module that cannot be narrowed; the message is the reason."""


def _node(tree: Mapping, path: tuple):
  for part in path:
    if not isinstance(tree, Mapping) or part not in tree:
      return None
    tree = tree[part]
  return tree if isinstance(tree, Mapping) else None


def _own_shapes(var_shapes: Mapping, path: tuple) -> dict:
  """``{"params/kernel": shape, ...}``: the variables of the module at ``path`` itself (not its children)."""
  out = {}
  for col, tree in var_shapes.items():
    node = _node(tree, path)
    for name, leaf in (node or {}).items():
      if not isinstance(leaf, Mapping):
        out[f"{col}/{name}"] = tuple(int(d) for d in leaf.shape)
  return out


def _conv(m, own, child):
  kernel = own["params/kernel"]
  attrs = {"features": kernel[-1]}
  groups = getattr(m, "feature_group_count", 1)
  if groups > 1:  # depthwise: the group count follows the output width (multiplier fixed)
    attrs["feature_group_count"] = ("per_group_out", kernel[-1])
  return attrs


def _dense(m, own, child):
  return {"features": own["params/kernel"][-1]}


def _dense_general(m, own, child):
  norm = lambda a: (a,) if isinstance(a, int) else tuple(a)  # noqa: E731
  n_in = len(norm(m.batch_dims)) + len(norm(m.axis))
  features = own["params/kernel"][n_in:]
  return {"features": features[0] if isinstance(m.features, int) else tuple(features)}


def _embed(m, own, child):
  return {"num_embeddings": own["params/embedding"][0], "features": own["params/embedding"][-1]}


def _attention(m, own, child):
  q, out = child("query").get("params/kernel"), child("out").get("params/kernel")
  if q is None or out is None:
    raise _Cannot("attention without its query/out projections in the variables")
  heads, head_dim = q[-2], q[-1]
  return {"num_heads": heads, "qkv_features": heads * head_dim, "out_features": out[-1], "head_dim": head_dim}


def _group_norm(m, own, child):
  width = (own.get("params/scale") or own.get("params/bias") or (None,))[-1]
  if width is None or m.num_groups is None:
    return {}
  return {"num_groups": ("per_group", width)}


def _from_input(m, own, child):
  return {}


# (class, rule): the first isinstance match; a rule maps the module's shapes to its width attributes
RULES = (
    (nn.MultiHeadDotProductAttention, _attention),
    (nn.ConvTranspose, _conv), (nn.ConvLocal, _conv), (nn.Conv, _conv),
    (nn.Dense, _dense), (nn.DenseGeneral, _dense_general), (nn.Embed, _embed),
    (nn.GroupNorm, _group_norm),
    (nn.BatchNorm, _from_input), (nn.LayerNorm, _from_input), (nn.RMSNorm, _from_input),
)


def _rule_for(module):
  for cls, rule in RULES:
    if isinstance(module, cls):
      return rule
  return None


def _layer_attrs(module, old_shapes, new_shapes, path, groups: Optional[int] = None) -> tuple[dict, Optional[str]]:
  """The attributes of ``module`` that change from the dense to the pruned shapes, and a note when
  its type is unknown but its variables change shape (assumed to take their widths from its input,
  which the check of the rebuilt module then confirms or refutes)."""
  rule = _rule_for(module)
  own_old, own_new = _own_shapes(old_shapes, path), _own_shapes(new_shapes, path)
  if own_old and not own_new:
    raise _Cannot("its variables are dropped by the pruning, but it is not inside a removed block's module")
  if rule is None:
    note = None
    if own_old != own_new:
      changed = [f"{k} {own_old[k]} -> {own_new.get(k)}" for k in own_old if own_old[k] != own_new.get(k)]
      note = (f"{'/'.join(path) or '<top>'}: a layer type whose widths this does not know "
              f"({type(module).__qualname__}: {', '.join(changed)}), assumed to take them from its input")
    return {}, note
  old = rule(module, own_old, lambda n: _own_shapes(old_shapes, path + (n,)))
  new = rule(module, own_new, lambda n: _own_shapes(new_shapes, path + (n,)))
  attrs = {}
  for key, value in new.items():
    if key == "feature_group_count" and groups is not None:  # as the pruned program convolves
      value, old_value = groups, getattr(module, key)
    elif isinstance(value, tuple) and value and value[0] in ("per_group_out", "per_group"):
      # a count that keeps the per-group size: new = old_count * new_width / old_width
      count, old_w, new_w = getattr(module, key), old[key][1], value[1]
      if (count * new_w) % old_w:
        raise _Cannot(f"{key}={count} does not divide the kept width {new_w} into groups of the same size")
      value, old_value = count * new_w // old_w, count
    else:
      old_value = old[key]
    if value != old_value:
      attrs[key] = value
  if "head_dim" in attrs:
    raise _Cannot(f"the per-head dimension changes ({old['head_dim']} -> {attrs['head_dim']}): the attention "
                  "scale 1/sqrt(head_dim) of the rebuilt layer would differ from the pruned one")
  attrs.pop("head_dim", None)
  if "num_embeddings" in attrs:
    raise _Cannot(f"the vocabulary changes ({old['num_embeddings']} -> {attrs['num_embeddings']})")
  return attrs, None


def _shapes(tree):
  return jax.tree_util.tree_map(abstract_like, tree)


def _paths(tree, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_paths(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(int(d) for d in v.shape)
  return out


# -- which module each removed block is ---------------------------------------------------------

def _under(where: str, scope: str) -> bool:
  return where == scope or where.startswith(scope + "/")


def block_modules(net: TracedNetwork, calls: Mapping, inputs) -> dict:
  """``{block: (module path, None) or (None, reason)}``: the module whose call returns the block's
  add, with its other operand coming from outside the module; else why none can be skipped."""
  program, coupling = net.traced(next(iter(net.modes)), inputs)
  producer, consumers = {}, {}
  for idx, e in enumerate(program.eqns):
    for o in e.outs:
      producer[o] = idx
    for v in e.ins:
      if not isinstance(v, Lit):
        consumers.setdefault(v, []).append(idx)
  data = set(program.invars[program.n_vars:])
  for e in program.eqns:
    if any(v in data for v in e.ins if not isinstance(v, Lit)):
      data.update(e.outs)

  out = {}
  for name, block in coupling.block_sites[program].items():
    add = program.eqns[block.eqn]
    call = calls.get(add.where)
    if call is None:
      out[name] = (None, f"its add runs at {add.where!r}, which is no module call it could find "
                         "(named scopes off, or a transformed module)")
      continue
    path = "/".join(map(str, call.path))
    where = f"block {name} (module {path or '<top>'!s})"
    if not call.path:
      out[name] = (None, f"block {name}: its add is in the top-level module's own code; only a "
                         "submodule that returns x + f(x) can be skipped")
    elif call.method != "__call__" or call.count > 1:
      out[name] = (None, f"{where}: its add is in method {call.method!r} called {call.count} time(s); "
                         "only a module called once, in __call__, can be skipped")
    elif any(_under(program.eqns[i].where, add.where) for i in consumers.get(add.outs[0], [])):
      i = next(i for i in consumers[add.outs[0]] if _under(program.eqns[i].where, add.where))
      out[name] = (None, f"{where}: the sum x + f(x) is processed further inside the module "
                         f"({program.eqns[i].name}), so the module does not return it")
    else:
      inner = _inside_ops(program, producer, data, block.residual, add.where)
      if inner is None:
        out[name] = (path, None)
      else:
        op = program.eqns[inner]
        kind = ("a projection shortcut" if op.name in CONTRACTIONS
                else f"a shortcut computed inside the module ({op.name})")
        out[name] = (None, f"{where}: {kind} at {op.where}; skipping the module would return its "
                           "input instead of the shortcut")
  return out


def _inside_ops(program, producer, data, residual, scope) -> Optional[int]:
  """The first op (a weighted contraction if there is one) inside ``scope`` that computes ``residual``."""
  found, todo, seen = None, [residual], set()
  while todo:
    v = todo.pop()
    if v in seen or v not in producer or v not in data:
      continue
    seen.add(v)
    idx = producer[v]
    e = program.eqns[idx]
    if not _under(e.where, scope):
      continue
    weighted = e.name in CONTRACTIONS and any(u not in data for u in e.ins if not isinstance(u, Lit))
    if weighted:
      return idx
    found = idx if found is None else found
    todo.extend(u for u in e.ins if not isinstance(u, Lit))
  return found


# -- the plan -------------------------------------------------------------------------------------

def _concrete_inputs(net: TracedNetwork, inputs):
  """The example inputs, or random ones shaped like the traced inputs."""
  if not inputs:
    inputs = example_inputs_of(net)
  leaves, tree = jax.tree_util.tree_flatten(tuple(inputs))
  keys = jax.random.split(jax.random.key(0), max(len(leaves), 1))
  out = []
  for k, x in zip(keys, leaves):
    if isinstance(x, jax.ShapeDtypeStruct):
      x = (jax.random.normal(k, x.shape, x.dtype) if np.issubdtype(x.dtype, np.floating)
           else jax.numpy.zeros(x.shape, x.dtype))
    out.append(x)
  return jax.tree_util.tree_unflatten(tree, out)


def removed_block_modules(net: TracedNetwork, masks: Mapping, calls: Mapping, inputs,
                          small_shapes) -> tuple[list, list]:
  """(module paths to skip, problems) for the blocks ``masks`` remove (see ``block_modules``);
  a module still owning pruned variables (a projection shortcut) is a problem."""
  decision = prune_decision(net, masks)
  blocks = block_modules(net, calls, inputs)
  problems, removed = [], []
  for name, keep in decision.keep_blocks.items():
    if not keep:
      path, reason = blocks[name]
      if reason is not None:
        problems.append(reason)
      else:
        removed.append(path)
  for path in sorted({"/".join(map(str, p[1:-1])) for p in _paths(small_shapes)}):
    inside = [r for r in removed if _under(path, r)]
    if inside:
      problems.append(f"{path}: its variables stay though it is inside the removed block module {inside[0]} "
                      "(a projection shortcut?), and skipping that module would drop them")
  return removed, problems


def _widths(calls: Mapping, old_shapes, new_shapes, removed, problems: list, notes: list,
            groups: Optional[Mapping] = None) -> dict:
  """The plan's ``layers``: ``{module path: {attribute: JSON value}}`` of the modules called
  (outside the removed blocks) whose widths change; problems and notes appended to the lists.
  ``groups``: ``{module path: feature_group_count}`` of the grouped convolutions as the pruned
  program runs them (whole groups and per-group widths may both be pruned)."""
  layers = {}
  groups = groups or {}
  for call in calls.values():
    path = "/".join(call.path)
    if path in layers or any(_under(path, r) for r in removed if path):
      continue
    try:
      attrs, note = _layer_attrs(call.module, old_shapes, new_shapes, call.path, groups.get(path))
    except _Cannot as err:
      problems.append(f"{path or '<top>'}: {err}")
      continue
    if note and note not in notes:
      notes.append(note)
    if attrs:
      layers[path] = {k: list(v) if isinstance(v, tuple) else int(v) for k, v in attrs.items()}
  return dict(sorted(layers.items()))


def layer_widths(model: nn.Module, variables, small_variables, *inputs, modes: Optional[Mapping] = None) -> dict:
  """The ``layers`` table of a plan for ``model`` whose ``variables`` become ``small_variables``
  (sliced by any means), with no block removed: which layer attributes change. ``inputs`` (arrays
  or ``ShapeDtypeStruct``) and ``modes`` (apply keyword arguments per mode, default eval only)
  are those ``model.apply`` is called with. Raises ``RebuildError`` naming the modules whose
  widths cannot be set."""
  old_shapes = _shapes(variables)
  calls = record_calls(model, old_shapes, inputs, modes or {"eval": {}})
  problems: list = []
  layers = _widths(calls, old_shapes, _shapes(small_variables), (), problems, [])
  if problems:
    raise RebuildError(problems)
  return layers


def draws_random_numbers(net: TracedNetwork, mode: str, inputs) -> bool:
  """Whether the traced ``mode`` draws random numbers (dropout, drop-path)."""
  return program_draws(net.traced(mode, inputs)[0])


def conv_groups(decision, inputs) -> dict:
  """``{module path: feature_group_count}`` of every grouped convolution as the materialized
  program runs it (kept input width / kept kernel input width), from the traced modes. The module
  is the one owning the kernel variable (followed back through casts), so methods other than
  ``__call__`` and lifted transforms (``nn.remat``) name it as its variables do; a kernel computed
  from several variables falls back to the op's named scope with method suffixes dropped."""
  net = decision.net
  passthrough = ("convert_element_type", "copy", "copy_p", "reduce_precision")
  out = {}
  for mode in net.modes:
    program, _ = net.traced(mode, inputs)
    var_of = dict(zip(program.invars[:program.n_vars], program.var_paths))
    producer = {o: e for e in program.eqns for o in e.outs}
    for idx, e in _shrink(decision, mode, inputs).eqns:
      if e.name != "conv_general_dilated" or program.eqns[idx].params["feature_group_count"] <= 1:
        continue
      v = program.eqns[idx].ins[1]
      while not isinstance(v, Lit) and v not in var_of and v in producer and producer[v].name in passthrough:
        v = producer[v].ins[0]
      if not isinstance(v, Lit) and v in var_of:
        path = "/".join(var_of[v].split("/")[1:-1])  # "params/enc/dw/kernel" -> "enc/dw"
      else:
        path = "/".join(part.split(".")[0] for part in e.where.split("/")[1:])
      out[path] = int(e.params["feature_group_count"])
  return out


def _plan(net: TracedNetwork, small_variables, masks: Mapping, inputs, decision=None) -> tuple[dict, list, list]:
  """(plan, problems, notes): see ``pruning_plan``. ``decision``: the masks' ``prune_decision``
  when the caller has one (its pruned programs are cached there)."""
  calls = record_calls(net.model, net.var_shapes, inputs, net.modes)
  new_shapes = _shapes(small_variables)
  removed, problems = removed_block_modules(net, masks, calls, inputs, new_shapes)
  notes: list = []
  groups = conv_groups(decision or prune_decision(net, masks), inputs)
  layers = _widths(calls, net.var_shapes, new_shapes, removed, problems, notes, groups)
  cls = type(net.model)
  cls = getattr(cls, "_bpcp_base", cls)
  previous = plan_of(net.model)  # pruning a rebuilt network again: the plan from the original class
  if previous is not None:
    merged = previous["layers"]
    for path, attrs in layers.items():
      merged.setdefault(path, {}).update(attrs)
    layers, removed = dict(sorted(merged.items())), previous["removed_blocks"] + removed
  plan = {"format": PLAN_FORMAT, "class": cls.__qualname__, "layers": layers,
          "removed_blocks": sorted(removed)}
  return plan, list(dict.fromkeys(problems)), notes


def pruning_plan(net: TracedNetwork, small_variables, masks: Mapping, *example_inputs) -> dict:
  """The plan (JSON-serialisable) that narrows ``net.model``'s class to ``small_variables``.

  ``small_variables`` are those of ``materialize_traced(net, variables, masks)``; ``masks`` say
  which residual blocks are removed; ``example_inputs`` (default: shaped like the traced ones)
  fix the trace that locates each block's module. Raises ``RebuildError`` listing every module
  that cannot be narrowed, with its path and the reason. The plan is not checked numerically:
  ``rebuild`` does that.
  """
  plan, problems, _ = _plan(net, small_variables, masks, tuple(example_inputs) or example_inputs_of(net))
  if problems:
    raise RebuildError(problems)
  return plan


# -- the narrowed class -----------------------------------------------------------------------------

def _check_plan(plan) -> None:
  if not isinstance(plan, Mapping) or plan.get("format") != PLAN_FORMAT:
    raise ValueError(f"not a pruning plan (expected a mapping with format {PLAN_FORMAT!r}): {plan!r:.200}")
  for key in ("layers", "removed_blocks"):
    if key not in plan:
      raise ValueError(f"pruning plan has no {key!r} entry")
  for path, attrs in plan["layers"].items():
    if not isinstance(attrs, Mapping):
      raise ValueError(f"pruning plan layer {path!r}: expected a mapping of attributes, got {attrs!r}")


def _narrowing_interceptor(layers: Mapping, removed: frozenset):
  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if m.scope is not None:
      path = "/".join(m.path)
      for key, value in layers.get(path, {}).items():
        object.__setattr__(m, key, value)  # a bound clone made for this call: never the user's instance
      if path in removed and context.method_name == "__call__":
        return args[0] if args else next(iter(kwargs.values()))
    return next_fun(*args, **kwargs)
  return interceptor


def narrow(model: nn.Module, plan: Mapping) -> nn.Module:
  """``model`` as an instance of a subclass of its own class, with the same fields, whose
  ``init``/``apply``/``init_with_output`` narrow the layers and skip the removed blocks of
  ``plan`` (from ``pruning_plan``). ``nn.tabulate``, ``jax.jit(model.apply)`` and
  ``apply(..., method=...)`` go through these; a module used through ``bind`` is not narrowed.
  Raises ``ValueError`` when ``plan`` is not a plan or was made for another class.
  """
  _check_plan(plan)
  base = getattr(type(model), "_bpcp_base", type(model))
  if plan.get("class") not in (None, base.__qualname__):
    raise ValueError(f"the pruning plan was made for class {plan['class']!r}, not {base.__qualname__!r}")
  layers = {path: {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}
            for path, attrs in plan["layers"].items()}
  interceptor = _narrowing_interceptor(layers, frozenset(plan["removed_blocks"]))

  def entry(name):
    def method(self, *args, **kwargs):
      with nn.intercept_methods(interceptor):
        return getattr(base, name)(self, *args, **kwargs)
    method.__name__ = name
    method.__doc__ = getattr(base, name).__doc__
    return nn.nowrap(method)  # an entry point, not a module method: Flax must not wrap it

  namespace = {"__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
               "_bpcp_base": base, "_bpcp_plan": copy.deepcopy(dict(plan)),
               **{name: entry(name) for name in ("init", "apply", "init_with_output")}}
  narrowed = type(base.__name__, (base,), namespace)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init and f.name != "parent"}
  return narrowed(**fields)


def plan_of(module) -> Optional[dict]:
  """The plan a module made by ``narrow``/``rebuild`` was narrowed with (a copy), else ``None``."""
  plan = getattr(type(module), "_bpcp_plan", None)
  return copy.deepcopy(plan) if plan is not None else None


# -- rebuild and check ---------------------------------------------------------------------------

def _max_diff(got, want) -> float:
  """Largest |got - want| relative to max(1, |want|), or inf when the structures or shapes differ."""
  if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(want):
    return float("inf")
  worst = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
      return float("inf")
    if a.size:
      worst = max(worst, float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b)))))
  return worst


def _run_tracked(fn, failed_at: list):
  """``fn()`` with the innermost module whose call raised recorded in ``failed_at``."""
  def tracker(next_fun, args, kwargs, context):
    try:
      return next_fun(*args, **kwargs)
    except Exception:
      if not failed_at and context.module.scope is not None:
        failed_at.append("/".join(context.module.path) or "<top>")
      raise
  with nn.intercept_methods(tracker):
    return fn()


def check_rebuilt(module, reference: PrunedNetwork, small_variables, inputs, modes: Mapping,
                  tol: float = 1e-5) -> tuple[list, dict]:
  """``(problems, max_abs_diff)``: ``module.init`` must create exactly the shapes of
  ``small_variables``, and ``module.apply`` must equal ``reference`` (outputs and updated
  collections) in every mode named ``"eval"`` or ``"train"`` to ``tol`` (relative to max(1, |x|));
  a mode with ``rngs`` (dropout) must give the same shapes."""
  problems, diffs = [], {}
  eval_kw = dict(next(iter(modes.values())))
  init_kw = {k: v for k, v in eval_kw.items() if k not in ("mutable", "rngs")}
  rngs = {**dict(eval_kw.get("rngs", {})), "params": jax.random.key(0)}
  failed_at: list = []
  try:
    created = _run_tracked(lambda: jax.eval_shape(lambda: module.init(rngs, *inputs, **init_kw)), failed_at)
  except Exception as err:  # noqa: BLE001 - any failure of user code means: not rebuildable
    return [f"{failed_at[0] if failed_at else '<top>'}: init of the narrowed class fails: "
            f"{type(err).__name__}: {str(err).splitlines()[0]}"], diffs
  want, got = _paths(_shapes(small_variables)), _paths(dict(created))
  for p in sorted(set(want) | set(got)):
    if want.get(p) != got.get(p):
      return [f"{'/'.join(p[1:-1]) or '<top>'}: init of the narrowed class creates {'/'.join(p)} with shape "
              f"{got.get(p)}, the pruned variables have {want.get(p)} (a width not set by a layer "
              "attribute, e.g. hard-coded in the module's code)"], diffs
  for mode, kw in modes.items():
    if mode not in ("eval", "train"):
      continue
    ref_kw = {"train": mode == "train", "mutable": kw.get("mutable", False)}
    if kw.get("rngs"):  # random ops draw from the keys given at call time, in both
      ref_kw["rngs"] = kw["rngs"]
    want = jax.jit(lambda v, x: reference.apply(v, *x, **ref_kw))(small_variables, inputs)
    failed_at = []
    try:
      run = jax.jit(lambda v, x, kw=kw: module.apply(v, *x, **kw))
      got = _run_tracked(lambda: run(small_variables, inputs), failed_at)
    except Exception as err:  # noqa: BLE001
      problems.append(f"{failed_at[0] if failed_at else '<top>'}: the narrowed class fails in {mode} mode: "
                      f"{type(err).__name__}: {str(err).splitlines()[0]}")
      continue
    if draws_random_numbers(reference.decision.net, mode, inputs):
      # random ops (dropout) draw at each layer's own width in the narrowed class, at full width and
      # sliced in the pruned program: another draw of the same distribution, so only shapes compare
      shapes = lambda t: jax.tree_util.tree_map(lambda a: (np.shape(a), str(a.dtype)), t)  # noqa: E731
      if shapes(got) != shapes(want):
        problems.append(f"<top>: in {mode} mode the narrowed class returns other shapes than the pruned program")
      continue
    diffs[mode] = _max_diff(got, want)
    if not diffs[mode] <= tol:
      problems.append(f"<top>: in {mode} mode the narrowed class differs from the pruned program by "
                      f"{diffs[mode]:.3g} (a width or constant computed in the module's code)")
  return problems, diffs


def rebuild(net: TracedNetwork, small_variables, masks: Mapping, *example_inputs,
            tol: float = 1e-5) -> tuple[Any, RebuildReport]:
  """``(module, report)``: the pruned network as an instance of ``net.model``'s own class.

  ``small_variables`` come from ``materialize_traced(net, variables, masks)`` and fit the module
  returned either way (same names). ``example_inputs`` (default: random ones shaped like the
  traced inputs) are used to check the rebuilt module against the ``PrunedNetwork`` in eval and
  train mode. When the check or the plan fails, this warns (``RebuildWarning``, naming the module
  path and the reason) and returns the ``PrunedNetwork``; ``report.problems`` lists the reasons.
  """
  decision = prune_decision(net, masks)
  reference = PrunedNetwork(decision, _shapes(small_variables))
  inputs = _concrete_inputs(net, example_inputs)
  plan, problems, notes = _plan(net, small_variables, masks, inputs, decision)
  diffs = {}
  if not problems:
    module = narrow(net.model, plan)
    problems, diffs = check_rebuilt(module, reference, small_variables, inputs, net.modes, tol)
    problems += notes if problems else []
  if problems:
    warnings.warn(f"{type(net.model).__qualname__} is not rebuilt as its own class, the pruned network is the "
                  "traced PrunedNetwork: " + "; ".join(problems), RebuildWarning, stacklevel=2)
    return reference, RebuildReport(False, plan, list(problems), diffs, notes)
  return module, RebuildReport(True, plan, [], diffs, notes)
