"""A Flax network traced once into a flat program of primitives, and an interpreter for it.

``trace_program(model, variables, *inputs, **apply_kwargs)`` runs ``jax.make_jaxpr`` on
``model.apply`` and inlines every call-like primitive: any primitive carrying one sub-program
whose inputs and outputs are its own (``jit``/``pjit``, ``remat``/``checkpoint`` in all their
names, ``custom_jvp_call``, ``custom_vjp_call``, ``closed_call``, ...), numbering every value with
an integer. Control flow (``cond``, ``while``, ``scan``) stays one equation. The coupling
analysis, the masked evaluation and the materialized (smaller) network all walk this one list,
so what is analysed is exactly what runs. Inlining drops custom derivative rules: gradients come
from differentiating the forward computation (the same mathematical gradient).

The program's inputs are the variable leaves, the input leaves, then the PRNG keys of the
``rngs=`` collections (dropout, drop-path), so random ops draw from the keys given at call time.
Named axes (``BatchNorm(axis_name=...)``) are traced with ``axis_env=[(name, size)]`` and the
program is then run under that axis (``pmap``, ``shard_map`` or ``vmap(axis_name=...)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import jax.extend.core as jcore
import numpy as np

# primitives with sub-programs that are not a plain call: loops, maps, branches (their sub-programs may match the
# equation's own signature, e.g. a while loop without condition constants, and must not be inlined as one call)
NOT_CALLS = frozenset("""
cond while scan shard_map xla_pmap pmap pallas_call run_state for custom_transpose_call linear_call custom_lin
""".split())


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
  """A flat program: ``outvars = f(variable leaves..., input leaves..., rng keys...)``.

  ``var_paths[i]`` is the path (``"params/Conv_0/kernel"``) of the i-th variable leaf, whose id is
  ``invars[i]``; then come the inputs' leaves, then one key per name in ``rng_names``. Hashes by
  identity so a Flax module can hold it as an attribute.
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
  rng_names: tuple = ()

  @property
  def n_vars(self) -> int:
    return len(self.var_paths)

  @property
  def input_ids(self) -> list:
    return self.invars[self.n_vars:len(self.invars) - len(self.rng_names)]

  @property
  def rng_ids(self) -> list:
    return self.invars[len(self.invars) - len(self.rng_names):]

  def shape(self, v) -> tuple:
    return tuple(np.shape(v.value)) if isinstance(v, Lit) else tuple(self.avals[v].shape)


