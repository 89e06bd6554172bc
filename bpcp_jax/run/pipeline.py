"""The BPCP stages in order: pretrain -> block search -> fine-tune -> channel prune -> fine-tune.

``run_pipeline`` reads a config, loads the data once, and runs the configured stages, each in
its own checkpoint directory. The output of one stage (a spec and its variables, plus the gate
logits after the search) is the input of the next; the block decisions and the channel
selection are materialized between stages, so every fine-tune trains an ordinary, smaller
network. With ``resume=True`` finished stages are read back from their final checkpoints and
an interrupted stage continues from its last checkpoint. At the end the run directory gets
``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bpcp_jax.training import data, parallel, steps
from bpcp_jax.pruning.channel_prune import format_report, prune_channels
from bpcp_jax.training.checkpoint import CheckpointError, StageCheckpoints, spec_from_meta
from bpcp_jax.run.config import STAGES, check_config, stage_list
from bpcp_jax.training.loop import MetricsLog, StageRun, evaluate, train_stage
from bpcp_jax.pruning.masks import init_masks
from bpcp_jax.families.materialize import materialize
from bpcp_jax.families.resnet import ResNet
from bpcp_jax.families.structure import group_widths
from bpcp_jax.training.optim import lr_schedule, make_optimizer
from bpcp_jax.families.spec import ArchSpec, dense_spec, parse_model_name

TRAINING_STAGES = ("pretrain", "search", "finetune_blocks", "finetune_channels")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class StageOutput:
  """What a stage hands to the next: the network and, after the search, the gate logits."""

  spec: ArchSpec
  variables: dict[str, Any]
  gates: dict[str, Any]
  accuracy: Optional[float] = None


@dataclasses.dataclass
class RunContext:
  config: Any
  workdir: str
  resume: bool
  train: data.Split
  test: data.Split
  progress: bool

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, "checkpoints", stage)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, "metrics.jsonl")


def build_model(config, spec: ArchSpec) -> ResNet:
  if config.dtype not in DTYPES:
    raise ValueError(f"config key 'dtype' must be one of {sorted(DTYPES)}, got {config.dtype!r}")
  return ResNet(spec=spec, dtype=DTYPES[config.dtype], init_style=config.init_style, bn_axis_name=parallel.AXIS)


def check_run_config(config) -> None:
  """Everything about a config that can be checked before any compute."""
  check_config(config)
  parse_model_name(config.model)
  stage_list(config)
  n_dev = jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    b = config[key]
    if b < 1 or b % n_dev:
      raise ValueError(f"config key {key!r} = {b} must be a positive multiple of the device count ({n_dev})")
  p = config.stages.prune
  if not 0.0 <= p.ratio < 1.0:
    raise ValueError(f"config key 'stages.prune.ratio' must be in [0, 1), got {p.ratio}")
  from bpcp_jax.pruning.channel_prune import CRITERIA, REDUCTIONS, SCOPES, TARGETS
  for key, value, valid in (("criterion", p.criterion, CRITERIA), ("reduce", p.reduce, REDUCTIONS),
                            ("target", p.target, TARGETS), ("scope", p.scope, SCOPES)):
    if value not in valid:
      raise ValueError(f"config key 'stages.prune.{key}' = {value!r} is not one of {', '.join(valid)}")
  if p.selection not in ("criterion", "speed"):
    raise ValueError(f"config key 'stages.prune.selection' = {p.selection!r} is not one of criterion, speed")
  if p.selection == "speed":
    if p.cost not in ("macs", "latency"):
      raise ValueError(f"config key 'stages.prune.cost' = {p.cost!r} is not one of macs, latency")
    if p.latency_batch < 1:
      raise ValueError(f"config key 'stages.prune.latency_batch' must be >= 1, got {p.latency_batch}")
    if p.latency_ms < 0 or (p.latency_ms > 0 and p.cost != "latency"):
      raise ValueError(f"config key 'stages.prune.latency_ms' = {p.latency_ms} needs cost 'latency' and must be >= 0")
    if p.latency_ms == 0 and p.target != "macs":
      raise ValueError("config key 'stages.prune.target' must be 'macs' for speed selection without a latency budget")
  if config.stages.search.gamma < 0:
    raise ValueError(f"config key 'stages.search.gamma' must be >= 0, got {config.stages.search.gamma}")
  for s in TRAINING_STAGES:
    if config.stages[s].epochs < 0:
      raise ValueError(f"config key 'stages.{s}.epochs' must be >= 0, got {config.stages[s].epochs}")
  if config.optim.schedule not in ("step", "cosine", "constant"):
    raise ValueError(f"config key 'optim.schedule' = {config.optim.schedule!r} is not one of step, cosine, constant")


def load_data(config, data_path: Optional[str] = None, progress: bool = True) -> tuple[data.Split, data.Split]:
  d = config.data
  if d.source == "folder":
    path = data_path or d.path or data.default_data_path()
    kw = dict(cache_dir=d.cache_dir or None, progress=progress)
    train = data.load_image_folder(path, "train", max_per_class=d.max_train_per_class or None, **kw)
    test = data.load_image_folder(path, "test", max_per_class=d.max_test_per_class or None, **kw)
    data.check_same_classes(train, test)
  else:
    train, test = data.load_dataset(d.source, data_dir=d.tfds_data_dir or None)
  if len(train.class_names) != config.num_classes:
    raise ValueError(f"config key 'num_classes' = {config.num_classes} but the data has "
                     f"{len(train.class_names)} classes ({', '.join(train.class_names[:5])}, ...)")
  return train, test


def _stage_key(config, stage: str) -> np.ndarray:
  return np.asarray(jax.random.fold_in(jax.random.PRNGKey(config.seed), STAGES.index(stage)))


def _open_stage(ctx: RunContext, stage: str, spec: ArchSpec, spec_key: str = "spec"):
  """The stage's checkpoints and, if any exist, their latest meta (checked against this run's input)."""
  ckpt = StageCheckpoints(ctx.stage_dir(stage), max_to_keep=ctx.config.checkpoint.keep)
  if ckpt.latest_step() is None:
    return ckpt, None
  meta = ckpt.read_meta()
  if meta.get("stage") != stage:
    raise CheckpointError(f"{ckpt.directory} holds checkpoints of stage {meta.get('stage')!r}, not {stage!r}")
  if spec_from_meta({"spec": meta.get(spec_key)}, ckpt.directory) != spec:
    raise CheckpointError(f"{ckpt.directory} holds a checkpoint of another architecture than this run's "
                          f"{stage} stage (model {ctx.config.model}); use another --workdir")
  if not ctx.resume:
    raise CheckpointError(f"{ckpt.directory} already has checkpoints; pass --resume to continue that run "
                          "or choose a new --workdir")
  return ckpt, meta


def run_training_stage(ctx: RunContext, stage: str, inp: StageOutput) -> StageOutput:
  config, scfg = ctx.config, ctx.config.stages[stage]
  model = build_model(config, inp.spec)
  mode = "search" if stage == "search" else "dense"
  spe = data.num_batches(len(ctx.train.labels), config.batch_size)
  total = max(1, spe * scfg.epochs)
  schedule = lr_schedule(scfg.lr, total, config.optim.schedule)
  tx = make_optimizer(schedule, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
                      gate_learning_rate=lr_schedule(config.optim.gate_lr, total, config.optim.schedule))
  gates = (inp.gates or init_masks(inp.spec)["blocks"]) if mode == "search" else {}
  state = steps.create_train_state(inp.variables, tx, _stage_key(config, stage), gates=gates)
  ckpt, meta = _open_stage(ctx, stage, inp.spec)
  start = 0
  log = MetricsLog(ctx.metrics_path)
  later = tuple(STAGES[STAGES.index(stage) + 1:])
  if meta is not None:
    state, meta = ckpt.restore(state)
    start = int(meta["step"])
  if meta is None or not meta.get("done"):  # this stage (re)trains: its replayed lines and later ones go
    log.truncate_after(stage, int(meta["epoch"]) if meta else 0, later)
  run = StageRun(
      name=stage, model=model, tx=tx, schedule=schedule, mode=mode, epochs=scfg.epochs, train=ctx.train,
      test=ctx.test, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, seed=config.seed,
      checkpoints=ckpt, meta={"spec": inp.spec.to_dict(), "model": config.model, "mode": mode},
      metrics_path=ctx.metrics_path, gamma=scfg.get("gamma", 0.0), bn_l1=scfg.get("bn_l1", 0.0),
      every_steps=config.checkpoint.every_steps, log_every=config.log_every_steps,
      eval_every_epochs=config.eval_every_epochs, progress=ctx.progress)
  if meta is not None and meta.get("done"):
    accuracy = meta.get("accuracy")
    if ctx.progress and jax.process_index() == 0:
      tqdm.write(f"[{stage}] already finished in {ckpt.directory}; reusing it")
  else:
    state, last = train_stage(run, state, start_step=start, start_sums=(meta or {}).get("epoch_sums"))
    accuracy = last.get("accuracy")
  ckpt.close()
  return StageOutput(inp.spec, {"params": state.params, "batch_stats": state.batch_stats}, dict(state.gates), accuracy)


def materialize_blocks(config, out: StageOutput) -> StageOutput:
  """Apply the search's decisions (keep iff logit >= 0)."""
  model = build_model(config, out.spec)
  masks = init_masks(out.spec)
  masks["blocks"] = {k: jnp.asarray(v) for k, v in out.gates.items()}
  small, small_vars = materialize(model, out.variables, masks)
  return StageOutput(small.spec, small_vars, {}, None)


