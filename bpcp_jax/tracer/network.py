"""Pruning any Flax network: masks, masked evaluation and materialization driven by the trace.

``trace_network(model, variables, *example_inputs)`` traces ``model.apply`` and finds its channel
groups and residual blocks (``coupling.py``). The masks have the same shape as the ResNet
families' (``{"blocks": {name: logit}, "channels": {group: 0/1 vector}}``), so channel criteria,
optax and orbax treat both alike. ``masked_apply`` computes what the pruned network will: every
contraction reads its input through the channel masks, every residual add is ``a + g * b``.
``materialize_traced`` returns a ``PrunedNetwork``, a Flax module that runs the traced program
with the removed blocks and channels gone (smaller arrays, depthwise group counts and reshapes
adjusted), and its smaller variables: no mask is left in it.

A trace is specific to the input shapes; a new batch size is traced again on first use (the
variables' shapes are all it needs) and checked to have the same groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.tracer.coupling import Coupling, find_coupling
from bpcp_jax.pruning.masks import check_mask_tree, full_masks
from bpcp_jax.tracer.program import Lit, Program, path_str, run_program, trace_program


@dataclasses.dataclass(eq=False)
class TracedNetwork:
  """A Flax module with its traced programs (one per mode) and its channel coupling.

  ``modes`` maps a mode name to the keyword arguments of ``model.apply`` for it, e.g.
  ``{"eval": {"train": False}, "train": {"train": True, "mutable": ["batch_stats"]}}``.
  """

  model: Any
  modes: dict
  var_shapes: Any  # pytree of jax.ShapeDtypeStruct mirroring the variables
  coupling: Optional[Coupling]  # set by the first trace
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

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
      programs = {m: trace_program(self.model, self.var_shapes, *abstract, **kw) for m, kw in self.modes.items()}
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


def trace_network(model, variables, *example_inputs, modes: Optional[Mapping[str, Mapping]] = None) -> TracedNetwork:
  """Trace ``model`` (any ``flax.linen`` module) and find its channel groups and residual blocks.

  ``example_inputs`` are the positional inputs of ``model.apply`` (a small batch is enough);
  ``modes`` the apply keyword arguments per mode (default ``{"eval": {}}``). Modes are analysed
  together: channels are coupled if any mode couples them.
  """
  modes = {"eval": {}} if modes is None else {k: dict(v) for k, v in modes.items()}
  var_shapes = jax.tree_util.tree_map(abstract_like, variables)
  net = TracedNetwork(model, modes, var_shapes, None)
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
  """All groups' masks end to end, then a 1 for the always-kept positions (code -1)."""
  parts = [xp.asarray(channel_masks[name], dtype=xp.float32).reshape(-1) for name in coupling.groups]
  return xp.concatenate(parts + [xp.ones((1,), xp.float32)])


