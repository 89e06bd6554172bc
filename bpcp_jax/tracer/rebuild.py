"""The pruned network as the user's own ``flax.linen`` class, narrower.

``materialize_traced`` gives a ``PrunedNetwork``, an interpreter of the traced program. Here the
pruned network is instead an instance of (a subclass made on the fly of) the user's own module
class, with the same fields: its methods run inside ``flax.linen.intercept_methods`` with an
interceptor that, before each call of a flax layer, sets the layer's width attributes from a
*plan*, and removes the removed residual blocks. Methods, submodules, ``nn.tabulate``, ``init``
and any batch size then work as for any Flax module.

A plan is a plain JSON-serialisable table::

    {"format": "bpcp_jax.plan/1", "class": "Net",
     "layers": {"Block_0/Conv_1": {"features": 12}, "dw": {"features": 24, "feature_group_count": 24}},
     "removed_blocks": ["Block_1"],
     "zeroed": {"Block_2/Conv_0": {"shape": [4, 8, 8, 12], "follow": [0, 1, 2], "dtype": "float32"}}}

``layers`` maps a module path (as in the variables, "" for the top module) to the attributes
that differ from the dense network; each width is derived from the pruned variables' shapes
(``features`` of ``nn.Dense``/``nn.Conv``/``nn.ConvTranspose``/``nn.Embed``/``nn.DenseGeneral``,
depthwise ``feature_group_count``, ``num_heads``/``qkv_features``/``out_features`` of
``nn.MultiHeadDotProductAttention`` and the ``features`` of its query/key/value projections;
norms take their width from their input). Two counts are taken from the pruned program instead,
as it runs them: a grouped convolution's ``feature_group_count`` and ``nn.GroupNorm``'s
``num_groups`` (or ``group_size``, whichever the layer sets), so that whole groups and positions
in every group may both be pruned. An attention layer whose per-head query/key dimension is
pruned keeps the dense ``1/sqrt(head_dim)``, as the pruned program does: ``attention_depth`` (the
dense dimension) wraps its ``attention_fn`` (``dense_scale_attention``); the value's per-head
dimension may differ from the query's.

A removed residual block goes in one of two ways (``removed_block_plan``, located from the trace
through the named scopes Flax opens around module calls, ``flax_profile``, on by default):

- ``removed_blocks``: the module whose ``__call__`` returns ``x + f(x)`` (the add runs directly in
  it, its output is the module's, its other operand comes from outside) returns its first input;
- otherwise (``relu(x + f(x))``, a projection shortcut ``proj(x) + f(x)``, each residual add of a
  pre-LN transformer layer, an add in the top module's code) the modules only the block's branch
  uses are ``zeroed``: each returns zeros of its output's shape in the pruned program (the axes in
  ``follow``, the batch and such, as long as its first argument's), creating no variable, and the
  module's own code runs on ``x`` around them: ``relu(x + 0)``, ``proj(x) + 0``, as the traced
  program computes them.

A layer of a type not listed whose variables change shape is assumed to take its widths from
its input (``report.assumed``). ``rebuild`` makes the plan, narrows the class and checks the
result against the traced ``PrunedNetwork`` (``init`` shapes, then outputs and updated
collections in every traced mode); when the class cannot be rebuilt (a width hard-coded in user
code, a variable only a removed branch reads in the code of a module that stays, such as a layer
scale held as the layer's own parameter, a layer whose widths do not follow its input) it warns,
naming the module path and the reason, and returns the ``PrunedNetwork``. When the outputs
differ, the reason is the first op whose result differs (``disagreement``: both programs run,
their ops aligned by primitive and module path): a mean over channels whose count is a constant
in the module's code, a constant or a shape parameter computed from a width there (a hand-written
split into groups). A rebuilt network traced and pruned again gets a plan holding both rounds,
from the original class (its zeroed modules follow the new widths).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np

from bpcp_jax.tracer.network import (PrunedNetwork, TracedNetwork, abstract_like, example_inputs_of,
                                     _shrink, prune_decision, shape_under)
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


def record_calls(model, var_shapes, inputs, modes: Mapping, axis_env=()) -> dict:
  """``{named-scope path: _Call}`` of every module method call of ``model.apply`` in each mode,
  found by abstract evaluation; ``count`` is the largest number of calls in one mode. ``axis_env``:
  the named axes ``[(name, size)]`` the network's collectives use (``TracedNetwork.axis_env``)."""
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

    # outside the apply of a narrowed class: the interceptor added first is the outer one, so the recorder also
    # sees the calls of the modules that class skips or zeroes
    with nn.intercept_methods(recorder):
      jax.make_jaxpr(lambda v, x, kw=kwargs: model.apply(v, *x, **kw), axis_env=list(axis_env) or None)(
          var_shapes, tuple(inputs))
    for key, n in counts.items():
      calls[key].count = max(calls[key].count, n)
  return calls


