"""Pruning any Flax network: masks, masked evaluation and materialization driven by the trace.

``trace_network(model, variables, *example_inputs)`` traces ``model.apply`` and finds its channel
groups and residual blocks (``coupling.py``). The masks have the same shape as the ResNet
families' (``{"blocks": {name: logit}, "channels": {group: 0/1 vector}}``), so channel criteria,
optax and orbax treat both alike. ``masked_apply`` computes what the pruned network will: every
contraction reads its input through the channel masks, every reduction over channels (a
LayerNorm's, a GroupNorm's, a weight standardization's, flax's or hand-written) sums the kept
channels and divides a mean by the kept count (``jnp.var``'s by the kept count less ``ddof``),
every residual add is ``a + g * b``. ``materialize_traced`` returns a
``PrunedNetwork``, a Flax module that runs the traced program with the removed blocks and
channels gone (smaller arrays; group counts, reshapes, slices and mean divisors adjusted; values
not computed from the inputs, such as random masks, computed at full size and sliced), and its
smaller variables (and optimizer state): no mask is left in it.

A trace is specific to the input shapes; a new batch size is traced again on first use (the
variables' shapes are all it needs) and checked to have the same groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import optax

from bpcp_jax.pruning.masks import check_mask_tree, full_masks, take_kept
from bpcp_jax.tracer.coupling import CUMULATIVE, REDUCTIONS, Coupling, find_coupling
from bpcp_jax.tracer.program import Lit, Program, bind, draws_random_numbers, path_str, run_program, trace_program


@dataclasses.dataclass(eq=False)
class TracedNetwork:
  """A Flax module with its traced programs (one per mode) and its channel coupling.

  ``modes`` maps a mode name to the keyword arguments of ``model.apply`` for it, e.g.
  ``{"eval": {"train": False}, "train": {"train": True, "mutable": ["batch_stats"],
  "rngs": {"dropout": key}}}`` (the keys only give shapes: the keys used are the ones given at
  call time). ``axis_env`` lists the named axes ``(name, size)`` the network's collectives use.
  """

  model: Any
  modes: dict
  var_shapes: Any  # pytree of jax.ShapeDtypeStruct mirroring the variables
  coupling: Optional[Coupling]  # set by the first trace
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)
  axis_env: tuple = ()

  @property
  def groups(self):
    return self.coupling.groups

  @property
  def blocks(self):
    return self.coupling.blocks

  @property
  def unfollowed(self):
    return self.coupling.unfollowed

  def traced(self, mode: str, inputs) -> tuple[Program, Coupling]:
    """The program of ``mode`` for inputs shaped like ``inputs`` and the coupling at those shapes."""
    if mode not in self.modes:
      raise ValueError(f"mode {mode!r} was not traced; traced modes: {sorted(self.modes)}")
    key = _shapes_key(inputs)
    if key not in self._cache:
      abstract = jax.tree_util.tree_map(abstract_like, inputs)
      programs = {}
      for m, kw in self.modes.items():
        try:
          programs[m] = trace_program(self.model, self.var_shapes, *abstract, axis_env=self.axis_env, **kw)
        except Exception as err:
          raise ValueError(f"tracing mode {m!r} ({kw}) of {type(self.model).__name__} failed: {err}") from err
      coupling = find_coupling(list(programs.values()))
      if self.coupling is None:  # the first trace defines the network's groups and blocks
        self.coupling = coupling
      _check_same_structure(self.coupling, coupling)
      self._cache[key] = (programs, coupling)
    programs, coupling = self._cache[key]
    return programs[mode], coupling


def abstract_like(x) -> jax.ShapeDtypeStruct:
  """Shape and dtype of an array, a NumPy value or a ``ShapeDtypeStruct``."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _shapes_key(inputs) -> tuple:
  return tuple((a.shape, str(a.dtype)) for a in map(abstract_like, jax.tree_util.tree_leaves(inputs)))


def _check_same_structure(ref: Coupling, new: Coupling):
  got = {n: g.width for n, g in new.groups.items()}
  want = {n: g.width for n, g in ref.groups.items()}
  if got != want or set(new.blocks) != set(ref.blocks):
    raise ValueError("tracing the network at a new input shape gave different channel groups or blocks "
                     f"({sorted(got.items())} vs {sorted(want.items())}); trace it at the shape you run it at")


