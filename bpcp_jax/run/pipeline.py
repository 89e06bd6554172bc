"""The BPCP stages in order: pretrain -> block search -> fine-tune -> channel prune -> fine-tune.

``run_pipeline`` reads a config, checks everything it can before any compute (the config, the
run directory, the ``--from`` checkpoint, the data), says what it is about to run, and runs the
configured stages, each in its own checkpoint directory, on a ``PrunableNetwork``
(``bpcp_jax.pruning.network``): one of the ResNet families (``model=resnet_v2_56``) or any Flax
classifier (``model=path/to/file.py:make_model``, traced). The output of one stage (a network and
its variables, plus the gate logits after the search) is the input of the next; the block
decisions and the channel selection are materialized between stages, so every fine-tune
trains an ordinary, smaller network. At the end the run directory gets ``summary.json`` and
``report.md``.

``resume=True`` continues the run in the directory: its settings must equal the run's
``config.json`` (the differing keys are named otherwise), a finished run (``summary.json``) is
left as it is, finished stages are read back from their final checkpoints and an interrupted
stage continues from its newest readable checkpoint (a damaged one is skipped with a warning,
and with none left the stage starts again), so the run ends where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bpcp_jax.families.provider import DTYPES, FamilyNetwork
from bpcp_jax.families.spec import parse_model_name
from bpcp_jax.pruning.block_controls import BLOCK_METHODS, SCORED, select_blocks
from bpcp_jax.pruning.channel_prune import format_report
from bpcp_jax.pruning.network import PrunableNetwork, network_from_description
from bpcp_jax.run.config import (RESUME_FREE_KEYS, STAGES, ConfigError, check_config, config_differences,
                                 stage_list)
from bpcp_jax.run.lock import hold_run_directory
from bpcp_jax.training import data, files, parallel, steps
from bpcp_jax.training.checkpoint import (CheckpointError, CheckpointWarning, StageCheckpoints, network_meta,
                                          read_stage_checkpoint)
from bpcp_jax.training.loop import MetricsLog, StageRun, evaluate, train_stage
from bpcp_jax.training.optim import lr_schedule, make_optimizer

TRAINING_STAGES = ("pretrain", "search", "finetune_blocks", "finetune_channels")
RUN_FILES = ("config.json", "summary.json", "metrics.jsonl")


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
  log: Callable[[str], None] = print

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
  (``path/to/file.py:make_model`` / ``package.module:make_model``, called with ``num_classes``, and
  with ``rngs`` when it makes a ``flax.nnx`` module)."""
  if config.dtype not in DTYPES:
    raise ValueError(f"config key 'dtype' must be one of {sorted(DTYPES)}, got {config.dtype!r}")
  if is_family(config.model):
    return FamilyNetwork.create(config.model, config.num_classes, dtype=config.dtype,
                                init_style=config.init_style, image_size=input_shape[0])
  from bpcp_jax.tracer.provider import FlaxNetwork

  return FlaxNetwork.from_factory(config.model, config.num_classes, input_shape, output=config.model_output)


def check_run_config(config) -> None:
  """Everything about a config that can be checked before any compute."""
  check_config(config)
  if is_family(config.model):
    parse_model_name(config.model)
    if config.model_output not in ("", "auto"):
      raise ValueError(f"config key 'model_output' = {config.model_output!r} is for your own networks; the family "
                       f"network {config.model} returns its logits (leave model_output 'auto')")
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
  if config.data.source not in ("folder", *data.TFDS_SOURCES):
    raise ValueError(f"config key 'data.source' = {config.data.source!r} is not one of "
                     f"{', '.join(('folder', *data.TFDS_SOURCES))}")
  if config.data.source != "folder" and not data.tfds_available():
    raise ValueError(f"config key 'data.source' = {config.data.source!r} needs tensorflow_datasets "
                     "(pip install 'bpcp-jax[tfds]'); offline, use data.source=folder with --data PATH")
  if config.profile.repeats < 1:
    raise ValueError(f"config key 'profile.repeats' must be >= 1, got {config.profile.repeats}")
  profile_batch_sizes(config)