def op_label(e) -> str:
  """An op as the user wrote it: ``relu`` for ``max(x, 0)``, else the primitive's name."""
  if e.name == "max" and any(isinstance(v, Lit) and not np.any(np.asarray(v.value)) for v in e.ins):
    return "relu"
  return e.name


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


def _layer_attrs(module, old_shapes, new_shapes, path, groups: Optional[int] = None,
                 norm_split: Optional[tuple] = None) -> tuple[dict, Optional[str]]:
  """The attributes of ``module`` that change from the dense to the pruned shapes, and a note when
  its type is unknown but its variables change shape (assumed to take their widths from its input,
  which the check of the rebuilt module then confirms or refutes). ``groups``: the
  ``feature_group_count`` of a grouped convolution, ``norm_split``: ``(num_groups, group_size)`` of a
  ``GroupNorm``, as the pruned program runs them (``conv_groups``, ``group_norm_splits``)."""
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
  if norm_split is not None and isinstance(module, nn.GroupNorm):  # as the pruned program splits the channels
    new = {"num_groups": norm_split[0]} if module.num_groups is not None else {"group_size": norm_split[1]}
  for key, value in new.items():
    if key == "feature_group_count" and groups is not None:  # as the pruned program convolves
      value, old_value = groups, getattr(module, key)
    elif key in ("num_groups", "group_size") and norm_split is not None:
      old_value = getattr(module, key)
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
  if "head_dim" in attrs:  # the per-head query/key dimension: the attention keeps the dense 1/sqrt(depth)
    attrs["attention_depth"] = getattr(module.attention_fn, "depth", old["head_dim"])
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
                         f"({op_label(program.eqns[i])}), so the module does not return it")
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


# -- a removed block's branch replaced by zeros -----------------------------------------------

# ops whose outputs are zero when their first operand is (the others are indices, shapes, a padding value)
_ZERO_WITH_FIRST = frozenset("""reshape transpose broadcast_in_dim squeeze expand_dims convert_element_type copy copy_p
reduce_precision slice dynamic_slice gather rev reduce_sum reduce_max reduce_min cumsum neg abs sign sin tanh erf sqrt
real imag div""".split())
_ZERO_WITH_ANY = frozenset(("mul", "dot_general", "conv_general_dilated"))  # zero when any operand is
_ZERO_WITH_ALL = frozenset(("add", "sub", "add_any", "concatenate"))  # zero when every operand is


def _zero_after(e, zero: set) -> bool:
  """Whether the outputs of ``e`` are zero when the values in ``zero`` are (a sufficient test)."""
  def is_zero(v, bound=None):
    if isinstance(v, Lit):
      value = np.asarray(v.value)
      return not np.any(value) if bound is None else bool(np.all(value <= 0) if bound == "max" else np.all(value >= 0))
    return v in zero
  ins = list(e.ins)
  if not ins:
    return False
  if e.name in _ZERO_WITH_ANY:
    return any(is_zero(v) for v in ins)
  if e.name in _ZERO_WITH_FIRST or (e.name == "integer_pow" and e.params.get("y", 0) > 0):
    return is_zero(ins[0])
  if e.name == "pad":
    return is_zero(ins[0]) and is_zero(ins[1])
  if e.name in _ZERO_WITH_ALL:
    return all(is_zero(v) for v in ins)
  if e.name == "select_n":
    return all(is_zero(v) for v in ins[1:])
  if e.name in ("max", "min"):  # relu: max(0, 0) = 0; max(0, c) = 0 for c <= 0
    return any(not isinstance(v, Lit) and v in zero for v in ins) and all(is_zero(v, e.name) for v in ins)
  return False


def _var_owner(path: str) -> str:
  """``"params/blocks/0/conv1/kernel"`` -> ``"blocks/0/conv1"``: the module owning a variable."""
  return "/".join(path.split("/")[1:-1])


