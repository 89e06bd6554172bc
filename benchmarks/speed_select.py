"""Latency-aware vs MACs-only selection at an equal MACs budget: measured speed and accuracy.

From one dense ResNet-v2-56 (experiments/configs/speed_select.py: 4 epochs on 10,000 CIFAR-10
training images), three selections prune to at most 40% of the MACs, each through the
pipeline's prune stage and 2 fine-tuning epochs, each evaluated on all 10,000 test images:

- ``macs``: importance per MAC saved, any width;
- ``macs_r8``: importance per MAC saved, widths at multiples of 8;
- ``latency``: importance per ms saved at batch 1 (per-layer times measured on this machine),
  widths at multiples of 8, blocks and channels both candidates.

The fine-tuned networks are then restored from their checkpoints and timed with the dense one
in interleaved rounds, in one process: batch-1 latency and batch-128 throughput.

    python -m benchmarks.speed_select --workdir runs/speed_select --json benchmarks/results/speed_select.json \\
      --md benchmarks/results/speed_select.md

Rows whose run finished are not rerun (``--measure-only`` skips all training). ``--quick``
selects on a random ResNet-v2-11 without any training (a smoke run: no accuracy).
"""

from __future__ import annotations

import sys

from benchmarks import common

if __name__ == "__main__":  # with the command line's allocator, before jax starts
  common.restart_with_allocator("benchmarks.speed_select", sys.argv[1:])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bpcp_jax as bp  # noqa: E402

CONFIG = os.path.join("experiments", "configs", "speed_select.py")
ROWS = {  # name -> overrides of the config's prune stage (latency first: it times layers, best on a quiet machine)
    "latency": ["--config.stages.prune.cost=latency", "--config.stages.prune.round_to=8"],
    "macs": ["--config.stages.prune.cost=macs", "--config.stages.prune.round_to=1"],
    "macs_r8": ["--config.stages.prune.cost=macs", "--config.stages.prune.round_to=8"],
}


def _run(cmd, log):
  print("+", " ".join(cmd), flush=True)
  start = time.time()
  with open(log, "a") as f:
    code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
  if code != 0:
    raise SystemExit(f"command failed with exit {code} (log: {log}): {' '.join(cmd)}")
  return time.time() - start


def _resume(workdir):
  return ["--resume"] if os.path.isdir(os.path.join(workdir, "checkpoints")) else []


def train_rows(workdir, data, quiet_progress=True):
  """Run the dense pretraining and the three prune + fine-tune rows that have not finished."""
  common_args = ["--config", CONFIG] + (["--data", data] if data else []) + (["--no-progress"] if quiet_progress else [])
  walls = {}
  dense = os.path.join(workdir, "dense")
  if not os.path.exists(os.path.join(dense, "summary.json")):
    walls["dense"] = _run(["bpcp-jax", "train", "--workdir", dense, *_resume(dense), *common_args],
                          os.path.join(workdir, "dense.log"))
  for name, overrides in ROWS.items():
    row = os.path.join(workdir, name)
    if os.path.exists(os.path.join(row, "summary.json")):
      continue
    walls[name] = _run(["bpcp-jax", "pipeline", "--workdir", row, *_resume(row), "--from",
                        os.path.join(dense, "checkpoints", "pretrain"),
                        "--config.stages.run=prune,finetune_channels", *overrides, *common_args],
                       os.path.join(workdir, f"{name}.log"))
  return walls


def networks_from_runs(workdir):
  from bpcp_jax.training.checkpoint import load_network

  nets = {"dense": load_network(os.path.join(workdir, "dense", "checkpoints", "pretrain"))}
  info = {"dense": {"top1": _summary(workdir, "dense")["dense"]["accuracy"]}}
  for name in ROWS:
    model, variables = load_network(os.path.join(workdir, name, "checkpoints", "finetune_channels"))
    nets[name] = (model, variables)
    summary = _summary(workdir, name)
    _, prune_meta = _prune_meta(workdir, name)
    info[name] = {"top1": summary["pruned"]["accuracy"], "actions": prune_meta.get("speed_selection", {}).get("actions", [])}
  return nets, info


def _summary(workdir, name):
  with open(os.path.join(workdir, name, "summary.json")) as f:
    return json.load(f)


