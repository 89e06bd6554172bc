"""Speed-aware pruning: choose blocks and channels by importance per unit of measured cost.

Removed MACs do not turn into time evenly: removing a residual block saves its layers' per-layer
overhead as well as its arithmetic, removing channels saves less, least of all at odd widths
(``../shared/reference/SPEED-NOTES.md``). ``select_pruning`` is a greedy search over two kinds of
action on a traced network (``traced_network.py``):

- remove a residual block (importance: the scores of the channels only that block owns);
- narrow one channel group to the next multiple of ``round_to`` (importance: the scores of the
  channels removed, the lowest-scored first).

Each step takes the action that loses the least importance per unit of cost saved, where the
cost is either MACs (``cost="macs"``) or latency predicted from a table of per-layer times
measured on this device (``cost="latency"``, ``latency.OpTimer``: every convolution and dense
layer is timed alone at the shape the action would give it; per-channel work is charged at the
measured cost of a fused elementwise epilogue). It stops at a MACs budget, or at a latency
budget, checked by materializing the selection and measuring it; when the measured network
is slower than predicted, the prediction is rescaled and the search goes on.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from bpcp_jax.tracer.coupling import ELEMENTWISE, REDUCTIONS
from bpcp_jax.deploy.latency import OpTimer, measure_latency
from bpcp_jax.tracer.program import Lit
from bpcp_jax.tracer.network import (
    TracedNetwork,
    adjusted_params,
    eqn_macs,
    example_inputs_of,
    leaves_by_path,
    live_values,
    materialize_traced,
    shape_under,
)

COSTS = ("macs", "latency")


def _leaf_codes(net: TracedNetwork, program, coupling, path: str, axis: int) -> Optional[np.ndarray]:
  vid = program.invars[program.var_paths.index(path)]
  return coupling.codes[program][vid][axis]


def _score_into(row: np.ndarray, code: Optional[np.ndarray], off: int, values: np.ndarray) -> bool:
  """``row[c - off] = fmax(row, values at the positions with a factor c of this group)``; whether any matched.

  ``code`` is (positions, factors): a position of a split axis (GroupNorm groups, attention heads
  and head dimensions) is a product of several groups' channels."""
  if code is None:
    return False
  found = False
  for f in range(code.shape[1]):
    sel = (code[:, f] >= off) & (code[:, f] < off + len(row))
    if sel.any():
      np.fmax.at(row, code[sel, f] - off, values[sel])
      found = True
  return found


