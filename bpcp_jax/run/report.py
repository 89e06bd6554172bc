"""Run results: ``summary.json`` (the first and the final network) and ``report.md`` with its plots.

The summary holds two rows, each labelled with what it is: ``dense`` is the network the run
prunes from (the pretrained one, or the ``--from`` input) and ``pruned`` the run's final
network. For each: test accuracy, parameters, MACs, the deployed latency at every batch size
of ``profile.batch_sizes`` (median of interleaved rounds, with the interquartile range), blocks
kept and channels kept per group. Two networks of one architecture are timed once, so their
speed-up is 1.0 by construction; when the run trained only (no pruning step) the two rows are
one network and the table shows one row. After a block search, every block's keep probability
and the margin of its decision are reported, and decisions that have not settled are named.

``report.md`` renders the table and the plots from ``metrics.jsonl`` (accuracy over every
stage, gate probabilities during the search, channels kept per group); a plot with no data is
left out, a single point is drawn as a marker.
"""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any, Optional, Sequence

import jax
import numpy as np
SETTLED_MARGIN = 0.2  # a block decision is settled when its keep probability is this far from 0.5 (p <= 0.3 or >= 0.7)


# ---------------------------------------------------------------------------------------------
# block decisions


def keep_probability(logit) -> float:
  """``sigmoid(logit)`` as a float for a logit of any size (1e4, -1e4, inf: 1.0, 0.0, 1.0; NaN: NaN),
  computed so that ``exp`` never overflows."""
  a = float(np.asarray(logit, np.float64))
  if math.isnan(a):
    return math.nan
  if a >= 0:
    return 1.0 / (1.0 + math.exp(-a))
  e = math.exp(a)  # a < 0: e in [0, 1)
  return e / (1.0 + e)


def block_decisions(gates: dict[str, Any], records: Sequence[dict] = (), settled_margin: float = SETTLED_MARGIN):
  """The block search's decisions: keep iff logit >= 0 (p = sigmoid(logit) >= 0.5), with their margins;
  logits of any size are read (``keep_probability``).

  ``records``: the run's ``metrics.jsonl`` lines; the search's last two epochs tell whether a
  decision flipped in the last epoch. A decision is settled when |p - 0.5| >= ``settled_margin``
  and it did not flip. Returns ``{"blocks": {name: {"keep_prob", "margin", "kept",
  "flipped_last_epoch", "settled"}}, "kept", "removed", "settled_margin", "unsettled",
  "warnings"}`` (``warnings``: lines to show the user, empty when every decision settled).
  """
  search = [r for r in records if r.get("stage") == "search" and "gate_probs" in r]
  previous = search[-2]["gate_probs"] if len(search) >= 2 else {}
  blocks = {}
  for name in sorted(gates):
    p = keep_probability(gates[name])
    kept = float(np.asarray(gates[name], np.float64)) >= 0  # the rule materialize applies (NaN: removed)
    flipped = name in previous and (previous[name] >= 0.5) != kept
    blocks[name] = {"keep_prob": p, "margin": abs(p - 0.5), "kept": kept, "flipped_last_epoch": flipped,
                    "settled": abs(p - 0.5) >= settled_margin and not flipped}
  unsettled = [n for n, b in blocks.items() if not b["settled"]]
  kept = sum(b["kept"] for b in blocks.values())
  lines = []
  if unsettled:
    shown = ", ".join(f"{n} p={blocks[n]['keep_prob']:.4f}{' (flipped)' if blocks[n]['flipped_last_epoch'] else ''}"
                      for n in unsettled)
    lines.append(f"warning: {len(unsettled)} of {len(blocks)} block decisions have not settled (keep probability "
                 f"within {settled_margin} of 0.5, or flipped in the last search epoch): {shown}. These blocks are "
                 "kept or removed by little more than chance: search longer (stages.search.epochs) or with a "
                 "larger gate learning rate (optim.gate_lr)")
  return {"blocks": blocks, "kept": kept, "removed": len(blocks) - kept, "settled_margin": settled_margin,
          "unsettled": unsettled, "warnings": lines}


