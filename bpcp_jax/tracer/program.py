"""A Flax network traced once into a flat program of primitives, and an interpreter for it.

``trace_program(model, variables, *inputs, **apply_kwargs)`` runs ``jax.make_jaxpr`` on
``model.apply`` and inlines every call-like primitive (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``closed_call``, ``remat``), numbering every value with an integer. The
coupling analysis, the masked evaluation and the materialized (smaller) network all walk this
one list, so what is analysed is exactly what runs. Inlining drops custom derivative rules:
gradients come from differentiating the forward computation (the same mathematical gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend.core as jcore
import numpy as np

INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
           "closed_call": "call_jaxpr", "core_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand (a Python or NumPy scalar baked into the program)."""

  value: Any


@dataclasses.dataclass(eq=False)
class Eqn:
  """One primitive application: ``outs = prim.bind(*ins, **params)``; ``where`` is the module path."""

  prim: Any
  params: dict
  ins: tuple  # int ids or Lit
  outs: tuple  # int ids
  where: str

  @property
  def name(self) -> str:
    return self.prim.name


@dataclasses.dataclass(eq=False)
class Program:
  """A flat program: ``outvars = f(variable leaves..., input leaves...)``.

  ``var_paths[i]`` is the path (``"params/Conv_0/kernel"``) of the i-th variable leaf, whose id is
  ``invars[i]``; the remaining invars are the inputs' leaves. Hashes by identity so a Flax module
  can hold it as an attribute.
  """

  eqns: list
  invars: list
  outvars: list
  avals: dict  # id -> jax.core.ShapedArray
  consts: dict  # id -> array
  var_paths: list
  var_tree: Any  # treedef of the variables dict
  input_tree: Any
  out_tree: Any

  @property
  def n_vars(self) -> int:
    return len(self.var_paths)

  def shape(self, v) -> tuple:
    return tuple(np.shape(v.value)) if isinstance(v, Lit) else tuple(self.avals[v].shape)


def path_str(path) -> str:
  """``(DictKey('params'), DictKey('Conv_0'), DictKey('kernel'))`` -> ``"params/Conv_0/kernel"``."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def trace_program(model, variables, *inputs, **apply_kwargs) -> Program:
  """Trace ``model.apply(variables, *inputs, **apply_kwargs)`` into a flat ``Program``."""
  var_leaves, var_tree = jax.tree_util.tree_flatten_with_path(variables)
  in_leaves, input_tree = jax.tree_util.tree_flatten(inputs)

  def fn(var_leaves, in_leaves):
    v = jax.tree_util.tree_unflatten(var_tree, var_leaves)
    x = jax.tree_util.tree_unflatten(input_tree, in_leaves)
    return model.apply(v, *x, **apply_kwargs)

  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)([leaf for _, leaf in var_leaves], in_leaves)
  out_tree = jax.tree_util.tree_structure(out_shape)
  builder = _Builder()
  invars = [builder.fresh(v.aval) for v in closed.jaxpr.invars]
  outvars = builder.inline(closed.jaxpr, closed.consts, invars, "")
  return Program(builder.eqns, invars, outvars, builder.avals, builder.consts,
                 [path_str(p) for p, _ in var_leaves], var_tree, input_tree, out_tree)


class _Builder:
  def __init__(self):
    self.eqns, self.avals, self.consts = [], {}, {}

  def fresh(self, aval) -> int:
    i = len(self.avals)
    self.avals[i] = aval
    return i

  def inline(self, jaxpr, consts, in_ids, where_prefix):
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self.fresh(v.aval)
      self.consts[env[v]] = c
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(v):
      return Lit(v.val) if isinstance(v, jcore.Literal) else env[v]

    for e in jaxpr.eqns:
      ins = [read(v) for v in e.invars]
      where = str(e.source_info.name_stack) or where_prefix
      sub = INLINED.get(e.primitive.name)
      if sub is not None and sub in e.params:
        inner = e.params[sub]
        inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
        ids = [self._materialize_lit(x) for x in ins]
        outs = self.inline(inner_jaxpr, inner_consts, ids, where)
        for v, o in zip(e.outvars, outs):
          env[v] = self._materialize_lit(o)
        continue
      outs = [self.fresh(v.aval) for v in e.outvars]
      self.eqns.append(Eqn(e.primitive, dict(e.params), tuple(ins), tuple(outs), where))
      for v, o in zip(e.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [read(v) if isinstance(v, jcore.Literal) else env[v] for v in jaxpr.outvars]

  def _materialize_lit(self, x):
    """Literals passed into an inlined call become constants of the flat program."""
    if not isinstance(x, Lit):
      return x
    arr = np.asarray(x.value)
    i = self.fresh(jax.core.ShapedArray(arr.shape, arr.dtype))
    self.consts[i] = arr
    return i


EqnHook = Callable[[int, Eqn, list], Optional[list]]


def run_program(program: Program, var_leaves: Sequence, in_leaves: Sequence, *, eqns=None,
                hook: Optional[EqnHook] = None, alias: Optional[dict] = None, outvars=None):
  """Evaluate ``program`` (or the subset ``eqns`` of (index, Eqn) pairs, already in order).

  ``hook(index, eqn, values)`` may return the equation's outputs itself (masking, gating);
  returning ``None`` binds the primitive. ``alias`` maps an output id to an input id whose value
  it takes without computing (a removed residual branch). Returns the output pytree, or the
  values of the ids ``outvars`` when given.
  """
  env = dict(program.consts)
  for i, x in zip(program.invars, list(var_leaves) + list(in_leaves)):
    env[i] = x

  def read(v):
    return v.value if isinstance(v, Lit) else env[v]

  for idx, e in (enumerate(program.eqns) if eqns is None else eqns):
    if alias and e.outs[0] in alias:
      env[e.outs[0]] = env[alias[e.outs[0]]]
      continue
    vals = [read(v) for v in e.ins]
    outs = hook(idx, e, vals) if hook is not None else None
    if outs is None:
      outs = e.prim.bind(*vals, **e.params)
      if not e.prim.multiple_results:
        outs = [outs]
    for o, val in zip(e.outs, outs):
      env[o] = val
  if outvars is not None:
    return [read(v) for v in outvars]
  return jax.tree_util.tree_unflatten(program.out_tree, [read(v) for v in program.outvars])