def trace_network(model, variables, *example_inputs, modes: Optional[Mapping[str, Mapping]] = None,
                  axis_env: Sequence[tuple[str, int]] = ()) -> TracedNetwork:
  """Trace ``model`` (any ``flax.linen`` module) and find its channel groups and residual blocks.

  ``example_inputs`` are the positional inputs of ``model.apply`` (a small batch is enough);
  ``modes`` the apply keyword arguments per mode (default ``{"eval": {}}``; a mode's ``rngs``
  give the PRNG collections it draws from, e.g. ``{"dropout": key}``). Modes are analysed
  together: channels are coupled if any mode couples them. ``axis_env``: the named axes
  ``[(name, size)]`` of the network's collectives (``BatchNorm(axis_name="batch")`` in train
  mode); the network is then run under that axis (``pmap``, ``shard_map``, ``vmap(axis_name=)``).
  """
  modes = {"eval": {}} if modes is None else {k: dict(v) for k, v in modes.items()}
  if not modes:
    raise ValueError("modes must name at least one mode, e.g. {'eval': {}}")
  axis_env = tuple((str(n), int(s)) for n, s in axis_env)
  var_shapes = jax.tree_util.tree_map(abstract_like, variables)
  net = TracedNetwork(model, modes, var_shapes, None, axis_env=axis_env)
  net.traced(next(iter(modes)), example_inputs)
  return net


# -- masks ----------------------------------------------------------------------------------------

def init_traced_masks(net: TracedNetwork) -> dict:
  """Every block kept (logit 0) and every channel of every group kept."""
  return full_masks(net.blocks, {name: g.width for name, g in net.groups.items()})


def check_traced_masks(net: TracedNetwork, masks: Mapping) -> None:
  """Raise ``ValueError`` naming the first block, group or shape that does not fit ``net``."""
  check_mask_tree(masks, net.blocks, {name: g.width for name, g in net.groups.items()})


def _flat_mask(coupling: Coupling, channel_masks, xp=jnp):
  """All groups' masks end to end, then a 1 for the always-kept factors (code -1)."""
  parts = [xp.asarray(channel_masks[name], dtype=xp.float32).reshape(-1) for name in coupling.groups]
  return xp.concatenate(parts + [xp.ones((1,), xp.float32)])


def position_mask(code: np.ndarray, flat):
  """Per position of an axis, the product of its factors' mask values (``code``: (positions, factors))."""
  m = flat[np.where(code >= 0, code, flat.shape[0] - 1)]
  return m.prod(axis=1)


def position_keep(code: np.ndarray, keep_flat: np.ndarray) -> np.ndarray:
  """Per position of an axis, whether all its factors are kept."""
  return keep_flat[np.where(code >= 0, code, len(keep_flat) - 1)].all(axis=1)