def run_prune_stage(ctx: RunContext, inp: StageOutput) -> StageOutput:
  config, p = ctx.config, ctx.config.stages.prune
  model = build_model(config, inp.spec)
  ckpt, meta = _open_stage(ctx, "prune", inp.spec, spec_key="input_spec")
  if meta is not None and meta.get("done"):
    tree, meta = ckpt.restore_raw()
    ckpt.close()
    small_spec = ArchSpec.from_dict(meta["pruned_spec"])
    return StageOutput(small_spec, {"params": tree["params"], "batch_stats": tree["batch_stats"]}, {}, None)
  key = jax.random.PRNGKey(config.seed)
  selection = None
  if p.selection == "speed":
    from bpcp_jax.pruning.speed_select import select_resnet

    target = {"latency_budget_ms": p.latency_ms} if p.latency_ms > 0 else {"macs_fraction": 1.0 - p.ratio}
    masks, report, selection = select_resnet(
        model, inp.variables, criterion=p.criterion, reduce=p.reduce, key=key, cost=p.cost, batch=p.latency_batch,
        round_to=p.round_to, min_channels=p.min_channels, prune_blocks=p.blocks, progress=ctx.progress, **target)
  else:
    masks, report = prune_channels(model, inp.variables, p.ratio, p.criterion, reduce=p.reduce, target=p.target,
                                   scope=p.scope, round_to=p.round_to, min_channels=p.min_channels, key=key)
  small, small_vars = materialize(model, inp.variables, masks)
  tx = make_optimizer(0.0)
  state = steps.create_train_state(small_vars, tx, _stage_key(config, "prune"))
  # the checkpoint's spec is the pruned one: the next stage restores from it alone
  ckpt.save(0, state, {"spec": small.spec.to_dict(), "pruned_spec": small.spec.to_dict(), "input_spec": inp.spec.to_dict(),
                       "stage": "prune", "epoch": 0, "step": 0, "done": True, "report": report,
                       "speed_selection": None if selection is None else {
                           "macs": selection.macs, "dense_macs": selection.dense_macs,
                           "measured_ms": selection.measured_ms, "actions": [h["action"] for h in selection.history]}})
  ckpt.close()
  if jax.process_index() == 0:
    with open(os.path.join(ctx.workdir, "prune_report.md"), "w") as f:
      f.write(f"# Channel selection: {p.criterion}, ratio {p.ratio} of {p.target}\n\n{format_report(report)}\n")
      if selection is not None:
        f.write(_speed_report(p, selection))
  return StageOutput(small.spec, small_vars, {}, None)


