"""Inference speed-up of materialized networks over the dense one, beside their MACs ratio.

For ResNet-v2-56 and several compressions (blocks removed, channels removed with widths rounded
to multiples of 8, both together up to the paper's ~80% of MACs), the masks are turned into a
smaller ordinary network by ``bp.materialize`` and timed as deployed (``bp.make_predictor``:
jitted eval-mode apply, weights compiled in): batch-1 latency (median of many calls) and
batch-128 throughput. The dense network is also timed with its weights passed as arguments. Dense and pruned networks are timed in
interleaved rounds in one process; the speed-up is divided by the MACs ratio to show how much
of the removed arithmetic became time.

    python -m benchmarks.inference_speedup --json benchmarks/results/inference_speedup.json
"""

from __future__ import annotations

import sys

from benchmarks import common

if __name__ == "__main__":  # with the command line's allocator, before jax starts
  common.restart_with_allocator("benchmarks.inference_speedup", sys.argv[1:])

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bpcp_jax as bp  # noqa: E402
from bpcp_jax.pruning.channel_prune import prune_channels  # noqa: E402

PAPER_SPEEDUP = 3.17  # BPCP's batch-1 CPU speed-up at -80.3% MACs
PAPER_MACS_CUT = 0.803


def remove_blocks(model, n_remove: int) -> dict:
  """Masks removing ``n_remove`` blocks, spread over the stages, never a stage's entry block,
  the deepest first (a stand-in for a search result; only the count matters for speed)."""
  masks = bp.init_masks(model)
  per_stage = [[n for n in masks["blocks"] if n.startswith(f"stage{s}_") and not n.endswith("_block0")]
               for s in range(len(model.spec.stages))]
  order = []
  for i in range(max(len(p) for p in per_stage)):
    for p in per_stage:
      if i < len(p):
        order.append(p[-1 - i])
  for name in order[:n_remove]:
    masks["blocks"][name] = jnp.asarray(-1.0, jnp.float32)
  return masks


def compressions(model, variables, quick: bool, speed_aware: bool = True):
  """(name, masks) pairs: blocks only, channels only, blocks + channels at and past the paper, and (with
  ``speed_aware``) the paper's MACs budget chosen by speed-aware selection."""
  n_blocks = model.spec.num_blocks
  n_rm = max(1, round(n_blocks * 10 / 18))  # 10 of ResNet-v2-56's 18 blocks
  dense_macs = bp.count_params_macs(model)["macs"]
  blocks = remove_blocks(model, n_rm)
  out = [(f"{n_rm} of {n_blocks} blocks", blocks)]
  ch, _ = prune_channels(model, variables, 0.5, "l1", target="macs", round_to=8)
  out.append(("channels -50% MACs (x8)", ch))
  if quick:
    return out
  # channel cut on top of the block cut that lands the whole network at the paper's -80.3% MACs
  left = bp.count_params_macs(bp.pruned_spec(model.spec, blocks))["macs"] / dense_macs
  for total_cut in (PAPER_MACS_CUT, 0.85):
    ratio = 1.0 - (1.0 - total_cut) / left
    m, _ = prune_channels(model, variables, ratio, "l1", masks=blocks, target="macs", round_to=8)
    out.append((f"{n_rm} blocks + channels (x8), -{100 * total_cut:.0f}% MACs", m))
  if not speed_aware:
    return out
  # the same budget chosen by speed-aware selection: blocks and channels by l1 per batch-1 ms saved
  from bpcp_jax.pruning.speed_select import select_resnet

  m, _, _ = select_resnet(model, variables, criterion="l1", cost="latency", batch=1, round_to=8,
                          macs_fraction=1.0 - PAPER_MACS_CUT, progress=False)
  out.append((f"speed-aware selection (batch-1 ms, x8), <= -{100 * PAPER_MACS_CUT:.0f}% MACs", m))
  return out