def block_decisions_markdown(decisions: dict[str, Any]) -> str:
  rows = ["| block | keep probability | margin from 0.5 | decision | settled |", "|---|---|---|---|---|"]
  for name, b in decisions["blocks"].items():
    rows.append(f"| {name} | {b['keep_prob']:.4f} | {b['margin']:.4f} | {'keep' if b['kept'] else 'remove'} | "
                f"{'yes' if b['settled'] else 'NO' + (' (flipped in the last epoch)' if b['flipped_last_epoch'] else '')} |")
  head = (f"{decisions['kept']} of {len(decisions['blocks'])} blocks kept; a decision is settled when its keep "
          f"probability is at least {decisions['settled_margin']} from 0.5 and did not flip in the last epoch.")
  return head + "\n\n" + "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------
# summary.json


def architecture(network) -> str:
  """A key equal for two networks of the same architecture (a family spec, or a Flax network's
  factory, prunings and plan)."""
  desc = network.describe()
  return json.dumps(desc["spec"] if desc["kind"] == "family" else desc, sort_keys=True)


def summarize(ctx, dense, final, history, labels: tuple[str, str] = ("dense", "pruned"),
              decisions: Optional[dict] = None) -> dict[str, Any]:
  """Evaluate what is missing, time both networks side by side and write ``summary.json``.

  ``dense`` is the first row's network, ``final`` the run's output; ``labels`` say what each
  is. The same object twice (a run that only trained) is one network; two of one architecture
  are timed once (speed-up 1.0 by construction). ``decisions``: ``block_decisions`` of the search.
  """
  from bpcp_jax.deploy.latency import paired_ratio
  from bpcp_jax.deploy.profile import MIN_TIME_S, profile_networks
  from bpcp_jax.run.pipeline import evaluate_output, profile_batch_sizes

  cfg = ctx.config
  identical = final is dense
  same_arch = architecture(final.network) == architecture(dense.network)
  dense_acc = dense.accuracy if dense.accuracy is not None else evaluate_output(cfg, dense, ctx.test, ctx.progress)
  final_acc = dense_acc if identical else (
      final.accuracy if final.accuracy is not None else evaluate_output(cfg, final, ctx.test, ctx.progress))
  batch_sizes = profile_batch_sizes(cfg)
  nets = {"dense": (dense.network, dense.variables)}
  if not same_arch:
    nets["pruned"] = (final.network, final.variables)
  entries, samples = profile_networks(nets, batch_sizes, rounds=cfg.profile.repeats)

  def entry(key, out, accuracy, label):
    e = dict(entries[key])
    e.update({"label": label, "accuracy": accuracy, **out.network.structure()})
    desc = out.network.describe()
    e["network"] = desc
    if desc["kind"] == "family":
      e["spec"] = desc["spec"]
    return e

  summary = {
      "model": cfg.model,
      "data": {"source": cfg.data.source, "train_images": int(len(ctx.train.labels)),
               "test_images": int(len(ctx.test.labels))},
      "machine": {"platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
                  "device_count": jax.device_count(), "process_count": jax.process_count(),
                  "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
      "dense": entry("dense", dense, dense_acc, labels[0]),
      "pruned": entry("dense" if same_arch else "pruned", final, final_acc, labels[1]),
      "identical": identical,
      "same_architecture": same_arch,
      "timing": {"method": "deployed predictor, rounds interleaved across networks; median and interquartile range",
                 "rounds": int(cfg.profile.repeats), "min_time_s_per_sample": MIN_TIME_S,
                 "batch_sizes": list(batch_sizes), "timed_once": same_arch},
      "stages": {name: {"accuracy": out.accuracy, **out.network.counts(out.variables)}
                 for name, out in history.items()},
  }
  d, p = summary["dense"], summary["pruned"]
  summary["reduction"] = {
      "params_removed_pct": _removed_pct(p["params"], d["params"]),
      "macs_removed_pct": _removed_pct(p["macs"], d["macs"]),
      "accuracy_drop_pct_points": 100.0 * (d["accuracy"] - p["accuracy"]),
  }
  summary["speedup_spread"] = {}
  for b in batch_sizes:
    # per-round ratio of the paired samples; one architecture: 1.0 by construction (timed once)
    ratio = ({"median": 1.0, "q25": 1.0, "q75": 1.0, "rounds": 0} if same_arch
             else paired_ratio(samples["dense"][f"b{b}"], samples["pruned"][f"b{b}"]))
    summary["reduction"][f"speedup_b{b}"] = ratio["median"]
    summary["speedup_spread"][f"b{b}"] = ratio
  if decisions is not None:
    search = cfg.stages.search
    summary["block_search"] = {**{k: v for k, v in decisions.items() if k != "warnings"}, "method": search.method,
                               "seed": int(search.get("seed", 0)), "gamma": float(search.gamma)}
  if jax.process_index() == 0:
    with open(os.path.join(ctx.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary


def _removed_pct(left: float, before: float) -> float:
  """``100 * (1 - left / before)``; 0 when nothing was there to remove."""
  return 100.0 * (1 - left / before) if before else 0.0


def _read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _batch(key: str) -> int:
  return int(key.rsplit("_b", 1)[1])


def format_ms(ms: float) -> str:
  """Milliseconds with three significant digits, never in exponent form (0.684, 7.73, 890, 1,140)."""
  if not math.isfinite(ms):
    return str(ms)
  return f"{ms:,.0f}" if ms >= 100 else f"{ms:.{2 - int(np.floor(np.log10(max(ms, 1e-3))))}f}"


def _latency_cell(e: dict, b: int) -> str:
  ms = e.get(f"latency_ms_b{b}")
  if ms is None:
    return ""
  s = (e.get("latency_spread_ms") or {}).get(f"b{b}")
  return f"{format_ms(ms)} ({format_ms(s['q25'])}-{format_ms(s['q75'])})" if s else format_ms(ms)


def summary_table(summary: dict[str, Any]) -> str:
  """The markdown table of a ``summary.json``: one row per network (one when the run only trained),
  a latency column per profiled batch size (median ms, interquartile range in brackets), and the
  reduction and speed-ups below it."""
  names = ["dense"] if summary.get("identical") else ["dense", "pruned"]
  batches = sorted({_batch(k) for n in names for k in summary[n] if k.startswith("latency_ms_b")})
  head = ["network", "test acc %", "params", "MACs", "blocks"] + [f"latency b{b} ms" for b in batches]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in names:
    e = summary[name]
    rows.append("| " + " | ".join([e.get("label", name), f"{100 * e['accuracy']:.2f}", f"{e['params']:,}",
                                   f"{e['macs']:,}", str(len(e["blocks_kept"]))] + [_latency_cell(e, b) for b in batches])
                + " |")
  text = "\n".join(rows) + "\n"
  if summary.get("identical"):
    return text + "\nThe run trained only: nothing was pruned, so there is nothing to compare.\n"
  r = summary["reduction"]
  parts = [f"params removed {r['params_removed_pct']:.1f}%", f"MACs removed {r['macs_removed_pct']:.1f}%",
           f"accuracy drop {r['accuracy_drop_pct_points']:.2f} points"]
  if summary.get("same_architecture"):
    parts.append("same architecture: timed once, speed-up 1.00x by construction")
  else:
    spread = summary.get("speedup_spread") or {}
    for b in batches:
      s = spread.get(f"b{b}")
      v = r.get(f"speedup_b{b}")
      if v is not None:
        parts.append(f"speed-up b{b} {v:.2f}x" + (f" ({s['q25']:.2f}-{s['q75']:.2f})" if s else ""))
  return text + "\n" + ", ".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# plots (matplotlib Figure objects, no pyplot state: no backend needed, nothing left open)


def _figure(size, ax=None):
  """A new figure and its axes, or the given ``ax`` and its figure (a panel of a larger figure)."""
  if ax is not None:
    return ax.figure, ax
  from matplotlib.figure import Figure

  fig = Figure(figsize=size)
  return fig, fig.add_subplot()


def _epoch_axis(ax, xs) -> None:
  """Whole epochs on the x axis, a lone point in the middle of a one-epoch-wide axis."""
  xs = sorted(set(xs))
  if len(xs) <= 20:
    ax.set_xticks(xs)
  else:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)


def plot_accuracy(records: Sequence[dict], ax=None):
  """Train (dashed) and test (solid) accuracy of every training stage, epochs laid end to end
  (on ``ax`` if given); None when no stage trained."""
  records = [r for r in records if "train_accuracy" in r]
  if not records:
    return None
  fig, ax = _figure((7, 3.5), ax)
  x0 = 0
  for i, stage in enumerate(dict.fromkeys(r["stage"] for r in records)):
    rs = [r for r in records if r["stage"] == stage]
    xs = [x0 + r["epoch"] for r in rs]
    color = f"C{i}"
    ax.plot(xs, [r["train_accuracy"] for r in rs], "o--", ms=3, color=color, label=f"{stage} train")
    test = [(x, r["test_accuracy"]) for x, r in zip(xs, rs) if "test_accuracy" in r]
    if test:
      ax.plot(*zip(*test), "s-", ms=4, color=color, label=f"{stage} test")
    x0 = xs[-1]
  _epoch_axis(ax, [x for line in ax.get_lines() for x in line.get_xdata()])
  ax.set_xlabel("epoch (all stages)")
  ax.set_ylabel("accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_gates(records: Sequence[dict], ax=None):
  """Keep probability of every block after each search epoch (on ``ax`` if given); None without a search."""
  search = [r for r in records if r.get("stage") == "search" and r.get("gate_probs")]
  if not search:
    return None
  fig, ax = _figure((7, 3.5), ax)
  names = sorted(search[0]["gate_probs"])
  epochs = [r["epoch"] for r in search]
  for n in names:
    ax.plot(epochs, [r["gate_probs"].get(n, np.nan) for r in search], "o-", ms=4, label=n)
  ax.axhline(0.5, color="k", lw=0.8, ls=":")
  ax.set_ylim(-0.02, 1.02)
  _epoch_axis(ax, epochs)
  ax.set_xlabel("search epoch")
  ax.set_ylabel("keep probability")
  ax.legend(fontsize=6, ncol=max(1, len(names) // 12 + 1))
  fig.tight_layout()
  return fig


def plot_channels(summary: dict[str, Any]):
  """Channels per group, first row's network beside the final one (horizontal bars, one row per
  group, readable at any depth); None without groups."""
  first, final = summary["dense"]["channels_per_group"], summary["pruned"]["channels_per_group"]
  groups = list(first)
  if not groups:
    return None
  fig, ax = _figure((7, max(2.5, 0.16 * len(groups) + 1.0)))
  ys = np.arange(len(groups))[::-1]
  ax.barh(ys, [first[g] for g in groups], color="0.8", label=summary["dense"].get("label", "dense"))
  if not summary.get("identical"):
    ax.barh(ys, [final.get(g, 0) for g in groups], height=0.6, color="C0",
            label=summary["pruned"].get("label", "pruned"))
  ax.set_yticks(ys, groups, fontsize=7)
  ax.set_ylim(-0.7, len(groups) - 0.3)
  ax.set_xlabel("channels")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return fig


def write_report(workdir: str) -> str:
  """Write ``report.md`` and its PNG plots from the run directory's files; returns the path.

  Without matplotlib the report holds the tables alone and says the plots were skipped."""
  if jax.process_index() != 0:
    return ""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  parts = [f"# BPCP run: {summary['model']}\n", summary_table(summary)]
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    parts.append("\nPlots skipped: matplotlib is not installed.\n")
    if summary.get("block_search"):
      parts.append("\n## Block decisions\n\n" + block_decisions_markdown(summary["block_search"]))
    return _write_report_md(workdir, parts)
  sections = (("accuracy", "Accuracy", plot_accuracy(records)),
              ("gates", "Gate probabilities during the block search", plot_gates(records)),
              ("channels", "Channels kept per group", plot_channels(summary)))
  for name, title, fig in sections:
    path = os.path.join(workdir, f"{name}.png")
    if fig is None:
      if os.path.exists(path):
        os.remove(path)  # a plot of an earlier report whose data is gone
      continue
    fig.savefig(path, dpi=110)
    parts.append(f"\n## {title}\n\n![{name}]({name}.png)\n")
    if name == "gates" and summary.get("block_search"):
      parts.append("\n" + block_decisions_markdown(summary["block_search"]))
  if summary.get("block_search") and not any(f is not None for n, _, f in sections if n == "gates"):
    parts.append("\n## Block decisions\n\n" + block_decisions_markdown(summary["block_search"]))
  return _write_report_md(workdir, parts)


def _write_report_md(workdir: str, parts: list[str]) -> str:
  if os.path.exists(os.path.join(workdir, "prune_report.md")):
    parts.append("\nThe channel selection, group by group: [prune_report.md](prune_report.md)\n")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path