def leaves_by_path(variables) -> dict:
  """``{"params/Conv_0/kernel": leaf, ...}``: the variables keyed as the traced program names them."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _rng_leaves(program: Program, rngs, mode: str) -> list:
  if not program.rng_names:
    return []
  rngs = rngs or {}
  missing = [n for n in program.rng_names if n not in rngs]
  if missing:
    raise ValueError(f"mode {mode!r} draws random numbers from {list(program.rng_names)}: give rngs= with "
                     f"{missing} (e.g. rngs={{{missing[0]!r}: jax.random.key(0)}})")
  return [rngs[n] for n in program.rng_names]


def masked_apply(net: TracedNetwork, variables, masks: Mapping, *inputs, mode: str = "eval",
                 block_gates: Optional[Mapping] = None, rngs: Optional[Mapping] = None):
  """``model.apply`` in ``mode`` with the masks applied: what the materialized network computes.

  Returns what ``model.apply`` returns in that mode (with ``mutable=...``: ``(output, updated
  variables)``, full size). ``block_gates`` (e.g. sampled straight-through gates during a block
  search) replace the decisions ``logit >= 0`` of ``masks["blocks"]``. ``rngs`` (``{name: key}``)
  are the keys of the mode's random ops (dropout). Pure, jittable and differentiable in
  ``variables``, ``masks`` and ``block_gates``.
  """
  program, coupling = net.traced(mode, inputs)
  codes = coupling.codes[program]
  flat = _flat_mask(coupling, masks["channels"])
  adds = {b.eqn: (name, b) for name, b in coupling.block_sites[program].items()}
  divisors = coupling.divisors[program]

  def axis_mask(vid, k, ndim, dtype):
    code = codes[vid][k] if not isinstance(vid, Lit) else None
    if code is None:
      return None
    return position_mask(code, flat).astype(dtype).reshape([-1 if j == k else 1 for j in range(ndim)])

  def read_masked(x, vid, axes, fill=0.0):
    for k in axes:
      m = axis_mask(vid, k, x.ndim, jnp.float32)
      if m is None:
        continue
      if fill == 0.0 and jnp.issubdtype(x.dtype, jnp.inexact):
        x = x * m.astype(x.dtype)
      else:
        x = jnp.where(m > 0, x, _neutral(fill, x.dtype))
    return x

  def hook(idx, e, vals):
    if idx in adds:
      name, b = adds[idx]
      g = block_gates[name] if block_gates is not None else (masks["blocks"][name] >= 0)
      branch_pos = 0 if e.ins[0] == b.branch else 1
      vals = list(vals)
      vals[branch_pos] = vals[branch_pos] * jnp.asarray(g, vals[branch_pos].dtype)
      return [vals[0] + vals[1]]
    if idx in divisors:  # a mean over channels: count - ddof becomes kept count - ddof
      pos, src, axes, value = divisors[idx]
      count = float(np.prod([program.shape(src)[k] for k in axes]))
      ratio = jnp.float32(1.0)
      for k in axes:
        code = codes[src][k]
        if code is not None:
          ratio = ratio * position_mask(code, flat).sum() / code.shape[0]
      vals = list(vals)
      vals[pos] = (value - count + count * ratio).astype(jnp.result_type(vals[pos]))
      return bind(e, vals)
    if e.name == "conv_general_dilated":
      lhs = read_masked(vals[0], e.ins[0], [e.params["dimension_numbers"].lhs_spec[1]])
      return bind(e, [lhs, vals[1]])
    if e.name == "dot_general":
      (lc, _), _ = e.params["dimension_numbers"]
      return bind(e, [read_masked(vals[0], e.ins[0], lc), vals[1]])
    if e.name in REDUCTIONS and REDUCTIONS[e.name] is not None:
      return bind(e, [read_masked(vals[0], e.ins[0], e.params["axes"], REDUCTIONS[e.name])] + list(vals[1:]))
    if e.name in CUMULATIVE:
      return bind(e, [read_masked(vals[0], e.ins[0], [e.params["axis"]], CUMULATIVE[e.name])])
    return None

  leaves = leaves_by_path(variables)
  var_leaves = [_leaf(leaves, p) for p in program.var_paths]
  return run_program(program, var_leaves, jax.tree_util.tree_leaves(inputs), _rng_leaves(program, rngs, mode),
                     hook=hook)


def _neutral(fill, dtype):
  """``fill`` (0, 1, +-inf, True, False: what leaves a reduction unchanged) in ``dtype``."""
  if jnp.issubdtype(dtype, jnp.integer) and np.isinf(fill):
    info = jnp.iinfo(dtype)
    return jnp.asarray(info.min if fill < 0 else info.max, dtype)
  return jnp.asarray(fill, dtype)


def _leaf(leaves: Mapping, path: str):
  if path not in leaves:
    raise ValueError(f"variable {path!r} of the traced network is missing from the variables given")
  return leaves[path]


# -- materialization ------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class PruneDecision:
  """What stays: kept channel positions per group and kept blocks (hashed by identity)."""

  net: TracedNetwork
  keep_channels: dict  # group -> bool array
  keep_blocks: dict  # block -> bool
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def keep_flat(self, coupling: Coupling) -> np.ndarray:
    return np.concatenate([self.keep_channels[g] for g in coupling.groups] + [np.ones((1,), bool)])


def prune_decision(net: TracedNetwork, masks: Mapping) -> PruneDecision:
  check_traced_masks(net, masks)
  keep = {g: np.asarray(masks["channels"][g]) > 0.5 for g in net.groups}
  for g, k in keep.items():
    if not k.any():
      raise ValueError(f"channel mask {g!r} keeps no channel; every group must keep at least one")
  blocks = {b: bool(np.asarray(masks["blocks"][b]) >= 0) for b in net.blocks}
  return PruneDecision(net, keep, blocks)


def kept_indices(code, keep_flat: np.ndarray) -> Optional[np.ndarray]:
  """Indices of the kept positions of an axis with ``code`` (``None``: the whole axis)."""
  if code is None:
    return None
  return np.flatnonzero(position_keep(code, keep_flat))


def _is_key(x) -> bool:
  """Whether ``x`` is a typed PRNG key array (no NumPy form: sliced as a jax array)."""
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def slice_array(x, code_per_axis, keep_flat: np.ndarray):
  """``x`` with the dropped positions of every coded axis removed (``take_kept``: one gather)."""
  return take_kept(x, [kept_indices(c, keep_flat) for c in code_per_axis])


def live_values(program: Program, alias: Mapping, outs) -> set:
  """Value ids the outputs ``outs`` need, walking backwards; an aliased output needs only its alias."""
  live = {v for v in outs if not isinstance(v, Lit)}
  for e in reversed(program.eqns):
    if not any(o in live for o in e.outs):
      continue
    if e.outs[0] in alias:
      live.add(alias[e.outs[0]])
    else:
      live.update(v for v in e.ins if not isinstance(v, Lit))
  return live


def shape_under(program: Program, codes: Mapping, keep_flat: np.ndarray, v) -> tuple:
  """The shape of value ``v`` once the positions ``keep_flat`` drops are gone."""
  shape = list(program.shape(v))
  if isinstance(v, Lit):
    return tuple(shape)
  for k, c in enumerate(codes.get(v, ())):
    if c is not None:
      shape[k] = int(position_keep(c, keep_flat).sum())
  return tuple(shape)


def adjusted_params(program: Program, e, new_shape, kept=None) -> dict:
  """``e``'s parameters for its smaller operands: shapes baked into broadcasts, reshapes, slices,
  splits and gathers, and the group count of a grouped convolution. ``kept(value, axis)`` gives
  the kept positions of an axis (needed for slices)."""
  params = dict(e.params)
  if e.name == "broadcast_in_dim":
    params["shape"] = new_shape(e.outs[0])
  elif e.name == "reshape":
    params["new_sizes"] = new_shape(e.outs[0])
  elif e.name == "slice" and kept is not None:
    starts, limits = list(params["start_indices"]), list(params["limit_indices"])
    for k in range(len(starts)):
      keep = kept(e.ins[0], k)
      if keep is not None:
        starts[k], limits[k] = int(keep[:starts[k]].sum()), int(keep[:limits[k]].sum())
    params["start_indices"], params["limit_indices"] = tuple(starts), tuple(limits)
  elif e.name == "split":
    params["sizes"] = tuple(new_shape(o)[params["axis"]] for o in e.outs)
  elif e.name in ("gather", "dynamic_slice"):
    old, new = program.shape(e.ins[0]), new_shape(e.ins[0])
    params["slice_sizes"] = tuple(n if s == o else s for s, o, n in zip(params["slice_sizes"], old, new))
  elif e.name == "conv_general_dilated" and params["feature_group_count"] > 1:
    dn = params["dimension_numbers"]
    params["feature_group_count"] = new_shape(e.ins[0])[dn.lhs_spec[1]] // new_shape(e.ins[1])[dn.rhs_spec[1]]
  return params


@dataclasses.dataclass(eq=False)
class _Shrunk:
  eqns: list  # (index, Eqn with adjusted params and literals)
  alias: dict
  main_out: list  # output ids of the module's return value
  main_tree: Any
  written: list  # (path, output id) of variables written back in this mode
  live_paths: set
  shapes: dict  # value id -> new shape
  kept: dict  # value id -> per axis: kept indices or None
  consts: dict  # the program's constants, sliced


def _main_live(decision: PruneDecision, mode: str, inputs):
  """What the return value of ``mode`` needs: (removed-block aliases, output ids, their tree, live
  value ids, live variable paths)."""
  program, coupling = decision.net.traced(mode, inputs)
  key = ("main", id(program), mode)
  if key not in decision._cache:
    alias = {program.eqns[b.eqn].outs[0]: b.residual for b in coupling.block_sites[program].values()
             if not decision.keep_blocks[b.name]}
    index_tree = jax.tree_util.tree_unflatten(program.out_tree, list(range(len(program.outvars))))
    main_tree = index_tree[0] if decision.net.modes[mode].get("mutable", False) else index_tree
    main_idx, main_def = jax.tree_util.tree_flatten(main_tree)
    main_out = [program.outvars[j] for j in main_idx]
    live = live_values(program, alias, main_out)
    var_ids = dict(zip(program.invars[:program.n_vars], program.var_paths))
    decision._cache[key] = (alias, main_out, main_def, live, {var_ids[v] for v in live if v in var_ids})
  return decision._cache[key]


def _shrink(decision: PruneDecision, mode: str, inputs) -> _Shrunk:
  program, coupling = decision.net.traced(mode, inputs)
  key = (id(program), mode)
  if key in decision._cache:
    return decision._cache[key]
  keep_flat = decision.keep_flat(coupling)
  codes = coupling.codes[program]
  alias, main_out, main_def, live, live_paths = _main_live(decision, mode, inputs)
  # variables written back (mutable=...): those some mode reads, e.g. BN statistics the eval mode reads
  read = set().union(*(_main_live(decision, m, inputs)[4] for m in decision.net.modes))
  if decision.net.modes[mode].get("mutable", False):
    index_tree = jax.tree_util.tree_unflatten(program.out_tree, list(range(len(program.outvars))))
    upd = {path_str(p): j for p, j in jax.tree_util.tree_flatten_with_path(index_tree[1])[0]}
  else:
    upd = {}
  written = [(p, program.outvars[j]) for p, j in upd.items() if p in read]
  live = live_values(program, alias, main_out + [o for _, o in written])
  var_ids = dict(zip(program.invars[:program.n_vars], program.var_paths))
  live_paths = {var_ids[v] for v in live if v in var_ids}

  kept = {v: tuple(kept_indices(c, keep_flat) for c in codes[v]) for v in live if v in codes}

  def new_shape(v):
    if isinstance(v, Lit):
      return program.shape(v)
    return tuple(n if i is None else len(i) for n, i in zip(program.shape(v), kept.get(v, ())))

  def kept_mask(v, k):
    code = codes.get(v, ())[k] if not isinstance(v, Lit) and codes.get(v) else None
    return None if code is None else position_keep(code, keep_flat)

  shapes = {v: new_shape(v) for v in live}
  divisors = coupling.divisors[program]
  eqns = []
  for idx, e in enumerate(program.eqns):
    if not any(o in live for o in e.outs):
      continue
    e = dataclasses.replace(e, params=adjusted_params(program, e, new_shape, kept_mask))
    if idx in divisors:  # a mean over channels divides by the kept count (less ddof)
      pos, src, axes, value = divisors[idx]
      count = np.prod([program.shape(src)[k] for k in axes], dtype=np.float64)
      kept_count = np.prod([new_shape(src)[k] for k in axes], dtype=np.float64)
      den = e.ins[pos]
      dtype = np.result_type(den.value) if isinstance(den, Lit) else program.avals[den].dtype
      ins = list(e.ins)
      ins[pos] = Lit(np.asarray(value - count + kept_count, dtype=dtype))
      e = dataclasses.replace(e, ins=tuple(ins))
    eqns.append((idx, e))
  consts = {v: slice_array(c if _is_key(c) else np.asarray(c), codes[v], keep_flat) if v in codes else c
            for v, c in program.consts.items()}
  shrunk = _Shrunk(eqns, alias, main_out, main_def, written, live_paths, shapes, kept, consts)
  decision._cache[key] = shrunk
  return shrunk


def _run_shrunk(e, vals, shrunk: _Shrunk, program: Program):
  """One equation of the materialized program: control flow re-traced at the smaller shapes, and
  results computed at full size (not from the inputs: random masks, iota) sliced to the kept positions."""
  if e.name == "cond" and any(np.shape(v) != program.shape(i) for v, i in zip(vals, e.ins)):
    branches = [jcore.jaxpr_as_fun(b) for b in e.params["branches"]]
    outs = jax.lax.switch(vals[0], [lambda *a, f=f: tuple(f(*a)) for f in branches], *vals[1:])
  elif e.name == "while" and any(np.shape(v) != program.shape(i) for v, i in zip(vals, e.ins)):
    cn, bn = e.params["cond_nconsts"], e.params["body_nconsts"]
    cond_f = jcore.jaxpr_as_fun(e.params["cond_jaxpr"])
    body_f = jcore.jaxpr_as_fun(e.params["body_jaxpr"])
    cc, bc, carry = vals[:cn], vals[cn:cn + bn], vals[cn + bn:]
    outs = jax.lax.while_loop(lambda c: cond_f(*cc, *c)[0], lambda c: tuple(body_f(*bc, *c)), tuple(carry))
  elif e.name == "scan" and any(np.shape(v) != program.shape(i) for v, i in zip(vals, e.ins)):
    nc, ncarry = e.params["num_consts"], e.params["num_carry"]
    body = jcore.jaxpr_as_fun(e.params["jaxpr"])
    consts, carry, xs = vals[:nc], vals[nc:nc + ncarry], vals[nc + ncarry:]

    def step(c, x):
      out = body(*consts, *c, *x)
      return tuple(out[:ncarry]), tuple(out[ncarry:])

    carry, ys = jax.lax.scan(step, tuple(carry), tuple(xs), length=e.params["length"], reverse=e.params["reverse"])
    outs = list(carry) + list(ys)
  else:
    outs = bind(e, vals)
  outs = list(outs)
  for j, o in enumerate(e.outs):
    want = shrunk.shapes.get(o)
    if want is not None and tuple(np.shape(outs[j])) != want:
      kept = shrunk.kept[o]
      if tuple(np.shape(outs[j])) != program.shape(o):
        raise ValueError(f"materialized {e.name} at {e.where} gave shape {np.shape(outs[j])}, expected {want}")
      for k, i in enumerate(kept):
        if i is not None and len(i) != outs[j].shape[k]:
          outs[j] = jnp.take(outs[j], i, axis=k)
  return outs


class PrunedNetwork(nn.Module):
  """A network materialized from a traced one: no masks, smaller arrays, removed blocks gone.

  Call it like the original (``small.apply(small_vars, *inputs)``; ``train=True`` runs the
  ``"train"`` mode when it was traced, ``mutable=`` and ``rngs=`` work as usual: random ops draw
  from the keys given here, as the original's do). Its variables keep the original names;
  ``init`` only gives zeros of the right shapes.
  """

  decision: PruneDecision
  var_shapes: Any  # {collection: nested dict of ShapeDtypeStruct}, the kept variables

  @nn.compact
  def __call__(self, *inputs, train: bool = False):
    mode = "train" if train else "eval"
    shrunk = _shrink(self.decision, mode, inputs)
    program, _ = self.decision.net.traced(mode, inputs)
    handles, leaves = {}, {}
    for col, tree in self.var_shapes.items():
      for top, sub in tree.items():
        zeros = lambda *_, sub=sub: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sub)  # noqa: E731
        if col == "params":
          value = self.param(top, zeros)
        else:
          handles[(col, top)] = self.variable(col, top, zeros)
          value = handles[(col, top)].value
        for p, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
          leaves["/".join([col, top] + ([path_str(p)] if p else []))] = leaf
    var_leaves = [leaves.get(p) for p in program.var_paths]
    keys = []
    for name in program.rng_names:
      if not self.has_rng(name):
        if draws_random_numbers(program):
          raise ValueError(f"the {mode} mode draws random numbers from {name!r}: call with rngs={{{name!r}: key}}")
        keys.append(jax.random.key(0))  # a key the program was traced with but never reads
        continue
      rng = self.scope.rngs[name]
      keys.append(rng.as_jax_rng() if hasattr(rng, "as_jax_rng") else rng)
    outs = run_program(program, var_leaves, jax.tree_util.tree_leaves(inputs), keys, eqns=shrunk.eqns,
                       alias=shrunk.alias, outvars=shrunk.main_out + [o for _, o in shrunk.written],
                       consts=shrunk.consts, hook=lambda idx, e, vals: _run_shrunk(e, vals, shrunk, program))
    main, written = outs[:len(shrunk.main_out)], outs[len(shrunk.main_out):]
    if written and not self.is_initializing():
      updates = dict(zip((p for p, _ in shrunk.written), written))
      for (col, top), handle in handles.items():
        if self.is_mutable_collection(col):
          prefix = f"{col}/{top}"
          handle.value = _replace_leaves(handle.value, prefix, updates)
    return jax.tree_util.tree_unflatten(shrunk.main_tree, main)


def _replace_leaves(tree, prefix, updates):
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for p, leaf in flat:
    path = "/".join([prefix] + ([path_str(p)] if p else []))
    out.append(updates.get(path, leaf))
  return jax.tree_util.tree_unflatten(treedef, [x for x in out])


def _select_leaves(tree: Mapping, values: Mapping, prefix: tuple = ()) -> dict:
  """``tree``'s nesting with each leaf replaced by ``values[its path string]``; leaves not in
  ``values``, and dicts left empty, are dropped. (Keys may contain "/", as flax's WeightNorm's do.)"""
  out = {}
  for k, v in tree.items():
    path = prefix + (k,)
    if isinstance(v, Mapping):
      sub = _select_leaves(v, values, path)
      if sub:
        out[k] = sub
    elif "/".join(map(str, path)) in values:
      out[k] = values["/".join(map(str, path))]
  return out


def materialize_traced(net: TracedNetwork, variables, masks: Mapping, *example_inputs, mode: str = "eval",
                       opt_state: Optional[Any] = None):
  """``(PrunedNetwork, smaller variables)`` for ``masks``: removed blocks and channels are gone.

  The variables only the removed blocks read are dropped; every other leaf is sliced to its kept
  channels (in NumPy, one gather per leaf; leaves given as jax arrays come back as jax arrays).
  ``example_inputs`` (default: the inputs ``net`` was traced with) fix the shape used to decide
  which variables survive (in every traced mode). With ``opt_state`` (any optax state whose
  sub-trees mirror ``variables["params"]``), returns ``(PrunedNetwork, variables, opt_state)``:
  every state leaf shaped like its parameter is sliced as the parameter is, scalars (step
  counts) are kept, and trees keyed by block name (gate logits) keep the kept blocks.
  """
  decision = prune_decision(net, masks)
  if not example_inputs:
    example_inputs = _first_inputs(net)
  live_paths = set().union(*(_shrink(decision, m, example_inputs).live_paths for m in net.modes))
  program, coupling = net.traced(mode, example_inputs)
  keep_flat = decision.keep_flat(coupling)
  codes = coupling.codes[program]
  leaf_codes = {path: codes[vid] for vid, path in zip(program.invars[:program.n_vars], program.var_paths)}
  leaves = leaves_by_path(variables)
  host = jax.device_get(leaves)  # one transfer; slicing in NumPy compiles nothing
  small = {path: slice_array(np.asarray(_leaf(host, path)), leaf_codes[path], keep_flat)
           for path in program.var_paths if path in live_paths}
  on_device = [p for p in small if isinstance(leaves[p], jax.Array)]
  small.update(zip(on_device, jax.device_put([small[p] for p in on_device])))
  small_vars = _select_leaves(variables, small)
  shapes = jax.tree_util.tree_map(abstract_like, small_vars)
  model = PrunedNetwork(decision, shapes)
  if opt_state is None:
    return model, small_vars
  params = variables["params"] if "params" in variables else variables
  state = _slice_state(opt_state, set(params.keys()), live_paths, leaf_codes, keep_flat,
                       set(net.blocks), {b for b, k in decision.keep_blocks.items() if k})
  return model, small_vars, state


def _slice_state(state, param_keys: set, live_paths: set, leaf_codes: dict, keep_flat, blocks: set, kept_blocks: set):
  """Slice the sub-trees of an optimizer state that mirror the parameters, as the parameters are."""
  recurse = lambda s: _slice_state(s, param_keys, live_paths, leaf_codes, keep_flat, blocks, kept_blocks)  # noqa: E731
  if isinstance(state, Mapping) and state and set(state.keys()) == param_keys:
    values = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(dict(state),
                                                         is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]:
      path = "params/" + path_str(p)
      if path not in live_paths:
        continue
      if isinstance(leaf, optax.MaskedNode) or np.ndim(leaf) == 0:
        values[path] = leaf
        continue
      code = leaf_codes.get(path)
      if code is None or len(code) != np.ndim(leaf):
        raise ValueError(f"optimizer state leaf {path!r} has shape {np.shape(leaf)}, which does not mirror the "
                         "parameter of that name; only states shaped like the parameters can be sliced")
      sliced = slice_array(np.asarray(jax.device_get(leaf)), code, keep_flat)
      values[path] = jax.device_put(sliced) if isinstance(leaf, jax.Array) else sliced
    return _select_leaves(state, values, ("params",))
  if isinstance(state, Mapping) and state and set(state.keys()) == blocks:
    return {k: v for k, v in state.items() if k in kept_blocks}
  if isinstance(state, Mapping):
    return {k: recurse(v) for k, v in state.items()}
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    return type(state)(*(recurse(v) for v in state))
  if isinstance(state, (tuple, list)):
    return type(state)(recurse(v) for v in state)
  return state


def example_inputs_of(net: TracedNetwork, batch: Optional[int] = None):
  """Abstract inputs shaped like the ones ``net`` was traced with, at batch ``batch`` if given."""
  inputs = _first_inputs(net)
  if batch is None:
    return inputs
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((batch,) + tuple(s.shape[1:]), s.dtype), inputs)


def _first_inputs(net: TracedNetwork):
  programs, _ = next(iter(net._cache.values()))
  program = next(iter(programs.values()))
  leaves = [jax.ShapeDtypeStruct(program.shape(i), program.avals[i].dtype) for i in program.input_ids]
  return jax.tree_util.tree_unflatten(program.input_tree, leaves)


# -- counting -------------------------------------------------------------------------------------

def prunable_fraction(net: TracedNetwork, suffix: str = "/kernel") -> float:
  """Fraction of the parameters of the conv and dense kernels (variables whose path ends with
  ``suffix``) that pruning some channel group can remove: those at a position of some axis that
  belongs to a group. 1.0 when every kernel's every channel can go; less when an op, or the
  network's input or output, keeps channels whole (see ``net.unfollowed``)."""
  program, coupling = net.traced(next(iter(net.modes)), _first_inputs(net))
  codes = coupling.codes[program]
  total = whole = 0
  for vid, path in zip(program.invars[:program.n_vars], program.var_paths):
    if not path.endswith(suffix):
      continue
    shape = program.shape(vid)
    total += int(np.prod(shape))
    whole += int(np.prod([n if c is None else int((c < 0).all(axis=1).sum()) for n, c in zip(shape, codes[vid])]))
  return (total - whole) / total if total else 0.0


def eqn_macs(e, shape) -> int:
  """Multiply-accumulates of one equation (a convolution or ``dot_general``; 0 otherwise), with
  ``shape(value)`` giving its operands' shapes."""
  if e.name == "conv_general_dilated":
    rhs = shape(e.ins[1])
    per_out = int(np.prod([rhs[k] for k in e.params["dimension_numbers"].rhs_spec[1:]]))  # in/group x window
    return int(np.prod(shape(e.outs[0]))) * per_out
  if e.name == "dot_general":
    (lc, _), _ = e.params["dimension_numbers"]
    lhs = shape(e.ins[0])
    return int(np.prod(shape(e.outs[0]))) * int(np.prod([lhs[k] for k in lc]))
  return 0


def per_example_inputs(inputs):
  """``(inputs at batch 1, 1)`` when every input leaf has the same leading (batch) axis, else
  ``(inputs, leading size of the first leaf)``."""
  leaves = [abstract_like(x) for x in jax.tree_util.tree_leaves(inputs)]
  batches = {s.shape[0] if s.shape else None for s in leaves}
  if len(batches) == 1 and None not in batches:
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((1,) + tuple(s.shape[1:]), s.dtype),
                                  jax.tree_util.tree_map(abstract_like, inputs)), 1
  return inputs, int(leaves[0].shape[0]) if leaves and leaves[0].shape else 1