def profile_batch_sizes(config) -> tuple[int, ...]:
  """The batch sizes of ``profile.batch_sizes`` ("1,128")."""
  text = str(config.profile.batch_sizes)
  try:
    sizes = tuple(int(b) for b in text.split(",") if b.strip())
  except ValueError:
    sizes = ()
  if not sizes or min(sizes) < 1:
    raise ValueError(f"config key 'profile.batch_sizes' = {text!r} must list positive batch sizes, e.g. '1,128'")
  return sizes


def load_data(config, data_path: Optional[str] = None, progress: bool = True) -> tuple[data.Split, data.Split]:
  d = config.data
  if d.source == "folder":
    path = data_path or d.path or data.default_data_path()
    kw = dict(cache_dir=d.cache_dir or None, progress=progress)
    train = data.load_image_folder(path, "train", max_per_class=d.max_train_per_class or None, **kw)
    test = data.load_image_folder(path, "test", max_per_class=d.max_test_per_class or None, **kw)
    data.check_same_classes(train, test)
  else:  # tfds:<name> (checked by check_run_config)
    name, data_dir = d.source.split(":", 1)[1], d.tfds_data_dir or None
    train = data.load_tfds(name, "train", data_dir=data_dir, max_per_class=d.max_train_per_class or None)
    test = data.load_tfds(name, "test", data_dir=data_dir, max_per_class=d.max_test_per_class or None)
  if len(train.class_names) != config.num_classes:
    raise ValueError(f"config key 'num_classes' = {config.num_classes} but the data has "
                     f"{len(train.class_names)} classes ({', '.join(train.class_names[:5])}, ...)")
  return train, test


def _stage_key(config, stage: str) -> np.ndarray:
  return np.asarray(jax.random.fold_in(jax.random.PRNGKey(config.seed), STAGES.index(stage)))


# ---------------------------------------------------------------------------------------------
# before any compute: the run directory, the network to start from, what will run


