"""Prune any network: the real-network suite traced, pruned to half its MACs and materialized.

For every architecture of ``tests/real_networks.py`` at its real width and input size (one
example; 224x224, Inception 299x299): the time to trace it in eval and train mode
(``bp.trace_network``), to select what to prune down to half its MACs (``bp.select_pruning``,
``cost="macs"``, widths in multiples of ``--round-to``) and to materialize the selection
(``bp.materialize_traced``, variables held as jax arrays); the fraction of the conv/dense kernel
parameters that pruning can remove, the channel groups, residual blocks and ops not followed.
``--quick`` runs the tests' small configurations instead (a smoke run).

    python -m benchmarks.any_network --json benchmarks/results/any_network.json
"""

from __future__ import annotations

import sys

from benchmarks import common

if __name__ == "__main__":  # with the command line's allocator, before jax starts
  common.restart_with_allocator("benchmarks.any_network", sys.argv[1:])

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

import bpcp_jax as bp  # noqa: E402
from bpcp_jax.tracer.network import prunable_fraction  # noqa: E402
from tests.real_networks import NETWORKS, random_variables  # noqa: E402


def measure(name: str, quick: bool, round_to: int) -> dict:
  small, real, small_shape, real_shape = NETWORKS[name]
  model, shape = (small, small_shape) if quick else (real, (1,) + real_shape)
  x = jax.random.normal(jax.random.key(1), shape)
  variables = jax.device_put(random_variables(model, x))
  train = {"train": True, "rngs": {"dropout": jax.random.key(2)}}
  if "batch_stats" in variables:
    train["mutable"] = ["batch_stats"]
  t = time.perf_counter()
  net = bp.trace_network(model, variables, x, modes={"eval": {}, "train": train})
  trace_s = time.perf_counter() - t
  t = time.perf_counter()
  sel = bp.select_pruning(net, variables, cost="macs", macs_fraction=0.5, round_to=round_to, progress=False)
  select_s = time.perf_counter() - t
  t = time.perf_counter()
  small_net, small_vars = bp.materialize_traced(net, variables, sel.masks)
  materialize_s = time.perf_counter() - t
  params, macs = bp.count_traced(net, variables)
  small_params, small_macs = bp.count_traced(small_net, small_vars)
  return {"name": name, "input": list(shape), "params": params, "macs": macs, "trace_s": trace_s, "select_s": select_s,
          "materialize_s": materialize_s, "prunable_fraction": prunable_fraction(net), "groups": len(net.groups),
          "blocks": len(net.blocks), "unfollowed": [str(u) for u in net.unfollowed], "selected_macs": small_macs,
          "selected_params": small_params, "target_met": sel.target_met, "actions": len(sel.history)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_args(p)
  p.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated names from tests/real_networks.py")
  p.add_argument("--round-to", type=int, default=8, help="kept widths in multiples of this (1 with --quick)")
  args = p.parse_args(argv)
  names = [n for n in args.networks.split(",") if n]
  unknown = [n for n in names if n not in NETWORKS]
  if unknown:
    p.error(f"unknown networks {unknown}; choose from {', '.join(NETWORKS)}")
  rows = [measure(n, args.quick, 1 if args.quick else args.round_to) for n in names]
  table = common.markdown_table(
      ["network", "params", "GMACs", "trace s", "select s", "materialize s", "prunable", "groups", "blocks",
       "MACs kept", "unfollowed"],
      [(r["name"], f"{r['params'] / 1e6:.2f}M", r["macs"] / 1e9, r["trace_s"], r["select_s"], r["materialize_s"],
        f"{r['prunable_fraction']:.1%}", r["groups"], r["blocks"], f"{r['selected_macs'] / r['macs']:.1%}",
        "; ".join(r["unfollowed"]) or "none") for r in rows])
  return common.write_outputs("any_network", args, {"networks": rows, "quick": args.quick}, table)


if __name__ == "__main__":
  main()