def removed_block_plan(net: TracedNetwork, masks: Mapping, calls: Mapping, inputs, small_shapes,
                       zeroed_before: Optional[Mapping] = None) -> tuple[list, dict, list, list]:
  """``(skipped, zeroed, problems, hints)``: how a module of the user's classes (NNX) computes what the
  traced program computes for the blocks ``masks`` remove (the add's output is its residual ``x``).

  - ``skipped``: module paths that return their input: the module of a block whose ``__call__``
    returns ``x + f(x)`` with ``x`` from outside it (``block_modules``) and no variable kept inside.
  - ``zeroed``: ``{module path: {"shape": [...], "follow": [...], "dtype": str}}``, the modules that
    only the removed blocks' branches use (every op inside them gone from the pruned program in every
    traced mode, none of their variables kept), each replaced by one returning zeros of ``shape``
    (the output's shape in the pruned program; the axes in ``follow``, of no channel group and as long
    as the input's, as its first input's at call time: the batch, tokens, pixels). The code around
    them still runs: for ``relu(x + f(x))`` the module then computes ``relu(x + 0)``, for a pre-LN
    layer ``x = x + attn(ln1(x))`` becomes ``x + 0`` and its MLP sub-block stays, and a projection
    shortcut is kept (``proj(x) + 0``). ``zeroed_before``: such modules from an earlier round (same
    form): kept, their shapes recomputed for this one.
  - ``problems``: what makes this impossible (a variable only the branch reads, in the code of a
    module that stays; a module of the branch returning several values).
  - ``hints``: removed blocks whose branch this cannot show to be zero once its modules return zeros
    (an op such as ``exp`` between them and the add); worth saying only when the check then fails.
  """
  decision = prune_decision(net, masks)
  kept_vars = {"/".join(map(str, p)) for p in _paths(small_shapes)}
  blocks = block_modules(net, calls, inputs)
  skipped, branches = [], []
  for name, keep in decision.keep_blocks.items():
    if keep:
      continue
    path, reason = blocks[name]
    if reason is None and not any(_under(_var_owner(v), path) for v in kept_vars):
      skipped.append(path)
    else:
      branches.append(name)
  zeroed_before = dict(zeroed_before or {})
  key_path = {k: "/".join(map(str, c.path)) for k, c in calls.items()}
  calls_of: dict = {}
  for k, p in key_path.items():
    calls_of[p] = max(calls_of.get(p, 0), calls[k].count)
  paths = {p for p in key_path.values() if p and not any(_under(p, s) for s in skipped)}
  per_mode, seen, live_any = [], {}, set()
  for mode in net.modes:
    program, coupling = net.traced(mode, inputs)
    live = {idx for idx, _ in _shrink(decision, mode, inputs).eqns}
    inside: dict = {}  # module path -> indices of the ops it runs
    in_skipped = set()  # ops inside the skipped modules
    for i, e in enumerate(program.eqns):
      parts = e.where.split("/")
      for k in range(1, len(parts) + 1):
        p = key_path.get("/".join(parts[:k]))
        if p in paths:
          inside.setdefault(p, []).append(i)
        elif p is not None and p in skipped:
          in_skipped.add(i)
    for p, idxs in inside.items():
      seen.setdefault(p, mode)
      if any(i in live for i in idxs):
        live_any.add(p)
    per_mode.append((mode, program, coupling, live, inside, in_skipped))
  dead = {p for p in seen if p not in live_any and not any(_under(_var_owner(v), p) for v in kept_vars)}
  candidates = dead | {p for p in zeroed_before if p in paths}
  chosen = sorted(p for p in candidates if not any(q != p and _under(p, q) for q in candidates))

  problems, hints, zeroed = [], [], {}
  for mode, program, coupling, live, inside, in_skipped in per_mode:
    consumers: dict = {}
    for i, e in enumerate(program.eqns):
      for v in e.ins:
        if not isinstance(v, Lit):
          consumers.setdefault(v, []).append(i)
    outvars = set(program.outvars)
    data = set(program.invars[program.n_vars:])
    for e in program.eqns:
      if any(v in data for v in e.ins if not isinstance(v, Lit)):
        data.update(e.outs)
    keep_flat = decision.keep_flat(coupling)
    codes = coupling.codes[program]
    zero, in_zeroed = set(), set()
    for p in chosen:
      idxs = set(inside.get(p, ()))
      in_zeroed |= idxs
      outs = [o for i in sorted(idxs) for o in program.eqns[i].outs
              if o in outvars or any(c not in idxs for c in consumers.get(o, ()))]
      zero.update(outs)
      if p in zeroed or not idxs:
        continue
      shapes = {tuple(shape_under(program, codes, keep_flat, o)) for o in outs}
      if len(outs) > 1 and not (calls_of.get(p, 1) == len(outs) and len(shapes) == 1):  # not one per call
        problems.append(f"{p}: a module only a removed block's branch uses returns {len(outs)} values; only one "
                        "returning a single array can be replaced by zeros")
        continue
      old = zeroed_before.get(p)
      if not outs:
        zeroed[p] = old or {"shape": [], "follow": [], "dtype": "float32"}
        continue
      shape = [int(d) for d in shape_under(program, codes, keep_flat, outs[0])]
      channels = [k for k, c in enumerate(codes.get(outs[0], ())) if c is not None]  # widths the plan sets
      if old is not None:
        follow = [k for k in old["follow"] if k < len(shape) and k not in channels]
      else:
        produced = {o for i in idxs for o in program.eqns[i].outs}
        # the value the module takes from outside it, of the output's rank where there is one (a dropout's
        # first op reads its key, not the array it is called with)
        outside = [v for i in sorted(idxs) for v in program.eqns[i].ins
                   if not isinstance(v, Lit) and v in data and v not in produced]
        first = next((v for v in outside if len(program.avals[v].shape) == len(shape)),
                     outside[0] if outside else None)
        shape_in = shape_under(program, codes, keep_flat, first) if first is not None else ()
        follow = [k for k, d in enumerate(shape) if k < len(shape_in) and shape_in[k] == d and k not in channels]
      zeroed[p] = {"shape": shape, "follow": follow, "dtype": str(program.avals[outs[0]].dtype)}
    # what still runs of a removed branch: the code of the modules that stay, between the zeros and the add
    var_path = dict(zip(program.invars[:program.n_vars], program.var_paths))
    for i, e in enumerate(program.eqns):
      if i in live or i in in_zeroed or i in in_skipped:
        continue
      for v in e.ins:
        if not isinstance(v, Lit) and v in var_path and var_path[v] not in kept_vars:
          owner = _var_owner(var_path[v])
          problems.append(f"{owner or '<top>'}: its variable {var_path[v]} is read only by a removed block's "
                          f"branch ({op_label(e)} at {e.where}), in the module's own code; the module stays, so "
                          "the variable cannot go (a submodule's can)")
      if _zero_after(e, zero):
        zero.update(e.outs)
    for name in branches:
      block = coupling.block_sites[program].get(name)
      if block is not None and block.branch not in zero:
        producer = next((e for e in program.eqns if block.branch in e.outs), None)
        op = f" ({op_label(producer)} at {producer.where})" if producer is not None else ""
        hints.append(f"block {name}: its branch is not zero once the modules only it uses return zeros{op}")
  for p in chosen:  # one of an earlier round that runs no op now
    zeroed.setdefault(p, zeroed_before.get(p) or {"shape": [], "follow": [], "dtype": "float32"})
  return sorted(skipped), dict(sorted(zeroed.items())), list(dict.fromkeys(problems)), list(dict.fromkeys(hints))


