"""CP, channel pruning: importance criteria, coupled-group scores, global selection, report.

A channel group (see ``models.structure``) is pruned as a whole: one score per channel of the
group, reduced from its members (``max`` as the original code; ``mean`` and ``sum`` as
options). Criteria:

- ``bn_scale``: |BN scale| of every BN normalising the group (network slimming).
- ``l1``: L1 norm of every filter producing the group (Li et al.).
- ``l2``: L2 norm of the producing filters (SFP's criterion; see ``soft_prune``).
- ``cop``: COP-style redundancy: a filter that is nearly parallel to another filter of the same
  layer carries little, so its score is its L2 norm (relative to its layer's mean) times
  ``1 - max |cosine|`` with the layer's other filters.
- ``random``: uniform scores from a PRNG key, the control.

Selection removes the lowest-scored channels across all groups (``scope="global"``) or the
same fraction inside each group (``"per_group"``, as SFP) until a fraction of the channels or
of the MACs is gone. A group never goes below ``min_channels``; ``round_to`` keeps widths at
multiples of N, which kernels turn into speed (see the speed notes).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.families.counting import count_params_macs
from bpcp_jax.pruning.masks import init_masks, kept_blocks, live_groups, pruned_spec
from bpcp_jax.families.resnet import ResNet
from bpcp_jax.families.structure import layer_table

CRITERIA = ("bn_scale", "l1", "l2", "cop", "random")
REDUCTIONS = ("max", "mean", "sum")
TARGETS = ("channels", "macs")
SCOPES = ("global", "per_group")


def _live_layers(spec, masks):
  keep = kept_blocks(masks)
  return [l for l in layer_table(spec) if l.block is None or keep[l.block]]


def _filter_scores(kernel: np.ndarray, criterion: str) -> np.ndarray:
  w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]).T  # (out, k*k*in)
  if criterion == "l1":
    return np.abs(w).sum(1)
  norms = np.sqrt((w * w).sum(1))
  if criterion == "l2":
    return norms
  unit = w / np.maximum(norms[:, None], 1e-12)
  cos = np.abs(unit @ unit.T)
  np.fill_diagonal(cos, 0.0)
  redundancy = cos.max(1) if len(cos) > 1 else np.zeros(len(cos))
  return norms / max(norms.mean(), 1e-12) * (1.0 - redundancy)


def channel_importance(
    model: ResNet,
    variables: Mapping[str, Any],
    criterion: str = "bn_scale",
    *,
    masks: Optional[Mapping[str, Any]] = None,
    reduce: str = "max",
    key: Optional[jax.Array] = None,
) -> dict[str, np.ndarray]:
  """One score per channel of every live group (higher = more important)."""
  if criterion not in CRITERIA:
    raise ValueError(f"unknown channel criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
  if reduce not in REDUCTIONS:
    raise ValueError(f"unknown group reduction {reduce!r}; choose from {', '.join(REDUCTIONS)}")
  spec = model.spec
  masks = init_masks(spec) if masks is None else masks
  groups = live_groups(spec, masks)
  if criterion == "random":
    if key is None:
      raise ValueError("criterion 'random' needs a PRNG key (key=...)")
    keys = jax.random.split(key, len(groups))
    return {g: np.asarray(jax.random.uniform(k, (masks["channels"][g].shape[0],))) for g, k in zip(groups, keys)}
  params = variables["params"]
  members: dict[str, list[np.ndarray]] = {g: [] for g in groups}
  for layer in _live_layers(spec, masks):
    if criterion == "bn_scale" and layer.kind == "bn":
      members[layer.out_group].append(np.abs(np.asarray(params[layer.name]["scale"], np.float64)))
    elif criterion != "bn_scale" and layer.kind == "conv":
      members[layer.out_group].append(_filter_scores(np.asarray(params[layer.name]["kernel"]), criterion))
  reducer = {"max": np.max, "mean": np.mean, "sum": np.sum}[reduce]
  scores = {}
  for g, ms in members.items():
    # a group nothing scores (e.g. the v2 stem once its only BN consumer is gone) is kept whole
    scores[g] = reducer(np.stack(ms), axis=0) if ms else np.full(masks["channels"][g].shape, np.inf)
  return scores


def _widths_after(order, k, sizes, protected, round_to):
  removed = {g: 0 for g in sizes}
  for g, _ in order[:k]:
    removed[g] += 1
  widths = {}
  for g, n in sizes.items():
    w = max(n - removed[g], protected[g])
    if round_to > 1:
      w = min(n, math.ceil(w / round_to) * round_to)
    widths[g] = w
  return widths


def select_channels(
    model: ResNet,
    scores: Mapping[str, np.ndarray],
    prune_ratio: float,
    *,
    masks: Optional[Mapping[str, Any]] = None,
    **select_kwargs,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Choose channels of a ResNet-family network to remove; returns ``(masks, report)``.

  See ``select_from_scores`` for the keywords (``target``, ``scope``, ``min_channels``, ``round_to``).
  """
  spec = model.spec
  masks = init_masks(spec) if masks is None else masks
  return select_from_scores(live_groups(spec, masks), scores, prune_ratio, masks=masks,
                            macs_of=lambda widths: count_params_macs(_spec_with(spec, masks, widths))["macs"],
                            **select_kwargs)


