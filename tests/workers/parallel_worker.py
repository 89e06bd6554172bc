"""Runs a few train steps on every device of this process (and of the other processes when
launched as one of several), and saves the losses and final parameters for a test to compare.

  python tests/workers/parallel_worker.py --mode search --steps 3 --out OUT.npz [--reference]
      [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I]

``--reference`` runs the same global batches through the plain jitted step on one device.
"""

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mode", default="dense")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--out", required=True)
  ap.add_argument("--reference", action="store_true")
  ap.add_argument("--coordinator")
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  a = ap.parse_args()
  if a.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                               process_id=a.process_id)
  import functools

  import numpy as np

  import bpcp_jax as bp
  from bpcp_jax.training import data, parallel, steps
  from bpcp_jax.training.optim import make_optimizer

  from bpcp_jax.families.provider import FamilyNetwork

  model = bp.create_model("resnet_v2_11")
  network = FamilyNetwork.of(model)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  tx = make_optimizer(0.1)
  gates = bp.init_masks(model)["blocks"] if a.mode == "search" else None
  state = steps.create_train_state(variables, tx, jax.random.PRNGKey(1), gates=gates)
  rng = np.random.default_rng(0)  # the same synthetic data set in every process
  images = rng.integers(0, 256, (a.batch * a.steps, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, a.batch * a.steps).astype(np.int32)
  losses = []
  if a.reference:
    fn = jax.jit(functools.partial(steps.train_step, network=network, tx=tx, mode=a.mode, gamma=0.1))
    for idx in data.epoch_batches(len(labels), a.batch, seed=0, epoch=0):
      state, m = fn(state, {"image": images[idx], "label": labels[idx]})
      losses.append(float(m["loss"]))
    params = state.params
  else:
    p_step = parallel.parallel_train_step(network, tx, mode=a.mode, gamma=0.1)
    state_r = parallel.replicate(state)
    for idx in data.epoch_batches(len(labels), a.batch, seed=0, epoch=0, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
      state_r, m = p_step(state_r, parallel.shard_batch({"image": images[idx], "label": labels[idx]}))
      losses.append(float(np.asarray(m["loss"])[0]))
    params = parallel.unreplicate(state_r).params
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(a.out, losses=np.asarray(losses), devices=jax.device_count(), **flat)
  if a.coordinator:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
