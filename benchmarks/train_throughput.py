"""Training-step throughput: dense, BP search and masked fine-tune steps, side by side.

Times the step functions the training loop runs (``parallel.parallel_train_step``: pmap over the
local devices, old state donated, augmentation inside the step) on uint8 batches already on the
device, and the same ``steps.train_step`` under ``jax.jit`` for comparison. The modes are timed
in interleaved rounds in one process, so their ratio is measured under the same conditions.
Compile time is the first call minus a steady step. Peak memory is the maximum resident size of
a fresh process that compiles and runs one mode (``--peak-memory``). The process runs with the
host allocator the command line picks (``bpcp_jax/run/host.py``); ``--compare-allocators`` times the
dense and search steps under every allocator available, one fresh process each.

    python -m benchmarks.train_throughput --json benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import sys

from benchmarks import common

if __name__ == "__main__":  # with the command line's allocator, before jax starts
  common.restart_with_allocator("benchmarks.train_throughput", sys.argv[1:])

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bpcp_jax as bp  # noqa: E402
from bpcp_jax.families.provider import FamilyNetwork  # noqa: E402
from bpcp_jax.training import optim, parallel, steps  # noqa: E402
from bpcp_jax.pruning.channel_prune import prune_channels  # noqa: E402

MODES = ("dense", "search", "masked")
# No ratio to PyTorch here: a ratio is measured with both sides in one run (python -m benchmarks.vs_pytorch),
# never against a figure from another machine or day.


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(mode: str, model_name: str, batch: int, seed: int = 0, dtype: str = "float32"):
  """(model, tx, host state, host batch) for one step kind, as the pipeline builds them (``dtype``: the
  compute dtype, as the config's ``dtype``; parameters stay float32)."""
  model = bp.create_model(model_name, dtype=DTYPES[dtype])
  variables = common.fast_init(model, seed)
  tx = optim.make_optimizer(0.1)
  gates, channels = None, None
  if mode in ("search", "masked"):
    gates = bp.init_masks(model)["blocks"]
  if mode == "masked":  # fine-tuning under fixed masks: half of the MACs' channels masked, widths by 8
    masks, _ = prune_channels(model, variables, 0.5, "l1", target="macs", round_to=8)
    channels = masks["channels"]
  state = steps.create_train_state(variables, tx, jax.random.PRNGKey(seed + 1), gates=gates,
                                   channel_masks=channels)
  rng = np.random.default_rng(seed)
  host_batch = {"image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
                "label": rng.integers(0, 10, (batch,), dtype=np.int32)}
  return model, tx, state, host_batch


def make_runner(mode: str, wrapper: str, model_name: str, batch: int, dtype: str = "float32"):
  """A closure running one step (state kept inside), with its first-call time."""
  model, tx, state, host_batch = build(mode, model_name, batch, dtype=dtype)
  network = FamilyNetwork.of(model)
  if wrapper == "pmap":
    fn = parallel.parallel_train_step(network, tx, mode=mode, gamma=0.05)
    box = {"state": parallel.replicate(state)}
    dev_batch = parallel.shard_batch(host_batch)
  else:  # one device, plain jit; BN statistics are local (no mapped axis)
    fn = jax.jit(functools.partial(steps.train_step, network=network, tx=tx, mode=mode, gamma=0.05),
                 donate_argnums=(0,))
    box = {"state": jax.device_put(state)}
    dev_batch = jax.device_put(host_batch)

  def run():
    box["state"], metrics = fn(box["state"], dev_batch)
    return metrics

  first = common.timed(run)
  return run, first


def measure(configs, steps_per_round: int, repeats: int, *, threads: int = 1, deadline: float | None = None,
            on_built=None, on_round=None) -> dict:
  """Time the train step of every config ``(mode, wrapper, model_name, batch, dtype)``, rounds interleaved.

  The runners are built (and their steps compiled) by ``threads`` threads; with a ``deadline``
  (``time.time()`` seconds) a config not yet started by then is skipped, and rounds stop at the
  deadline after the first. Returns ``{config: {"images_per_s", "step_s", "first_call_s",
  "compile_s", "step_times_s"}}`` for the configs measured (``compile_s``: first call minus a
  steady step; with several threads the compilations overlap, so each took longer than alone).
  ``on_built(config)`` is called as each runner is ready, ``on_round(results so far)`` after each round."""
  import concurrent.futures
  import time

  def build_one(cfg):
    if deadline is not None and time.time() > deadline:
      return None
    out = make_runner(cfg[0], cfg[1], cfg[2], cfg[3], cfg[4])
    if on_built:
      on_built(cfg)
    return out

  if threads > 1:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      built = dict(zip(configs, pool.map(build_one, configs)))
  else:
    built = {cfg: build_one(cfg) for cfg in configs}
  runners = {cfg: b for cfg, b in built.items() if b is not None}
  times = {cfg: [] for cfg in runners}

  def results():
    out = {}
    for cfg, ts in times.items():
      step, first = common.median(ts), runners[cfg][1]
      out[cfg] = {"images_per_s": cfg[3] / step, "step_s": step, "first_call_s": first,
                  "compile_s": max(first - step, 0.0), "step_times_s": list(ts)}
    return out

  for r in range(repeats):
    if r and deadline is not None and time.time() > deadline:
      break
    for cfg, (run, _) in runners.items():
      times[cfg].append(sum(common.timed(run) for _ in range(steps_per_round)) / steps_per_round)
    if on_round:
      on_round(results())
  return results()


def _child(mode: str, model_name: str, batch: int, steps_: int, repeats: int, allocator=None) -> dict:
  """Run ``mode`` in a fresh process (as it is, or restarted with ``allocator``): its JSON line."""
  from bpcp_jax.run import host

  cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--_child", mode, "--model", model_name,
         "--batch", str(batch), "--steps", str(steps_), "--repeats", str(repeats)]
  env = dict(os.environ)
  if allocator is not None:  # undo this process's allocator, let the child choose the named one
    for k in (*host.SET_VARIABLES, host.DONE, host.OPT_OUT):  # a named allocator overrides an opt-out
      env.pop(k, None)
    env[host.CHOICE] = allocator
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=_repo_root(), env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _repo_root():
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_main(args) -> None:
  run, _ = make_runner(args._child, "pmap", args.model, args.batch)
  times = [sum(common.timed(run) for _ in range(args.steps)) / args.steps for _ in range(args.repeats)]
  print(json.dumps({"peak_rss_gib": common.peak_rss_gib(), "images_per_s": args.batch / common.median(times),
                    "allocator": common.environment()["host_allocator"]}))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(p)
  p.add_argument("--model", default="resnet_v2_56")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype of the network")
  p.add_argument("--steps", type=int, default=3, help="steps per timed round")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--wrappers", default="pmap,jit", help="pmap (what the loop runs) and/or jit")
  p.add_argument("--peak-memory", action="store_true", help="max RSS of a fresh process per mode")
  p.add_argument("--compare-allocators", action="store_true",
                 help="also time the dense and search steps in a fresh process per available host allocator")
  p.add_argument("--allocators", default="",
                 help="with --compare-allocators: only these (comma-separated; default every available one)")
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:
    child_main(args)
    return {}
  if args.quick:
    args.model, args.batch, args.steps, args.repeats = "resnet_v2_11", 8, 1, 1
    args.wrappers = "pmap"
  modes = [m for m in args.modes.split(",") if m]
  wrappers = [w for w in args.wrappers.split(",") if w]
  if args.batch % jax.local_device_count():
    raise SystemExit(f"--batch {args.batch} must divide over {jax.local_device_count()} devices")

  configs = [(m, w, args.model, args.batch, args.dtype) for w in wrappers for m in modes]
  measured = measure(configs, args.steps, args.repeats)  # rounds interleaved over every (mode, wrapper)
  runners = [(m, w) for m, w, *_ in configs]

  results: dict = {"model": args.model, "batch": args.batch, "dtype": args.dtype, "steps_per_round": args.steps,
                   "repeats": args.repeats, "devices": jax.local_device_count(), "step_times_s": {}}
  rows = []
  for (m, w, *_), r in measured.items():
    suffix = "" if w == "pmap" else "_jit"
    results[f"{m}_step{suffix}_images_per_s"] = r["images_per_s"]
    results[f"{m}_step{suffix}_compile_s"] = r["compile_s"]
    results["step_times_s"][f"{m}_{w}"] = r["step_times_s"]
  for w in wrappers:
    suffix = "" if w == "pmap" else "_jit"
    if "dense" in modes and "search" in modes:
      results[f"search_over_dense{suffix}"] = (results[f"search_step{suffix}_images_per_s"]
                                               / results[f"dense_step{suffix}_images_per_s"])
  if args.peak_memory:
    for m in modes:
      results[f"{m}_peak_rss_gib"] = _child(m, args.model, args.batch, 5, 2)["peak_rss_gib"]
  else:
    results["process_peak_rss_gib"] = common.peak_rss_gib()
  if args.compare_allocators:
    # one fresh process per (allocator, mode), rounds of the allocators interleaved
    from bpcp_jax.run.host import available_allocators

    allocators = [a for a in available_allocators() if not args.allocators or a in args.allocators.split(",")]
    per = {(a, m): [] for a in allocators for m in ("dense", "search")}
    for _ in range(1 if args.quick else 2):
      for a in allocators:
        for m in ("dense", "search"):
          per[(a, m)].append(_child(m, args.model, args.batch, args.steps, args.repeats, allocator=a))
    results["allocators"] = {f"{a}_{m}": {"images_per_s": common.median([r["images_per_s"] for r in rs]),
                                          "runs_images_per_s": [r["images_per_s"] for r in rs],
                                          "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                                          "ran_with": sorted({r["allocator"] for r in rs})}
                             for (a, m), rs in per.items()}

  for (m, w) in runners:
    suffix = "" if w == "pmap" else "_jit"
    ips = results[f"{m}_step{suffix}_images_per_s"]
    rows.append([m, w, ips, 1000 * args.batch / ips, results[f"{m}_step{suffix}_compile_s"],
                 results.get(f"{m}_peak_rss_gib", float("nan")) if w == "pmap" else float("nan")])
  table = common.markdown_table(["step", "wrapper", "images/s", "ms/step", "compile s", "peak RSS GiB"], rows)
  extra = []
  for w in wrappers:
    suffix = "" if w == "pmap" else "_jit"
    if f"search_over_dense{suffix}" in results:
      extra.append(f"search / dense ({w}): {results[f'search_over_dense{suffix}']:.2f}")
  if extra:
    table += "\n\n" + "\n".join(f"- {e}" for e in extra)
  if "allocators" in results:
    alloc_rows = [[a, results["allocators"][f"{a}_dense"]["images_per_s"],
                   results["allocators"][f"{a}_search"]["images_per_s"],
                   max(results["allocators"][f"{a}_{m}"]["peak_rss_gib"] for m in ("dense", "search"))]
                  for a in allocators]
    table += "\n\nHost allocator (a fresh process each, pmap steps, median of 2 interleaved runs):\n\n" + common.markdown_table(
        ["allocator", "dense img/s", "search img/s", "peak RSS GiB"], alloc_rows)
  common.write_outputs("train_throughput", args, results, table)
  return results


if __name__ == "__main__":
  main()