def count_traced(network, variables, *example_inputs, mode: str = "eval") -> tuple[int, int]:
  """(parameters, multiply-accumulates per example) of a ``TracedNetwork``, a ``PrunedNetwork``
  or any Flax module (which is traced; give its example inputs).

  MACs are those of every convolution and ``dot_general`` of the program traced at batch 1
  (when every input shares its leading axis), so work that does not depend on the batch (a
  layer applied to a constant) counts once, whatever batch the network was traced at.
  """
  params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(variables.get("params", variables)))
  if isinstance(network, PrunedNetwork):
    net = network.decision.net
  elif isinstance(network, TracedNetwork):
    net = network
  elif isinstance(network, nn.Module):
    if not example_inputs:
      raise ValueError(f"count_traced needs example inputs to trace a plain {type(network).__name__} module; "
                       "give them, or pass the TracedNetwork from bp.trace_network")
    net = trace_network(network, variables, *example_inputs)
  else:
    raise TypeError(f"count_traced counts a TracedNetwork, a PrunedNetwork or a flax module, not {type(network)}")
  inputs, batch = per_example_inputs(example_inputs or _first_inputs(net))
  if isinstance(network, PrunedNetwork):
    shrunk = _shrink(network.decision, mode, inputs)
    program, _ = net.traced(mode, inputs)
    shapes = shrunk.shapes

    def shape(v):
      return program.shape(v) if isinstance(v, Lit) or v not in shapes else shapes[v]
    eqns = shrunk.eqns
  else:
    program, _ = net.traced(mode, inputs)
    shape, eqns = program.shape, list(enumerate(program.eqns))
  return params, sum(eqn_macs(e, shape) for _, e in eqns) // batch


