"""Input pipeline: images/s the data path delivers, beside what the training step consumes.

The host path is the training loop's: ``data.epoch_batches`` indices into uint8 arrays held in
memory, ``parallel.shard_batch`` onto the devices, ``data.prefetch`` in a background thread.
It runs on CIFAR-sized synthetic arrays (50,000 x 32x32x3 uint8), or on the real cached CIFAR-10
with ``--real PATH``. The on-device augmentation (``steps.augment_batch``: pad, random crop,
flip, normalize) is timed on its own under jit; in training it runs inside the step. The dense
step's consumption comes from ``--train-json`` (a ``train_throughput`` result) or is measured.

    python -m benchmarks.input_pipeline --json benchmarks/results/input_pipeline.json
"""

from __future__ import annotations

import sys

from benchmarks import common

if __name__ == "__main__":  # with the command line's allocator, before jax starts
  common.restart_with_allocator("benchmarks.input_pipeline", sys.argv[1:])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bpcp_jax.training import data, parallel, steps  # noqa: E402


def host_batches(images, labels, batch, epoch=0):
  for idx in data.epoch_batches(len(labels), batch, seed=0, epoch=epoch):
    yield {"image": images[idx], "label": labels[idx]}


def rate(iterable, batch: int, limit: int) -> float:
  """Images/s pulling up to ``limit`` batches (each made ready on its device)."""
  n, t = 0, time.perf_counter()
  for b in iterable:
    jax.block_until_ready(b)
    n += 1
    if n >= limit:
      break
  return n * batch / (time.perf_counter() - t)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(p)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--examples", type=int, default=50_000)
  p.add_argument("--batches", type=int, default=390, help="batches per timed round (390 = one CIFAR epoch)")
  p.add_argument("--real", default=None, help="a CIFAR-10 image-folder archive (data.load_image_folder)")
  p.add_argument("--train-json", default=None, help="train_throughput JSON whose dense step rate to show")
  args = p.parse_args(argv)
  if args.quick:
    args.examples, args.batches, args.batch, args.repeats = 2048, 8, 32, 1

  if args.real:
    split = data.load_image_folder(args.real, "train")
    images, labels, source = split.images, split.labels, f"CIFAR-10 from {args.real}"
  else:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.examples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (args.examples,), dtype=np.int32)
    source = f"synthetic uint8 {images.shape}"
  limit = min(args.batches, data.num_batches(len(labels), args.batch))

  aug = jax.jit(lambda key, im: steps.augment_batch(key, im, np.arange(im.shape[0])))
  dev = jax.device_put(images[: args.batch])
  jax.block_until_ready(aug(jax.random.PRNGKey(0), dev))

  rounds = {"host_index": [], "host_index_shard": [], "prefetch_shard": [], "augment_on_device": []}
  for r in range(args.repeats):
    rounds["host_index"].append(rate(host_batches(images, labels, args.batch, r), args.batch, limit))
    rounds["host_index_shard"].append(
        rate((parallel.shard_batch(b) for b in host_batches(images, labels, args.batch, r)), args.batch, limit))
    with data.prefetch(host_batches(images, labels, args.batch, r), size=2, device_put=parallel.shard_batch) as it:
      rounds["prefetch_shard"].append(rate(it, args.batch, limit))
    t = time.perf_counter()
    for i in range(min(limit, 50)):
      jax.block_until_ready(aug(jax.random.PRNGKey(i), dev))
    rounds["augment_on_device"].append(min(limit, 50) * args.batch / (time.perf_counter() - t))

  results = {"source": source, "batch": args.batch, "batches_per_round": limit, "repeats": args.repeats,
             "rounds_images_per_s": rounds}
  for k, v in rounds.items():
    results[f"{k}_images_per_s"] = common.median(v)
  train_rate, train_src = None, None
  if args.train_json and os.path.exists(args.train_json):
    with open(args.train_json) as f:
      train = json.load(f)["results"]
    train_rate, train_src = train.get("dense_step_images_per_s"), args.train_json
  elif not args.quick:
    from benchmarks import train_throughput

    run, _ = train_throughput.make_runner("dense", "pmap", "resnet_v2_56", args.batch)
    times = [common.timed(run) for _ in range(3)]
    train_rate, train_src = args.batch / common.median(times), "measured here (dense step, pmap, 3 steps)"
  if train_rate:
    results["train_step_images_per_s"] = train_rate
    results["train_step_source"] = train_src
    results["pipeline_over_train_step"] = results["prefetch_shard_images_per_s"] / train_rate

  desc = {"host_index": "epoch_batches + uint8 indexing (host only)",
          "host_index_shard": "... + parallel.shard_batch (device copy), serial",
          "prefetch_shard": "... the loop's path: data.prefetch(device_put=parallel.shard_batch)",
          "augment_on_device": "steps.augment_batch under jit (runs inside the train step)"}
  rows = [[k, desc[k], results[f"{k}_images_per_s"]] for k in rounds]
  if train_rate:
    rows.append(["train_step", f"dense ResNet-v2-56 step consumes ({train_src})", train_rate])
  table = common.markdown_table(["stage", "what", "images/s"], rows)
  table += f"\n\nSource: {source}; batch {args.batch}; {limit} batches per round; median of {args.repeats} rounds."
  common.write_outputs("input_pipeline", args, results, table)
  return results


if __name__ == "__main__":
  main()