def _widths(calls: Mapping, old_shapes, new_shapes, removed, problems: list, notes: list,
            groups: Optional[Mapping] = None, norm_splits: Optional[Mapping] = None) -> dict:
  """The plan's ``layers``: ``{module path: {attribute: JSON value}}`` of the modules called
  (outside the removed blocks' and the zeroed modules, ``removed``) whose widths change; problems
  and notes appended to the lists. ``groups``: ``{module path: feature_group_count}`` of the grouped
  convolutions, ``norm_splits``: ``{module path: (num_groups, group_size)}`` of the GroupNorms, as
  the pruned program runs them (whole groups and per-group widths may both be pruned)."""
  layers = {}
  groups, norm_splits = groups or {}, norm_splits or {}
  for call in calls.values():
    path = "/".join(call.path)
    if path in layers or any(_under(path, r) for r in removed if path):
      continue
    try:
      attrs, note = _layer_attrs(call.module, old_shapes, new_shapes, call.path, groups.get(path),
                                 norm_splits.get(path))
    except _Cannot as err:
      problems.append(f"{path or '<top>'}: {err}")
      continue
    if note and note not in notes:
      notes.append(note)
    if attrs:
      layers[path] = {k: list(v) if isinstance(v, tuple) else int(v) for k, v in attrs.items()}
    if attrs and isinstance(call.module, nn.MultiHeadDotProductAttention):
      # its query/key/value projections take (heads, qkv_features // heads) from it: each set from its own
      # kernel instead, so that the query/key and the value per-head dimensions may differ
      for child in ("query", "key", "value"):
        kernel = _own_shapes(new_shapes, call.path + (child,)).get("params/kernel")
        if kernel is not None:
          layers["/".join(call.path + (child,))] = {"features": [int(d) for d in kernel[1:]]}
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


