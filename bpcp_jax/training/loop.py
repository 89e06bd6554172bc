"""The epoch loop of one training stage: batches in, checkpoints and metrics out.

``train_stage`` runs a stage from a given epoch/step to its end on all devices: host batches
come from ``data.epoch_batches`` (deterministic per seed and epoch, each host reading its own
share), are prefetched onto the devices, and go through the pmapped step. After every epoch
(and every ``every_steps`` steps) the state is checkpointed; a non-finite loss stops the run
before anything is saved over the last good checkpoint. Because data order, augmentation and
gate samples are functions of (seed, epoch, step), resuming from a checkpoint replays exactly
what an uninterrupted run would have done. Ctrl-C raises ``StageInterrupted``: the stage, the
step it stopped at and the last checkpoint written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from bpcp_jax.training import data, files, parallel
from bpcp_jax.pruning.block_search import gate_probabilities
from bpcp_jax.training.checkpoint import NonFiniteState, StageCheckpoints

TIMING_KEYS = ("images_per_s", "epoch_seconds", "time")


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or Inf; the message says where and how to resume."""


class StageInterrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) during a training stage, also during a checkpoint save.

  ``stage``, ``step`` (the last step computed), ``epoch`` (1-based, the one running),
  ``epochs``, and ``checkpoint``: the directory of the last checkpoint of the stage, or None.
  """

  def __init__(self, stage: str, step: int, epoch: int, epochs: int, checkpoint: Optional[str]):
    self.stage, self.step, self.epoch, self.epochs, self.checkpoint = stage, step, epoch, epochs, checkpoint
    super().__init__(f"interrupted in stage {stage!r} at step {step} (epoch {epoch} of {epochs})")


@dataclasses.dataclass
class StageRun:
  """Everything the loop of one stage needs (built by the pipeline)."""

  name: str
  network: Any  # a PrunableNetwork
  tx: Any
  schedule: Callable[[int], float]
  mode: str
  epochs: int
  train: data.Split
  test: data.Split
  batch_size: int
  eval_batch_size: int
  seed: int
  checkpoints: StageCheckpoints
  meta: dict[str, Any]
  metrics_path: str
  gamma: float = 0.0
  bn_l1: float = 0.0
  every_steps: int = 0
  log_every: int = 20
  eval_every_epochs: int = 1
  progress: bool = True  # progress bars; the epoch lines are printed either way
  distill: Any = None  # steps.Distillation: the dense network as a teacher
  teacher_variables: Any = None
  gate_seed: int = 0  # the search's own seed for its gate samples (steps.train_step)

  @property
  def steps_per_epoch(self) -> int:
    return data.num_batches(len(self.train.labels), self.batch_size)


class MetricsLog:
  """``metrics.jsonl``: one JSON line per epoch; truncated on resume so replays do not duplicate."""

  def __init__(self, path: str):
    self.path = path

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_after(self, stage: str, epoch: int, later_stages: tuple[str, ...] = ()) -> None:
    """Drop this stage's lines past ``epoch`` and every line of ``later_stages``."""
    keep = [r for r in self.read()
            if not ((r["stage"] == stage and r["epoch"] > epoch) or r["stage"] in later_stages)]
    self._write(keep)

  def order_stages(self, order: tuple[str, ...]) -> None:
    """Lines grouped by stage in ``order`` (epochs in the order written): a stage that trained
    again after a later one finished (its newest checkpoint was damaged) goes back in its place."""
    records = self.read()
    rank = {s: i for i, s in enumerate(order)}
    ordered = sorted(records, key=lambda r: rank.get(r["stage"], len(order)))  # stable
    if ordered != records:
      self._write(ordered)

  def append(self, record: dict) -> None:
    if jax.process_index() != 0:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def _write(self, records):
    if jax.process_index() != 0:
      return
    files.write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class GateLog:
  """``gates.jsonl``: the keep probability of every block during a search, every ``log_every`` steps
  (how the decisions formed and whether they settled); a resumed search drops the lines past its
  restart step, so the file reads as one uninterrupted search."""

  def __init__(self, path: str):
    self.path = path

  def truncate_after(self, stage: str, step: int) -> None:
    if jax.process_index() != 0 or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and not (json.loads(line)["stage"] == stage
                                                            and json.loads(line)["step"] > step)]
    files.write_text(self.path, "".join(keep))

  def append(self, stage: str, step: int, epoch: int, gates_r) -> None:
    if jax.process_index() != 0:
      return
    probs = gate_probabilities({k: np.asarray(v)[0] for k, v in gates_r.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps({"stage": stage, "step": step, "epoch": epoch,
                          "gate_probs": {k: float(v) for k, v in sorted(probs.items())}}, sort_keys=True) + "\n")


def evaluate(p_eval, state_r, split: data.Split, eval_batch_size: int, *, desc: str = "eval",
             progress: bool = True, axis: str = parallel.AXIS) -> dict[str, float]:
  """Accuracy and mean loss over every example of ``split`` (padding carries weight 0). ``axis``:
  the axis ``p_eval`` is mapped over (``parallel.step_axis`` of its network)."""
  pc, pi = jax.process_count(), jax.process_index()
  local = eval_batch_size // pc
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  batches = data.epoch_batches(len(split.labels), eval_batch_size, seed=0, epoch=0, shuffle=False,
                               drop_remainder=False, process_index=pi, process_count=pc)
  n = data.num_batches(len(split.labels), eval_batch_size, drop_remainder=False)
  for idx in tqdm(batches, total=n, desc=desc, disable=not progress or pi != 0, leave=False):
    images, labels, weight = data.pad_batch(split.images[idx], split.labels[idx], local)
    sums = p_eval(state_r, parallel.shard_batch({"image": images, "label": labels, "weight": weight}, axis=axis))
    for k in totals:
      totals[k] += float(np.asarray(sums[k])[0])
  return {"accuracy": totals["correct"] / max(totals["count"], 1.0), "loss": totals["loss"] / max(totals["count"], 1.0),
          "count": int(totals["count"])}


def _host_batches(run: StageRun, epoch: int, skip: int):
  pc, pi = jax.process_count(), jax.process_index()
  it = data.epoch_batches(len(run.train.labels), run.batch_size, seed=run.seed, epoch=epoch,
                          process_index=pi, process_count=pc)
  for i, idx in enumerate(it):
    if i >= skip:
      yield {"image": run.train.images[idx], "label": run.train.labels[idx]}


def _finite(x) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x))))


