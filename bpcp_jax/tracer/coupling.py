"""Channel coupling found from the traced program: which parameter axes must be pruned together.

Every position of every variable axis is an "atom". Walking the traced program, each primitive
ties atoms together (a union-find): an elementwise op or a residual add ties its operands'
channels, a convolution ties its input's channels to its kernel's input axis and carries the
kernel's output axis into its result, a concatenation lays its inputs side by side, a reshape
that merges axes repeats the channels along the merged axis. An atom can also be defined as the
product of others: a reshape that splits a channel axis into (groups, per group) makes every
channel the product of a group atom and a per-group atom, and so does a grouped convolution
(``feature_group_count``): the pieces are pruned at the granularity the math allows (whole
GroupNorm groups and equal positions in every group; attention heads and head dimensions; whole
groups or equal numbers per group of a grouped convolution; channel-shuffle groups). A position
is kept when every factor of its product is kept.

Values that are not computed from the network's inputs (constants, broadcasts of scalars or of
size-1 axes, random masks drawn from the ``rngs`` keys, iota) get fresh atoms of their own: they
are compatible with any kept subset, and the materialized network computes them at full size
and slices them. A reduction over channels (LayerNorm, GroupNorm, RMSNorm, weight
standardization, a softmax over features, in flax's layers or written by hand) is computed over
the kept channels only, and a mean's divisor follows the kept count, so the pruned program is
the architecture at the kept width. The rule for a divisor: a sum over channels (followed
through ``keepdims``, reshapes, transposes and casts) divided by a literal equal to the number
of elements it sums, or by a constant computed from that literal (``jnp.var``'s and
``jnp.std``'s ``count - ddof``), is a mean: ``jnp.mean(x, -1)``, ``x.sum(-1) / 8`` and
``x.sum(-1) / x.shape[-1]`` are one program and all become ``sum / kept`` (``- ddof``). A sum
divided by any other constant, or multiplied by one (``x.sum(-1) * 0.125``), keeps its constant:
that is how to write a fixed scale that happens to equal the width.

Several traced modes (eval and train) share the variables' atoms, and one op seen again in
another mode ties its pieces factor by factor, including those an earlier mode found always
kept (the q/k/v axis of a fused projection), so a split is the same however many modes are
traced. Weights picked by the inputs (``w[idx]``, ``jnp.take``, ``dynamic_slice`` of a kernel:
a mixture of experts' per-token kernels) are kernels like any other: their output axes make
groups and their input axes join their input's group; the axis the indices pick along stays
whole (reported).

A channel group is the set of atoms a producing layer's output axis (a conv or dense kernel) is
made of, one group per factor. Atoms that reach the network's inputs or outputs, or pass through
an op the analysis cannot follow (a sort or an argmax over channels, a window across channels,
a strided slice of a channel axis, an unknown primitive, a loop computing with channels), are
fixed: never pruned. Every op that keeps a parameter's channels whole is reported with its
module path in ``Coupling.unfollowed``, and so is a parameter axis no group holds for another
reason (a kernel computed from the inputs, op ``"variable"``); nothing is kept silently, nothing
is sliced that was not followed, and no primitive can make the analysis fail (an error inside a
rule reports that op).

Residual blocks are the adds ``a + b`` of two same-shaped, data-dependent tensors that share an
ancestor, where one side (the branch) contains more parameterised contractions than the other
(``x + f(x)`` or ``shortcut(x) + f(x)``); these can carry block-pruning gates.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.tracer.program import Lit, Program, path_str

ELEMENTWISE = frozenset("""
add add_any sub mul div rem pow max min atan2 nextafter and or xor not eq ne lt le gt ge select_n clamp
neg exp exp2 log log1p expm1 tanh logistic sqrt rsqrt cbrt abs sign sin cos tan asin acos atan sinh cosh asinh
acosh atanh square integer_pow erf erfc erf_inv lgamma digamma igamma igammac polygamma bessel_i0e bessel_i1e
floor ceil round is_finite convert_element_type copy copy_p stop_gradient reduce_precision real imag conj
shift_left shift_right_logical shift_right_arithmetic population_count clz threefry2x32 random_fold_in random_wrap
random_unwrap random_seed
""".split())
# reductions computed over the kept positions of a channel axis: the value that leaves a result unchanged
REDUCTIONS = {"reduce_sum": 0.0, "reduce_max": -np.inf, "reduce_min": np.inf, "reduce_prod": 1.0,
              "reduce_and": True, "reduce_or": False, "reduce_xor": False, "argmax": None, "argmin": None}
CUMULATIVE = {"cumsum": 0.0, "cumprod": 1.0, "cummax": -np.inf, "cummin": np.inf, "cumlogsumexp": -np.inf}
# every operand's layout passes to the result of the same position
IDENTITY = frozenset("""
psum pmax pmin ppermute pbroadcast pvary psum_invariant optimization_barrier device_put sharding_constraint
mesh_cast reshard
""".split())
CONTRACTIONS = ("conv_general_dilated", "dot_general")
# ops that move a value's elements without changing them (a sum through them is still that sum)
SHAPE_ONLY = frozenset("""
broadcast_in_dim reshape squeeze expand_dims transpose convert_element_type copy copy_p
""".split())
# scalar ops folded at analysis time (a divisor computed from literals)
FOLDABLE = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "neg": np.negative,
            "max": np.maximum, "min": np.minimum, "convert_element_type": lambda x: x, "copy": lambda x: x,
            "copy_p": lambda x: x}

INPUT = "reaches the network's input"
OUTPUT = "reaches the network's output"


@dataclasses.dataclass(frozen=True)
class Unfollowed:
  """An op whose effect on channels the analysis cannot follow; the channels it touches stay."""

  op: str
  where: str
  reason: str

  def __str__(self):
    return f"{self.op} at {self.where or '<top level>'}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Channels pruned together. ``members``: (variable path, axis) pairs whose positions map into
  the group; ``producers``: the kernels whose output axis creates the group, in forward order."""

  name: str
  width: int
  members: tuple
  producers: tuple


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
  """``out = residual + branch``; ``params`` are the variable paths only the branch uses."""

  name: str
  eqn: int  # index of the add in the program
  residual: int  # value ids
  branch: int
  params: tuple