def select_from_scores(
    groups,
    scores: Mapping[str, np.ndarray],
    prune_ratio: float,
    *,
    masks: Mapping[str, Any],
    macs_of: Callable[[Mapping[str, int]], int],
    target: str = "channels",
    scope: str = "global",
    min_channels: int = 1,
    round_to: int = 1,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Choose channels to remove from the live ``groups`` of any network; returns ``(masks, report)``.

  ``prune_ratio`` is the fraction removed: of the live channels (each group's channels counted
  once) for ``target="channels"``, of the network's MACs for ``target="macs"`` (``macs_of(widths)``
  gives the MACs with every group of ``groups`` at the given width). The report has one row per
  group: width before, kept, and whether ``min_channels`` saved it from emptying.
  """
  if not 0.0 <= prune_ratio < 1.0:
    raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
  if target not in TARGETS:
    raise ValueError(f"unknown pruning target {target!r}; choose from {', '.join(TARGETS)}")
  if scope not in SCOPES:
    raise ValueError(f"unknown pruning scope {scope!r}; choose from {', '.join(SCOPES)}")
  if min_channels < 1 or round_to < 1:
    raise ValueError(f"min_channels and round_to must be >= 1, got {min_channels} and {round_to}")
  groups = list(groups)
  missing = [g for g in groups if g not in scores]
  if missing:
    raise ValueError(f"no importance scores for channel groups {missing}")
  # channels already removed by an earlier mask stay removed and are not counted again
  alive = {g: np.flatnonzero(np.asarray(masks["channels"][g]) > 0.5) for g in groups}
  sizes = {g: len(alive[g]) for g in groups}
  protected = {g: min(min_channels, sizes[g]) for g in groups}

  def ranked(g):  # alive channels of g, least important first, minus the protected best
    s = np.asarray(scores[g])[alive[g]]
    order = np.argsort(s, kind="stable")
    return [(g, int(alive[g][i]), float(s[i])) for i in order[: sizes[g] - protected[g]]]

  per_group = {g: ranked(g) for g in groups}
  if scope == "global":
    entries = sorted((e for g in groups for e in per_group[g]), key=lambda e: e[2])
    order = [(g, i) for g, i, _ in entries]
  else:  # every prefix removes about the same fraction of every group
    keyed = sorted(((pos + 1) / sizes[g], g, i) for g in groups for pos, (_, i, _) in enumerate(per_group[g]))
    order = [(g, i) for _, g, i in keyed]

  def metric(widths):
    if target == "channels":
      return sum(widths.values())
    return macs_of(widths)

  full = metric(sizes)
  goal = full * (1.0 - prune_ratio)
  lo, hi = 0, len(order)
  while lo < hi:  # smallest number of removals that reaches the goal (metrics fall with k)
    mid = (lo + hi) // 2
    if metric(_widths_after(order, mid, sizes, protected, round_to)) <= goal + 1e-9:
      hi = mid
    else:
      lo = mid + 1
  widths = _widths_after(order, lo, sizes, protected, round_to)
  new_masks = {"blocks": dict(masks["blocks"]), "channels": dict(masks["channels"])}
  removed = {g: 0 for g in groups}
  for g, _ in order[:lo]:
    removed[g] += 1
  threshold = max((float(np.asarray(scores[g])[i]) for g, i in order[:lo]), default=-np.inf)
  report = []
  for g in groups:
    s = np.asarray(scores[g])[alive[g]]
    ranked_desc = np.argsort(-s, kind="stable")
    m = np.zeros(np.shape(masks["channels"][g]), np.float32)
    m[alive[g][ranked_desc[: widths[g]]]] = 1.0
    new_masks["channels"][g] = jnp.asarray(m)
    # the cut reached this group's floor and would have taken the protected channels too
    at_floor = removed[g] == sizes[g] - protected[g] and widths[g] == protected[g]
    saved = bool(at_floor and (scope == "per_group" and prune_ratio > 0 or s[ranked_desc[0]] <= threshold))
    report.append({"group": g, "width": sizes[g], "kept": widths[g], "kept_to_avoid_empty": saved})
  return new_masks, report


def _spec_with(spec, masks, widths):
  """A spec with the given group widths (for MACs during the search for the cut)."""
  m = {"blocks": masks["blocks"], "channels": {}}
  for g, v in masks["channels"].items():
    w = widths.get(g)
    if w is None:
      m["channels"][g] = v
    else:
      vec = np.zeros(np.shape(v), np.float32)
      vec[:w] = 1.0
      m["channels"][g] = vec
  return pruned_spec(spec, m)


def prune_channels(
    model: ResNet,
    variables: Mapping[str, Any],
    prune_ratio: float,
    criterion: str = "bn_scale",
    *,
    masks: Optional[Mapping[str, Any]] = None,
    reduce: str = "max",
    key: Optional[jax.Array] = None,
    **select_kwargs,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Score with ``criterion`` and select to ``prune_ratio``: ``(masks, report)``."""
  scores = channel_importance(model, variables, criterion, masks=masks, reduce=reduce, key=key)
  return select_channels(model, scores, prune_ratio, masks=masks, **select_kwargs)