def leaves_by_path(variables) -> dict:
  """``{"params/Conv_0/kernel": leaf, ...}``: the variables keyed as the traced program names them."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}


def masked_apply(net: TracedNetwork, variables, masks: Mapping, *inputs, mode: str = "eval",
                 block_gates: Optional[Mapping] = None):
  """``model.apply`` in ``mode`` with the masks applied: what the materialized network computes.

  ``block_gates`` (e.g. sampled straight-through gates during a block search) replace the
  decisions ``logit >= 0`` of ``masks["blocks"]``. Pure and jittable; masks may be traced values.
  """
  program, coupling = net.traced(mode, inputs)
  codes = coupling.codes[program]
  flat = _flat_mask(coupling, masks["channels"])
  last = flat.shape[0] - 1
  adds = {b.eqn: (name, b) for name, b in coupling.block_sites[program].items()}

  def read_masked(x, vid, axes):
    for k in axes:
      code = codes[vid][k]
      if code is None:
        continue
      m = flat[np.where(code >= 0, code, last)].astype(x.dtype)
      x = x * m.reshape([-1 if j == k else 1 for j in range(x.ndim)])
    return x

  def hook(idx, e, vals):
    if idx in adds:
      name, b = adds[idx]
      g = block_gates[name] if block_gates is not None else (masks["blocks"][name] >= 0)
      branch_pos = 0 if e.ins[0] == b.branch else 1
      vals = list(vals)
      vals[branch_pos] = vals[branch_pos] * jnp.asarray(g, vals[branch_pos].dtype)
      return [vals[0] + vals[1]]
    if e.name == "conv_general_dilated" and e.params["feature_group_count"] == 1 and not isinstance(e.ins[0], Lit):
      lhs = read_masked(vals[0], e.ins[0], [e.params["dimension_numbers"].lhs_spec[1]])
      return [e.prim.bind(lhs, vals[1], **e.params)]
    if e.name == "dot_general" and not isinstance(e.ins[0], Lit):
      (lc, _), _ = e.params["dimension_numbers"]
      return [e.prim.bind(read_masked(vals[0], e.ins[0], lc), vals[1], **e.params)]
    return None

  leaves = leaves_by_path(variables)
  var_leaves = [leaves[p] for p in program.var_paths]
  return run_program(program, var_leaves, jax.tree_util.tree_leaves(inputs), hook=hook)


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


def _slice_leaf(leaf, code, keep_flat):
  for k, c in enumerate(code):
    if c is not None:
      idx = np.flatnonzero(keep_flat[np.where(c >= 0, c, len(keep_flat) - 1)])
      leaf = jnp.take(leaf, idx, axis=k) if not isinstance(leaf, np.ndarray) else np.take(leaf, idx, axis=k)
  return leaf


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
      shape[k] = int(keep_flat[np.where(c >= 0, c, len(keep_flat) - 1)].sum())
  return tuple(shape)


def adjusted_params(program: Program, e, new_shape) -> dict:
  """``e``'s parameters for its smaller operands: shapes baked into broadcasts, reshapes, slices
  and splits, and the group count of a depthwise convolution."""
  params = dict(e.params)
  if e.name == "broadcast_in_dim":
    params["shape"] = new_shape(e.outs[0])
  elif e.name == "reshape":
    params["new_sizes"] = new_shape(e.outs[0])
  elif e.name == "slice":  # only whole-axis slices of channel axes are followed
    in_shape, old = new_shape(e.ins[0]), program.shape(e.ins[0])
    params["limit_indices"] = tuple(n if lim == o else lim for lim, n, o in zip(params["limit_indices"], in_shape, old))
  elif e.name == "split":
    params["sizes"] = tuple(new_shape(o)[params["axis"]] for o in e.outs)
  elif e.name == "conv_general_dilated" and params["feature_group_count"] > 1:
    params["feature_group_count"] = new_shape(e.ins[0])[params["dimension_numbers"].lhs_spec[1]]
  return params


@dataclasses.dataclass(eq=False)
class _Shrunk:
  eqns: list  # (index, Eqn with adjusted params)
  alias: dict
  main_out: list  # output ids of the module's return value
  main_tree: Any
  written: list  # (path, output id) of variables written back in this mode
  live_paths: set
  shapes: dict  # value id -> new shape


def _shrink(decision: PruneDecision, mode: str, inputs) -> _Shrunk:
  program, coupling = decision.net.traced(mode, inputs)
  key = (id(program), mode)
  if key in decision._cache:
    return decision._cache[key]
  keep_flat = decision.keep_flat(coupling)
  codes = coupling.codes[program]
  alias = {program.eqns[b.eqn].outs[0]: b.residual for b in coupling.block_sites[program].values()
           if not decision.keep_blocks[b.name]}

  # the return value, and variables written back (mutable=...) whose variable survives
  index_tree = jax.tree_util.tree_unflatten(program.out_tree, list(range(len(program.outvars))))
  mutable = decision.net.modes[mode].get("mutable", False)
  main_tree, updates = (index_tree if mutable else (index_tree, {}))
  main_idx, main_def = jax.tree_util.tree_flatten(main_tree)
  upd = {path_str(p): j for p, j in jax.tree_util.tree_flatten_with_path(updates)[0]}

  main_out = [program.outvars[j] for j in main_idx]
  live = live_values(program, alias, main_out)
  var_ids = dict(zip(program.invars[:program.n_vars], program.var_paths))
  live_paths = {var_ids[v] for v in live if v in var_ids}
  # an update (BatchNorm statistics in train mode, which the output does not read) is written
  # back unless computing it needs a variable only a removed block uses
  removed = {p for name, b in coupling.block_sites[program].items() if not decision.keep_blocks[name] for p in b.params}
  # ... and unless its variable is gone (the materialized variables are those the eval mode reads)
  kept = _shrink(decision, "eval", inputs).live_paths if mode != "eval" and "eval" in decision.net.modes else None
  written = [(p, program.outvars[j]) for p, j in upd.items() if (kept is None or p in kept) and (
      p in live_paths or not removed & {var_ids.get(v) for v in live_values(program, alias, [program.outvars[j]])})]
  live = live_values(program, alias, main_out + [o for _, o in written])

  def new_shape(v):
    return shape_under(program, codes, keep_flat, v)

  shapes = {v: new_shape(v) for v in live}
  eqns = [(idx, dataclasses.replace(e, params=adjusted_params(program, e, new_shape)))
          for idx, e in enumerate(program.eqns) if any(o in live for o in e.outs)]
  shrunk = _Shrunk(eqns, alias, main_out, main_def, written, live_paths, shapes)
  decision._cache[key] = shrunk
  return shrunk


class PrunedNetwork(nn.Module):
  """A network materialized from a traced one: no masks, smaller arrays, removed blocks gone.

  Call it like the original (``small.apply(small_vars, *inputs)``; ``train=True`` runs the
  ``"train"`` mode when it was traced, and ``mutable=`` works as usual). Its variables keep the
  original names; ``init`` only gives zeros of the right shapes.
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
    outs = run_program(program, var_leaves, jax.tree_util.tree_leaves(inputs), eqns=shrunk.eqns,
                       alias=shrunk.alias, outvars=shrunk.main_out + [o for _, o in shrunk.written])
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