def train_stage(run: StageRun, state, *, start_step: int = 0, start_sums: Optional[dict] = None,
                p_eval=None) -> tuple[Any, dict[str, float]]:
  """Train ``state`` (host pytree) from global step ``start_step`` to the end of the stage.

  ``start_sums``: the running metric sums of the interrupted epoch (from the checkpoint's meta),
  so a resumed epoch reports exactly what an uninterrupted one would. Returns the final host
  state and the last test metrics.
  """
  spe = run.steps_per_epoch
  if spe == 0:
    raise ValueError(f"stage {run.name}: the training set ({len(run.train.labels)} images) is smaller than "
                     f"one batch ({run.batch_size})")
  p_step = parallel.parallel_train_step(run.network, run.tx, mode=run.mode, gamma=run.gamma, bn_l1=run.bn_l1,
                                        distill=run.distill, gate_seed=run.gate_seed)
  p_eval = p_eval or parallel.parallel_eval_step(run.network)
  axis = parallel.step_axis(run.network)
  state_r = parallel.replicate(state, axis)
  extra = () if run.distill is None else (parallel.replicate(run.teacher_variables, axis),)
  log = MetricsLog(run.metrics_path)
  gate_log = GateLog(os.path.join(os.path.dirname(run.metrics_path), "gates.jsonl")) if run.mode == "search" else None
  if gate_log is not None:
    gate_log.truncate_after(run.name, start_step)
  progress = {"step": start_step, "epoch": start_step // spe}
  try:
    state_r, last_eval = _epochs(run, state_r, start_step, start_sums, p_step, p_eval, log, progress, extra, gate_log,
                                 axis)
  except KeyboardInterrupt:
    raise StageInterrupted(run.name, progress["step"], min(progress["epoch"] + 1, run.epochs), run.epochs,
                           _last_checkpoint(run.checkpoints)) from None
  host = parallel.unreplicate(state_r)
  return host, last_eval


def _last_checkpoint(checkpoints: StageCheckpoints) -> Optional[str]:
  steps = [s for s in checkpoints.all_steps() if os.path.isdir(checkpoints.step_dir(s))]
  return checkpoints.step_dir(max(steps)) if steps else None


def _epochs(run: StageRun, state_r, start_step, start_sums, p_step, p_eval, log, progress, extra=(), gate_log=None,
            axis: str = parallel.AXIS):
  """The epochs of ``train_stage``; ``progress`` holds the step and epoch reached (for Ctrl-C);
  ``extra``: the step's further arguments (the teacher's variables when distilling); ``axis``: the
  axis the steps are mapped over."""
  spe = run.steps_per_epoch
  last_eval: dict[str, float] = {}
  start_epoch = start_step // spe
  for epoch in range(start_epoch, run.epochs):
    progress["epoch"] = epoch
    skip = start_step - epoch * spe if epoch == start_epoch else 0
    sums = None
    if skip and start_sums:  # device-shaped float32, so the additions replay bit for bit
      sums = {k: np.full((jax.local_device_count(),), v, np.float32) for k, v in start_sums.items()}
    t0 = time.time()
    batches = data.prefetch(_host_batches(run, epoch, skip), size=2,
                            device_put=lambda b: parallel.shard_batch(b, axis=axis))
    bar = tqdm(total=spe, initial=skip, desc=f"{run.name} {epoch + 1}/{run.epochs}", unit="step",
               disable=not run.progress or jax.process_index() != 0, leave=False)
    step = epoch * spe + skip
    with batches:
      for batch in batches:
        state_r, metrics = p_step(state_r, batch, *extra)
        sums = metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)
        step += 1
        progress["step"] = step
        bar.update(1)
        if step % run.log_every == 0 or step % spe == 0:
          loss = float(np.asarray(metrics["loss"])[0])
          if not math.isfinite(loss):
            raise NonFiniteLoss(_nan_message(run, epoch, step))
          done = (step - epoch * spe - skip) * run.batch_size
          bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{done / max(time.time() - t0, 1e-9):.0f}")
          if gate_log is not None:
            gate_log.append(run.name, step, epoch, state_r.gates)
        if run.every_steps and step % run.every_steps == 0 and step % spe:
          _save(run, state_r, step, epoch, metrics=None,
                extra={"epoch_sums": {k: float(np.asarray(v)[0]) for k, v in sums.items()}})
    bar.close()
    seconds = time.time() - t0
    train = {k: float(np.asarray(v)[0]) / spe for k, v in sums.items()}
    if not math.isfinite(train["loss"]):
      raise NonFiniteLoss(_nan_message(run, epoch, step))
    record = {"stage": run.name, "epoch": epoch + 1, "step": step, "lr": float(run.schedule(step - 1)),
              "train_loss": train["loss"], "train_ce": train["ce"], "train_accuracy": train["accuracy"],
              "images_per_s": (spe - skip) * run.batch_size / max(seconds, 1e-9), "epoch_seconds": seconds}
    host = parallel.unreplicate(state_r)
    if host.gates:
      probs = gate_probabilities(host.gates)
      record["gate_probs"] = {k: float(v) for k, v in sorted(probs.items())}
      record["blocks_kept"] = int(sum(float(v) >= 0.5 for v in probs.values()))
    record["blocks"] = len(run.network.block_names)
    record["channels"] = int(sum(run.network.group_widths.values()))
    last_epoch = epoch + 1 == run.epochs
    if last_epoch or (run.eval_every_epochs and (epoch + 1) % run.eval_every_epochs == 0):
      last_eval = evaluate(p_eval, state_r, run.test, run.eval_batch_size, desc=f"{run.name} eval",
                           progress=run.progress, axis=axis)
      record.update({"test_accuracy": last_eval["accuracy"], "test_loss": last_eval["loss"]})
    # the line goes first: a kill between the two replays the epoch, and resume drops the line
    log.append(record)
    _save(run, state_r, step, epoch + 1, metrics={"accuracy": last_eval["accuracy"]} if "test_accuracy" in record
          else None, done=last_epoch, host=host)
    if jax.process_index() == 0:  # with progress off too (it hides the bars only)
      acc = f", test acc {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
      tqdm.write(f"[{run.name}] epoch {epoch + 1}/{run.epochs}: loss {record['train_loss']:.4f}, "
                 f"train acc {record['train_accuracy']:.4f}{acc}, {record['images_per_s']:.0f} img/s")
  return state_r, last_eval


def _save(run: StageRun, state_r, step: int, epoch: int, metrics, done: bool = False, host=None, extra=None):
  host = parallel.unreplicate(state_r) if host is None else host
  meta = {**run.meta, "stage": run.name, "epoch": epoch, "step": step, "done": done,
          "steps_per_epoch": run.steps_per_epoch, "epochs": run.epochs, **(extra or {})}
  if metrics:
    meta["accuracy"] = metrics["accuracy"]
  try:
    run.checkpoints.save(step, host, meta, metrics=metrics)
  except NonFiniteState as e:  # weights went non-finite before the loss showed it
    raise NonFiniteLoss(_nan_message(run, (step - 1) // run.steps_per_epoch, step) + f" ({e})") from e


def _nan_message(run: StageRun, epoch: int, step: int) -> str:
  last = run.checkpoints.latest_step()
  where = f"the last good checkpoint is step {last} in {run.checkpoints.directory}" if last is not None else \
      "no checkpoint of this stage was written yet"
  return (f"non-finite loss in stage {run.name!r} at epoch {epoch + 1}, step {step}; {where}. "
          f"Resume with --resume and a lower learning rate, e.g. --config.stages.{run.name}.lr=<smaller>")