def group_norm_splits(decision, calls: Mapping, inputs, cls=nn.GroupNorm) -> dict:
  """``{module path: (num_groups, group_size)}`` of each ``cls`` layer (a GroupNorm) as the pruned
  program runs it: the shape of its reshape ``(..., C) -> (..., groups, size)`` there (whole groups and
  positions in every group may both be pruned)."""
  scopes = {k: "/".join(map(str, c.path)) for k, c in calls.items() if isinstance(c.module, cls)}
  out: dict = {}
  for mode in decision.net.modes:
    program, _ = decision.net.traced(mode, inputs)
    shrunk = _shrink(decision, mode, inputs)
    for _, e in shrunk.eqns:
      path = scopes.get(e.where)
      if path is None or path in out or e.name != "reshape":
        continue
      a, b = program.shape(e.ins[0]), program.shape(e.outs[0])
      if len(b) == len(a) + 1 and b[:-2] == a[:-1] and b[-2] * b[-1] == a[-1]:
        new = shrunk.shapes[e.outs[0]]
        out[path] = (int(new[-2]), int(new[-1]))
  return out


def _plan(net: TracedNetwork, small_variables, masks: Mapping, inputs, decision=None) -> tuple:
  """(plan, problems, notes, hints): see ``pruning_plan`` and ``removed_block_plan``. ``decision``:
  the masks' ``prune_decision`` when the caller has one (its pruned programs are cached there)."""
  decision = decision or prune_decision(net, masks)
  calls = record_calls(net.model, net.var_shapes, inputs, net.modes, net.axis_env)
  new_shapes = _shapes(small_variables)
  previous = plan_of(net.model)  # pruning a rebuilt network again: the plan from the original class
  removed, zeroed, problems, hints = removed_block_plan(net, masks, calls, inputs, new_shapes,
                                                        (previous or {}).get("zeroed"))
  notes: list = []
  gone = removed + list(zeroed)
  layers = _widths(calls, net.var_shapes, new_shapes, gone, problems, notes, conv_groups(decision, inputs),
                   group_norm_splits(decision, calls, inputs))
  cls = type(net.model)
  cls = getattr(cls, "_bpcp_base", cls)
  if previous is not None:
    merged = previous["layers"]
    for path, attrs in layers.items():
      merged.setdefault(path, {}).update(attrs)
    layers, removed = merged, previous["removed_blocks"] + removed
  layers = {p: a for p, a in sorted(layers.items()) if not any(_under(p, g) for g in gone if p)}
  plan = {"format": PLAN_FORMAT, "class": cls.__qualname__, "layers": layers, "removed_blocks": sorted(set(removed))}
  if zeroed:
    plan["zeroed"] = zeroed
  return plan, list(dict.fromkeys(problems)), notes, hints


def pruning_plan(net: TracedNetwork, small_variables, masks: Mapping, *example_inputs) -> dict:
  """The plan (JSON-serialisable) that narrows ``net.model``'s class to ``small_variables``.

  ``small_variables`` are those of ``materialize_traced(net, variables, masks)``; ``masks`` say
  which residual blocks are removed; ``example_inputs`` (default: shaped like the traced ones)
  fix the trace that locates each block's module. Raises ``RebuildError`` listing every module
  that cannot be narrowed, with its path and the reason. The plan is not checked numerically:
  ``rebuild`` does that.
  """
  plan, problems, _, _ = _plan(net, small_variables, masks, tuple(example_inputs) or example_inputs_of(net))
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
  for path, spec in plan.get("zeroed", {}).items():
    if not isinstance(spec, Mapping) or not isinstance(spec.get("shape"), (list, tuple)):
      raise ValueError(f"pruning plan zeroes module {path!r} with {spec!r}; expected {{'shape': [...], 'follow': "
                       "[...], 'dtype': ...}")