def _nest(flat: dict) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = leaf
  return out


def materialize_traced(net: TracedNetwork, variables, masks: Mapping, *example_inputs, mode: str = "eval"):
  """``(PrunedNetwork, smaller variables)`` for ``masks``: removed blocks and channels are gone.

  The variables only the removed blocks read are dropped; every other leaf is sliced to its kept
  channels. ``example_inputs`` (default: the inputs ``net`` was traced with) fix the shape used
  to decide which variables survive.
  """
  decision = prune_decision(net, masks)
  if not example_inputs:
    example_inputs = _first_inputs(net)
  shrunk = _shrink(decision, mode, example_inputs)
  program, coupling = net.traced(mode, example_inputs)
  keep_flat = decision.keep_flat(coupling)
  codes = coupling.codes[program]
  leaves = leaves_by_path(variables)
  small = {}
  for vid, path in zip(program.invars[:program.n_vars], program.var_paths):
    if path in shrunk.live_paths:
      small[path] = _slice_leaf(leaves[path], codes[vid], keep_flat)
  small_vars = _nest(small)
  shapes = jax.tree_util.tree_map(abstract_like, small_vars)
  return PrunedNetwork(decision, shapes), small_vars


def example_inputs_of(net: TracedNetwork, batch: Optional[int] = None):
  """Abstract inputs shaped like the ones ``net`` was traced with, at batch ``batch`` if given."""
  inputs = _first_inputs(net)
  if batch is None:
    return inputs
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((batch,) + tuple(s.shape[1:]), s.dtype), inputs)


def _first_inputs(net: TracedNetwork):
  programs, _ = next(iter(net._cache.values()))
  program = next(iter(programs.values()))
  ids = program.invars[program.n_vars:]
  leaves = [jax.ShapeDtypeStruct(program.shape(i), program.avals[i].dtype) for i in ids]
  return jax.tree_util.tree_unflatten(program.input_tree, leaves)


# -- counting -------------------------------------------------------------------------------------

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


def count_traced(net_or_pruned, variables, *example_inputs, mode: str = "eval") -> tuple[int, int]:
  """(parameters, multiply-accumulates per example) of a ``TracedNetwork`` or a ``PrunedNetwork``.

  MACs are those of every convolution and ``dot_general`` in the traced program (the leading axis
  of the first input is taken as the batch).
  """
  params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(variables.get("params", variables)))
  if isinstance(net_or_pruned, PrunedNetwork):
    decision = net_or_pruned.decision
    inputs = example_inputs or _first_inputs(decision.net)
    shrunk = _shrink(decision, mode, inputs)
    program, _ = decision.net.traced(mode, inputs)
    shapes = shrunk.shapes

    def shape(v):
      return program.shape(v) if isinstance(v, Lit) or v not in shapes else shapes[v]
    eqns = shrunk.eqns
  else:
    inputs = example_inputs or _first_inputs(net_or_pruned)
    program, _ = net_or_pruned.traced(mode, inputs)
    shape, eqns = program.shape, list(enumerate(program.eqns))
  batch = int(np.shape(jax.tree_util.tree_leaves(inputs)[0])[0])
  return params, sum(eqn_macs(e, shape) for _, e in eqns) // batch


def count_traced_at(net: TracedNetwork, widths: Mapping[str, int], keep_blocks: Optional[Mapping[str, bool]] = None,
                    mode: str = "eval") -> int:
  """Multiply-accumulates per example with every group of ``widths`` narrowed to that many channels
  and the blocks ``keep_blocks`` marks False removed (what a selection to these widths would count)."""
  inputs = _first_inputs(net)
  program, coupling = net.traced(mode, inputs)
  keep_flat = np.ones(coupling.total_channels + 1, bool)
  for g, w in widths.items():
    off, width = coupling.offsets[g], coupling.groups[g].width
    keep_flat[off + int(w):off + width] = False
  keep_blocks = keep_blocks or {}
  alias = {program.eqns[b.eqn].outs[0]: b.residual for b in coupling.block_sites[program].values()
           if not keep_blocks.get(b.name, True)}
  live = live_values(program, alias, [v for v in program.outvars if not isinstance(v, Lit)])
  codes = coupling.codes[program]
  total = sum(eqn_macs(e, lambda v: shape_under(program, codes, keep_flat, v))
              for e in program.eqns if any(o in live for o in e.outs) and e.outs[0] not in alias)
  batch = int(np.shape(jax.tree_util.tree_leaves(inputs)[0])[0])
  return total // batch
