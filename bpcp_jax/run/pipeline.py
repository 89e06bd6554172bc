"""The BPCP stages in order: pretrain -> block search -> fine-tune -> channel prune -> fine-tune.

``run_pipeline`` reads a config, loads the data once, and runs the configured stages, each in
its own checkpoint directory, on a ``PrunableNetwork`` (``bpcp_jax.pruning.network``): one of the
ResNet families (``model=resnet_v2_56``) or any Flax classifier (``model=path/to/file.py:make_model``,
traced). The output of one stage (a network and its variables, plus the gate logits after the
search) is the input of the next; the block decisions and the channel
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
from bpcp_jax.pruning.channel_prune import format_report
from bpcp_jax.training.checkpoint import CheckpointError, StageCheckpoints, network_meta
from bpcp_jax.run.config import STAGES, check_config, stage_list
from bpcp_jax.training.loop import MetricsLog, StageRun, evaluate, train_stage
from bpcp_jax.pruning.block_search import BLOCK_METHODS, select_blocks
from bpcp_jax.pruning.network import PrunableNetwork, network_from_description
from bpcp_jax.families.provider import DTYPES, FamilyNetwork
from bpcp_jax.families.spec import parse_model_name
from bpcp_jax.training.optim import lr_schedule, make_optimizer

TRAINING_STAGES = ("pretrain", "search", "finetune_blocks", "finetune_channels")


@dataclasses.dataclass
class StageOutput:
  """What a stage hands to the next: the network and, after the search, the gate logits."""

  network: PrunableNetwork
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


def is_family(model: str) -> bool:
  """Whether ``model`` names a ResNet family network (else it is a factory reference)."""
  return ":" not in model


def build_network(config, input_shape=(32, 32, 3)) -> PrunableNetwork:
  """The dense network ``config.model`` names: a family (``resnet_v2_56``) or a Flax factory
  (``path/to/file.py:make_model`` / ``package.module:make_model``, called with ``num_classes``)."""
  if config.dtype not in DTYPES:
    raise ValueError(f"config key 'dtype' must be one of {sorted(DTYPES)}, got {config.dtype!r}")
  if is_family(config.model):
    return FamilyNetwork.create(config.model, config.num_classes, dtype=config.dtype,
                                init_style=config.init_style, image_size=input_shape[0])
  from bpcp_jax.tracer.provider import FlaxNetwork

  return FlaxNetwork.from_factory(config.model, config.num_classes, input_shape)


def check_run_config(config) -> None:
  """Everything about a config that can be checked before any compute."""
  check_config(config)
  if is_family(config.model):
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
  s = config.stages.search
  if s.method not in BLOCK_METHODS:
    raise ValueError(f"config key 'stages.search.method' = {s.method!r} is not one of {', '.join(BLOCK_METHODS)}")
  if s.method != "bp" and s.blocks < 0:
    raise ValueError(f"config key 'stages.search.blocks' must be >= 0, got {s.blocks}")
  for st in ("finetune_blocks", "finetune_channels"):
    if config.stages[st].distill < 0 or not 0.0 <= config.stages[st].distill_weight <= 1.0:
      raise ValueError(f"config keys 'stages.{st}.distill' (a temperature, 0 = off) must be >= 0 and "
                       f"'stages.{st}.distill_weight' in [0, 1]")
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


def _open_stage(ctx: RunContext, stage: str, network: PrunableNetwork, key: str = "network"):
  """The stage's checkpoints and, if any exist, their latest meta (checked against this run's input)."""
  ckpt = StageCheckpoints(ctx.stage_dir(stage), max_to_keep=ctx.config.checkpoint.keep)
  if ckpt.latest_step() is None:
    return ckpt, None
  meta = ckpt.read_meta()
  if meta.get("stage") != stage:
    raise CheckpointError(f"{ckpt.directory} holds checkpoints of stage {meta.get('stage')!r}, not {stage!r}")
  if not _same_network(network_meta(meta, key, ckpt.directory), network.describe()):
    raise CheckpointError(f"{ckpt.directory} holds a checkpoint of another architecture than this run's "
                          f"{stage} stage (model {ctx.config.model}); use another --workdir")
  if not ctx.resume:
    raise CheckpointError(f"{ckpt.directory} already has checkpoints; pass --resume to continue that run "
                          "or choose a new --workdir")
  return ckpt, meta


def _same_network(stored: dict, current: dict) -> bool:
  stored, current = (json.loads(json.dumps(d, sort_keys=True)) for d in (stored, current))
  if stored.get("kind", "family") == "family" and current["kind"] == "family":
    return stored["spec"] == current["spec"]  # dtype and init style do not change the architecture
  return stored == current


def _network_meta(network: PrunableNetwork, key: str = "network") -> dict:
  """``{key: description}``, plus the family spec under the older key for older readers."""
  desc = network.describe()
  meta = {key: desc}
  if desc["kind"] == "family":
    meta[{"network": "spec", "input_network": "input_spec"}[key]] = desc["spec"]
  return meta


def _distillation(ctx: RunContext, stage: str, teacher: Optional["StageOutput"]):
  scfg = ctx.config.stages[stage]
  if not scfg.get("distill", 0.0) or teacher is None:
    return None, None
  return steps.Distillation(teacher.network, float(scfg.distill), float(scfg.distill_weight)), teacher.variables


def run_training_stage(ctx: RunContext, stage: str, inp: StageOutput,
                       teacher: Optional[StageOutput] = None) -> StageOutput:
  config, scfg = ctx.config, ctx.config.stages[stage]
  network = inp.network
  mode = "search" if stage == "search" else "dense"
  spe = data.num_batches(len(ctx.train.labels), config.batch_size)
  total = max(1, spe * scfg.epochs)
  schedule = lr_schedule(scfg.lr, total, config.optim.schedule)
  tx = make_optimizer(schedule, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
                      gate_learning_rate=lr_schedule(config.optim.gate_lr, total, config.optim.schedule))
  gates = (inp.gates or network.init_masks()["blocks"]) if mode == "search" else {}
  state = steps.create_train_state(inp.variables, tx, _stage_key(config, stage), gates=gates)
  ckpt, meta = _open_stage(ctx, stage, network)
  start = 0
  log = MetricsLog(ctx.metrics_path)
  later = tuple(STAGES[STAGES.index(stage) + 1:])
  if meta is not None:
    state, meta = ckpt.restore(state)
    start = int(meta["step"])
  if meta is None or not meta.get("done"):  # this stage (re)trains: its replayed lines and later ones go
    log.truncate_after(stage, int(meta["epoch"]) if meta else 0, later)
  distill, teacher_vars = _distillation(ctx, stage, teacher)
  run = StageRun(
      name=stage, network=network, tx=tx, schedule=schedule, mode=mode, epochs=scfg.epochs, train=ctx.train,
      test=ctx.test, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, seed=config.seed,
      checkpoints=ckpt, meta={**_network_meta(network), "model": config.model, "mode": mode},
      metrics_path=ctx.metrics_path, gamma=scfg.get("gamma", 0.0), bn_l1=scfg.get("bn_l1", 0.0),
      every_steps=config.checkpoint.every_steps, log_every=config.log_every_steps,
      eval_every_epochs=config.eval_every_epochs, progress=ctx.progress, distill=distill,
      teacher_variables=teacher_vars)
  if meta is not None and meta.get("done"):
    accuracy = meta.get("accuracy")
    if ctx.progress and jax.process_index() == 0:
      tqdm.write(f"[{stage}] already finished in {ckpt.directory}; reusing it")
  else:
    state, last = train_stage(run, state, start_step=start, start_sums=(meta or {}).get("epoch_sums"))
    accuracy = last.get("accuracy")
  ckpt.close()
  return StageOutput(network, {"params": state.params, "batch_stats": state.batch_stats}, dict(state.gates), accuracy)


def select_block_stage(ctx: RunContext, inp: StageOutput) -> StageOutput:
  """The search stage with a rule instead of the learned search (``stages.search.method``):
  ``random`` blocks, the ``last`` blocks of every stage, or the least ``importance``; the gates it
  returns decide the blocks as a search would (no training)."""
  s = ctx.config.stages.search
  logits = select_blocks(inp.network, inp.variables, s.method, s.blocks, seed=s.select_seed)
  if jax.process_index() == 0 and ctx.progress:
    removed = [b for b, v in logits.items() if v < 0]
    tqdm.write(f"[search] method {s.method}: removing {len(removed)} of {len(logits)} blocks: {', '.join(removed)}")
  return StageOutput(inp.network, inp.variables, logits, None)


def materialize_blocks(config, out: StageOutput) -> StageOutput:
  """Apply the search's decisions (keep iff logit >= 0)."""
  masks = out.network.init_masks()
  masks["blocks"] = {k: jnp.asarray(v) for k, v in out.gates.items()}
  small, small_vars = out.network.materialize(out.variables, masks)
  return StageOutput(small, small_vars, {}, None)


