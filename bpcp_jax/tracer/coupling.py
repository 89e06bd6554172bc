"""Channel coupling found from the traced program: which parameter axes must be pruned together.

Every axis of every variable leaf starts as its own "atoms" (one per position). Walking the
traced program, each primitive ties atoms together: an elementwise op or a residual add ties
its operands' channels, a convolution ties its input's channels to its kernel's input axis and
carries the kernel's output axis into its result, a concatenation lays its inputs side by
side (index offsets), a reshape/flatten repeats the channels along the merged axis, a
depthwise convolution ties output channel ``o`` to input ``o // multiplier``. A union-find over
atoms then gives the channel groups: all the atoms a producing layer's output axis (a conv or
dense kernel) is tied to. Channels that reach the network's inputs or outputs, or pass through
an op the analysis cannot follow (a reduction over channels such as LayerNorm's, a slice of
the channel axis, a grouped convolution, any unknown primitive), are fixed: never pruned, and
every such op is reported with its module path. Nothing is sliced that was not followed.

Residual blocks are the adds ``a + b`` of two same-shaped, data-dependent tensors that share an
ancestor, where one side (the branch) contains more parameterised contractions than the other
(``x + f(x)`` or ``shortcut(x) + f(x)``); these can carry block-pruning gates.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import numpy as np

from bpcp_jax.tracer.program import Lit, Program, path_str

ELEMENTWISE = frozenset("""
add add_any sub mul div rem pow max min atan2 nextafter and or xor not eq ne lt le gt ge select_n clamp
neg exp exp2 log log1p expm1 tanh logistic sqrt rsqrt cbrt abs sign sin cos tan asin acos atan sinh cosh asinh
acosh atanh square integer_pow erf erfc erf_inv lgamma digamma floor ceil round is_finite convert_element_type
copy copy_p stop_gradient reduce_precision real imag conj imag_p optimization_barrier
""".split())
REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split())
SOURCES = frozenset("iota rng_bit_generator random_bits random_seed random_wrap random_unwrap threefry2x32 full".split())


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

  ``codes[program][value id]`` gives, per axis, ``None`` (an axis carrying no prunable channel) or an int
  array: for each position, its index into the concatenation of all groups' masks (in
  ``groups`` order), or -1 for a position that is always kept.
  """

  groups: dict  # name -> ChannelGroup
  offsets: dict  # name -> offset of the group's first channel in the concatenated mask
  codes: dict
  blocks: dict  # name -> ResidualBlock (in the first program)
  block_sites: dict  # program -> {name: ResidualBlock}
  unfollowed: list  # Unfollowed
  fixed: dict  # (variable path, axis) -> reason it is not pruned

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
  """Union-find over atoms; an atom can be fixed, with the first reason recorded."""

  def __init__(self):
    self.parent: list[int] = []
    self.fixed: dict[int, str] = {}

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

  def union(self, a: int, b: int):
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra
      if rb in self.fixed and ra not in self.fixed:
        self.fixed[ra] = self.fixed[rb]

  def fix(self, atoms, reason: str):
    for a in np.asarray(atoms).ravel():
      if a >= 0:
        r = self.find(int(a))
        self.fixed.setdefault(r, reason)


def _full(n):
  return np.full((n,), -1, dtype=np.int64)