def dense_scale_attention(base, depth: int):
  """``base`` (an ``attention_fn`` of ``nn.MultiHeadDotProductAttention``, which must scale by
  ``1/sqrt(query.shape[-1])``, as flax's ``dot_product_attention`` does) with its queries scaled by
  ``sqrt(kept / depth)`` first: a layer whose per-head query/key dimension was pruned from ``depth``
  to ``kept`` keeps the dense network's ``1/sqrt(depth)``, as the pruned program does. Its signature
  is ``base``'s (the layer passes the keywords ``base`` takes); ``.depth`` and ``.base`` say what it wraps."""
  base = getattr(base, "base", base) if hasattr(base, "depth") else base

  @functools.wraps(base)
  def attention(query, key, value, *args, **kwargs):
    kept = query.shape[-1]
    if kept != depth:
      query = query * jax.numpy.asarray(np.sqrt(kept / depth), query.dtype)
    return base(query, key, value, *args, **kwargs)
  attention.depth, attention.base = int(depth), base
  return attention


def _zeros(spec: Mapping, args, kwargs):
  """Zeros of ``spec["shape"]`` (``dtype``), the axes in ``follow`` as long as the first array argument's."""
  ref = next((a for a in (*args, *kwargs.values()) if hasattr(a, "shape")), None)
  follow = set(spec.get("follow", ()))
  shape = [ref.shape[k] if k in follow and ref is not None and k < len(ref.shape) else int(d)
           for k, d in enumerate(spec["shape"])]
  return jax.numpy.zeros(shape, spec.get("dtype", "float32"))


def _narrowing_interceptor(layers: Mapping, removed: frozenset, zeroed: Optional[Mapping] = None):
  """Before each call of a module of ``layers``, its attributes set (``attention_depth``: its
  ``attention_fn`` wrapped by ``dense_scale_attention``); the ``__call__`` of a ``removed`` module
  returns its first input; every method of a ``zeroed`` one (``{path: {"shape", "follow", "dtype"}}``)
  returns zeros (``_zeros``) and its ``setup`` does not run, so it creates no variable."""
  zeroed = dict(zeroed or {})

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if m.scope is not None:
      path = "/".join(m.path)
      for key, value in layers.get(path, {}).items():
        if key == "attention_depth":
          if getattr(m.attention_fn, "depth", None) != value:
            object.__setattr__(m, "attention_fn", dense_scale_attention(m.attention_fn, value))
        else:
          object.__setattr__(m, key, value)  # a bound clone made for this call: never the user's instance
      if path in zeroed:
        return None if context.method_name == "setup" else _zeros(zeroed[path], args, kwargs)
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
  zeroed = {path: {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in spec.items()}
            for path, spec in plan.get("zeroed", {}).items()}
  interceptor = _narrowing_interceptor(layers, frozenset(plan["removed_blocks"]), zeroed)

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


def _under_axes(fn, axis_env):
  """``fn(v, x)`` with the named axes ``axis_env`` (``[(name, size)]``, ``TracedNetwork.axis_env``)
  bound, every member of an axis computing the same: how a network whose collectives name an axis
  (``BatchNorm(axis_name="batch")``) runs outside ``pmap``, a mean over the axis being the value itself."""
  for name, size in reversed(tuple(axis_env)):
    fn = (lambda f, n, k: lambda v, x: jax.tree_util.tree_map(
        lambda a: a[0], jax.vmap(f, in_axes=None, axis_name=n, axis_size=k)(v, x)))(fn, name, int(size))
  return fn


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
    axes = reference.decision.net.axis_env  # the named axes of the network's collectives, bound for both
    want = jax.jit(_under_axes(lambda v, x: reference.apply(v, *x, **ref_kw), axes))(small_variables, inputs)
    failed_at = []
    try:
      run = jax.jit(_under_axes(lambda v, x, kw=kw: module.apply(v, *x, **kw), axes))
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
      try:
        cause = disagreement(module, reference, small_variables, inputs, mode, kw, tol)
      except Exception:  # noqa: BLE001 - the diagnosis is best effort; the generic message stays
        cause = None
      problems.append(cause or f"<top>: in {mode} mode the narrowed class differs from the pruned program by "
                      f"{diffs[mode]:.3g} (a width or constant computed in the module's code)")
  return problems, diffs