def count_traced_at(net: TracedNetwork, widths: Mapping[str, int], keep_blocks: Optional[Mapping[str, bool]] = None,
                    mode: str = "eval") -> int:
  """Multiply-accumulates per example with every group of ``widths`` narrowed to that many channels
  (its first ones) and the blocks ``keep_blocks`` marks False removed: what a selection to these
  widths counts, without materializing it. Counted on the program traced at batch 1."""
  inputs, batch = per_example_inputs(_first_inputs(net))
  program, coupling = net.traced(mode, inputs)
  keep = {g: np.arange(coupling.groups[g].width) < int(widths.get(g, coupling.groups[g].width)) for g in coupling.groups}
  keep_flat = np.concatenate([keep[g] for g in coupling.groups] + [np.ones((1,), bool)])
  keep_blocks = keep_blocks or {}
  alias = {program.eqns[b.eqn].outs[0]: b.residual for b in coupling.block_sites[program].values()
           if not keep_blocks.get(b.name, True)}
  live = live_values(program, alias, [v for v in program.outvars if not isinstance(v, Lit)])
  codes = coupling.codes[program]
  total = sum(eqn_macs(e, lambda v: shape_under(program, codes, keep_flat, v))
              for e in program.eqns if any(o in live for o in e.outs) and e.outs[0] not in alias)
  return total // batch