def _speed_report(p, selection) -> str:
  lines = [f"\n## Speed-aware selection: cost {p.cost} at batch {p.latency_batch}, round_to {p.round_to}\n",
           f"MACs kept: {selection.macs:,} of {selection.dense_macs:,} ({selection.macs / selection.dense_macs:.1%}); "
           f"target {'met' if selection.target_met else 'NOT met'}."]
  if selection.measured_ms is not None:
    lines.append(f"Measured latency: {selection.measured_ms:.3f} ms (dense {selection.dense_measured_ms:.3f} ms).")
  return "\n".join(lines) + "\n\n" + selection.table() + "\n"


def run_pipeline(config, workdir: str, *, resume: bool = False, data_path: Optional[str] = None,
                 input_dir: Optional[str] = None, progress: bool = True,
                 before_stage: Optional[Callable[[str, Any], None]] = None) -> dict[str, Any]:
  """Run the configured stages in ``workdir``; returns the summary (also written to disk).

  ``before_stage(stage, config)``, when given, is called just before each stage and may change the
  settings of that stage and the later ones (epochs planned from a time budget, as
  experiments/accelerator_run.py does); the changed config is checked again and ``config.json``
  rewritten, so it holds what ran."""
  from bpcp_jax.run import report

  check_run_config(config)
  stages = stage_list(config)
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"work directory {workdir} is not writable")
  train, test = load_data(config, data_path, progress=progress)
  ctx = RunContext(config, os.path.abspath(workdir), resume, train, test, progress)
  _write_config(ctx)

  if input_dir:
    from bpcp_jax.training.checkpoint import load_network

    net, variables, meta = load_network(input_dir)
    gates = {}
    if meta.get("mode") == "search":
      ckpt = StageCheckpoints(input_dir, read_only=True)
      tree, _ = ckpt.restore_raw()
      ckpt.close()
      gates = tree.get("gates") or {}
    # a searched network's recorded accuracy is under its gates; the dense one is measured anew
    current = StageOutput(net.spec, variables, gates, None if gates else meta.get("accuracy"))
  else:
    spec = dense_spec(*parse_model_name(config.model), config.num_classes)
    model = build_model(config, spec)
    variables = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    current = StageOutput(spec, dict(variables), {}, None)

  dense = StageOutput(current.spec, current.variables, {}, current.accuracy)  # the network we start from
  history = {}
  for stage in stages:
    if before_stage is not None:
      before_stage(stage, config)
      check_run_config(config)
      _write_config(ctx)
    if stage == "prune":
      if current.gates:  # pruning channels of a searched network: decide its blocks first
        current = materialize_blocks(config, current)
      current = run_prune_stage(ctx, current)
    else:
      if stage != "search" and current.gates:
        current = materialize_blocks(config, current)
      if config.stages[stage].epochs == 0:
        continue
      current = run_training_stage(ctx, stage, current)
    history[stage] = current
    if stage == "pretrain":
      dense = current
  if current.gates:
    current = materialize_blocks(config, current)
  summary = report.summarize(ctx, dense, current, history)
  report.write_report(ctx.workdir)
  return summary


def _write_config(ctx: RunContext) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(ctx.workdir, "config.json"), "w") as f:
      json.dump(ctx.config.to_dict(), f, indent=2, sort_keys=True)


def evaluate_output(config, out: StageOutput, split: data.Split, progress: bool = True) -> float:
  model = build_model(config, out.spec)
  state = steps.create_train_state(out.variables, make_optimizer(0.0), np.zeros(2, np.uint32))
  p_eval = parallel.parallel_eval_step(model)
  return evaluate(p_eval, parallel.replicate(state), split, config.eval_batch_size, progress=progress)["accuracy"]


def channels_per_group(spec: ArchSpec) -> dict[str, int]:
  return dict(sorted(group_widths(spec).items()))