def _prune_meta(workdir, name):
  from bpcp_jax.training.checkpoint import StageCheckpoints

  ckpt = StageCheckpoints(os.path.join(workdir, name, "checkpoints", "prune"), read_only=True)
  try:
    return ckpt.restore_raw()
  finally:
    ckpt.close()


def networks_quick():
  from bpcp_jax.pruning.speed_select import select_resnet

  model = bp.create_model("resnet_v2_11")
  variables = common.fast_init(model)
  variables["params"] = {k: ({**v, "scale": jnp.asarray(np.random.default_rng(len(k)).uniform(0.1, 1, v["scale"].shape),
                                                         jnp.float32)} if "scale" in v else v)
                         for k, v in variables["params"].items()}
  nets, info = {"dense": (model, variables)}, {"dense": {"top1": None}}
  for name, overrides in ROWS.items():
    cost = overrides[0].split("=")[1]
    round_to = int(overrides[1].split("=")[1])
    masks, _, sel = select_resnet(model, variables, cost=cost, round_to=round_to, macs_fraction=0.4, progress=False)
    nets[name] = bp.materialize(model, variables, masks)
    info[name] = {"top1": None, "actions": [h["action"] for h in sel.history]}
  return nets, info


def measure(nets, repeats, calls, large_calls, batch):
  """Median batch-1 latency (ms) and large-batch images/s of every network, rounds interleaved."""
  x1 = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  xb = jnp.asarray(np.random.default_rng(1).normal(size=(batch, 32, 32, 3)), jnp.float32)
  lat, thr = common.interleaved_inference([(n, m, v) for n, (m, v) in nets.items()], x1, xb, repeats, calls,
                                          large_calls)
  return {n: common.median(t) * 1e3 for n, t in lat.items()}, {n: common.median(t) for n, t in thr.items()}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--workdir", default="runs/speed_select")
  p.add_argument("--data", default=None, help="CIFAR-10 archive or folder (default: the config's)")
  p.add_argument("--measure-only", action="store_true", help="do not train; measure the finished rows")
  p.add_argument("--calls", type=int, default=50, help="batch-1 calls per round (median)")
  p.add_argument("--large-calls", type=int, default=4, help="large-batch calls per round")
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args(argv)
  walls = {}
  if args.quick:
    nets, info = networks_quick()
    args.calls, args.large_calls, args.batch = 5, 1, 8
  else:
    os.makedirs(args.workdir, exist_ok=True)
    if not args.measure_only:
      walls = train_rows(args.workdir, args.data)
    nets, info = networks_from_runs(args.workdir)
  lat, thr = measure(nets, args.repeats, args.calls, args.large_calls, args.batch)
  dense_macs = bp.count_params_macs(nets["dense"][0].spec)["macs"]
  results, rows = {"rows": {}, "train_wall_s": walls}, []
  for name, (model, _) in nets.items():
    macs = bp.count_params_macs(model.spec)["macs"]
    r = {"macs": macs, "macs_kept": macs / dense_macs, "blocks": len(model.spec.block_names()),
         "latency_b1_ms": lat[name], "speedup_b1": lat["dense"] / lat[name],
         f"images_per_s_b{args.batch}": thr[name], f"speedup_b{args.batch}": thr[name] / thr["dense"],
         "top1": info[name]["top1"], "actions": info[name].get("actions", [])}
    results["rows"][name] = r
    rows.append([name, f"{macs / 1e6:.1f}M", f"{r['macs_kept']:.1%}", r["blocks"], r["latency_b1_ms"],
                 f"{r['speedup_b1']:.2f}x", thr[name], f"{r[f'speedup_b{args.batch}']:.2f}x",
                 "n/a" if r["top1"] is None else f"{r['top1']:.2%}"])
  if "latency" in lat and "macs" in lat:
    results["latency_over_macs_speedup_b1"] = lat["macs"] / lat["latency"]
    results["latency_over_macs_r8_speedup_b1"] = lat["macs_r8"] / lat["latency"]
  table = common.markdown_table(
      ["selection", "MACs", "MACs kept", "blocks", "batch-1 ms", "speed-up b1", f"img/s b{args.batch}",
       f"speed-up b{args.batch}", "top-1 (fine-tuned)"], rows)
  common.write_outputs("speed_select", args, results, table)
  return results


if __name__ == "__main__":
  main()