def check_workdir(config, workdir: str, resume: bool) -> Optional[dict[str, Any]]:
  """Refuse what cannot be done in ``workdir``; nothing is created here.

  Without ``resume`` a directory that holds a run is refused. With ``resume`` the settings must
  equal the run's ``config.json`` except ``RESUME_FREE_KEYS`` (a ``ConfigError`` names every
  differing key). Returns the run's summary if it finished (``summary.json``), else None.
  """
  workdir = os.path.abspath(workdir)
  _check_writable(workdir)
  ck_root = os.path.join(workdir, "checkpoints")
  used_stages = [s for s in STAGES if os.path.isdir(os.path.join(ck_root, s)) and os.listdir(os.path.join(ck_root, s))]
  used = used_stages or any(os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES)
  if not used:
    return None
  if not resume:
    what = f" (checkpoints of {', '.join(used_stages)})" if used_stages else ""
    raise CheckpointError(f"{workdir} already holds a run{what}; pass --resume to continue that run "
                          "or choose a new --workdir")
  saved_path = os.path.join(workdir, "config.json")
  if os.path.isfile(saved_path):
    try:
      with open(saved_path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"cannot read the run's settings {saved_path}: {e}") from e
    diff = config_differences(saved, config)
    if diff:
      lines = "; ".join(f"{k}: run {a!r}, now {b!r}" for k, a, b in diff)
      raise ConfigError(f"--resume with settings that differ from the run in {workdir} (config.json): {lines}. "
                        f"Resume with the run's settings (omit --config to use its config.json), or start the "
                        f"changed run in a new --workdir; only {', '.join(RESUME_FREE_KEYS)} may change")
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.isfile(summary_path):
    try:
      with open(summary_path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # unreadable: the run computes its summary again
  return None


def _check_writable(workdir: str) -> None:
  """The directory, or the nearest existing folder above it, must be a writable directory."""
  path = workdir
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  if not os.path.isdir(path):
    raise NotADirectoryError(20, "not a directory, so the work directory cannot be made there", path)
  if not os.access(path, os.W_OK):
    raise PermissionError(13, "not writable", path)


@dataclasses.dataclass
class StartNetwork:
  """The network the run starts from and what it is (the first row of the report)."""

  output: StageOutput
  label: str
  source: Optional[str] = None  # the --from directory


def start_network(config, input_dir: Optional[str] = None) -> StartNetwork:
  """What the first stage starts from: the network of a stage checkpoint (``--from``), or
  ``config.model`` initialised, with the user's trained weights when ``init_from`` names them."""
  if input_dir:
    from bpcp_jax.training.checkpoint import load_stage

    network, variables, meta = load_stage(input_dir)
    gates = {}
    if meta.get("mode") == "search":
      tree, _ = read_stage_checkpoint(input_dir)
      gates = tree.get("gates") or {}
    # its recorded accuracy may come from another test set (or be under its gates): measured anew
    out = StageOutput(network, variables, gates, None)
    what = "all blocks, before the block decisions" if gates else f"{len(network.block_names)} blocks"
    return StartNetwork(out, f"input: {meta.get('stage', '?')} checkpoint ({what})", os.path.abspath(input_dir))
  network = build_network(config)
  variables = network.init(jax.random.PRNGKey(config.seed))
  if config.init_from:
    from bpcp_jax.training.weights import load_weights

    variables = load_weights(config.init_from, variables)
    return StartNetwork(StageOutput(network, dict(variables), {}, None), "dense, your weights",
                        os.path.abspath(config.init_from))
  return StartNetwork(StageOutput(network, dict(variables), {}, None), "dense, initialised")


def check_stage_inputs(stages: list[str], start: StartNetwork) -> None:
  """Stages that cannot do anything with the start network are refused before any compute (a
  block search alone on a network without blocks; within a longer run it is skipped, and said)."""
  if stages == ["search"] and not start.output.network.block_names:
    where = f"the network from {start.source}" if start.source else "this network"
    raise ValueError(f"{where} has no residual blocks left: a block search has nothing to decide; "
                     "run prune-channels or finetune on it instead")


def describe_run(config, stages: list[str], start: StartNetwork, workdir: str, resume: bool,
                 data_path: Optional[str]) -> list[str]:
  """What the run is about to do, one line each: network, stages and epochs, data, devices."""
  network = start.output.network
  counts = network.counts(start.output.variables)
  source = f" from {start.source}" if start.source else ""
  lines = [f"network: {config.model if not start.source else start.label}{source}: {counts['params']:,} params, "
           f"{counts['macs'] / 1e6:,.2f}M MACs, {len(network.block_names)} blocks"]
  parts = []
  for s in stages:
    if s == "prune":
      p = config.stages.prune
      what = (f"speed-aware, cost {p.cost}" if p.selection == "speed" else p.criterion)
      target = f"to {p.latency_ms} ms" if p.selection == "speed" and p.latency_ms > 0 else f"{p.ratio:.0%} of {p.target}"
      parts.append(f"prune ({what}, {target})")
      continue
    sc = config.stages[s]
    if sc.epochs == 0:
      parts.append(f"{s} (0 epochs: skipped)")
      continue
    if s == "search" and sc.method != "bp":
      parts.append(f"search (method {sc.method}: {sc.blocks} blocks removed, no training)")
      continue
    extra = f", gamma {sc.gamma}, gate lr {config.optim.gate_lr}" if s == "search" else ""
    if sc.get("distill", 0.0):
      extra += f", distilled from the dense network at T={sc.distill}"
    parts.append(f"{s} {sc.epochs} epoch{'s' if sc.epochs != 1 else ''} (lr {sc.lr}{extra})")
  lines.append("stages: " + " -> ".join(parts))
  d = config.data
  if d.source == "folder":
    src = f"folder {data_path or d.path or data.default_data_path()}"
  else:
    src = d.source
  limits = [f"{n} {what}" for n, what in ((d.max_train_per_class, "train"), (d.max_test_per_class, "test")) if n]
  lines.append(f"data: {src}" + (f", at most {' and '.join(limits)} images per class" if limits else ", every image"))
  n_dev = jax.device_count()
  axis = parallel.step_axis(network)  # a network whose collectives name several axes is refused here
  named = list(getattr(network, "axis_names", ()) or ())
  lines.append(f"devices: {n_dev} x {jax.devices()[0].platform} ({jax.process_count()} process"
               f"{'es' if jax.process_count() > 1 else ''}), batch {config.batch_size} "
               f"({config.batch_size // n_dev} per device)"
               + (f"; the network's BatchNorm statistics span the devices (axis {axis!r})" if named else ""))
  lines.append(f"run directory: {os.path.abspath(workdir)}{' (resuming)' if resume else ''}")
  return lines


# ---------------------------------------------------------------------------------------------
# stages


def _check_stage_meta(ckpt: StageCheckpoints, meta: dict, stage: str, network: PrunableNetwork, key: str, model: str):
  if meta.get("stage") != stage:
    raise CheckpointError(f"{ckpt.directory} holds checkpoints of stage {meta.get('stage')!r}, not {stage!r}")
  if not _same_network(network_meta(meta, key, ckpt.directory), network.describe()):
    raise CheckpointError(f"{ckpt.directory} holds a checkpoint of another architecture than this run's "
                          f"{stage} stage (model {model}); use another --workdir")


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


def resume_point(ctx: RunContext, stage: str, network: PrunableNetwork, target_state=None, key: str = "network"):
  """The stage's checkpoints and the newest readable one: ``(ckpt, (state, meta) or None)``.

  Checkpoints of another stage or architecture are an error; unreadable ones are skipped
  (warned, moved aside); with none left the stage starts again (said so).
  """
  ckpt = StageCheckpoints(ctx.stage_dir(stage), max_to_keep=ctx.config.checkpoint.keep)
  if not ckpt.all_steps():
    return ckpt, None
  if not ctx.resume:
    raise CheckpointError(f"{ckpt.directory} already has checkpoints; pass --resume to continue that run "
                          "or choose a new --workdir")
  found = ckpt.restore_newest(
      target_state, check=lambda meta: _check_stage_meta(ckpt, meta, stage, network, key, ctx.config.model))
  if found is None:
    ctx.log(f"[{stage}] no readable checkpoint left in {ckpt.directory}: the stage starts again from its beginning")
    return ckpt, None
  state, meta, step = found
  if ckpt.skipped:
    ctx.log(f"[{stage}] resuming from checkpoint {ckpt.step_dir(step)} (step {step}), the newest readable one")
  return ckpt, (state, meta)


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
  ckpt, found = resume_point(ctx, stage, network, state)
  state, meta = found if found is not None else (state, None)
  start = int(meta["step"]) if meta else 0
  log = MetricsLog(ctx.metrics_path)
  if meta is None or not meta.get("done"):  # this stage (re)trains: its replayed lines go
    log.truncate_after(stage, int(meta["epoch"]) if meta else 0)
  distill, teacher_vars = _distillation(ctx, stage, teacher)
  run = StageRun(
      name=stage, network=network, tx=tx, schedule=schedule, mode=mode, epochs=scfg.epochs, train=ctx.train,
      test=ctx.test, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, seed=config.seed,
      checkpoints=ckpt, meta={**_network_meta(network), "model": config.model, "mode": mode},
      metrics_path=ctx.metrics_path, gamma=scfg.get("gamma", 0.0), bn_l1=scfg.get("bn_l1", 0.0),
      every_steps=config.checkpoint.every_steps, log_every=config.log_every_steps,
      eval_every_epochs=config.eval_every_epochs, progress=ctx.progress, distill=distill,
      teacher_variables=teacher_vars, gate_seed=int(scfg.get("seed", 0)) if mode == "search" else 0)
  if meta is not None and meta.get("done"):
    accuracy = meta.get("accuracy")
    if jax.process_index() == 0:
      tqdm.write(f"[{stage}] already finished in {ckpt.directory}; reusing it")
  else:
    state, last = train_stage(run, state, start_step=start, start_sums=(meta or {}).get("epoch_sums"))
    accuracy = last.get("accuracy")
    log.order_stages(STAGES)  # lines of later stages kept from before a damaged checkpoint stay after these
  ckpt.close()
  return StageOutput(network, {"params": state.params, "batch_stats": state.batch_stats}, dict(state.gates), accuracy)


def select_block_stage(ctx: RunContext, inp: StageOutput) -> StageOutput:
  """The search stage with a rule instead of the learned search (``stages.search.method``):
  ``random`` blocks, the ``last`` blocks of every stage, or the blocks scored lowest on the first
  ``stages.search.control_images`` training images (``single_drop``, ``importance``;
  pruning/block_controls.py); the gates it returns decide the blocks as a search would (no training)."""
  s = ctx.config.stages.search
  images = labels = None
  if s.method in SCORED:
    n = min(int(s.get("control_images", 512)), len(ctx.train.labels))
    images, labels = np.asarray(data.normalize(ctx.train.images[:n])), ctx.train.labels[:n]
  logits = select_blocks(inp.network, inp.variables, s.method, s.blocks, seed=s.select_seed, images=images,
                         labels=labels, batch_size=ctx.config.eval_batch_size)
  removed = [b for b, v in logits.items() if v < 0]
  ctx.log(f"[search] method {s.method}: removing {len(removed)} of {len(logits)} blocks: {', '.join(removed)}")
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
  ckpt, found = resume_point(ctx, "prune", network, key="input_network")
  if found is not None and found[1].get("done"):
    tree, meta = found
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


# ---------------------------------------------------------------------------------------------
# the whole run


def _write_json(path: str, obj) -> None:
  """Written whole or not at all (a kill mid-write must not leave a half file that blocks --resume)."""
  if jax.process_index() == 0:
    files.write_json(path, obj)


def _final_label(start: StageOutput, final: StageOutput, last_stage: str) -> str:
  """What the last stage made of the first row's network: ``blocks and channels pruned, after prune``."""
  a, b = start.network.counts(start.variables), final.network.counts(final.variables)
  cut = [what for what, smaller in (("blocks", b["blocks"] < a["blocks"]),
                                    ("channels", _channels_cut(start.network, final.network, b["macs"] < a["macs"])))
         if smaller]
  return f"{' and '.join(cut) + ' pruned' if cut else 'same architecture'}, after {last_stage}"


def _channels_cut(a: PrunableNetwork, b: PrunableNetwork, fewer_macs: bool) -> bool:
  """Whether any channel group that ``b`` keeps is narrower than in ``a`` (group names of a traced
  network change with its trace: there, fewer MACs with the same blocks)."""
  wa, wb = a.group_widths, b.group_widths
  if isinstance(a, FamilyNetwork):
    return any(w < wa[g] for g, w in wb.items() if g in wa)
  return fewer_macs and sum(wb.values()) < sum(wa.values())


def run_pipeline(config, workdir: str, *, resume: bool = False, data_path: Optional[str] = None,
                 input_dir: Optional[str] = None, progress: bool = True,
                 log: Optional[Callable[[str], None]] = None,
                 before_stage: Optional[Callable[[str, Any], None]] = None) -> dict[str, Any]:
  """Run the configured stages in ``workdir``; returns the summary (also written to disk).

  Everything that can be refused is refused before the run directory is created: the config,
  a used directory without ``resume`` or with other settings, the ``--from`` checkpoint or the
  ``init_from`` weights, stages that cannot apply to them, the data. ``log`` (default: print on
  process 0) gets what the run is about to do and what it decided (unsettled block decisions,
  skipped damaged checkpoints). ``before_stage(stage, config)``, when given, is called just before
  each stage and may change the settings of that stage and the later ones (epochs planned from a
  time budget, as experiments/accelerator_run.py does); the changed config is checked again and
  ``config.json`` rewritten, so it holds what ran.

  One process writes a run directory at a time (``bpcp_jax.run.lock``): ``RunDirectoryInUse``,
  naming the process, when another one is writing ``workdir``.
  """
  from bpcp_jax.run import report

  if log is None:
    log = (lambda s: print(s, flush=True)) if jax.process_index() == 0 else (lambda s: None)
  check_run_config(config)
  stages = stage_list(config)
  if config.init_from and "pretrain" in stages and not input_dir:
    stages.remove("pretrain")  # the given weights are the trained dense network
    log(f"[pretrain] skipped: starting from the trained weights in {config.init_from}")
  # one writer at a time: an existing directory is locked before it is read, a new one when made
  existed = os.path.isdir(workdir)
  lock = {"job": True, "then": "run again with --resume to continue its run"}

  def kept(finished):
    log(f"the run in {os.path.abspath(workdir)} has finished; its summary.json is kept as it is "
        "(start a new --workdir to run again)")
    if not os.path.exists(os.path.join(workdir, "report.md")):
      report.write_report(workdir)
    return finished

  with contextlib.ExitStack() as held:
    if existed:
      _check_writable(os.path.abspath(workdir))  # its own message, before the lock file is made in it
      held.enter_context(hold_run_directory(workdir, **lock))
    finished = check_workdir(config, workdir, resume)
    if finished is not None:
      return kept(finished)
    start = start_network(config, input_dir)
    check_stage_inputs(stages, start)
    for line in describe_run(config, stages, start, workdir, resume, data_path):
      log(line)
    train, test = load_data(config, data_path, progress=progress)
    log(f"data loaded: {len(train.labels):,} train and {len(test.labels):,} test images, {len(train.class_names)} classes")
    shape = tuple(train.images.shape[1:])
    if shape != tuple(start.output.network.input_shape):
      raise ValueError(f"the data's images are {shape}, the network {start.output.network.label} takes "
                       f"{tuple(start.output.network.input_shape)}")
    if not existed:  # made now; a process that made it meanwhile holds it, or has left a run in it
      os.makedirs(workdir, exist_ok=True)
      held.enter_context(hold_run_directory(workdir, **lock))
      finished = check_workdir(config, workdir, resume)
      if finished is not None:  # (with resume) a run that finished meanwhile is kept as it is
        return kept(finished)
    return _run_locked(config, workdir, resume, stages, start, train, test, progress, log, before_stage)


def _run_locked(config, workdir, resume, stages, start, train, test, progress, log, before_stage):
  """The stages, the summary and the report of ``run_pipeline``, with the directory held."""
  from bpcp_jax.run import report

  ctx = RunContext(config, os.path.abspath(workdir), resume, train, test, progress, log)
  if not os.path.exists(os.path.join(workdir, "config.json")):  # a resume never rewrites the run's settings
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())

  with warnings.catch_warnings():
    warnings.simplefilter("always", CheckpointWarning)  # every damaged checkpoint is named, not only the first
    current, history, decisions = _run_stages(ctx, stages, start.output, before_stage)
  # the first row: the network the pruning starts from (the pretrained one when pretraining ran)
  first, first_label = start.output, start.label
  if "pretrain" in history:
    first = history["pretrain"]
    first_label = f"{start.label}, after pretrain" if start.source else "dense, pretrained"
  last_stage = next(reversed(history), None)
  labels = (first_label, first_label if current is first else _final_label(first, current, last_stage))
  summary = report.summarize(ctx, first, current, history, labels=labels, decisions=decisions)
  report.write_report(ctx.workdir)
  return summary