def path_str(path) -> str:
  """``(DictKey('params'), DictKey('Conv_0'), DictKey('kernel'))`` -> ``"params/Conv_0/kernel"``."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def trace_program(model, variables, *inputs, axis_env: Sequence = (), **apply_kwargs) -> Program:
  """Trace ``model.apply(variables, *inputs, **apply_kwargs)`` into a flat ``Program``.

  ``apply_kwargs["rngs"]`` (``{name: key}``) only gives the keys' shapes: the keys become inputs
  of the program. ``axis_env`` lists the named axes ``(name, size)`` the network's collectives use.
  """
  apply_kwargs = dict(apply_kwargs)
  rngs = apply_kwargs.pop("rngs", None) or {}
  if not isinstance(rngs, dict):
    raise ValueError(f"rngs must be a dict {{name: key}} (e.g. {{'dropout': key}}), got {type(rngs).__name__}")
  rng_names = tuple(sorted(rngs))
  var_leaves, var_tree = jax.tree_util.tree_flatten_with_path(variables)
  in_leaves, input_tree = jax.tree_util.tree_flatten(inputs)

  def fn(var_leaves, in_leaves, keys):
    v = jax.tree_util.tree_unflatten(var_tree, var_leaves)
    x = jax.tree_util.tree_unflatten(input_tree, in_leaves)
    extra = {"rngs": dict(zip(rng_names, keys))} if rng_names else {}
    return model.apply(v, *x, **apply_kwargs, **extra)

  keys = [_abstract_key(rngs[n]) for n in rng_names]
  closed, out_shape = jax.make_jaxpr(fn, axis_env=list(axis_env) or None, return_shape=True)(
      [leaf for _, leaf in var_leaves], in_leaves, keys)
  out_tree = jax.tree_util.tree_structure(out_shape)
  builder = _Builder()
  invars = [builder.fresh(v.aval) for v in closed.jaxpr.invars]
  outvars = builder.inline(closed.jaxpr, closed.consts, invars, "")
  return Program(builder.eqns, invars, outvars, builder.avals, builder.consts,
                 [path_str(p) for p, _ in var_leaves], var_tree, input_tree, out_tree, rng_names)


RANDOM_PRIMITIVES = ("random_bits", "threefry2x32")


def draws_random_numbers(program: Program) -> bool:
  """Whether ``program`` draws random numbers from its keys (dropout, drop-path)."""
  return any(e.name in RANDOM_PRIMITIVES for e in program.eqns)


def _key_as(aval, key):
  """``key`` in the form the program was traced with: a typed key (``jax.random.key``) or a raw
  uint32 one (``jax.random.PRNGKey``), so either kind may be given at call time."""
  typed = jnp.issubdtype(aval.dtype, jax.dtypes.prng_key)
  if typed and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(key)
  if not typed and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def _abstract_key(key):
  if isinstance(key, jax.ShapeDtypeStruct):
    return key
  if not hasattr(key, "dtype"):
    raise ValueError(f"an rng must be a PRNG key (jax.random.key(0)), got {key!r}")
  return jax.ShapeDtypeStruct(np.shape(key), key.dtype)


def sub_program(e) -> Optional[Any]:
  """The sub-program of a call-like equation (one whose sub-program takes and returns exactly the
  equation's operands and results), or ``None``."""
  if e.primitive.name in NOT_CALLS:
    return None
  for value in e.params.values():
    inner = value.jaxpr if isinstance(value, jcore.ClosedJaxpr) else value
    if not isinstance(inner, jcore.Jaxpr):
      continue
    if (len(inner.invars) == len(e.invars) and len(inner.outvars) == len(e.outvars)
        and all(_same_aval(a.aval, b.aval) for a, b in zip(inner.invars, e.invars))
        and all(_same_aval(a.aval, b.aval) for a, b in zip(inner.outvars, e.outvars))):
      return value
  return None


def _same_aval(a, b) -> bool:
  return getattr(a, "shape", None) == getattr(b, "shape", None) and getattr(a, "dtype", None) == getattr(b, "dtype", None)


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
      inner = sub_program(e)
      if inner is not None:
        inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if isinstance(inner, jcore.ClosedJaxpr) else (inner, ())
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


def run_program(program: Program, var_leaves: Sequence, in_leaves: Sequence, rng_leaves: Sequence = (), *,
                eqns=None, hook: Optional[EqnHook] = None, alias: Optional[dict] = None, outvars=None,
                consts: Optional[dict] = None):
  """Evaluate ``program`` (or the subset ``eqns`` of (index, Eqn) pairs, already in order).

  ``hook(index, eqn, values)`` may return the equation's outputs itself (masking, gating);
  returning ``None`` binds the primitive. ``alias`` maps an output id to an input id whose value
  it takes without computing (a removed residual branch). ``consts`` replaces the program's
  constants. Returns the output pytree, or the values of the ids ``outvars`` when given.
  """
  env = dict(program.consts if consts is None else consts)
  rng_leaves = [_key_as(program.avals[i], k) for i, k in zip(program.rng_ids, rng_leaves)]
  for i, x in zip(program.invars, list(var_leaves) + list(in_leaves) + list(rng_leaves)):
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
      outs = bind(e, vals)
    for o, val in zip(e.outs, outs):
      env[o] = val
  if outvars is not None:
    return [read(v) for v in outvars]
  return jax.tree_util.tree_unflatten(program.out_tree, [read(v) for v in program.outvars])


def bind(e: Eqn, vals: Sequence) -> list:
  """``e``'s primitive applied to ``vals``, as a list of outputs."""
  outs = e.prim.bind(*vals, **e.params)
  return list(outs) if e.prim.multiple_results else [outs]