def run_prune_stage(ctx: RunContext, inp: StageOutput) -> StageOutput:
  config, p = ctx.config, ctx.config.stages.prune
  network = inp.network
  ckpt, meta = _open_stage(ctx, "prune", network, key="input_network")
  if meta is not None and meta.get("done"):
    tree, meta = ckpt.restore_raw()
    ckpt.close()
    small = network_from_description(network_meta(meta, "network", ckpt.directory))
    return StageOutput(small, {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}, {}, None)
  key = jax.random.PRNGKey(config.seed)
  selection = None
  if p.selection == "speed":
    target = {"latency_budget_ms": p.latency_ms} if p.latency_ms > 0 else {"macs_fraction": 1.0 - p.ratio}
    masks, report, selection = network.select_speed(
        inp.variables, criterion=p.criterion, reduce=p.reduce, key=key, cost=p.cost, batch=p.latency_batch,
        round_to=p.round_to, min_channels=p.min_channels, prune_blocks=p.blocks, progress=ctx.progress, **target)
  else:
    scores = network.channel_importance(inp.variables, p.criterion, reduce=p.reduce, key=key)
    masks, report = network.select_channels(scores, p.ratio, target=p.target, scope=p.scope, round_to=p.round_to,
                                            min_channels=p.min_channels)
  small, small_vars = network.materialize(inp.variables, masks)
  tx = make_optimizer(0.0)
  state = steps.create_train_state(small_vars, tx, _stage_key(config, "prune"))
  # the checkpoint's network is the pruned one: the next stage restores from it alone
  meta = {**_network_meta(small), **_network_meta(network, "input_network"), "stage": "prune", "epoch": 0,
          "step": 0, "done": True, "report": report,
          "speed_selection": None if selection is None else {
              "macs": selection.macs, "dense_macs": selection.dense_macs,
              "measured_ms": selection.measured_ms, "actions": [h["action"] for h in selection.history]}}
  if "spec" in meta:
    meta["pruned_spec"] = meta["spec"]
  ckpt.save(0, state, meta)
  ckpt.close()
  if jax.process_index() == 0:
    with open(os.path.join(ctx.workdir, "prune_report.md"), "w") as f:
      f.write(f"# Channel selection: {p.criterion}, ratio {p.ratio} of {p.target}\n\n{format_report(report)}\n")
      if selection is not None:
        f.write(_speed_report(p, selection))
  return StageOutput(small, small_vars, {}, None)


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
  if config.init_from and "pretrain" in stages and not input_dir:
    stages.remove("pretrain")  # the given weights are the trained dense network
    if jax.process_index() == 0:
      tqdm.write(f"[pretrain] skipped: starting from the trained weights in {config.init_from}")
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"work directory {workdir} is not writable")
  train, test = load_data(config, data_path, progress=progress)
  ctx = RunContext(config, os.path.abspath(workdir), resume, train, test, progress)
  _write_config(ctx)

  current = initial_network(config, ctx, input_dir)
  dense = StageOutput(current.network, current.variables, {}, current.accuracy)  # the network we start from
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
    elif stage == "search" and not current.network.block_names:
      if jax.process_index() == 0:
        tqdm.write(f"[search] skipped: {current.network.label} has no residual blocks to search "
                   "(blocks are adds x + f(x) or shortcut(x) + f(x))")
      continue
    elif stage == "search" and config.stages.search.method != "bp":
      current = select_block_stage(ctx, current)
    else:
      if stage != "search" and current.gates:
        current = materialize_blocks(config, current)
      if config.stages[stage].epochs == 0:
        continue
      current = run_training_stage(ctx, stage, current, teacher=dense if stage != "pretrain" else None)
    history[stage] = current
    if stage == "pretrain":
      dense = current
  if current.gates:
    current = materialize_blocks(config, current)
  summary = report.summarize(ctx, dense, current, history)
  report.write_report(ctx.workdir)
  return summary