@dataclasses.dataclass(eq=False)
class Coupling:
  """The result of ``find_coupling``.

  ``codes[program][value id]`` gives, per axis, ``None`` (an axis carrying no prunable channel) or
  an int array of shape (positions, factors): for each position, the indices of its factors in
  the concatenation of all groups' masks (in ``groups`` order), -1 for a factor always kept. A
  position is kept when all its factors are. ``divisors[program][eqn index] = (operand, value
  id, axes, divisor)``: a mean's divisor (operand ``operand`` of that equation, a literal or a
  constant of value ``divisor``: the count, or ``count - ddof``) counts the elements of value
  ``value id`` over ``axes``, so it follows the kept count (``divisor - count + kept count``).
  """

  groups: dict  # name -> ChannelGroup
  offsets: dict  # name -> offset of the group's first channel in the concatenated mask
  codes: dict
  blocks: dict  # name -> ResidualBlock (in the first program)
  block_sites: dict  # program -> {name: ResidualBlock}
  unfollowed: list  # Unfollowed
  fixed: dict  # (variable path, axis) -> reason its channels (some or all) are kept whole
  divisors: dict = dataclasses.field(default_factory=dict)

  @property
  def total_channels(self) -> int:
    return sum(g.width for g in self.groups.values())

  def summary(self) -> str:
    lines = [f"{len(self.groups)} channel groups, {len(self.blocks)} residual blocks"]
    for g in self.groups.values():
      lines.append(f"  group {g.name}: {g.width} channels, {len(g.members)} member axes")
    for b in self.blocks.values():
      lines.append(f"  block {b.name}: {len(b.params)} variables in its branch")
    for u in self.unfollowed:
      lines.append(f"  not followed: {u}")
    return "\n".join(lines)


class _Atoms:
  """Union-find over atoms. A root atom is free, fixed (always kept; the first reason recorded), or
  defined as the product of other atoms (kept when all of them are)."""

  MAX_DEPTH = 64

  def __init__(self):
    self.parent: list[int] = []
    self.fixed: dict[int, str] = {}
    self.defn: dict[int, tuple] = {}

  def new(self, n: int) -> np.ndarray:
    start = len(self.parent)
    self.parent.extend(range(start, start + n))
    return np.arange(start, start + n)

  def find(self, a: int) -> int:
    root = a
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[a] != root:
      self.parent[a], a = root, self.parent[a]
    return root

  def expand(self, a: int, depth: int = 0) -> tuple:
    """The free root atoms whose product atom ``a`` is (fixed factors dropped)."""
    r = self.find(int(a))
    if r in self.fixed:
      return ()
    d = self.defn.get(r)
    if d is None:
      return (r,)
    if depth > self.MAX_DEPTH:
      raise ValueError("atoms defined in a cycle")
    return tuple(x for f in d for x in self.expand(f, depth + 1))

  def factors(self, a: int, depth: int = 0) -> tuple:
    """The root atoms whose product atom ``a`` is, fixed factors included (``expand`` drops them)."""
    r = self.find(int(a))
    d = self.defn.get(r)
    if r in self.fixed or d is None:
      return (r,)
    if depth > self.MAX_DEPTH:
      raise ValueError("atoms defined in a cycle")
    return tuple(x for f in d for x in self.factors(f, depth + 1))

  def reason(self, a: int, depth: int = 0) -> Optional[str]:
    r = self.find(int(a))
    if r in self.fixed:
      return self.fixed[r]
    for f in self.defn.get(r, ()):
      if depth < self.MAX_DEPTH:
        why = self.reason(f, depth + 1)
        if why is not None:
          return why
    return None

  def fix(self, a: int, reason: str, depth: int = 0):
    r = self.find(int(a))
    if r in self.fixed:
      return
    self.fixed[r] = reason
    if depth < self.MAX_DEPTH:
      for f in self.defn.get(r, ()):
        self.fix(f, reason, depth + 1)

  def _union(self, a: int, b: int):
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra

  def tie(self, left, right, conflict: str):
    """Make the product of atoms ``left`` equal to the product of atoms ``right``."""
    el = tuple(x for a in left for x in self.expand(a))
    er = tuple(x for a in right for x in self.expand(a))
    if el == er:
      return
    if not el or not er:  # one side is always kept: so is every factor of the other
      why = next((self.reason(a) for a in (left if not el else right) if self.reason(a)), conflict)
      for x in el + er:
        self.fix(x, why)
    elif len(el) == 1 and len(er) == 1:
      self._union(el[0], er[0])
    elif len(el) == 1 and el[0] not in er:
      self.defn[el[0]] = er
    elif len(er) == 1 and er[0] not in el:
      self.defn[er[0]] = el
    elif len(el) == len(er):
      for x, y in zip(el, er):
        self.tie((x,), (y,), conflict)
    else:
      # the same split seen again (another traced mode replaying an op) after some of its factors were found
      # always kept: the products match factor by factor once the kept factors are counted
      fl = tuple(x for a in left for x in self.factors(a))
      fr = tuple(x for a in right for x in self.factors(a))
      if len(fl) == len(fr):
        for x, y in zip(fl, fr):
          x, y = self.find(x), self.find(y)
          if x in self.fixed or y in self.fixed:
            self.fix(y if x in self.fixed else x, self.fixed.get(x) or self.fixed[y])
          else:
            self.tie((x,), (y,), conflict)
      else:
        for x in el + er:
          self.fix(x, conflict)


def _is_number(x) -> bool:
  """Whether ``x`` holds real numbers (not PRNG keys, booleans or complex numbers)."""
  dtype = getattr(x, "dtype", None)
  dtype = np.asarray(x).dtype if dtype is None else dtype
  return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def _is_atoms(entry) -> bool:
  return isinstance(entry, np.ndarray)