class _Analysis:
  def __init__(self, program: Program, atoms: _Atoms, leaf_atoms: dict):
    self.p, self.atoms = program, atoms
    self.layout: dict = {}
    self.unfollowed: list[Unfollowed] = []
    self.data_dep: set = set()
    # value id -> the variable a parameter-only value was computed from (casts, squeezes, ...)
    self.origin = {vid: path for vid, path in zip(program.invars, program.var_paths)}
    for i, vid in enumerate(program.invars):
      if i < program.n_vars:
        self.layout[vid] = leaf_atoms[program.var_paths[i]]
      else:
        self.layout[vid] = (None,) * len(program.shape(vid))
        self.data_dep.add(vid)
    for vid in program.consts:
      self.layout[vid] = (None,) * len(program.shape(vid))

  # -- layouts ------------------------------------------------------------------------------
  def lay(self, v):
    if isinstance(v, Lit):
      return (None,) * np.ndim(v.value)
    return self.layout[v]

  def tie(self, a, b, why):
    """Tie two axis layouts position by position; a tracked position tied to an untracked one is fixed."""
    if a is None and b is None:
      return None
    if a is None or b is None:
      tracked = a if a is not None else b
      self.atoms.fix(tracked, why)
      return None
    if a is b or np.array_equal(a, b):
      return a
    out = a.copy()
    for k, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
      if x >= 0 and y >= 0:
        self.atoms.union(x, y)
      elif x >= 0 or y >= 0:
        self.atoms.fix([max(x, y)], why)
        out[k] = -1
    return out

  def fix_value(self, v, why):
    if isinstance(v, Lit):
      return
    for arr in self.layout[v]:
      if arr is not None:
        self.atoms.fix(arr, why)

  def touched(self, vals) -> bool:
    return any(arr is not None and (arr >= 0).any() for v in vals if not isinstance(v, Lit) for arr in self.lay(v))

  def give_up(self, e, reason, values=None):
    values = list(e.ins) + list(e.outs) if values is None else values
    if self.touched(values):
      self.unfollowed.append(Unfollowed(e.name, e.where, reason))
      for v in values:
        self.fix_value(v, f"{e.name} at {e.where}: {reason}")

  # -- the walk -------------------------------------------------------------------------------
  def run(self):
    for idx, e in enumerate(self.p.eqns):
      ins = [v for v in e.ins if not isinstance(v, Lit)]
      if any(v in self.data_dep for v in ins):
        self.data_dep.update(e.outs)
      else:
        sources = {self.origin.get(v) for v in ins}
        if len(sources) == 1 and None not in sources:
          self.origin.update((o, next(iter(sources))) for o in e.outs)
      handler = getattr(self, "op_" + e.name, None)
      if handler is not None:
        outs = handler(e)
      elif e.name in ELEMENTWISE:
        outs = [self.elementwise(e)]
      elif e.name in REDUCTIONS:
        outs = [self.reduction(e)]
      elif e.name in SOURCES:
        outs = [(None,) * len(self.p.shape(o)) for o in e.outs]
      else:
        self.give_up(e, "an op the channel analysis does not know", list(e.ins))
        outs = [(None,) * len(self.p.shape(o)) for o in e.outs]
      for o, lay in zip(e.outs, outs):
        self.layout[o] = tuple(None if (a is not None and not (a >= 0).any()) else a for a in lay)

  def elementwise(self, e):
    shape = self.p.shape(e.outs[0])
    out = [None] * len(shape)
    first = [True] * len(shape)
    for v in e.ins:
      if len(self.p.shape(v)) != len(shape):
        continue  # a scalar operand
      for k, arr in enumerate(self.lay(v)):
        if shape[k] == 1:
          continue
        if first[k]:
          out[k], first[k] = arr, False
        else:
          out[k] = self.tie(out[k], arr, f"{e.name} at {e.where}")
    return out

  def reduction(self, e):
    (x,) = e.ins[:1]
    axes = set(e.params.get("axes", ()))
    lay = self.lay(x)
    reduced = [lay[k] for k in axes if lay[k] is not None]
    if reduced:
      self.unfollowed.append(Unfollowed(e.name, e.where, "reduces over a channel axis (e.g. LayerNorm over "
                                                          "channels); pruning would change its result"))
      for arr in reduced:
        self.atoms.fix(arr, f"{e.name} at {e.where} reduces over these channels")
    return [a for k, a in enumerate(lay) if k not in axes]

  def op_broadcast_in_dim(self, e):
    shape, dims = self.p.shape(e.outs[0]), e.params["broadcast_dimensions"]
    src_shape, lay = self.p.shape(e.ins[0]), self.lay(e.ins[0])
    out = [None] * len(shape)
    for j, d in enumerate(dims):
      if src_shape[j] == shape[d]:
        out[d] = lay[j]
    return [out]

  def op_squeeze(self, e):
    dims = {d % len(self.p.shape(e.ins[0])) for d in e.params["dimensions"]}
    return [[a for k, a in enumerate(self.lay(e.ins[0])) if k not in dims]]

  def op_transpose(self, e):
    lay = self.lay(e.ins[0])
    return [[lay[k] for k in e.params["permutation"]]]

  def op_rev(self, e):
    lay = list(self.lay(e.ins[0]))
    for d in e.params["dimensions"]:
      if lay[d] is not None:
        lay[d] = lay[d][::-1].copy()
    return [lay]

  def op_reshape(self, e):
    in_shape, out_shape = self.p.shape(e.ins[0]), self.p.shape(e.outs[0])
    lay = self.lay(e.ins[0])
    if all(a is None for a in lay):
      return [(None,) * len(out_shape)]
    full = np.full(in_shape, -1, dtype=np.int64)
    for k, arr in enumerate(lay):
      if arr is None:
        continue
      b = arr.reshape([-1 if j == k else 1 for j in range(len(in_shape))])
      if ((full >= 0) & (b >= 0)).any():
        self.give_up(e, "merges two channel axes into one")
        return [(None,) * len(out_shape)]
      full = np.where(b >= 0, b, full)
    full = full.reshape(out_shape)
    for k, size in enumerate(out_shape):
      if size == 1:
        continue
      line = full[tuple(slice(None) if j == k else 0 for j in range(len(out_shape)))]
      shape = [size if j == k else 1 for j in range(len(out_shape))]
      if np.array_equal(np.broadcast_to(line.reshape(shape), out_shape), full):
        out = [None] * len(out_shape)
        out[k] = line.copy()
        return [out]
    self.give_up(e, "splits a channel axis across several axes")
    return [(None,) * len(out_shape)]

  def op_concatenate(self, e):
    d = e.params["dimension"]
    shape = self.p.shape(e.outs[0])
    out = [None] * len(shape)
    for k in range(len(shape)):
      if k == d:
        parts = [self.lay(v)[k] if self.lay(v)[k] is not None else _full(self.p.shape(v)[k]) for v in e.ins]
        out[k] = np.concatenate(parts)
      elif shape[k] > 1:
        arrs = [self.lay(v)[k] for v in e.ins]
        acc = arrs[0]
        for a in arrs[1:]:
          acc = self.tie(acc, a, f"concatenate at {e.where}")
        out[k] = acc
    return [out]

  def op_split(self, e):
    axis = e.params["axis"]
    lay = self.lay(e.ins[0])
    outs, start = [], 0
    for o in e.outs:
      size = self.p.shape(o)[axis]
      piece = list(lay)
      if lay[axis] is not None:
        piece[axis] = lay[axis][start:start + size].copy()
      outs.append(piece)
      start += size
    return outs

  def op_slice(self, e):
    shape = self.p.shape(e.ins[0])
    lay = list(self.lay(e.ins[0]))
    starts, limits = e.params["start_indices"], e.params["limit_indices"]
    strides = e.params["strides"] or (1,) * len(shape)
    for k, arr in enumerate(lay):
      if arr is not None and (starts[k], limits[k], strides[k]) != (0, shape[k], 1):
        self.give_up(e, "slices a channel axis", [e.ins[0]])
        lay[k] = None
      elif arr is None:
        lay[k] = None
    return [lay]

  def op_pad(self, e):
    lay = list(self.lay(e.ins[0]))
    for k, (lo, hi, interior) in enumerate(e.params["padding_config"]):
      if lay[k] is not None and (lo, hi, interior) != (0, 0, 0):
        self.give_up(e, "pads a channel axis", [e.ins[0]])
        lay[k] = None
    return [lay]

  def _windowed(self, e, n_operands=1):
    lay = list(self.lay(e.ins[0]))
    dims, strides = e.params["window_dimensions"], e.params["window_strides"]
    pads = e.params.get("padding", ((0, 0),) * len(dims))
    shape = self.p.shape(e.ins[0])
    out_shape = self.p.shape(e.outs[0])
    for k in range(len(lay)):
      plain = dims[k] == 1 and strides[k] == 1 and tuple(pads[k]) == (0, 0)
      if lay[k] is not None and not plain:
        self.give_up(e, "pools across channels", [e.ins[0]])
        lay[k] = None
      elif not plain or shape[k] != out_shape[k]:
        lay[k] = None
    return [lay] * len(e.outs)

  op_reduce_window_sum = op_reduce_window_max = op_reduce_window_min = op_reduce_window = _windowed

  def op_cumsum(self, e):
    lay = list(self.lay(e.ins[0]))
    if lay[e.params["axis"]] is not None:
      self.give_up(e, "accumulates along a channel axis", [e.ins[0]])
      lay[e.params["axis"]] = None
    return [lay]

  op_cumprod = op_cummax = op_cummin = op_cumlogsumexp = op_cumsum

  def op_conv_general_dilated(self, e):
    lhs, rhs = e.ins
    dn = e.params["dimension_numbers"]
    lf, rin, rout, of = dn.lhs_spec[1], dn.rhs_spec[1], dn.rhs_spec[0], dn.out_spec[1]
    groups, bgroups = e.params["feature_group_count"], e.params["batch_group_count"]
    lhs_lay, rhs_lay = self.lay(lhs), self.lay(rhs)
    cin = self.p.shape(lhs)[lf]
    cout = self.p.shape(rhs)[rout]
    out = [None] * len(self.p.shape(e.outs[0]))
    for k in (dn.lhs_spec[0], *dn.lhs_spec[2:]):
      if lhs_lay[k] is not None:
        self.give_up(e, "convolves over a channel-carrying batch or spatial axis", [lhs])
    why = f"conv at {e.where}"
    if bgroups != 1:
      self.give_up(e, f"batch_group_count={bgroups}")
      return [out]
    if groups == 1:
      self.tie(lhs_lay[lf], rhs_lay[rin], why)
      out[of] = rhs_lay[rout]
    elif groups == cin and cout % cin == 0:  # depthwise, channel multiplier cout // cin
      mult = cout // cin
      rep = None if lhs_lay[lf] is None else np.repeat(lhs_lay[lf], mult)
      out[of] = self.tie(rep, rhs_lay[rout], why)
    else:
      self.give_up(e, f"grouped convolution ({groups} groups of {cin // groups} channels)")
    return [out]

  def op_dot_general(self, e):
    lhs, rhs = e.ins
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    ll, rl = self.lay(lhs), self.lay(rhs)
    why = f"dot_general at {e.where}"
    for a, b in zip(lc, rc):
      self.tie(ll[a], rl[b], why)
    batch = [self.tie(ll[a], rl[b], why) for a, b in zip(lb, rb)]
    free_l = [ll[k] for k in range(len(ll)) if k not in lc and k not in lb]
    free_r = [rl[k] for k in range(len(rl)) if k not in rc and k not in rb]
    return [batch + free_l + free_r]


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
    if e.name in ("conv_general_dilated", "dot_general"):
      weights = [origin[v] for v in ins if v in origin]
      if weights:
        weight_of[idx] = weights[0]
    ae, av = 0, 0
    for v in ins:
      ae |= anc_eqn[v]
      av |= anc_var[v]
    bit = 1 << idx
    if e.name in ("conv_general_dilated", "dot_general") and any(v not in data_dep for v in ins):
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
    lay = []
    for k, n in enumerate(shape):
      if n > 1:
        lay.append(atoms.new(n))
      else:
        lay.append(None)
    leaf_atoms[path] = tuple(lay)

  analyses, producer_axes, unfollowed = [], [], []
  for program in programs:
    if program.var_paths != main.var_paths:
      raise ValueError("every trace of a network must have the same variables")
    an = _Analysis(program, atoms, leaf_atoms)
    an.run()
    # outputs leave the network: their channels are fixed, except variables written back (BN
    # statistics in train mode), which are the same variables as the inputs of that name
    leaves = list(program.outvars)
    var_out = _written_variables(program)
    for j, v in enumerate(leaves):
      if j in var_out:
        src = leaf_atoms[var_out[j]]
        for arr, back in zip(an.lay(v), src):
          if arr is not None or back is not None:
            an.tie(arr, back, "variable written back")
      else:
        an.fix_value(v, "reaches the network's output")
    analyses.append(an)
    unfollowed += [u for u in dict.fromkeys(an.unfollowed) if u not in unfollowed]
    for e in program.eqns:
      producer_axes += _producer_axes(program, an, e)

  # groups: components reached by a producing kernel's output axis; overlapping ones merge
  comp_group: dict[int, int] = {}
  group_comps: list[list[int]] = []
  group_producers: list[list[str]] = []
  for path, arr in producer_axes:
    comps = list(dict.fromkeys(atoms.find(int(a)) for a in arr if a >= 0))
    hit = sorted({comp_group[c] for c in comps if c in comp_group})
    if hit:
      gi = hit[0]
      for other in hit[1:]:  # merge
        for c in group_comps[other]:
          comp_group[c] = gi
        group_comps[gi] += group_comps[other]
        group_producers[gi] += group_producers[other]
        group_comps[other], group_producers[other] = [], []
    else:
      gi = len(group_comps)
      group_comps.append([])
      group_producers.append([])
    for c in comps:
      if c not in comp_group:
        comp_group[c] = gi
        group_comps[gi].append(c)
    if path not in group_producers[gi]:
      group_producers[gi].append(path)

  # members; axes that are fixed, with the reason
  members: dict[int, list] = {}
  fixed_axes: dict = {}
  for path, lay in leaf_atoms.items():
    for k, arr in enumerate(lay):
      if arr is None:
        continue
      for a in arr.tolist():
        c = atoms.find(a)
        if c in atoms.fixed:
          fixed_axes.setdefault((path, k), atoms.fixed[c])
        gi = comp_group.get(c)
        if gi is not None and (path, k) not in members.setdefault(gi, []):
          members[gi].append((path, k))
  dead = set()
  for gi, comps in enumerate(group_comps):
    reasons = [atoms.fixed[c] for c in comps if c in atoms.fixed]
    if not comps or reasons:
      dead.add(gi)
      for m in members.get(gi, []):
        fixed_axes.setdefault(m, reasons[0] if reasons else "empty group")

  groups, offsets, comp_code, names = {}, {}, {}, set()
  offset = 0
  for gi, comps in enumerate(group_comps):
    if gi in dead:
      continue
    name = _group_name(group_producers[gi][0], names)
    names.add(name)
    groups[name] = ChannelGroup(name, len(comps), tuple(members.get(gi, [])), tuple(group_producers[gi]))
    offsets[name] = offset
    for j, c in enumerate(comps):
      comp_code[c] = offset + j
    offset += len(comps)

  def encode(arr):
    if arr is None:
      return None
    code = np.array([comp_code.get(atoms.find(a), -1) if a >= 0 else -1 for a in arr.tolist()], dtype=np.int64)
    return code if (code >= 0).any() else None

  codes = {}
  for an in analyses:
    for vid, lay in an.layout.items():
      codes.setdefault(an.p, {})[vid] = tuple(encode(a) for a in lay)
  sites = {an.p: _find_blocks(an.p, an.data_dep, an.origin) for an in analyses}
  blocks = sites[main]
  for program, found in sites.items():
    if set(found) != set(blocks):
      raise ValueError(f"the traced modes disagree on the residual blocks: {sorted(found)} vs {sorted(blocks)}")
  return Coupling(groups, offsets, codes, blocks, sites, unfollowed, fixed_axes)


def _group_name(producer_path: str, taken: set) -> str:
  parts = producer_path.split("/")[1:] or [producer_path]  # "params/Conv_0/kernel", or "value12"
  name = "/".join(parts[:-1]) if len(parts) > 1 else parts[0]
  base, k = name, 1
  while name in taken:
    k += 1
    name = f"{base}_{k}"
  return name


def _producer_axes(program: Program, an: _Analysis, e) -> list:
  """(kernel path, atoms) of the output axis of a parameterised conv or dense layer."""
  out = []
  if e.name == "conv_general_dilated" and e.params["feature_group_count"] == 1:
    rhs = e.ins[1]
    if not isinstance(rhs, Lit) and rhs not in an.data_dep:
      arr = an.lay(rhs)[e.params["dimension_numbers"].rhs_spec[0]]
      if arr is not None:
        out.append((an.origin.get(rhs, f"value{rhs}"), arr))
  elif e.name == "dot_general":
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    for v, contracted, batch in ((e.ins[1], rc, rb), (e.ins[0], lc, lb)):
      if isinstance(v, Lit) or v in an.data_dep:
        continue
      for k, arr in enumerate(an.lay(v)):
        if k not in contracted and k not in batch and arr is not None:
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