def initial_network(config, ctx: RunContext, input_dir: Optional[str] = None) -> StageOutput:
  """What the first stage starts from: a stage checkpoint (``--from``), the user's trained weights
  (``init_from``), or a freshly initialised ``config.model``."""
  if input_dir:
    from bpcp_jax.training.checkpoint import load_stage

    network, variables, meta = load_stage(input_dir)
    gates = {}
    if meta.get("mode") == "search":
      ckpt = StageCheckpoints(input_dir, read_only=True)
      tree, _ = ckpt.restore_raw()
      ckpt.close()
      gates = tree.get("gates") or {}
    # a searched network's recorded accuracy is under its gates; the dense one is measured anew
    return StageOutput(network, variables, gates, None if gates else meta.get("accuracy"))
  network = build_network(config, tuple(ctx.train.images.shape[1:]))
  variables = network.init(jax.random.PRNGKey(config.seed))
  if config.init_from:
    from bpcp_jax.training.weights import load_weights

    variables = load_weights(config.init_from, variables)
  return StageOutput(network, dict(variables), {}, None)


def _write_config(ctx: RunContext) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(ctx.workdir, "config.json"), "w") as f:
      json.dump(ctx.config.to_dict(), f, indent=2, sort_keys=True)


def evaluate_output(config, out: StageOutput, split: data.Split, progress: bool = True) -> float:
  state = steps.create_train_state(out.variables, make_optimizer(0.0), np.zeros(2, np.uint32))
  p_eval = parallel.parallel_eval_step(out.network)
  return evaluate(p_eval, parallel.replicate(state), split, config.eval_batch_size, progress=progress)["accuracy"]