def _run_recorded(program, var_leaves, in_leaves, **kwargs) -> dict:
  """``run_program`` (jitted) recording every equation's outputs: ``{eqn index: [arrays]}``."""
  from bpcp_jax.tracer.program import bind, run_program
  hook = kwargs.pop("hook", None)

  def run(var_leaves, in_leaves):
    seen = {}

    def record(idx, e, vals):
      outs = hook(idx, e, vals) if hook is not None else None
      seen[idx] = list(bind(e, vals) if outs is None else outs)
      return seen[idx]
    run_program(program, var_leaves, in_leaves, hook=record, **kwargs)
    return seen
  return jax.device_get(jax.jit(run)(list(var_leaves), list(in_leaves)))


def _where(e) -> str:
  """The module path of an equation: its named scope without the top module's name (the class's) and the
  methods' names (``"root_conv/root_conv.param"`` -> ``"root_conv"``)."""
  parts = e.where.split("/")[1:]
  out = []
  for p in parts:
    name, dot, _ = p.partition(".")
    if not (dot and out and out[-1] == name):  # "conv/conv.param": a method of the module just named
      out.append(name)
  return "/".join(out)


def _differ(a, b, tol: float) -> Optional[float]:
  """The relative difference of two results, ``None`` when they agree (or are not numbers)."""
  if np.shape(a) != np.shape(b):
    return float("inf")
  try:
    a, b = np.asarray(a), np.asarray(b)
  except TypeError:  # PRNG keys
    return None
  if not (jax.numpy.issubdtype(a.dtype, jax.numpy.number) and jax.numpy.issubdtype(b.dtype, jax.numpy.number)):
    return None
  a, b = a.astype(np.float64), b.astype(np.float64)
  same_nan = np.isnan(a) & np.isnan(b)
  a, b = np.where(same_nan, 0.0, a), np.where(same_nan, 0.0, b)
  if not a.size:
    return None
  d = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))
  return d if not d <= tol else None


def disagreement(module, reference: PrunedNetwork, small_variables, inputs, mode: str, kw: Mapping,
                 tol: float = 1e-5) -> Optional[str]:
  """``"<module path>: <the op that makes the narrowed class differ>"``, or ``None`` when it cannot tell.

  Both programs are run on ``inputs`` (the narrowed class ``module`` traced at the pruned variables'
  shapes, and the pruned program of ``reference``) and their equations aligned by primitive and
  module path; the first aligned op whose result differs is named: a mean over channels whose
  divisor is a constant in the module's code, a constant or a shape parameter (a group count, a
  reshape) computed from a width there, or a shape."""
  import difflib
  from bpcp_jax.tracer.network import _run_shrunk, leaves_by_path
  from bpcp_jax.tracer.program import trace_program
  net = reference.decision.net
  program, coupling = net.traced(mode, inputs)
  shrunk = _shrink(reference.decision, mode, inputs)
  leaves = leaves_by_path(small_variables)
  in_leaves = jax.tree_util.tree_leaves(inputs)
  ours = _run_recorded(program, [leaves.get(p) for p in program.var_paths], in_leaves, eqns=shrunk.eqns,
                       alias=shrunk.alias, consts=shrunk.consts, outvars=shrunk.main_out,
                       hook=lambda idx, e, vals: _run_shrunk(e, vals, shrunk, program))
  theirs_program = trace_program(module, jax.tree_util.tree_map(abstract_like, small_variables), *inputs,
                                 axis_env=net.axis_env, **kw)
  theirs_leaves = leaves_by_path(small_variables)
  theirs = _run_recorded(theirs_program, [theirs_leaves[p] for p in theirs_program.var_paths], in_leaves)
  a = [(i, e) for i, e in shrunk.eqns if i in ours]
  b = list(enumerate(theirs_program.eqns))
  matcher = difflib.SequenceMatcher(None, [(e.name, _where(e)) for _, e in a], [(e.name, _where(e)) for _, e in b],
                                    autojunk=False)
  try:
    calls = record_calls(net.model, net.var_shapes, inputs, {mode: kw}, axis_env=net.axis_env)
  except Exception:  # noqa: BLE001 - the layers' types only add to the message
    calls = {}
  kinds = {"/".join(c.path): type(c.module).__name__ for c in calls.values()
           if type(c.module).__module__.startswith("flax.")}  # a library layer: named with its type
  for block in matcher.get_matching_blocks():
    for j in range(block.size):
      (i, e), (k, f) = a[block.a + j], b[block.b + j]
      d = next((x for x in map(lambda p: _differ(*p, tol), zip(ours[i], theirs[k])) if x is not None), None)
      if d is None:
        continue
      path = _where(e)
      kind = kinds.get(path)
      at = f"{e.name} at {path or '<top>'}" + (f" (in a {kind})" if kind else "")
      lits = [(p, x.value, y.value) for p, (x, y) in enumerate(zip(e.ins, f.ins))
              if isinstance(x, Lit) and isinstance(y, Lit) and not np.array_equal(x.value, y.value)]
      if i in coupling.divisors.get(program, {}):
        pos, src, axes, _ = coupling.divisors[program][i]
        theirs_div = next((y for p, _, y in lits if p == pos), None)
        ours_div = e.ins[pos].value if isinstance(e.ins[pos], Lit) else None
        return (f"{path or '<top>'}: a mean over channels ({at}) divides by {_num(ours_div)}, the kept count, in the "
                f"pruned program and by {_num(theirs_div) if theirs_div is not None else 'another value'} in the "
                "module's code: a count written there as a constant (a sum divided by a literal equal to the "
                "number of elements it sums is taken for a mean; write jnp.mean or divide by x.shape[-1])")
      if lits:
        _, x, y = lits[0]
        return (f"{path or '<top>'}: {at} uses the constant {_num(x)} in the pruned program and {_num(y)} in the "
                "module's code (a constant computed from a width there)")
      params = [(name, e.params[name], f.params.get(name)) for name in e.params
                if name in f.params and _plain(e.params[name]) and _plain(f.params[name])
                and e.params[name] != f.params[name]]
      if params:
        name, x, y = params[0]
        return (f"{path or '<top>'}: {at} has {name}={x} in the pruned program and {name}={y} in the module's "
                "code (a width or group count computed there)")
      if d == float("inf"):
        return (f"{path or '<top>'}: {at} gives shape {tuple(np.shape(ours[i][0]))} in the pruned program and "
                f"{tuple(np.shape(theirs[k][0]))} in the module's code (a width in the module's code)")
      return (f"{path or '<top>'}: {at} is the first op whose result differs between the narrowed class and the "
              f"pruned program (by {d:.3g})")
  return None


