"""Run results: ``summary.json`` (dense beside pruned) and ``report.md`` with its plots.

The summary holds, for the dense and the pruned network, test accuracy, parameters, MACs,
latency at batch 1 and at the large batch, blocks kept and channels kept per group. The report
renders the table and three plots from ``metrics.jsonl``: accuracy over every stage, the gate
probabilities during the block search, and channels kept per group.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import jax
import numpy as np


def _network_entry(ctx, out, accuracy) -> dict[str, Any]:
  from bpcp_jax.deploy.profile import profile_network

  cfg = ctx.config
  batch_sizes = tuple(int(b) for b in str(cfg.profile.batch_sizes).split(",") if b.strip())
  entry = {"accuracy": accuracy, **profile_network(out.network, out.variables, batch_sizes, repeats=cfg.profile.repeats)}
  entry.update(out.network.structure())
  desc = out.network.describe()
  entry["network"] = desc
  if desc["kind"] == "family":
    entry["spec"] = desc["spec"]
  return entry


def summarize(ctx, dense, final, history) -> dict[str, Any]:
  """Evaluate what is missing, profile both networks and write ``summary.json``."""
  from bpcp_jax.run.pipeline import evaluate_output

  cfg = ctx.config
  dense_acc = dense.accuracy if dense.accuracy is not None else evaluate_output(cfg, dense, ctx.test, ctx.progress)
  final_acc = final.accuracy if final.accuracy is not None else evaluate_output(cfg, final, ctx.test, ctx.progress)
  summary = {
      "model": cfg.model,
      "data": {"source": cfg.data.source, "train_images": int(len(ctx.train.labels)),
               "test_images": int(len(ctx.test.labels))},
      "machine": {"platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
                  "device_count": jax.device_count(), "process_count": jax.process_count(),
                  "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
      "dense": _network_entry(ctx, dense, dense_acc),
      "pruned": _network_entry(ctx, final, final_acc),
      "stages": {name: {"accuracy": out.accuracy, **out.network.counts(out.variables)}
                 for name, out in history.items()},
  }
  d, p = summary["dense"], summary["pruned"]
  summary["reduction"] = {
      "params_removed_pct": 100.0 * (1 - p["params"] / d["params"]),
      "macs_removed_pct": 100.0 * (1 - p["macs"] / d["macs"]),
      "accuracy_drop_pct_points": 100.0 * (d["accuracy"] - p["accuracy"]),
  }
  for key in d:
    if key.startswith("latency_ms_b"):
      summary["reduction"][f"speedup_{key[len('latency_ms_'):]}"] = d[key] / p[key]
  if jax.process_index() == 0:
    with open(os.path.join(ctx.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary


def _read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summary_table(summary: dict[str, Any]) -> str:
  rows = ["| network | test acc % | params | MACs | blocks | latency b1 ms | latency b128 ms |",
          "|---|---|---|---|---|---|---|"]
  for name in ("dense", "pruned"):
    e = summary[name]
    rows.append(f"| {name} | {100 * e['accuracy']:.2f} | {e['params']:,} | {e['macs']:,} | {len(e['blocks_kept'])} "
                f"| {e.get('latency_ms_b1', float('nan')):.2f} | {e.get('latency_ms_b128', float('nan')):.1f} |")
  r = summary["reduction"]
  extra = ", ".join(f"{k.replace('_', ' ')}: {v:.2f}" for k, v in sorted(r.items()))
  return "\n".join(rows) + f"\n\n{extra}\n"


def plot_accuracy(ax, records) -> None:
  """Train and test accuracy of every stage on ``ax``, the stages' epochs laid end to end
  (``records``: the lines of ``metrics.jsonl``)."""
  x0 = 0
  for stage in dict.fromkeys(r["stage"] for r in records):
    rs = [r for r in records if r["stage"] == stage]
    xs = [x0 + r["epoch"] for r in rs]
    ax.plot(xs, [r["train_accuracy"] for r in rs], "--", label=f"{stage} train")
    test = [(x, r["test_accuracy"]) for x, r in zip(xs, rs) if "test_accuracy" in r]
    if test:
      ax.plot(*zip(*test), "o-", label=f"{stage} test")
    x0 = xs[-1] if xs else x0
  ax.set_xlabel("epoch (all stages)")
  ax.set_ylabel("accuracy")
  ax.legend(fontsize=7)


def plot_gates(ax, records) -> bool:
  """Each block's keep probability over the search epochs on ``ax``; False when no search was logged."""
  search = [r for r in records if r["stage"] == "search" and "gate_probs" in r]
  if not search:
    return False
  names = sorted(search[0]["gate_probs"])
  probs = np.array([[r["gate_probs"][n] for n in names] for r in search])
  for i, n in enumerate(names):
    ax.plot([r["epoch"] for r in search], probs[:, i], label=n)
  ax.axhline(0.5, color="k", lw=0.8, ls=":")
  ax.set_xlabel("search epoch")
  ax.set_ylabel("keep probability")
  ax.legend(fontsize=6, ncol=3)
  return True


def write_report(workdir: str) -> str:
  """Write ``report.md`` and its PNG plots from the run directory's files; returns the path.

  Without matplotlib the report holds the table alone and says the plots were skipped."""
  if jax.process_index() != 0:
    return ""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  parts = [f"# BPCP run: {summary['model']}\n", summary_table(summary)]
  try:
    import matplotlib
  except ImportError:
    parts.append("\nPlots skipped: matplotlib is not installed.\n")
  else:
    matplotlib.use("Agg")
    parts += _plots(workdir, summary, records)
  if os.path.exists(os.path.join(workdir, "prune_report.md")):
    parts.append("\nThe channel selection, group by group: [prune_report.md](prune_report.md)\n")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path


def _plots(workdir: str, summary, records) -> list[str]:
  import matplotlib.pyplot as plt

  parts = []
  fig, ax = plt.subplots(figsize=(7, 3.5))
  plot_accuracy(ax, records)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy.png"), dpi=110)
  plt.close(fig)
  parts.append("\n## Accuracy\n\n![accuracy](accuracy.png)\n")

  fig, ax = plt.subplots(figsize=(7, 3.5))
  if plot_gates(ax, records):
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "gates.png"), dpi=110)
    parts.append("\n## Gate probabilities during the block search\n\n![gates](gates.png)\n")
  plt.close(fig)

  dense_ch, pruned_ch = summary["dense"]["channels_per_group"], summary["pruned"]["channels_per_group"]
  groups = list(dense_ch)
  fig, ax = plt.subplots(figsize=(max(7, 0.18 * len(groups)), 3.5))
  xs = np.arange(len(groups))
  ax.bar(xs, [dense_ch[g] for g in groups], color="0.8", label="dense")
  ax.bar(xs, [pruned_ch.get(g, 0) for g in groups], color="C0", label="pruned")
  ax.set_xticks(xs, groups, rotation=90, fontsize=5)
  ax.set_ylabel("channels")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "channels.png"), dpi=110)
  plt.close(fig)
  parts.append("\n## Channels kept per group\n\n![channels](channels.png)\n")
  return parts