class _Analysis:
  """One program's walk. A layout entry per axis is an atom array, a marker (a reason string: the
  axis carries no prunable channel, e.g. a batch or spatial axis of the input) or ``None`` (a
  size-1 axis)."""

  def __init__(self, program: Program, atoms: _Atoms, leaf_atoms: dict):
    self.p, self.atoms = program, atoms
    self.layout: dict = {}
    self.reports: dict[str, Unfollowed] = {}
    self.data_dep: set = set()
    self.var_dep: set = set()
    self.indexed: set = set()  # weights picked by the inputs: data-dependent only through gather indices
    self.windows: set = set()  # atoms of convolution kernels' window axes (not channels)
    self.sums: dict = {}  # value id -> (reduced value id, axes) for a sum over channels (a mean's numerator)
    self.divisors: dict = {}  # eqn index -> (operand, value id, axes, the divisor's value)
    # scalar values computed from literals and constants only: id -> (value, the literals it was computed from)
    self.scalars: dict = {vid: (float(np.asarray(c)), frozenset()) for vid, c in program.consts.items()
                          if np.ndim(c) == 0 and _is_number(c)}
    # value id -> the variable a parameter-only value was computed from (casts, squeezes, ...)
    self.origin = {vid: path for vid, path in zip(program.invars, program.var_paths)}
    self.var_shape = {path: program.shape(vid) for vid, path in zip(program.invars, program.var_paths)}
    rng = set(program.rng_ids)
    for i, vid in enumerate(program.invars):
      shape = program.shape(vid)
      if i < program.n_vars:
        self.layout[vid] = leaf_atoms[program.var_paths[i]]
        self.var_dep.add(vid)
      elif vid in rng:
        self.layout[vid] = self.fresh(shape)
      else:
        self.layout[vid] = tuple(INPUT if n > 1 else None for n in shape)
        self.data_dep.add(vid)
    for vid in program.consts:
      self.layout[vid] = self.fresh(program.shape(vid))

  # -- layouts ------------------------------------------------------------------------------
  def fresh(self, shape) -> tuple:
    return tuple(self.atoms.new(n) if n > 1 else None for n in shape)

  def lay(self, v):
    if isinstance(v, Lit):
      return (None,) * np.ndim(v.value)
    return self.layout[v]

  def report(self, e, reason) -> str:
    u = Unfollowed(e.name, e.where, reason)
    self.reports[str(u)] = u
    return str(u)

  def fix_entry(self, entry, why: str):
    if _is_atoms(entry):
      for a in entry.tolist():
        self.atoms.fix(a, why)

  def tie(self, a, b, e):
    """Tie two axis entries position by position; the result's entry."""
    if a is None or b is None:
      return b if a is None else a
    if not _is_atoms(a) or not _is_atoms(b):
      marker, other = (a, b) if not _is_atoms(a) else (b, a)
      self.fix_entry(other, marker)
      return marker
    if a is b or np.array_equal(a, b):
      return a
    conflict = None
    for x, y in zip(a.tolist(), b.tolist()):
      if x != y:
        conflict = conflict or self.report(e, "splits these channels in two incompatible ways")
        self.atoms.tie((x,), (y,), conflict)
    return a

  def tie_factored(self, entry, factors, sizes, e):
    """Position ``p`` of axis ``entry`` (size ``prod(sizes)``, row-major) is the product of
    ``factors[k][index_k(p)]``; a marker or ``None`` factor counts as always kept."""
    facs = [f if _is_atoms(f) else None for f in factors]
    if entry is None or all(f is None for f in facs):
      if _is_atoms(entry):
        why = self.report(e, "reshapes these channels into axes that carry no channel")
        self.fix_entry(entry, next((f for f in factors if isinstance(f, str)), why))
      return
    if not _is_atoms(entry):
      for f in facs:
        self.fix_entry(f, entry)
      return
    conflict = None
    flat = entry.tolist()
    for pos, idx in enumerate(itertools.product(*(range(n) for n in sizes))):
      right = tuple(int(f[i]) for f, i in zip(facs, idx) if f is not None)
      left = (flat[pos],)
      if right != left:
        conflict = conflict or self.report(e, "splits these channels in two incompatible ways")
        self.atoms.tie(left, right, conflict)

  def give_up(self, e, reason, values=None, axes=None):
    """Fix the channels of ``values`` (default: every operand), on ``axes`` only when given."""
    why = self.report(e, reason)
    for v in (list(e.ins) if values is None else values):
      for k, entry in enumerate(self.lay(v)):
        if axes is None or k in axes:
          self.fix_entry(entry, why)
    return why

  def untracked(self, e, shape, why=None):
    """Entries for the axes of a result that carry no channel."""
    why = why or next((x for v in e.ins for x in self.lay(v) if isinstance(x, str)), None) or \
        f"{e.name} at {e.where}: not a channel axis"
    return [why if n > 1 else None for n in shape]

  # -- the walk -------------------------------------------------------------------------------
  def run(self):
    for idx, e in enumerate(self.p.eqns):
      self.idx = idx
      ins = [v for v in e.ins if not isinstance(v, Lit)]
      data = any(v in self.data_dep for v in ins)
      if data:
        self.data_dep.update(e.outs)
      if any(v in self.var_dep for v in ins):
        self.var_dep.update(e.outs)
      indexed = data and self.is_indexed(e, ins)
      if indexed:
        self.indexed.update(e.outs)
      if not data or indexed:  # a weight computed from variables is named after the one of its shape (weight norm)
        sources = {self.origin.get(v) for v in ins if not data or v in self.var_dep}
        if len(sources) == 1 and None not in sources:
          self.origin.update((o, next(iter(sources))) for o in e.outs)
        else:
          for o in e.outs:
            same = [p for p in sources if p is not None and self.var_shape[p] == self.p.shape(o)]
            if len(same) == 1:
              self.origin[o] = same[0]
      try:
        outs = self.dispatch(e)
      except Exception as err:  # noqa: BLE001 - an op's rule failing must report that op, not abort the analysis
        why = self.give_up(e, f"the channel analysis failed on it ({type(err).__name__}: {err})")
        outs = [self.untracked(e, self.p.shape(o), why) for o in e.outs]
      self.note_values(e)
      for o, lay in zip(e.outs, outs):
        shape = self.p.shape(o)
        lay = list(lay)
        for k, n in enumerate(shape):
          if n == 1 and not _is_atoms(lay[k]):
            lay[k] = None
          elif lay[k] is None or (not data and not _is_atoms(lay[k])):
            # a value not computed from the inputs is computed at full size and sliced: fresh atoms
            lay[k] = self.atoms.new(n) if not data else f"{e.name} at {e.where}: not a channel axis"
        self.layout[o] = tuple(lay)

  def is_indexed(self, e, ins) -> bool:
    """Whether ``e`` gives a weight picked by the inputs (``w[idx]``, ``jnp.take``, ``dynamic_slice`` of a kernel:
    a mixture of experts' per-token kernel), or one computed from such weights and non-input values only."""
    weight = lambda v: v in self.var_dep and (v not in self.data_dep or v in self.indexed)  # noqa: E731
    if e.name in ("gather", "dynamic_slice"):
      return not isinstance(e.ins[0], Lit) and weight(e.ins[0])
    return any(v in self.indexed for v in ins) and all(v not in self.data_dep or v in self.indexed for v in ins)

  def dispatch(self, e):
    handler = getattr(self, "op_" + e.name, None)
    if handler is not None:
      return handler(e)
    if e.name in ELEMENTWISE:
      if e.name == "div":
        self.note_divisor(e)
      return [self.elementwise(e)]
    if e.name in REDUCTIONS:
      return [self.reduction(e)]
    if e.name in CUMULATIVE:
      return [self.cumulative(e)]
    if e.name in IDENTITY:
      return [self.lay(v) for v in e.ins][:len(e.outs)]
    if not e.ins or all(v not in self.data_dep for v in e.ins if not isinstance(v, Lit)):
      # a source (iota, random bits) or any op on values that are not computed from the inputs: it gives a value
      # of full size that is sliced; its operands are not sliced
      for v in e.ins:
        for entry in self.lay(v):
          if _is_atoms(entry):
            self.fix_entry(entry, self.report(e, "an op the channel analysis does not know"))
      return [[None] * len(self.p.shape(o)) for o in e.outs]
    why = self.give_up(e, "an op the channel analysis does not know")
    return [self.untracked(e, self.p.shape(o), why) for o in e.outs]

  def elementwise(self, e):
    shape = self.p.shape(e.outs[0])
    out = [None] * len(shape)
    for v in e.ins:
      vs = self.p.shape(v)
      if len(vs) != len(shape):
        continue  # a scalar operand
      for k, entry in enumerate(self.lay(v)):
        if vs[k] == 1 and shape[k] != 1:
          continue  # a size-1 axis broadcast over this one
        out[k] = self.tie(out[k], entry, e)
    return out

  def note_values(self, e):
    """Follow a channel sum through ops that only move its values (a mean's ``keepdims``), and fold scalars
    computed from literals (``jnp.var``'s ``count - ddof``)."""
    if e.name in SHAPE_ONLY and not isinstance(e.ins[0], Lit) and e.ins[0] in self.sums:
      self.sums[e.outs[0]] = self.sums[e.ins[0]]
    if e.name in FOLDABLE and len(e.outs) == 1 and self.p.shape(e.outs[0]) == ():
      known = [self.scalar(v) for v in e.ins]
      if all(k is not None for k in known):
        with np.errstate(all="ignore"):
          value = float(FOLDABLE[e.name](*(k[0] for k in known)))
        self.scalars[e.outs[0]] = (value, frozenset().union(*(k[1] for k in known)))

  def scalar(self, v):
    """``(value, literals)`` of a scalar computed from literals and constants only, else ``None``."""
    if isinstance(v, Lit):
      return (float(np.asarray(v.value)), frozenset([float(np.asarray(v.value))])) \
          if np.ndim(v.value) == 0 and _is_number(v.value) else None
    return self.scalars.get(v)

  def note_divisor(self, e):
    """A mean: a sum over channels divided by the number of elements it sums (a literal, or a constant computed
    from that literal such as ``count - ddof``): the divisor follows the kept count."""
    num, den = e.ins
    known = self.scalar(den)
    if isinstance(num, Lit) or num not in self.sums or known is None:
      return
    src, axes = self.sums[num]
    count = float(np.prod([self.p.shape(src)[k] for k in axes]))
    value, literals = known
    offset = count - value
    if count in literals and offset == int(offset) and 0 <= offset < count:
      self.divisors[self.idx] = (1, src, axes, value)

  def reduction(self, e):
    x = e.ins[0]
    axes = tuple(e.params.get("axes", ()))
    if e.name in ("argmax", "argmin"):
      axes = tuple(e.params["axes"])
    lay = self.lay(x)
    tracked = [k for k in axes if _is_atoms(lay[k])]
    if tracked and REDUCTIONS[e.name] is None:
      self.give_up(e, "picks a position along a channel axis", [x], tracked)
    elif tracked and e.name == "reduce_sum":
      self.sums[e.outs[0]] = (x, axes)
    return [a for k, a in enumerate(lay) if k not in axes]

  def cumulative(self, e):
    return [list(self.lay(e.ins[0]))]

  def op_broadcast_in_dim(self, e):
    shape, dims = self.p.shape(e.outs[0]), e.params["broadcast_dimensions"]
    src_shape, lay = self.p.shape(e.ins[0]), self.lay(e.ins[0])
    out = [None] * len(shape)
    for j, d in enumerate(dims):
      if src_shape[j] == shape[d]:
        out[d] = lay[j]
    for d, n in enumerate(shape):
      if out[d] is None and n > 1:
        out[d] = self.atoms.new(n)  # constant along this axis: any kept subset of it is the same
    return [out]

  def op_squeeze(self, e):
    dims = {d % len(self.p.shape(e.ins[0])) for d in e.params["dimensions"]}
    lay = self.lay(e.ins[0])
    for d in dims:
      if _is_atoms(lay[d]):
        self.fix_entry(lay[d], self.report(e, "removes a channel axis sliced to one channel (it is kept)"))
    return [[a for k, a in enumerate(lay) if k not in dims]]

  def op_expand_dims(self, e):
    lay = list(self.lay(e.ins[0]))
    for d in sorted(e.params["dimensions"]):
      lay.insert(d, None)
    return [lay]

  def op_transpose(self, e):
    lay = self.lay(e.ins[0])
    return [[lay[k] for k in e.params["permutation"]]]

  def op_rev(self, e):
    lay = list(self.lay(e.ins[0]))
    for d in e.params["dimensions"]:
      if _is_atoms(lay[d]):
        lay[d] = lay[d][::-1].copy()
    return [lay]

  def op_reshape(self, e):
    in_shape, out_shape = self.p.shape(e.ins[0]), self.p.shape(e.outs[0])
    lay = self.lay(e.ins[0])
    if e.params.get("dimensions") is not None:
      return self.give_up_outs(e, "a reshape with a dimension order")
    out = [None] * len(out_shape)
    for ins, outs in _reshape_blocks(in_shape, out_shape):
      entries = [lay[k] for k in ins]
      in_sizes, out_sizes = [in_shape[k] for k in ins], [out_shape[j] for j in outs]
      marker = next((x for x in entries if isinstance(x, str)), f"{e.name} at {e.where}: not a channel axis")
      tracked = [i for i, x in enumerate(entries) if _is_atoms(x)]
      if not tracked:
        for j in outs:
          out[j] = marker if out_shape[j] > 1 else None
        continue
      if len(ins) == 1 and len(outs) == 1:
        out[outs[0]] = entries[0]
        continue
      if len(tracked) == 1:  # flattening or unflattening around one channel axis: its atoms repeat along one axis
        t = tracked[0]
        full = np.broadcast_to(entries[t].reshape([-1 if i == t else 1 for i in range(len(ins))]), in_sizes)
        full = full.reshape(out_sizes)
        varying = [j for j in range(len(outs)) if not _constant(full, j)]
        if len(varying) == 1:
          j = varying[0]
          line = full[tuple(slice(None) if i == j else 0 for i in range(len(outs)))].copy()
          for i, jj in enumerate(outs):
            out[jj] = line if i == j else (marker if out_sizes[i] > 1 else None)
          continue
      # a split and/or a merge of channel axes: every element is a product of atoms of the output axes
      new = [self.atoms.new(n) if n > 1 else None for n in out_sizes]
      if len(ins) == 1:
        self.tie_factored(entries[0], new, out_sizes, e)
      else:
        merged = new[0] if len(outs) == 1 else self.atoms.new(int(np.prod(out_sizes)))
        self.tie_factored(merged, entries, in_sizes, e)
        if len(outs) > 1:
          self.tie_factored(merged, new, out_sizes, e)
      for i, j in enumerate(outs):
        out[j] = new[i]
    return [out]

  def give_up_outs(self, e, reason):
    why = self.give_up(e, reason)
    return [self.untracked(e, self.p.shape(o), why) for o in e.outs]

  def _side_by_side(self, e, entries, sizes):
    """Entries of the pieces of one axis laid end to end (a concatenation)."""
    if not any(_is_atoms(x) for x in entries):
      return next((x for x in entries if isinstance(x, str)), None)
    parts = []
    for entry, n in zip(entries, sizes):
      if _is_atoms(entry):
        parts.append(entry)
      else:
        part = self.atoms.new(n)
        if isinstance(entry, str):  # positions from an untracked axis stay
          for a in part.tolist():
            self.atoms.fix(a, entry)
        parts.append(part)
    return np.concatenate(parts)

  def op_concatenate(self, e):
    d = e.params["dimension"]
    shape = self.p.shape(e.outs[0])
    out = [None] * len(shape)
    for k in range(len(shape)):
      if k == d:
        out[k] = self._side_by_side(e, [self.lay(v)[k] for v in e.ins], [self.p.shape(v)[k] for v in e.ins])
      else:
        for v in e.ins:
          out[k] = self.tie(out[k], self.lay(v)[k], e)
    return [out]

  def op_stack(self, e):
    axis = e.params["axis"]
    shape = self.p.shape(e.ins[0])
    out = [None] * len(shape)
    for k in range(len(shape)):
      for v in e.ins:
        out[k] = self.tie(out[k], self.lay(v)[k], e)
    out.insert(axis, self.untracked(e, [len(e.ins)])[0] if len(e.ins) > 1 else None)
    return [out]

  def op_tile(self, e):
    lay = list(self.lay(e.ins[0]))
    for k, r in enumerate(e.params["reps"]):
      if r > 1:
        lay[k] = np.tile(lay[k], r) if _is_atoms(lay[k]) else None
    return [lay]

  def op_split(self, e):
    axis = e.params["axis"]
    lay = self.lay(e.ins[0])
    outs, start = [], 0
    for o in e.outs:
      size = self.p.shape(o)[axis]
      piece = list(lay)
      if _is_atoms(lay[axis]):
        piece[axis] = lay[axis][start:start + size].copy()
      outs.append(piece)
      start += size
    return outs

  def op_slice(self, e):
    shape = self.p.shape(e.ins[0])
    lay = list(self.lay(e.ins[0]))
    starts, limits = e.params["start_indices"], e.params["limit_indices"]
    strides = e.params["strides"] or (1,) * len(shape)
    for k, entry in enumerate(lay):
      if (starts[k], limits[k], strides[k]) == (0, shape[k], 1):
        continue
      if _is_atoms(entry):
        if strides[k] != 1:
          self.give_up(e, "takes every n-th channel of a channel axis", [e.ins[0]], [k])
          lay[k] = self.untracked(e, [limits[k] - starts[k]])[0]
        else:
          lay[k] = entry[starts[k]:limits[k]].copy()
    return [lay]

  def op_pad(self, e):
    lay = list(self.lay(e.ins[0]))
    shape = self.p.shape(e.ins[0])
    for k, (lo, hi, interior) in enumerate(e.params["padding_config"]):
      if not _is_atoms(lay[k]) or (lo, hi, interior) == (0, 0, 0):
        continue
      if lo < 0 or hi < 0 or interior != 0:
        self.give_up(e, "crops or interleaves a channel axis", [e.ins[0]], [k])
        lay[k] = self.untracked(e, [self.p.shape(e.outs[0])[k]])[0]
      else:  # padded positions are constants that are always there
        pad = self.report(e, "pads a channel axis (the padded positions stay)")
        lay[k] = self._side_by_side(e, [pad, lay[k], pad], [lo, shape[k], hi])
    return [lay]

  def _windowed(self, e):
    lay = list(self.lay(e.ins[0]))
    dims, strides = e.params["window_dimensions"], e.params["window_strides"]
    pads = e.params.get("padding", ((0, 0),) * len(dims))
    dil = [e.params.get(p, (1,) * len(dims)) for p in ("base_dilation", "window_dilation")]
    for k in range(len(lay)):
      plain = dims[k] == 1 and strides[k] == 1 and tuple(pads[k]) == (0, 0) and dil[0][k] == 1 and dil[1][k] == 1
      if _is_atoms(lay[k]) and not plain:
        self.give_up(e, "pools across channels", [e.ins[0]], [k])
        lay[k] = None
      elif not plain:
        lay[k] = None
    return [lay] * len(e.outs)

  op_reduce_window_sum = op_reduce_window_max = op_reduce_window_min = op_reduce_window = _windowed

  def op_conv_general_dilated(self, e):
    lhs, rhs = e.ins
    dn = e.params["dimension_numbers"]
    lf, rin, rout, of = dn.lhs_spec[1], dn.rhs_spec[1], dn.rhs_spec[0], dn.out_spec[1]
    groups, bgroups = e.params["feature_group_count"], e.params["batch_group_count"]
    lhs_lay, rhs_lay = self.lay(lhs), self.lay(rhs)
    out_shape = self.p.shape(e.outs[0])
    out = [None] * len(out_shape)
    spatial = [k for k in (dn.lhs_spec[0], *dn.lhs_spec[2:]) if _is_atoms(lhs_lay[k])]
    if spatial:
      self.give_up(e, "convolves over an axis that carries channels", [lhs], spatial)
    for k, j in zip(dn.lhs_spec[2:], dn.out_spec[2:]):
      out[j] = lhs_lay[k] if isinstance(lhs_lay[k], str) else None
    out[dn.out_spec[0]] = lhs_lay[dn.lhs_spec[0]] if isinstance(lhs_lay[dn.lhs_spec[0]], str) else None
    if bgroups != 1:
      why = self.give_up(e, f"batch_group_count={bgroups}")
      out[of] = why
      return [out]
    cin_g, cout = self.p.shape(rhs)[rin], self.p.shape(rhs)[rout]
    for k in dn.rhs_spec[2:]:
      if _is_atoms(rhs_lay[k]):
        self.windows.update(rhs_lay[k].tolist())
    if groups == 1:
      self.tie(lhs_lay[lf], rhs_lay[rin], e)
    else:  # input channel g * cin_g + j is (group g) x (position j), output g * cout_g + k is (group g) x (own k)
      g_atoms = self.atoms.new(groups)
      self.tie_factored(lhs_lay[lf], [g_atoms, rhs_lay[rin]], [groups, cin_g], e)
      own = self.atoms.new(cout // groups) if cout // groups > 1 else None
      self.tie_factored(rhs_lay[rout], [g_atoms, own], [groups, cout // groups], e)
    out[of] = rhs_lay[rout]
    return [out]

  def op_dot_general(self, e):
    lhs, rhs = e.ins
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    ll, rl = self.lay(lhs), self.lay(rhs)
    for a, b in zip(lc, rc):
      self.tie(ll[a], rl[b], e)
    batch = [self.tie(ll[a], rl[b], e) for a, b in zip(lb, rb)]
    free_l = [ll[k] for k in range(len(ll)) if k not in lc and k not in lb]
    free_r = [rl[k] for k in range(len(rl)) if k not in rc and k not in rb]
    return [batch + free_l + free_r]

  def op_select_n(self, e):
    return [self.elementwise(e)]

  def op_clamp(self, e):
    return [self.elementwise(e)]

  def op_bitcast_convert_type(self, e):
    if self.p.shape(e.ins[0]) == self.p.shape(e.outs[0]):
      return [self.elementwise(e)]
    return self.give_up_outs(e, "changes the element size")

  def op_iota(self, e):
    return [[None] * len(self.p.shape(e.outs[0]))]

  def op_sort(self, e):
    d = e.params["dimension"]
    shape = self.p.shape(e.ins[0])
    why = f"{e.name} at {e.where}: not a channel axis"
    for v in e.ins:
      if _is_atoms(self.lay(v)[d]):
        why = self.give_up(e, "orders positions along a channel axis", [v], [d])
    out = [None] * len(shape)
    for k in range(len(shape)):
      if k == d:
        out[k] = why
        continue
      for v in e.ins:
        out[k] = self.tie(out[k], self.lay(v)[k], e)
    return [list(out) for _ in e.outs]

  def op_top_k(self, e):
    lay = list(self.lay(e.ins[0]))
    why = f"{e.name} at {e.where}: not a channel axis"
    if _is_atoms(lay[-1]):
      why = self.give_up(e, "orders positions along a channel axis", [e.ins[0]], [len(lay) - 1])
    lay[-1] = why
    return [lay, list(lay)]

  def op_dynamic_slice(self, e):
    x = e.ins[0]
    lay = list(self.lay(x))
    shape, sizes = self.p.shape(x), e.params["slice_sizes"]
    for k, entry in enumerate(lay):
      if sizes[k] != shape[k]:
        if _is_atoms(entry):
          self.give_up(e, "slices a channel axis at a computed position", [x], [k])
        lay[k] = self.untracked(e, [sizes[k]])[0]
    return [lay]

  def op_dynamic_update_slice(self, e):
    x, upd = e.ins[:2]
    lay = list(self.lay(x))
    shape, ushape = self.p.shape(x), self.p.shape(upd)
    for k in range(len(lay)):
      if ushape[k] == shape[k]:
        lay[k] = self.tie(lay[k], self.lay(upd)[k], e)
      else:
        for v in (x, upd):
          if _is_atoms(self.lay(v)[k]):
            self.give_up(e, "writes into part of a channel axis", [v], [k])
        lay[k] = lay[k] if not _is_atoms(lay[k]) else self.untracked(e, [shape[k]])[0]
    return [lay]

  def op_gather(self, e):
    x, idx = e.ins
    dn = e.params["dimension_numbers"]
    lay = self.lay(x)
    shape, sizes = self.p.shape(x), e.params["slice_sizes"]
    kept = [k for k in range(len(shape)) if k not in dn.collapsed_slice_dims and k not in dn.operand_batching_dims]
    bad = [k for k in range(len(shape)) if _is_atoms(lay[k]) and (k not in kept or sizes[k] != shape[k]
                                                                  or k in dn.start_index_map)]
    if bad:
      self.give_up(e, "gathers positions of a channel axis", [x], bad)
    out_shape = self.p.shape(e.outs[0])
    out = self.untracked(e, out_shape)
    for j, k in zip(dn.offset_dims, kept):
      if k not in bad and sizes[k] == shape[k]:
        out[j] = lay[k]
    return [out]

  def op_cond(self, e):
    branches = [b.jaxpr for b in e.params["branches"]]
    return self._control(e, [(b, list(range(1, len(e.ins)))) for b in branches], branches, None)

  def op_while(self, e):
    cn, bn = e.params["cond_nconsts"], e.params["body_nconsts"]
    carry = list(range(cn + bn, len(e.ins)))
    cond, body = e.params["cond_jaxpr"].jaxpr, e.params["body_jaxpr"].jaxpr
    return self._control(e, [(cond, list(range(cn)) + carry), (body, list(range(cn, cn + bn)) + carry)], [body],
                         [cn + bn + j for j in range(len(e.outs))])

  def op_scan(self, e):
    nc, ncarry = e.params["num_consts"], e.params["num_carry"]
    body = e.params["jaxpr"].jaxpr
    return self._control(e, [(body, list(range(len(e.ins))))], [body],
                         [nc + j for j in range(ncarry)] + [None] * (len(e.outs) - ncarry))

  def _control(self, e, bodies, producers, same_position):
    """cond / while / scan: a result that is an operand passed through unchanged (in every branch; a loop's
    carry at its own position) keeps that operand's channels; operands a body computes with are kept whole.

    ``bodies``: (sub-program, the equation operand index of each of its inputs); ``producers``: the
    sub-programs giving the results; ``same_position[j]``: the operand result ``j`` must be (loops)."""
    used = set()
    sources: dict = {}
    for body, in_map in bodies:
      for eq in body.eqns:
        used.update(in_map[i] for i, v in enumerate(body.invars) if any(v is w for w in eq.invars))
      if not any(body is p for p in producers):
        used.update(in_map[i] for i, v in enumerate(body.invars) if any(v is w for w in body.outvars))
        continue
      for j, ov in enumerate(body.outvars):
        src = next((in_map[i] for i, v in enumerate(body.invars) if v is ov), None)
        if same_position is not None and src is not None and src != same_position[j]:
          used.add(src)
          src = None
        sources.setdefault(j, set()).add(src)
    for i in sorted(used):
      if any(_is_atoms(x) for x in self.lay(e.ins[i])):
        self.give_up(e, "computes with these channels inside a branch or loop body", [e.ins[i]])
    outs = []
    for j, o in enumerate(e.outs):
      src = sources.get(j, {None})
      if len(src) == 1 and None not in src and next(iter(src)) not in used:
        outs.append(list(self.lay(e.ins[next(iter(src))])))
      else:
        outs.append(self.untracked(e, self.p.shape(o)))
    return outs


def _constant(full: np.ndarray, j: int) -> bool:
  """Whether ``full`` is constant along axis ``j``."""
  first = np.take(full, [0], axis=j)
  return bool(np.all(full == first))


def _reshape_blocks(in_shape, out_shape):
  """Contiguous runs of input and output axes a reshape maps onto each other (same element
  count), size-1 axes attached to the run before them: [((in axes), (out axes)), ...]."""
  blocks, i, j = [], 0, 0
  ni, no = len(in_shape), len(out_shape)
  while i < ni or j < no:
    ins, outs, pi, po = [], [], 1, 1
    while i < ni or j < no:
      if i < ni and (j >= no or pi < po or (pi == po and not ins)):
        pi *= in_shape[i]
        ins.append(i)
        i += 1
      else:
        po *= out_shape[j]
        outs.append(j)
        j += 1
      if pi == po and ins and outs:
        break
    while i < ni and in_shape[i] == 1:
      ins.append(i)
      i += 1
    while j < no and out_shape[j] == 1:
      outs.append(j)
      j += 1
    blocks.append((tuple(ins), tuple(outs)))
  return blocks


def _block_name(paths: list[str], last_layer: Optional[str], taken: set) -> str:
  """The modules' common path (``Block_3``) or name prefix (``stage1_block2``); else the branch's
  last layer (``project``)."""
  parts = [p.split("/")[1:-1] for p in paths]  # drop the collection and the leaf name
  common = []
  for level in zip(*parts):
    if len(set(level)) != 1:
      break
    common.append(level[0])
  if common:
    name = "/".join(common)
  else:
    firsts = sorted({p[0] for p in parts if p})
    prefix = os.path.commonprefix(firsts)
    # "stage1_block2_" names a block; "Conv_" (Conv_3, Conv_4: auto-numbered layers) does not
    if not prefix.endswith("_") or any(f[len(prefix):][:1].isdigit() for f in firsts):
      prefix = ""
    name = prefix.rstrip("_") or last_layer or "block"
  base, k = name, 1
  while name in taken:
    k += 1
    name = f"{base}_{k}"
  return name


def _find_blocks(program: Program, data_dep: set, origin: dict) -> dict:
  """Residual adds, with the variables used only by the branch."""
  anc_eqn, anc_var = {}, {}
  for i, vid in enumerate(program.invars):
    anc_eqn[vid], anc_var[vid] = 0, (1 << i) if i < program.n_vars else 0
  for vid in program.consts:
    anc_eqn[vid], anc_var[vid] = 0, 0
  contraction, data_eqns = 0, 0
  blocks, taken = {}, set()
  weight_of = {}  # contraction eqn index -> the variable its weight operand comes from
  for idx, e in enumerate(program.eqns):
    ins = [v for v in e.ins if not isinstance(v, Lit)]
    if e.name in CONTRACTIONS:
      weights = [origin[v] for v in ins if v in origin]
      if weights:
        weight_of[idx] = weights[0]
    ae, av = 0, 0
    for v in ins:
      ae |= anc_eqn[v]
      av |= anc_var[v]
    bit = 1 << idx
    if e.name in CONTRACTIONS and any(v not in data_dep for v in ins):
      contraction |= bit
    if any(v in data_dep for v in ins):
      data_eqns |= bit
    for o in e.outs:
      anc_eqn[o], anc_var[o] = ae | bit, av
    if e.name not in ("add", "add_any") or len(ins) != 2:
      continue
    a, b = ins
    if not (a in data_dep and b in data_dep) or program.shape(a) != program.shape(b):
      continue
    if not (anc_eqn[a] & anc_eqn[b] & data_eqns):
      continue  # two inputs meeting (e.g. an image and a side input), not a residual
    only_a = bin(anc_eqn[a] & ~anc_eqn[b] & contraction).count("1")
    only_b = bin(anc_eqn[b] & ~anc_eqn[a] & contraction).count("1")
    if only_a == only_b:
      continue
    residual, branch = (a, b) if only_b > only_a else (b, a)
    own = anc_var[branch] & ~anc_var[residual]
    paths = [program.var_paths[i] for i in range(program.n_vars) if own >> i & 1]
    if not paths:
      continue
    branch_contractions = anc_eqn[branch] & ~anc_eqn[residual] & contraction
    last = branch_contractions.bit_length() - 1
    last_layer = weight_of.get(last, "").split("/")[1:-1]
    name = _block_name(paths, "/".join(last_layer) or None, taken)
    taken.add(name)
    blocks[name] = ResidualBlock(name, idx, residual, branch, tuple(paths))
  return blocks


def find_coupling(programs: list[Program]) -> Coupling:
  """Channel groups, residual blocks and unfollowed ops of one network, from one or more traces
  of it (e.g. eval and train mode), which share the variable atoms."""
  main = programs[0]
  atoms = _Atoms()
  leaf_atoms = {}
  for i, path in enumerate(main.var_paths):
    shape = main.shape(main.invars[i])
    leaf_atoms[path] = tuple(atoms.new(n) if n > 1 else None for n in shape)

  analyses, producer_axes, reports = [], [], {}
  for program in programs:
    if program.var_paths != main.var_paths:
      raise ValueError("every trace of a network must have the same variables")
    an = _Analysis(program, atoms, leaf_atoms)
    an.run()
    # outputs leave the network: their channels are fixed, except variables written back (BN
    # statistics in train mode), which are the same variables as the inputs of that name
    var_out = _written_variables(program)
    for j, v in enumerate(program.outvars):
      if j in var_out:
        written = Unfollowed("output", var_out[j], "variable written back in another layout")
        an.reports[str(written)] = written
        for arr, back in zip(an.lay(v), leaf_atoms[var_out[j]]):
          if _is_atoms(arr) and _is_atoms(back):
            for x, y in zip(arr.tolist(), back.tolist()):
              atoms.tie((x,), (y,), str(written))
          elif _is_atoms(arr) or _is_atoms(back):
            an.fix_entry(arr if _is_atoms(arr) else back, str(written))
      else:
        for entry in an.lay(v):
          an.fix_entry(entry, OUTPUT)
    analyses.append(an)
    reports.update(an.reports)
    for e in program.eqns:
      producer_axes += _producer_axes(an, e)

  memo: dict = {}

  def expand(a):
    r = atoms.find(a)
    if r not in memo:
      memo[r] = atoms.expand(r)
    return memo[r]

  # groups: per producing axis and factor position, the free roots it is made of; overlapping ones merge
  group_uf: dict = {}

  def gfind(r):
    while group_uf[r] != r:
      group_uf[r] = group_uf[group_uf[r]]
      r = group_uf[r]
    return r

  order: list = []  # roots in first-seen order
  producers_of: dict = {}  # root -> producer paths
  for path, arr in producer_axes:
    slots: dict = {}
    for a in arr.tolist():
      ex = expand(a)
      for f, r in enumerate(ex):
        slots.setdefault((len(ex), f), []).append(r)
    for key in sorted(slots):
      roots = list(dict.fromkeys(slots[key]))
      for r in roots:
        if r not in group_uf:
          group_uf[r] = r
          order.append(r)
        producers_of.setdefault(r, [])
        if path not in producers_of[r]:
          producers_of[r].append(path)
      for r in roots[1:]:
        ra, rb = gfind(roots[0]), gfind(r)
        if ra != rb:
          group_uf[rb] = ra
  by_group: dict = {}
  for r in order:
    by_group.setdefault(gfind(r), []).append(r)

  groups, offsets, comp_code, names = {}, {}, {}, set()
  group_roots = []
  offset = 0
  for comps in by_group.values():
    producers = list(dict.fromkeys(p for r in comps for p in producers_of[r]))
    name = _group_name(producers[0], names)
    names.add(name)
    offsets[name] = offset
    for j, c in enumerate(comps):
      comp_code[c] = offset + j
    offset += len(comps)
    group_roots.append((name, comps, producers))

  code_memo: dict = {}

  def code_of(a):
    r = atoms.find(a)
    if r not in code_memo:
      code_memo[r] = [comp_code[x] for x in expand(r) if x in comp_code]
    return code_memo[r]

  def encode(entry):
    if not _is_atoms(entry):
      return None
    rows = [code_of(a) for a in entry.tolist()]
    width = max((len(c) for c in rows), default=0)
    if width == 0:
      return None
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, c in enumerate(rows):
      out[i, :len(c)] = c
    return out

  # members, and the parameter axes with positions kept whole (with the reason)
  members: dict = {name: [] for name, _, _ in group_roots}
  group_of_code = np.zeros(offset, dtype=np.int64)
  for gi, (name, comps, _) in enumerate(group_roots):
    group_of_code[[comp_code[c] for c in comps]] = gi
  fixed_axes: dict = {}
  unfollowed: list = []
  windows = set().union(*(an.windows for an in analyses))
  for path, lay in leaf_atoms.items():
    for k, arr in enumerate(lay):
      if arr is None:
        continue
      code = encode(arr)
      if code is not None:
        for gi in np.unique(group_of_code[code[code >= 0]]):
          members[group_roots[gi][0]].append((path, k))
      for a in arr.tolist():
        if not expand(a):
          why = atoms.reason(a) or "kept"
          fixed_axes.setdefault((path, k), why)
          if why in reports and reports[why] not in unfollowed:
            unfollowed.append(reports[why])
          break
      if code is None and (path, k) not in fixed_axes and not windows.issuperset(arr.tolist()):
        # free channels no group holds: nothing kept silently
        u = Unfollowed("variable", path, f"axis {k}: no layer the analysis follows produces these channels (e.g. a "
                       "kernel computed from the inputs, not only picked by them); kept whole")
        fixed_axes[(path, k)] = str(u)
        unfollowed.append(u)

  for name, comps, producers in group_roots:
    groups[name] = ChannelGroup(name, len(comps), tuple(members[name]), tuple(producers))

  codes, divisors = {}, {}
  for an in analyses:
    codes[an.p] = {vid: tuple(encode(x) for x in lay) for vid, lay in an.layout.items()}
    divisors[an.p] = {i: d for i, d in an.divisors.items()
                      if any(codes[an.p][d[1]][k] is not None for k in d[2])}
  sites = {an.p: _find_blocks(an.p, an.data_dep - an.indexed, an.origin) for an in analyses}
  blocks = sites[main]
  for program, found in sites.items():
    if set(found) != set(blocks):
      raise ValueError(f"the traced modes disagree on the residual blocks: {sorted(found)} vs {sorted(blocks)}")
  return Coupling(groups, offsets, codes, blocks, sites, unfollowed, fixed_axes, divisors)


def _group_name(producer_path: str, taken: set) -> str:
  parts = producer_path.split("/")[1:] or [producer_path]  # "params/Conv_0/kernel", or "value12"
  name = "/".join(parts[:-1]) if len(parts) > 1 else parts[0]
  base, k = name, 1
  while name in taken:
    k += 1
    name = f"{base}#{k}"
  return name


def _producer_axes(an: _Analysis, e) -> list:
  """(kernel path, atoms) of the output axes of a parameterised conv or dense layer."""
  out = []
  if e.name == "conv_general_dilated":
    rhs = e.ins[1]
    if not isinstance(rhs, Lit) and (rhs not in an.data_dep or rhs in an.indexed) and rhs in an.var_dep:
      arr = an.lay(rhs)[e.params["dimension_numbers"].rhs_spec[0]]
      if _is_atoms(arr):
        out.append((an.origin.get(rhs, f"value{rhs}"), arr))
  elif e.name == "dot_general":
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    for v, contracted, batch in ((e.ins[1], rc, rb), (e.ins[0], lc, lb)):
      if isinstance(v, Lit) or (v in an.data_dep and v not in an.indexed) or v not in an.var_dep:
        continue
      for k, arr in enumerate(an.lay(v)):
        if k not in contracted and k not in batch and _is_atoms(arr):
          out.append((an.origin.get(v, f"value{v}"), arr))
  return out


def _written_variables(program: Program) -> dict:
  """Output leaf index -> variable path, for outputs that are updated variables (``mutable=``)."""
  leaves_with_path = jax.tree_util.tree_flatten_with_path(
      jax.tree_util.tree_unflatten(program.out_tree, list(range(len(program.outvars)))))[0]
  known = set(program.var_paths)
  out = {}
  for path, j in leaves_with_path:
    s = path_str(path)
    # (logits, {"batch_stats": ...}) flattens to "1/batch_stats/..."; strip the tuple index
    candidate = s.split("/", 1)[1] if "/" in s else s
    if candidate in known:
      out[j] = candidate
  return out