def _num(x) -> str:
  return "?" if x is None else f"{float(np.asarray(x)):g}"


def _plain(x) -> bool:
  """A parameter that compares as a value (shapes, counts, axes), not a sub-program."""
  return isinstance(x, (int, float, str, bool, tuple))


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
  if isinstance(net.model, PrunedNetwork):  # pruned again after a fallback: the traced program stays one
    problems = ["<top>: the network is the traced program (PrunedNetwork) already, which has no class of its own "
                "to narrow"]
    warnings.warn(problems[0], RebuildWarning, stacklevel=2)
    return reference, RebuildReport(False, None, problems, {})
  inputs = _concrete_inputs(net, example_inputs)
  plan, problems, notes, hints = _plan(net, small_variables, masks, inputs, decision)
  diffs = {}
  if not problems:
    module = narrow(net.model, plan)
    problems, diffs = check_rebuilt(module, reference, small_variables, inputs, net.modes, tol)
    problems += hints + notes if problems else []
  if problems:
    warnings.warn(f"{type(net.model).__qualname__} is not rebuilt as its own class, the pruned network is the "
                  "traced PrunedNetwork: " + "; ".join(problems), RebuildWarning, stacklevel=2)
    return reference, RebuildReport(False, plan, list(problems), diffs, notes)
  return module, RebuildReport(True, plan, [], diffs, notes)


def plan_summary(plan) -> str:
  """``"3 layers narrowed, 1 block module skipped, 2 modules of removed branches zeroed"``: what a pruning plan
  does, for the one line a materialization prints."""
  plan = plan or {}

  def n(count, word):
    return f"{count} {word}{'s' * (count != 1)}"

  return (f"{n(len(plan.get('layers', {})), 'layer')} narrowed, "
          f"{n(len(plan.get('removed_blocks', ())), 'block module')} skipped, "
          f"{n(len(plan.get('zeroed', {})), 'module')} of removed branches zeroed")


def fallback_summary(problems, more: str = "see report.problems") -> str:
  """The first of ``problems`` on one line, with how many more there are: ``"<first> (and 2 more: <more>)"``."""
  first = " ".join(str(problems[0]).split()) if problems else "no reason given"
  rest = len(problems) - 1
  return first + (f" (and {rest} more: {more})" if rest > 0 else "")