def traced_importance(net: TracedNetwork, variables, criterion: str = "bn_scale", *, reduce: str = "max",
                      key: Optional[jax.Array] = None) -> dict[str, np.ndarray]:
  """One score per channel of every group (higher = keep), from the members the trace found.

  ``bn_scale``: |scale| of the normalisation layers (rank-1 ``scale`` variables) in the group; a
  group without one falls back to ``l1`` (each producer's norms divided by their mean) times the
  mean |scale| of the network's normalised channels, so a fallback channel of average norm
  compares as an average normalised one (not as 1 against scales L1 sparsity drove to ~0.1). ``l1`` / ``l2`` / ``cop``: the filters producing the
  channel (``channel_prune``'s filter criteria; L1 and L2 norms divided by their layer's mean, so
  layers of different fan-in compare). ``random``: uniform scores drawn from ``key``. Several
  members of one channel are combined by ``reduce`` (``max``, ``mean`` or ``sum``); within one
  member, the positions a channel is a factor of (a group of a split axis: GroupNorm groups,
  attention heads, head dimensions; a depthwise multiplier) count by their largest score.

  Raises ``ValueError`` for an unknown criterion or reduction, or ``random`` without a key.
  """
  from bpcp_jax.pruning.channel_prune import CRITERIA, REDUCTIONS, _filter_scores

  if criterion not in CRITERIA:
    raise ValueError(f"unknown channel criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
  if reduce not in REDUCTIONS:
    raise ValueError(f"unknown group reduction {reduce!r}; choose from {', '.join(REDUCTIONS)}")
  if criterion == "random":
    if key is None:
      raise ValueError("criterion 'random' needs a PRNG key (key=...)")
    keys = jax.random.split(key, max(len(net.groups), 1))
    return {name: np.asarray(jax.random.uniform(k, (g.width,))) for (name, g), k in zip(net.groups.items(), keys)}
  program, coupling = net.traced(next(iter(net.modes)), example_inputs_of(net))
  leaves = {path: np.asarray(x) for path, x in jax.device_get(leaves_by_path(variables)).items()}
  reducer = {"max": np.nanmax, "mean": np.nanmean, "sum": np.nansum}[reduce]
  scores, fallback = {}, set()
  for name, g in net.groups.items():
    off = coupling.offsets[name]
    rows = []

    def add(path, axis, values):
      row = np.full(g.width, np.nan)
      if _score_into(row, _leaf_codes(net, program, coupling, path, axis), off, values):
        rows.append(row)

    if criterion == "bn_scale":
      for path, axis in g.members:
        if path.startswith("params/") and path.endswith("/scale") and path in leaves and leaves[path].ndim == 1:
          add(path, axis, np.abs(leaves[path].astype(np.float64)))
    if not rows:
      filter_criterion = "l1" if criterion == "bn_scale" else criterion
      fallback.add(name)
      for path in g.producers:
        if path not in leaves:  # a weight computed from several variables: no single filter to score
          continue
        kernel = leaves[path]
        for axis in range(kernel.ndim):
          code = _leaf_codes(net, program, coupling, path, axis)
          if code is None or not any(((code[:, f] >= off) & (code[:, f] < off + g.width)).any()
                                     for f in range(code.shape[1])):
            continue
          values = _filter_scores(np.moveaxis(kernel, axis, -1), filter_criterion)
          if filter_criterion != "cop":
            values = values / max(values.mean(), 1e-12)
          add(path, axis, values)
    if rows:
      with warnings.catch_warnings():  # a position no member covers stays NaN (kept whole below)
        warnings.simplefilter("ignore", RuntimeWarning)
        s = reducer(np.stack(rows), axis=0)
      scores[name] = np.where(np.isnan(s), np.inf, s)
    else:
      scores[name] = np.full(g.width, np.inf)
  if criterion == "bn_scale":
    scored = [v[np.isfinite(v)] for k, v in scores.items() if k not in fallback]
    scored = np.concatenate(scored) if scored else np.zeros(0)
    unit = float(scored.mean()) if scored.size else 0.0
    if unit > 0:  # the fallbacks' mean-1 L1 scores in the unit of the scales they stand in for
      for k in fallback:
        scores[k] = scores[k] * unit
  return scores


@dataclasses.dataclass
class Selection:
  """What ``select_pruning`` chose: masks for ``materialize_traced`` and how it got there."""

  masks: dict
  history: list  # one dict per action
  dense_macs: int
  macs: int
  predicted_ms: Optional[float] = None
  measured_ms: Optional[float] = None
  dense_measured_ms: Optional[float] = None
  target_met: bool = True
  timer: Optional[OpTimer] = None

  @property
  def macs_ratio(self) -> float:
    return self.dense_macs / max(self.macs, 1)

  def table(self) -> str:
    lines = ["| step | action | importance lost | cost saved | MACs left |", "|---|---|---|---|---|"]
    for h in self.history:
      lines.append(f"| {h['step']} | {h['action']} | {h['importance']:.4g} | {h['saved']:.4g} | "
                   f"{h['macs'] / self.dense_macs:.1%} |")
    return "\n".join(lines)


class _Search:
  """The greedy state: kept positions, kept blocks, per-equation costs."""

  def __init__(self, net, importance, cost, timer, batch, round_to, min_channels, prune_blocks):
    self.net, self.cost_kind, self.timer = net, cost, timer
    self.round_to, self.prune_blocks = round_to, prune_blocks
    self.min_width = max(min_channels, round_to if round_to > 1 else 1)
    self.inputs = example_inputs_of(net, batch)
    self.program, self.coupling = net.traced("eval", self.inputs)
    self.codes = self.coupling.codes[self.program]
    # MACs per example are counted on the batch-1 program (as count_traced does), when it has the same equations
    self.macs_program = net.traced("eval", example_inputs_of(net, 1))[0] if batch != 1 else self.program
    if [e.name for e in self.macs_program.eqns] != [e.name for e in self.program.eqns]:
      self.macs_program = self.program
    self.macs_codes = self.coupling.codes[self.program] if self.macs_program is self.program else \
        net.traced("eval", example_inputs_of(net, 1))[1].codes[self.macs_program]
    self.macs_batch = batch if self.macs_program is self.program else 1
    p, c = self.program, self.coupling
    self.total = c.total_channels
    self.keep = np.ones(self.total + 1, bool)
    self.scores = np.concatenate([np.asarray(importance[g], np.float64) for g in c.groups] + [[np.inf]])
    self.blocks = dict(c.block_sites[p])
    self.keep_blocks = {b: True for b in self.blocks}
    starts = np.array([c.offsets[g] for g in c.groups])
    names = list(c.groups)
    self.batch = batch
    # which groups each equation's shapes depend on
    self.eqn_groups: dict[int, set] = {}
    self.group_eqns: dict[str, set] = {g: set() for g in names}
    for idx, e in enumerate(p.eqns):
      touched = set()
      for v in list(e.ins) + list(e.outs):
        if isinstance(v, Lit):
          continue
        for code in self.codes.get(v, ()):
          if code is not None:
            touched.update(names[i] for i in np.unique(np.searchsorted(starts, code[code >= 0], "right") - 1))
      self.eqn_groups[idx] = touched
      for g in touched:
        self.group_eqns[g].add(idx)
    # groups that live entirely inside a block's branch (they die with it)
    self.block_groups = {b: [g for g in names if set(c.groups[g].producers) <= set(site.params)]
                         for b, site in self.blocks.items()}
    self.out_ids = list(p.outvars)
    self.live = self._live_set()
    self.eqn_cost = {idx: self._cost(idx, self.keep) for idx in self.live}
    self.macs = {idx: self._macs(idx, self.keep) for idx in self.live}

  # -- costs ---------------------------------------------------------------------------------
  def _alias(self, removed=()):
    return {self.program.eqns[site.eqn].outs[0]: site.residual for b, site in self.blocks.items()
            if not self.keep_blocks[b] or b in removed}

  def _live_set(self, removed=()):
    alias = self._alias(removed)
    live = live_values(self.program, alias, self.out_ids)
    return {i for i, e in enumerate(self.program.eqns) if any(o in live for o in e.outs) and e.outs[0] not in alias}

  def _shape(self, v, keep):
    return shape_under(self.program, self.codes, keep, v)

  def _macs(self, idx, keep) -> int:
    return eqn_macs(self.macs_program.eqns[idx],
                    lambda v: shape_under(self.macs_program, self.macs_codes, keep, v))

  def _cost(self, idx, keep) -> float:
    if self.cost_kind == "macs":
      return float(self._macs(idx, keep))
    e = self.program.eqns[idx]
    if e.name in ("conv_general_dilated", "dot_general"):
      new_shape = lambda v: self._shape(v, keep)  # noqa: E731
      params = adjusted_params(self.program, e, new_shape)
      shapes = [new_shape(v) for v in e.ins]
      dtypes = [self.program.avals[v].dtype if not isinstance(v, Lit) else np.asarray(v.value).dtype for v in e.ins]
      return self.timer.cost(e.prim, params, shapes, dtypes)
    if e.name in ELEMENTWISE or e.name in REDUCTIONS:
      # a fused epilogue (scale, shift, ReLU) is three elementwise ops per element
      return self.timer.elementwise_ms / 3 * float(np.prod(self._shape(e.outs[0], keep)))
    return 0.0

  def total_cost(self) -> float:
    return float(sum(self.eqn_cost[i] for i in self.live))

  def total_macs(self) -> int:
    return int(sum(self.macs[i] for i in self.live)) // self.macs_batch

  # -- candidate actions ---------------------------------------------------------------------
  def group_alive(self, g) -> bool:
    return not any(g in self.block_groups[b] for b in self.blocks if not self.keep_blocks[b])

  def kept_positions(self, g):
    off = self.coupling.offsets[g]
    return off + np.flatnonzero(self.keep[off:off + self.coupling.groups[g].width])

  def channel_action(self, g):
    kept = self.kept_positions(g)
    n = len(kept)
    if self.round_to > 1:
      target = (math.ceil(n / self.round_to) - 1) * self.round_to
    else:
      target = n - 1
    if target < self.min_width:
      return None
    order = kept[np.argsort(self.scores[kept], kind="stable")]
    drop = order[: n - target]
    keep = self.keep.copy()
    keep[drop] = False
    affected = self.group_eqns[g] & self.live
    saved = sum(self.eqn_cost[i] - self._cost(i, keep) for i in affected)
    return {"action": f"narrow {g} {n}->{target}", "importance": float(self.scores[drop].sum()), "saved": saved,
            "apply": ("channels", g, keep, affected)}

  def block_action(self, b):
    live = self._live_set(removed=(b,))
    dead = self.live - live
    saved = sum(self.eqn_cost[i] for i in dead)
    imp = float(sum(self.scores[self.kept_positions(g)].sum() for g in self.block_groups[b] if self.group_alive(g)))
    return {"action": f"remove block {b}", "importance": imp, "saved": saved, "apply": ("block", b, live, dead)}

  def candidates(self):
    out = []
    for g in self.coupling.groups:
      if self.group_alive(g):
        a = self.channel_action(g)
        if a is not None:
          out.append(a)
    if self.prune_blocks:
      out += [self.block_action(b) for b in self.blocks if self.keep_blocks[b]]
    return [a for a in out if a["saved"] > 0]

  def apply(self, action):
    kind, *rest = action["apply"]
    if kind == "channels":
      g, keep, affected = rest
      self.keep = keep
      for i in affected:
        self.eqn_cost[i] = self._cost(i, keep)
        self.macs[i] = self._macs(i, keep)
    else:
      b, live, _ = rest
      self.keep_blocks[b] = False
      self.live = live

  def masks(self) -> dict:
    import jax.numpy as jnp

    c = self.coupling
    return {
        "blocks": {b: jnp.float32(1.0 if k else -1.0) for b, k in self.keep_blocks.items()},
        "channels": {g: jnp.asarray(self.keep[c.offsets[g]:c.offsets[g] + grp.width], jnp.float32)
                     for g, grp in c.groups.items()},
    }


def select_pruning(
    net: TracedNetwork,
    variables,
    *,
    importance: Optional[Mapping[str, np.ndarray]] = None,
    criterion: str = "bn_scale",
    cost: str = "latency",
    macs_fraction: Optional[float] = None,
    latency_budget_ms: Optional[float] = None,
    batch: int = 1,
    round_to: int = 1,
    min_channels: int = 1,
    prune_blocks: bool = True,
    timer: Optional[OpTimer] = None,
    measure: Callable[..., float] = measure_latency,
    max_checks: int = 8,
    progress: bool = True,
    key: Optional[jax.Array] = None,
) -> Selection:
  """Greedy speed-aware selection; see the module docstring.

  Exactly one target: ``macs_fraction`` (keep at most this fraction of the dense MACs) or
  ``latency_budget_ms`` (the materialized network at batch ``batch`` must measure at most this
  on this device). ``cost`` is what an action saves: ``"macs"`` or measured ``"latency"`` at
  batch ``batch``. ``importance`` (per group, per channel) defaults to ``traced_importance`` with
  ``criterion`` (``key``: the PRNG key of ``criterion="random"``).
  ``measure(model, variables, *inputs) -> ms`` measures a materialized selection against the
  budget (default ``latency.measure_latency``, on the default device); at most ``max_checks``
  measurements are taken before the search gives up with ``target_met=False``.
  """
  if cost not in COSTS:
    raise ValueError(f"cost {cost!r} unknown; choose from {', '.join(COSTS)}")
  if (macs_fraction is None) == (latency_budget_ms is None):
    raise ValueError("give exactly one target: macs_fraction or latency_budget_ms")
  if macs_fraction is not None and not 0.0 < macs_fraction <= 1.0:
    raise ValueError(f"macs_fraction must be in (0, 1], got {macs_fraction}")
  if latency_budget_ms is not None and latency_budget_ms <= 0:
    raise ValueError(f"latency_budget_ms must be positive, got {latency_budget_ms}")
  if round_to < 1:
    raise ValueError(f"round_to must be >= 1, got {round_to}")
  if importance is None:
    importance = traced_importance(net, variables, criterion, key=key)
  timer = timer or (OpTimer() if cost == "latency" or latency_budget_ms is not None else None)
  search = _Search(net, importance, cost, timer, batch, round_to, min_channels, prune_blocks)
  dense_macs = search.total_macs()
  history: list[dict] = []
  scale, predicted_dense = 1.0, None
  dense_ms = measured = None
  if latency_budget_ms is not None:
    if cost != "latency":
      raise ValueError("a latency budget needs cost='latency'")
    predicted_dense = search.total_cost()
    dense_ms = _measure(net, variables, search, measure)
    scale = dense_ms / predicted_dense

  bar = _progress(progress)
  checks, met = 0, True
  while True:
    if macs_fraction is not None and search.total_macs() <= macs_fraction * dense_macs:
      break
    if latency_budget_ms is not None and search.total_cost() * scale <= latency_budget_ms:
      measured = _measure(net, variables, search, measure)
      checks += 1
      if measured <= latency_budget_ms:
        break
      scale = measured / search.total_cost()
      if checks >= max_checks:
        met = False
        break
      continue
    options = search.candidates()
    if not options:
      met = False
      break
    best = min(options, key=lambda a: a["importance"] / a["saved"])
    search.apply(best)
    history.append({"step": len(history) + 1, "action": best["action"], "importance": best["importance"],
                    "saved": best["saved"], "macs": search.total_macs()})
    if bar is not None:
      bar.update(1)
      bar.set_postfix(macs=f"{search.total_macs() / dense_macs:.1%}")
  if bar is not None:
    bar.close()
  predicted = search.total_cost() * scale if cost == "latency" else None
  return Selection(search.masks(), history, dense_macs, search.total_macs(), predicted, measured, dense_ms, met, timer)


def _measure(net, variables, search, measure) -> float:
  small, small_vars = materialize_traced(net, variables, search.masks(), *search.inputs)
  x = jax.tree_util.tree_map(lambda s: np.random.default_rng(0).normal(size=s.shape).astype(s.dtype), search.inputs)
  return float(measure(small, small_vars, *x))


def _progress(enabled: bool) -> Any:
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(desc="selecting", unit="action", leave=False)


def select_resnet(
    model,
    variables,
    *,
    criterion: str = "bn_scale",
    reduce: str = "max",
    key: Optional[jax.Array] = None,
    image_size: int = 32,
    **select_kwargs,
) -> tuple[dict, list, Selection]:
  """``select_pruning`` for one of the ResNet families, in the family's own terms.

  Scores come from ``channel_prune.channel_importance`` (any of its criteria); the traced groups
  are matched to the declared ones, so the result is ``(masks, report, selection)`` with masks
  for ``bpcp_jax.families.materialize`` and a report in ``channel_prune.format_report``'s form.
  """
  import jax.numpy as jnp

  from bpcp_jax.pruning.channel_prune import channel_importance
  from bpcp_jax.pruning.masks import init_masks
  from bpcp_jax.families.structure import declared_members
  from bpcp_jax.tracer.network import trace_network

  batch = select_kwargs.get("batch", 1)
  x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  net = trace_network(model, variables, x)
  by_members = {frozenset(m): g for g, m in declared_members(model.spec).items()}
  to_declared = {}
  for name, group in net.groups.items():
    declared = by_members.get(frozenset(group.members))
    if declared is None:
      raise ValueError(f"traced group {name!r} matches no declared group of {model.spec.family}")
    to_declared[name] = declared
  scores = channel_importance(model, variables, criterion, reduce=reduce, key=key)
  importance = {name: scores[d] for name, d in to_declared.items()}
  selection = select_pruning(net, variables, importance=importance, **select_kwargs)
  masks = init_masks(model.spec)
  masks["blocks"] = dict(selection.masks["blocks"])
  for name, d in to_declared.items():
    masks["channels"][d] = selection.masks["channels"][name]
  report = [{"group": d, "width": int(masks["channels"][d].shape[0]), "kept": int(np.sum(masks["channels"][d])),
             "kept_to_avoid_empty": False} for d in sorted(masks["channels"])]
  return masks, report, selection