def _run_stages(ctx: RunContext, stages: list[str], current: StageOutput, before_stage=None):
  """Run ``stages`` from ``current``; returns (final output, {stage: output}, block decisions or None).
  The dense network (the pretrained one, else the start) teaches the fine-tunes that distill."""
  from bpcp_jax.run.report import block_decisions

  config, history, decisions = ctx.config, {}, None

  def decide(out: StageOutput) -> StageOutput:
    nonlocal decisions
    decisions = block_decisions(out.gates, MetricsLog(ctx.metrics_path).read())
    for line in decisions["warnings"]:
      ctx.log(line)
    return materialize_blocks(config, out)

  dense = current
  for stage in stages:
    if before_stage is not None:
      before_stage(stage, config)
      check_run_config(config)
      _write_json(os.path.join(ctx.workdir, "config.json"), config.to_dict())
    if stage == "prune":
      if current.gates:  # pruning channels of a searched network: decide its blocks first
        current = decide(current)
      current = run_prune_stage(ctx, current)
    elif stage == "search" and not current.network.block_names:
      ctx.log(f"[search] skipped: {current.network.label} has no residual blocks to search "
              "(blocks are adds x + f(x) or shortcut(x) + f(x))")
      continue
    elif stage == "search" and config.stages.search.method != "bp":
      current = select_block_stage(ctx, current)
    else:
      if stage != "search" and current.gates:
        current = decide(current)
      if config.stages[stage].epochs == 0:
        continue
      current = run_training_stage(ctx, stage, current, teacher=dense if stage != "pretrain" else None)
    history[stage] = current
    if stage == "pretrain":
      dense = current
  if current.gates:
    current = decide(current)
  return current, history, decisions


def evaluate_output(config, out: StageOutput, split: data.Split, progress: bool = True) -> float:
  state = steps.create_train_state(out.variables, make_optimizer(0.0), np.zeros(2, np.uint32))
  p_eval = parallel.parallel_eval_step(out.network)
  axis = parallel.step_axis(out.network)
  return evaluate(p_eval, parallel.replicate(state, axis), split, config.eval_batch_size, progress=progress,
                  axis=axis)["accuracy"]
