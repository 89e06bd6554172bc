"""What the reports claim: rows labelled, latency columns of the profiled batch sizes with their
spread, plots that show their data at any run length (or are left out), block decisions with
their margins, interleaved timing. In process, on made-up run files: no training."""

import json
import os

import pytest

from bpcp_jax.deploy.latency import interleaved_ms, paired_ratio, spread
from bpcp_jax.run import report


def _entry(label, params, macs, blocks, ms):
  return {"label": label, "accuracy": 0.5, "params": params, "macs": macs, "blocks_kept": [f"b{i}" for i in range(blocks)],
          "channels_per_group": {"stem": 16, "stage0": 16, "stage0_block0_mid1": 16 if blocks else 0},
          **{f"latency_ms_b{b}": v for b, v in ms.items()},
          "latency_spread_ms": {f"b{b}": {"median": v, "q25": 0.9 * v, "q75": 1.1 * v, "rounds": 5} for b, v in ms.items()}}


def _summary(identical=False, same=False):
  dense = _entry("dense, pretrained", 1000, 5000, 3, {1: 2.0, 8: 9.0})
  pruned = dense if identical else _entry("blocks pruned, after prune", 1000 if same else 400, 5000 if same else 2000,
                                          3 if same else 1, {1: 2.0, 8: 9.0} if same else {1: 1.0, 8: 3.0})
  ratio = {1: 1.0, 8: 1.0} if same or identical else {1: 2.0, 8: 3.0}
  return {"model": "resnet_v1_8", "dense": dense, "pruned": pruned, "identical": identical,
          "same_architecture": same or identical,
          "reduction": {"params_removed_pct": 60.0, "macs_removed_pct": 60.0, "accuracy_drop_pct_points": 0.0,
                        **{f"speedup_b{b}": r for b, r in ratio.items()}},
          "speedup_spread": {f"b{b}": {"median": r, "q25": r - 0.1, "q75": r + 0.1, "rounds": 5} for b, r in ratio.items()}}


def test_table_rows_say_what_they_are():
  table = report.summary_table(_summary())
  assert "| network | test acc % | params | MACs | blocks | latency b1 ms | latency b8 ms |" in table
  assert "| dense, pretrained |" in table and "| blocks pruned, after prune |" in table and "nan" not in table
  assert "2.00 (1.80-2.20)" in table and "speed-up b1 2.00x (1.90-2.10), speed-up b8 3.00x (2.90-3.10)" in table
  one = report.summary_table(_summary(identical=True))
  assert one.count("| dense, pretrained |") == 1 and "speed-up" not in one and "nothing was pruned" in one
  same = report.summary_table(_summary(same=True))
  assert "same architecture: timed once, speed-up 1.00x by construction" in same and "speed-up b1" not in same


def _records(epochs):
  out = []
  for stage, n in epochs.items():
    for e in range(1, n + 1):
      r = {"stage": stage, "epoch": e, "train_accuracy": 0.1 * e, "test_accuracy": 0.1 * e}
      if stage == "search":
        r["gate_probs"] = {"stage0_block0": 0.9, "stage1_block0": 0.1}
      out.append(r)
  return out


def _visible(fig):
  """Every line of the figure shows its points: a marker, or at least two points joined."""
  return all(line.get_marker() not in ("None", "", None) or len(line.get_xdata()) > 1
             for ax in fig.axes for line in ax.get_lines() if line.get_label()[:1] != "_")


def test_plots_show_single_points_and_leave_out_empty_ones():
  one_epoch = _records({"pretrain": 1, "search": 1, "finetune_blocks": 1, "finetune_channels": 1})
  fig = report.plot_accuracy(one_epoch)
  lines = [l for l in fig.axes[0].get_lines()]
  assert len(lines) == 8 and all(l.get_marker() not in ("None", "") for l in lines)  # every series visible
  assert _visible(report.plot_gates(one_epoch))
  assert report.plot_accuracy([]) is None and report.plot_gates(_records({"pretrain": 2})) is None
  fig = report.plot_channels(_summary())
  assert all(t.get_fontsize() >= 7 for t in fig.axes[0].get_yticklabels())  # readable group names


def test_report_of_a_run_without_training_has_no_empty_plot(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(_summary(), f)
  open(os.path.join(workdir, "accuracy.png"), "wb").close()  # left from an earlier report
  report.write_report(workdir)  # a prune-channels-only run: no metrics.jsonl (warnings are errors here)
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  assert "accuracy.png" not in text and not os.path.exists(os.path.join(workdir, "accuracy.png"))
  assert "![channels](channels.png)" in text and os.path.getsize(os.path.join(workdir, "channels.png")) > 1000


def test_block_decisions_report_margins_and_warn_when_unsettled():
  logits = {"a": 3.0, "b": -0.005, "c": -2.0, "d": 0.3}  # p = 0.953, 0.499, 0.119, 0.574
  records = [{"stage": "search", "epoch": 1, "gate_probs": {"a": 0.9, "b": 0.49, "c": 0.2, "d": 0.45}},
             {"stage": "search", "epoch": 2, "gate_probs": {"a": 0.95, "b": 0.499, "c": 0.12, "d": 0.574}}]
  d = report.block_decisions(logits, records)
  assert d["kept"] == 2 and d["removed"] == 2
  assert d["blocks"]["b"]["margin"] == pytest.approx(0.00125, abs=1e-4) and not d["blocks"]["b"]["settled"]
  assert d["blocks"]["d"]["flipped_last_epoch"] and not d["blocks"]["d"]["settled"]
  assert d["blocks"]["a"]["settled"] and d["blocks"]["c"]["settled"] and d["unsettled"] == ["b", "d"]
  assert len(d["warnings"]) == 1 and "b p=0.4988" in d["warnings"][0] and "(flipped)" in d["warnings"][0]
  assert "| b | 0.4988 | 0.0012 | remove | NO |" in report.block_decisions_markdown(d)
  assert report.block_decisions({"a": 3.0, "c": -2.0})["warnings"] == []


def test_interleaved_timing_alternates_rounds_and_pairs_samples():
  order = []
  calls = {name: (lambda n=name: order.append(n), ()) for name in ("x", "y")}
  samples = interleaved_ms(calls, rounds=4, min_time_s=0.0)
  assert order == ["x", "y"] + ["x", "y", "y", "x"] * 2  # warm-up, then the order alternates round by round
  assert {k: v.shape for k, v in samples.items()} == {"x": (4,), "y": (4,)}
  s = spread([1.0, 2.0, 3.0, 4.0, 100.0])
  assert s["median"] == 3.0 and s["q25"] == 2.0 and s["q75"] == 4.0 and s["rounds"] == 5
  assert paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])["median"] == 2.0
  with pytest.raises(ValueError, match="rounds"):
    interleaved_ms(calls, rounds=0)