def measure(model_name: str, large_batches, *, calls: int, large_calls: int, repeats: int, quick: bool = False,
            speed_aware: bool = True, threads: int = 1) -> dict:
  """Build the compressions of ``model_name`` (random weights), materialize them, and time every network
  at batch 1 and at each of ``large_batches`` (``threads`` compile in parallel). The results dict:
  ``networks`` (one record per network: counts, batch-1 latency and speed-up, and per large batch B
  ``batch{B}_images_per_s`` / ``batch{B}_speedup``; ``large_batch_*`` is the first large batch), the
  dense network's figures, and the dense network with its weights passed as arguments."""
  model = bp.create_model(model_name)
  key = jax.random.PRNGKey(0)
  variables = common.fast_init(model)  # random kernels: l1 scores differ between channels
  nets = [("dense", model, variables, None)]
  for name, masks in compressions(model, variables, quick, speed_aware):
    small, small_vars = bp.materialize(model, variables, masks)
    nets.append((name, small, small_vars, masks))

  x1 = jax.random.normal(key, (1, 32, 32, 3))
  xs = [jax.random.normal(key, (b, 32, 32, 3)) for b in large_batches]
  timed_nets = [(name, net, v) for name, net, v, _ in nets] + [("dense, weights as arguments", model, variables,
                                                                  "argument")]
  lat, thr = common.interleaved_inference_batches(timed_nets, x1, xs, repeats, calls, large_calls, threads=threads)

  dense_counts = bp.count_params_macs(model)
  dense_macs, dense_params = dense_counts["macs"], dense_counts["params"]
  base_lat = common.median(lat["dense"])
  base_thr = {b: common.median(thr[b]["dense"]) for b in large_batches}
  first = large_batches[0]
  nets_out = []
  for name, net, v, _ in nets:
    c = bp.count_params_macs(net)
    macs_ratio = dense_macs / c["macs"]
    l1 = common.median(lat[name])
    s1 = base_lat / l1
    rec = {"name": name, "blocks": net.spec.num_blocks, "params": c["params"], "macs": c["macs"],
           "params_cut": 1 - c["params"] / dense_params, "macs_cut": 1 - c["macs"] / dense_macs,
           "macs_ratio": macs_ratio, "batch1_latency_ms": 1000 * l1, "batch1_speedup": s1,
           "batch1_speedup_over_macs_ratio": s1 / macs_ratio, "batch1_latency_ms_rounds": [1000 * t for t in lat[name]]}
    for b in large_batches:
      tb = common.median(thr[b][name])
      rec[f"batch{b}_images_per_s"] = tb
      rec[f"batch{b}_speedup"] = tb / base_thr[b]
      rec[f"batch{b}_images_per_s_rounds"] = thr[b][name]
    rec.update({"large_batch_images_per_s": rec[f"batch{first}_images_per_s"],
                "large_batch_speedup": rec[f"batch{first}_speedup"],
                "large_batch_speedup_over_macs_ratio": rec[f"batch{first}_speedup"] / macs_ratio,
                "large_batch_images_per_s_rounds": thr[first][name]})
    nets_out.append(rec)
  return {"model": model_name, "large_batch": first, "large_batches": list(large_batches), "repeats": repeats,
          "calls": calls, "large_calls": large_calls, "networks": nets_out,
          "dense_batch1_latency_ms": 1000 * base_lat, "dense_large_batch_images_per_s": base_thr[first],
          "dense_weights_as_arguments_batch1_latency_ms": 1000 * common.median(lat["dense, weights as arguments"]),
          "dense_weights_as_arguments_large_batch_images_per_s": common.median(
              thr[first]["dense, weights as arguments"]),
          "paper_speedup": PAPER_SPEEDUP}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(p)
  p.add_argument("--model", default="resnet_v2_56")
  p.add_argument("--batch", type=int, default=128, help="the large batch (batch 1 is always timed)")
  p.add_argument("--calls", type=int, default=100, help="batch-1 calls per round")
  p.add_argument("--large-calls", type=int, default=5, help="large-batch calls per round")
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.batch, args.calls, args.large_calls, args.repeats = "resnet_v2_20", 8, 5, 1, 1

  results = measure(args.model, [args.batch], calls=args.calls, large_calls=args.large_calls, repeats=args.repeats,
                    quick=args.quick)
  rows = []
  for rec in results["networks"]:
    macs_ratio, s1, sb = rec["macs_ratio"], rec["batch1_speedup"], rec["large_batch_speedup"]
    rows.append([rec["name"], rec["blocks"], f"{100 * rec['macs_cut']:.1f}%", f"{macs_ratio:.2f}x",
                 f"{rec['batch1_latency_ms']:.2f}", f"{s1:.2f}x", f"{s1 / macs_ratio:.2f}",
                 f"{rec['large_batch_images_per_s']:.0f}", f"{sb:.2f}x", f"{sb / macs_ratio:.2f}"])
  table = common.markdown_table(
      ["network", "blocks", "MACs cut", "MACs ratio", "batch-1 ms", "batch-1 speed-up", "/ MACs ratio",
       f"batch-{args.batch} img/s", f"batch-{args.batch} speed-up", "/ MACs ratio"], rows)
  table += (f"\n\nEvery network runs as deployed, weights compiled in (`bp.make_predictor`); the dense one "
            f"with its weights passed as arguments to `jax.jit(model.apply)`: "
            f"{results['dense_weights_as_arguments_batch1_latency_ms']:.2f} ms at batch 1, "
            f"{results['dense_weights_as_arguments_large_batch_images_per_s']:.0f} img/s at batch {args.batch}. "
            f"Batch-1 latency: median of {args.calls} calls per round, median of {args.repeats} rounds; "
            f"batch-{args.batch}: {args.large_calls} calls per round. The paper's BPCP: -80.3% MACs, "
            f"{PAPER_SPEEDUP}x at batch 1 on its CPU.")
  common.write_outputs("inference_speedup", args, results, table)
  return results


if __name__ == "__main__":
  main()