def zero_pruned_filters(model: ResNet, variables: Mapping[str, Any], masks: Mapping[str, Any]) -> dict[str, Any]:
  """SFP's soft step: zero the filters producing every removed channel, keep training them.

  Returns new variables; the filters may regrow, and the last call's masks are the ones to
  materialize at the end.
  """
  params = dict(variables["params"])
  for layer in _live_layers(model.spec, masks):
    if layer.kind == "conv" and layer.out_group is not None:
      m = jnp.asarray(masks["channels"][layer.out_group], params[layer.name]["kernel"].dtype)
      params[layer.name] = {**params[layer.name], "kernel": params[layer.name]["kernel"] * m.reshape(1, 1, 1, -1)}
  return {**variables, "params": params}


def format_report(report: list[dict[str, Any]]) -> str:
  """Markdown table of a selection report."""
  lines = ["| group | width | kept | note |", "|---|---|---|---|"]
  for r in report:
    note = "kept to avoid emptying" if r["kept_to_avoid_empty"] else ""
    lines.append(f"| {r['group']} | {r['width']} | {r['kept']} | {note} |")
  total_w, total_k = sum(r["width"] for r in report), sum(r["kept"] for r in report)
  lines.append(f"| **total** | **{total_w}** | **{total_k}** | |")
  return "\n".join(lines)
