"""One command on a machine with one GPU or TPU: train-step throughput, inference speed-ups, and the paper's recipe.

  python experiments/accelerator_run.py --out DIR [--data ARCHIVE] [--budget 540]
  python experiments/accelerator_run.py --quick --out DIR     # the same code on CPU, about a minute on 2 cores (CI)

Within a hard wall-time budget (``--budget``, default 540 s = 9 minutes, enforced by this script):

1. **Throughput** (``benchmarks.train_throughput.measure``): the dense, BP search and masked
   fine-tune train steps (pmap, as the training loop runs them) of ResNet-v2-56 at batch 128 and
   1024, float32 and bfloat16 compute; **inference** (``benchmarks.inference_speedup.measure``):
   the dense network and materialized compressions of it (10 of 18 blocks, channels -50% MACs,
   both to -80% and -85% MACs), deployed, at batch 1, 128 and 1024. Compilations run in parallel
   threads (``--compile-threads``).
2. **A shortened paper recipe** (pretrain -> search -> finetune_blocks -> prune ->
   finetune_channels) on ResNet-v2-56 and the real CIFAR-10 (all 50,000 training and 10,000
   test images), through ``bpcp_jax.run.pipeline.run_pipeline`` with
   ``experiments/configs/resnet_v2_56_bpcp.py`` (batch 128, cosine schedule per stage). The epochs
   of each stage are planned just before it starts, from the measured step times (the throughput
   phase, then the stages already run) and the time left, shared by ``--stage-weights``.

Each phase runs in a child process; this process only supervises: at the end of a phase's time
it interrupts the child (SIGINT: the child writes what it has) and kills it shortly after, so the
whole run ends within the budget, and then writes what was measured. The data set is decoded
while the throughput phase runs. Outputs (at most 6 files, no folders: the device's limit is 8)
in ``--out`` (default ``$OUT``):

  results.md     the tables: train steps, inference, recipe stages and dense vs pruned, the plan
  results.json   everything: device, versions, timings, every measurement, the recipe's summary
  results.csv    one row per measurement (column ``table``: train_step, inference, recipe, final)
  metrics.jsonl  the pipeline's per-epoch metrics (loss, train and test accuracy, gate probabilities)
  plots.png      throughput, inference speed-ups, accuracy over the stages, gate probabilities
                 (skipped, and said so, without matplotlib)
  log.txt        everything the phases printed

On the lent H200 (device tool; jax/flax/optax/orbax/chex/tqdm/matplotlib are installed there,
ml_collections is not, and only the repository travels). Once, here, in the repository root:

  mkdir -p .data .whl && for d in /.data/ /.whl/; do grep -qx "$d" "$(git rev-parse --git-path info/exclude)" \
    || echo "$d" >> "$(git rev-parse --git-path info/exclude)"; done
  cp ../shared/data/cifar10-jpeg.tar.gz .data/
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0

then the one call (``run``), 600 s allowed for the 540 s budget:

  run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
               && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 || exit;
               python3 experiments/accelerator_run.py --data .data/cifar10-jpeg.tar.gz --out $OUT",
      carry=[".data", ".whl"], timeout_s=600)

``--quick`` (the ``QUICK`` settings below): ResNet-v1-8 train steps at batch 8 in float32, ResNet-v1-14
inference at batch 1 and 8, and the recipe on ResNet-v1-8 with 80 training and 50 test images, one
epoch per stage: the same code path, a smoke run, not a measurement (tests/test_accelerator_run.py).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

CONFIG = os.path.join(REPO, "experiments", "configs", "resnet_v2_56_bpcp.py")
MODES = ("dense", "search", "masked")
STAGES = ("pretrain", "search", "finetune_blocks", "prune", "finetune_channels")  # bpcp_jax.run.config.STAGES
TRAINING_STAGES = tuple(s for s in STAGES if s != "prune")
DEFAULT_WEIGHTS = "pretrain=4,search=2,finetune_blocks=1,finetune_channels=2"
OUT_FILES = ("results.md", "results.json", "results.csv", "metrics.jsonl", "plots.png", "log.txt")
CSV_COLUMNS = ("table", "name", "batch", "dtype", "images_per_s", "ms", "compile_s", "speedup", "macs_ratio",
               "accuracy", "params", "macs", "blocks", "epochs", "seconds")
GRACE_S = 15.0  # from the interrupt of a phase to its kill
ASSEMBLY_S = 15.0  # kept at the end for writing the results


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures and trains; ``FULL`` on an accelerator, ``QUICK`` for CI on CPU."""

  model: str
  train_batches: tuple[int, ...]
  dtypes: tuple[str, ...]
  steps: int  # train steps per timed round
  repeats: int  # timed rounds
  inference_model: str
  inference_batches: tuple[int, ...]  # the large batches (batch 1 is always timed)
  calls: int  # batch-1 calls per round
  large_calls: int
  recipe_model: str
  batch_size: int
  eval_batch_size: int
  max_train_per_class: int  # 0: all
  max_test_per_class: int
  max_epochs: int  # per stage
  profile_batches: str
  budget_s: float
  bench_fraction: float  # of the budget, for the throughput phase
  quick: bool


FULL = Settings(model="resnet_v2_56", train_batches=(128, 1024), dtypes=("float32", "bfloat16"), steps=10, repeats=3,
                inference_model="resnet_v2_56", inference_batches=(128, 1024), calls=50, large_calls=5,
                recipe_model="resnet_v2_56", batch_size=128, eval_batch_size=1000, max_train_per_class=0,
                max_test_per_class=0, max_epochs=160, profile_batches="1,128", budget_s=540.0, bench_fraction=0.35,
                quick=False)
QUICK = Settings(model="resnet_v1_8", train_batches=(8,), dtypes=("float32",), steps=1, repeats=1,
                 inference_model="resnet_v1_14", inference_batches=(8,), calls=3, large_calls=1,
                 recipe_model="resnet_v1_8", batch_size=16, eval_batch_size=40, max_train_per_class=8,
                 max_test_per_class=5, max_epochs=1, profile_batches="1", budget_s=240.0, bench_fraction=0.5,
                 quick=True)


# ------------------------------------------------------------------------------------------------
# Planning the recipe's epochs (pure: tested without any training)
# ------------------------------------------------------------------------------------------------


def parse_weights(text: str) -> dict[str, float]:
  """``"pretrain=4,search=2,..."`` -> weights of the training stages (a missing stage weighs 0)."""
  out = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    name, _, value = item.partition("=")
    if name not in TRAINING_STAGES:
      raise ValueError(f"--stage-weights: unknown stage {name!r}; choose from {', '.join(TRAINING_STAGES)}")
    try:
      out[name] = float(value)
    except ValueError:
      raise ValueError(f"--stage-weights: weight of {name!r} must be a number, got {value!r}") from None
    if out[name] < 0:
      raise ValueError(f"--stage-weights: weight of {name!r} must be >= 0, got {value}")
  if not any(out.values()):
    raise ValueError(f"--stage-weights {text!r}: at least one stage needs a positive weight")
  return out


def plan_epochs(stage: str, remaining: list[str], available_s: float, epoch_s: dict[str, float],
                overhead_s: dict[str, float], weights: dict[str, float], max_epochs: int) -> int:
  """Epochs for ``stage`` (the first of ``remaining``, the training stages still to run).

  The time left after every remaining stage's fixed overhead (compilation, first evaluation) is
  shared among them by ``weights``; the stage gets as many whole epochs as its share holds, at
  least 1 and at most ``max_epochs``."""
  free = available_s - sum(overhead_s[s] for s in remaining)
  total = sum(weights.get(s, 0.0) for s in remaining) or 1.0
  share = free * weights.get(stage, 0.0) / total
  return int(max(1, min(max_epochs, math.floor(share / max(epoch_s[stage], 1e-9)))))


class StagePlanner:
  """``before_stage`` hook of ``run_pipeline``: sets each training stage's epochs just before it runs.

  An epoch is estimated as its training steps plus an evaluation of the test set (at a third of
  the training time per image) plus 0.5 s (checkpoint, metrics line); a stage's fixed overhead
  (compiling its train and eval steps) as 1.5 x the dense step's compile time + 2 s. The first
  estimates come from the throughput phase (``step_s``: seconds per step of the recipe's batch and
  dtype for ``dense`` and ``search``; None: unknown, the first stage gets 1 epoch); after each stage,
  the later stages' estimates are replaced by what it took (its steady epoch time from
  ``metrics.jsonl``, its overhead = wall time - epochs x epoch time), scaled by the search / dense
  step-time ratio when the mode changes. A later network is never larger, so this errs long.
  Every decision is kept in ``history``; ``wall_s`` holds each stage's wall time."""

  def __init__(self, *, deadline: float, reserve_s: float, train_images: int, test_images: int, batch_size: int,
               step_s: Optional[dict[str, float]], compile_s: float, weights: dict[str, float], max_epochs: int,
               stages: list[str], metrics_path: str, clock=time.time):
    self.deadline, self.reserve_s, self.clock = deadline, reserve_s, clock
    self.weights, self.max_epochs, self.metrics_path = weights, max_epochs, metrics_path
    self.stages = [s for s in stages if s in TRAINING_STAGES]
    self.steps_per_epoch = max(1, train_images // batch_size)
    self.eval_fraction = test_images / (3.0 * max(train_images, 1))
    self.search_ratio = step_s["search"] / step_s["dense"] if step_s else 1.0
    self.epoch_s = {s: self._epoch(self.steps_per_epoch * step_s[_mode(s)]) if step_s else math.inf
                    for s in self.stages}
    self.overhead_s = {s: 1.5 * compile_s + 2.0 for s in self.stages}
    self.history: list[dict[str, Any]] = []
    self.started: dict[str, float] = {}
    self.wall_s: dict[str, float] = {}
    self.current: Optional[str] = None

  def _epoch(self, train_s: float) -> float:
    return train_s * (1.0 + self.eval_fraction) + 0.5

  def __call__(self, stage: str, config) -> None:
    now = self.clock()
    if self.current is not None:
      self.wall_s[self.current] = now - self.started[self.current]
      if self.current in self.stages:
        self._learn(self.current)
    self.current, self.started[stage] = stage, now
    if stage not in self.stages:
      self.history.append({"stage": stage, "at_s": now})
      return
    remaining = self.stages[self.stages.index(stage):]
    available = self.deadline - now - self.reserve_s
    epochs = plan_epochs(stage, remaining, available, self.epoch_s, self.overhead_s, self.weights, self.max_epochs)
    config.stages[stage].epochs = epochs
    self.history.append({"stage": stage, "at_s": now, "available_s": available, "epochs": epochs,
                         "epoch_estimate_s": self.epoch_s[stage], "overhead_estimate_s": self.overhead_s[stage]})
    print(f"[plan] {stage}: {epochs} epoch(s); {available:.0f} s left for {len(remaining)} stage(s), "
          f"~{self.epoch_s[stage]:.1f} s per epoch + ~{self.overhead_s[stage]:.0f} s to start", flush=True)

  def finish(self) -> None:
    """Close the last stage's wall time (it then includes the pipeline's summary)."""
    if self.current is not None and self.current not in self.wall_s:
      self.wall_s[self.current] = self.clock() - self.started[self.current]

  def _learn(self, stage: str) -> None:
    """Replace the later stages' estimates by what ``stage`` took."""
    secs = [r["epoch_seconds"] for r in _read_jsonl(self.metrics_path) if r.get("stage") == stage]
    if not secs:
      return
    if len(secs) > 1:  # the first epoch includes the compilation
      steady = sorted(secs[1:])[len(secs[1:]) // 2]
    else:  # one epoch: compilation and all; the estimate it had, when it had one, is closer
      prior = (self.epoch_s[stage] - 0.5) / (1.0 + self.eval_fraction)
      steady = min(secs[0], prior) if math.isfinite(prior) else secs[0]
    overhead = max(self.wall_s[stage] - len(secs) * self._epoch(steady), 0.0)
    for later in self.stages[self.stages.index(stage) + 1:]:
      ratio = {("dense", "search"): self.search_ratio, ("search", "dense"): 1.0 / self.search_ratio}.get(
          (_mode(stage), _mode(later)), 1.0)
      self.epoch_s[later] = self._epoch(steady * ratio)
      self.overhead_s[later] = overhead  # measured here (the prior came from compilations running side by side)


def _mode(stage: str) -> str:
  return "search" if stage == "search" else "dense"


# ------------------------------------------------------------------------------------------------
# Supervising the phases
# ------------------------------------------------------------------------------------------------


class Log:
  """Lines to stdout and to the log file, from several threads."""

  def __init__(self, path: str):
    self.file = open(path, "a", buffering=1)
    self.lock = threading.Lock()

  def __call__(self, line: str) -> None:
    with self.lock:
      print(line, flush=True)
      self.file.write(line + "\n")

  def close(self):
    self.file.close()


def _default_sigint():
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_child(cmd: list[str], log: Log, prefix: str, env=None, stdin=False) -> subprocess.Popen:
  """Start ``cmd`` with its output (stdout and stderr) copied line by line into ``log``."""
  # SIGINT back to its default in the child: a shell starting this script in the background (`&`,
  # nohup) ignores SIGINT, children inherit that, and a phase could then not be asked to stop
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                          stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, bufsize=1,
                          preexec_fn=_default_sigint if os.name == "posix" else None)

  def pump():
    for line in proc.stdout:
      log(f"[{prefix}] {line.rstrip()}")

  proc.pump = threading.Thread(target=pump, daemon=True)
  proc.pump.start()
  return proc


def supervise(proc: subprocess.Popen, soft_deadline: float, hard_deadline: float, poll_s: float = 0.1) -> dict:
  """Wait for ``proc``; SIGINT at ``soft_deadline`` (it should write what it has and exit), SIGKILL at
  ``hard_deadline``. Returns its exit status, whether it was interrupted or killed, and when it ended."""
  interrupted = killed = False
  while True:
    try:
      code = proc.wait(timeout=poll_s)
      break
    except subprocess.TimeoutExpired:
      now = time.time()
      if now >= hard_deadline:
        proc.kill()
        killed = True
      elif now >= soft_deadline and not interrupted:
        proc.send_signal(signal.SIGINT)
        interrupted = True
  if getattr(proc, "pump", None) is not None:
    proc.pump.join(timeout=5)
  for stream in (proc.stdout, proc.stdin):
    if stream is not None:
      try:
        stream.close()
      except OSError:  # a pipe to a process that ended
        pass
  return {"returncode": code, "interrupted": interrupted, "killed": killed, "ended": time.time()}


def _phase_cmd(phase: str, args, deadline: float) -> list[str]:
  cmd = [sys.executable, os.path.abspath(__file__), "--_phase", phase, "--_deadline", repr(deadline),
         "--workdir", args.workdir, "--stage-weights", args.stage_weights]
  if args.quick:
    cmd.append("--quick")
  if args.data:
    cmd += ["--data", args.data]
  if args.compile_threads:
    cmd += ["--compile-threads", str(args.compile_threads)]
  return cmd + list(args.config_overrides)


def supervisor(args, settings: Settings) -> dict:
  t0 = time.time()
  end = t0 + args.budget
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  log = Log(os.path.join(args.out, "log.txt"))
  log(f"accelerator run: budget {args.budget:.0f} s, out {args.out}, work {args.workdir}"
      f"{' (quick: a smoke run, not a measurement)' if settings.quick else ''}")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
         "PYTHONUNBUFFERED": "1"}
  if settings.quick:  # a smoke run compiles more than it computes: XLA's CPU backend without optimisation
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
  phases = {}
  work_end = end - ASSEMBLY_S  # every phase is over (killed at the latest) by then
  recipe = None
  if "recipe" in args.parts:  # starts now: imports and decodes the data while the throughput phase runs
    recipe = start_child(_phase_cmd("recipe", args, work_end - GRACE_S), log, "recipe", env, stdin=True)
  if "bench" in args.parts:
    bench_end = t0 + settings.bench_fraction * args.budget if recipe else work_end - GRACE_S
    bench = start_child(_phase_cmd("bench", args, bench_end), log, "bench", env)
    phases["bench"] = {"started": time.time(), **supervise(bench, bench_end, bench_end + GRACE_S)}
  if recipe is not None:
    try:
      recipe.stdin.write("go\n")  # the accelerator is free now
      recipe.stdin.flush()
    except BrokenPipeError:  # it ended early (an error): its output says why
      pass
    phases["recipe"] = {"started": time.time(), **supervise(recipe, work_end - GRACE_S, work_end)}
  for name, p in phases.items():
    p["seconds"] = p["ended"] - p["started"]
    state = "killed" if p["killed"] else "interrupted at its deadline" if p["interrupted"] else \
        f"exit {p['returncode']}"
    log(f"{name} phase: {p['seconds']:.1f} s, {state}")
  record = assemble(args, settings, phases, t0, log)
  with open(os.path.join(args.out, "results.md")) as f:
    log(f.read())
  log(f"total {record['timings']['total_s']:.1f} s of the {args.budget:.0f} s budget; results in {args.out}")
  log.close()
  return record


# ------------------------------------------------------------------------------------------------
# The phases (child processes)
# ------------------------------------------------------------------------------------------------


def _json_safe(obj):
  """Strict JSON: non-finite numbers become null (an unknown estimate is infinite), numpy scalars floats."""
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (bool, int, str)) or obj is None:
    return obj
  value = float(obj)
  return value if math.isfinite(value) else None


def _write_json(path: str, obj) -> None:
  from bpcp_jax.training import files

  files.write_json(path, _json_safe(obj), allow_nan=False)


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _threads(args, n: int) -> int:
  return args.compile_threads or max(1, min(n, (os.cpu_count() or 2) // 2))


def bench_phase(args, settings: Settings) -> None:
  """Train-step throughput, then inference speed-ups; ``bench.json`` is rewritten after each part."""
  import jax

  from benchmarks import common, inference_speedup, train_throughput

  path = os.path.join(args.workdir, "bench.json")
  env = common.environment()
  record = {"environment": env, "train_step": [], "inference": None, "timings": {}}
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s)), jax {jax.__version__}",
        flush=True)
  _write_json(path, record)
  start = time.time()
  try:
    configs = [(m, "pmap", settings.model, b, dt) for b in settings.train_batches for dt in settings.dtypes
               for m in MODES]  # the first batch in float32 first: the recipe's plan needs its step times
    threads = _threads(args, len(configs))
    train_deadline = start + 0.6 * (args._deadline - start)
    print(f"train steps: {len(configs)} configurations, {threads} compiling at a time", flush=True)

    def keep(measured):  # after every timed round: an interrupt loses at most the round under way
      record["train_step"] = [{"mode": m, "model": model, "batch": b, "dtype": dt, **r}
                              for (m, _, model, b, dt), r in measured.items()]
      _write_json(path, record)

    measured = train_throughput.measure(
        configs, settings.steps, settings.repeats, threads=threads, deadline=train_deadline, on_round=keep,
        on_built=lambda c: print(f"  compiled {c[0]} batch {c[3]} {c[4]} at {time.time() - start:.1f} s", flush=True))
    keep(measured)
    for (m, _, model, b, dt), r in measured.items():
      print(f"  {m:6s} batch {b:5d} {dt:8s}: {r['images_per_s']:10.0f} images/s, {1e3 * r['step_s']:8.2f} ms/step, "
            f"first call {r['first_call_s']:.1f} s", flush=True)
    record["timings"]["train_step_s"] = time.time() - start
    _write_json(path, record)

    t = time.time()
    nets = 4 if settings.quick else 6  # dense, the compressions, dense with its weights as arguments
    print(f"inference: {settings.inference_model}, batch 1 and {settings.inference_batches}", flush=True)
    record["inference"] = inference_speedup.measure(
        settings.inference_model, list(settings.inference_batches), calls=settings.calls,
        large_calls=settings.large_calls, repeats=settings.repeats, quick=settings.quick, speed_aware=False,
        threads=_threads(args, nets))
    for n in record["inference"]["networks"]:
      speedups = ", ".join(f"b{b} {n[f'batch{b}_speedup']:.2f}x" for b in settings.inference_batches)
      print(f"  {n['name']}: {n['batch1_latency_ms']:.2f} ms at batch 1 ({n['batch1_speedup']:.2f}x), {speedups}",
            flush=True)
    record["timings"]["inference_s"] = time.time() - t
  except KeyboardInterrupt:
    record["stopped"] = f"interrupted at the phase's deadline, {time.time() - start:.1f} s in"
    print(record["stopped"], flush=True)
  _write_json(path, record)


def recipe_config(args, settings: Settings):
  """The paper's BPCP config (experiments/configs/resnet_v2_56_bpcp.py), shortened for a time budget."""
  from bpcp_jax.run.config import apply_overrides, load_config_file

  overrides = [f"model={settings.recipe_model}", f"batch_size={settings.batch_size}",
               f"eval_batch_size={settings.eval_batch_size}",
               f"data.max_train_per_class={settings.max_train_per_class}",
               f"data.max_test_per_class={settings.max_test_per_class}", "optim.schedule=cosine",
               "stages.finetune_blocks.lr=0.02", "stages.finetune_channels.lr=0.02", "eval_every_epochs=1",
               "log_every_steps=50", "checkpoint.keep=1", f"profile.batch_sizes={settings.profile_batches}",
               f"profile.repeats={5 if settings.quick else 20}"]
  # the cap the planner works under; each stage's epochs are planned just before it starts
  overrides += [f"stages.{s}.epochs={settings.max_epochs}" for s in ("pretrain", "search", "finetune_blocks",
                                                                      "finetune_channels")]
  if args.data:
    overrides.append(f"data.path={args.data}")
  return apply_overrides(load_config_file(CONFIG), overrides + list(args.config_overrides))


def _bench_step_times(workdir: str, batch: int, dtype: str) -> tuple[dict[str, float], float]:
  """Step seconds of the dense and search train steps at the recipe's batch and dtype, and the dense step's
  compile time, from the throughput phase (scaled from the nearest batch measured); ``({}, 0)`` if none."""
  rows = (_load(os.path.join(workdir, "bench.json")) or {}).get("train_step", [])
  out, compile_s = {}, 0.0
  for mode in ("dense", "search"):
    cands = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype] or [r for r in rows if r["mode"] == mode]
    if not cands:
      continue
    r = min(cands, key=lambda r: abs(math.log(r["batch"] / batch)))
    out[mode] = r["step_s"] * batch / r["batch"] if r["batch"] != batch else r["step_s"]
    if mode == "dense":
      compile_s = r["first_call_s"]
  return out, compile_s


def recipe_phase(args, settings: Settings) -> None:
  """Load the data (while the throughput phase runs), wait for "go", then run the pipeline, planning each
  stage's epochs; ``recipe.json`` says what ran and how far it got."""
  from bpcp_jax.run import pipeline

  path = os.path.join(args.workdir, "recipe.json")
  run_dir = os.path.join(args.workdir, "run")
  config = recipe_config(args, settings)
  record: dict[str, Any] = {"status": "started", "config": config.to_dict(), "run_dir": run_dir}
  try:
    t = time.time()
    train, test = pipeline.load_data(config, args.data, progress=False)  # decoded once, then read from the cache
    record["data"] = {"train_images": len(train), "test_images": len(test), "load_s": time.time() - t}
    print(f"data: {len(train)} training and {len(test)} test images in {time.time() - t:.1f} s", flush=True)
    if not sys.stdin.readline().strip():  # the supervisor says when the accelerator is free
      raise SystemExit("recipe: no go from the supervisor")
    go = time.time()
    step_s, compile_s = _bench_step_times(args.workdir, config.batch_size, config.dtype)
    if len(step_s) < 2:  # no throughput measured: the first stage gets one epoch, the others learn from it
      step_s = None
    planner = StagePlanner(
        deadline=args._deadline, reserve_s=(5.0 if settings.quick else 15.0) + 1.5 * compile_s,
        train_images=len(train), test_images=len(test), batch_size=config.batch_size, step_s=step_s,
        compile_s=compile_s, weights=parse_weights(args.stage_weights), max_epochs=settings.max_epochs,
        stages=[s.strip() for s in config.stages.run.split(",")], metrics_path=os.path.join(run_dir, "metrics.jsonl"))
    record.update({"status": "running", "go_at": go, "deadline": args._deadline, "step_s": step_s,
                   "compile_s": compile_s})
    try:
      summary = pipeline.run_pipeline(config, run_dir, data_path=args.data, progress=False,
                                      before_stage=planner)
      record["status"] = "complete"
      record["summary"] = summary
    except KeyboardInterrupt:
      record["status"] = ("stopped at the time budget " + (
          "before the first stage" if planner.current is None else f"during {planner.current}"
          + (" or the summary after it" if planner.current == planner.stages[-1] else "")))
    planner.finish()
    record.update({"plan": planner.history, "stage_wall_s": planner.wall_s, "seconds": time.time() - go,
                   "config": config.to_dict()})
  except KeyboardInterrupt:
    record["status"] = "stopped at the time budget before training"
  print(f"recipe: {record['status']}", flush=True)
  _write_json(path, record)


# ------------------------------------------------------------------------------------------------
# Results: tables, CSV, JSON, plots
# ------------------------------------------------------------------------------------------------


def _load(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def recipe_rows(recipe: Optional[dict], metrics: list[dict]) -> list[dict]:
  """One row per stage that ran (epochs, seconds, last test accuracy, size) and, when the pipeline finished,
  the dense and the pruned network at each profiled batch (latency, speed-up)."""
  rows = []
  summary = (recipe or {}).get("summary") or {}
  sizes = summary.get("stages", {})
  walls = (recipe or {}).get("stage_wall_s", {})
  for stage in STAGES:
    size = sizes.get(stage, {})
    if stage == "prune":
      if stage in walls:
        rows.append({"table": "recipe", "name": stage, "seconds": walls[stage], "params": size.get("params"),
                     "macs": size.get("macs"), "blocks": size.get("blocks")})
      continue
    rs = [r for r in metrics if r["stage"] == stage]
    if not rs:
      continue
    tested = [r for r in rs if "test_accuracy" in r]
    rows.append({"table": "recipe", "name": stage, "epochs": len(rs),
                 "seconds": walls.get(stage, sum(r["epoch_seconds"] for r in rs)),
                 "images_per_s": sorted(r["images_per_s"] for r in rs)[len(rs) // 2],
                 "accuracy": tested[-1]["test_accuracy"] if tested else None, "params": size.get("params"),
                 "macs": size.get("macs"), "blocks": size.get("blocks", rs[-1].get("blocks"))})
  for name in ("dense", "pruned"):
    e = summary.get(name)
    if not e:
      continue
    for key in sorted(k for k in e if k.startswith("latency_ms_b")):
      b = int(key[len("latency_ms_b"):])
      dense_ms = summary["dense"][key]
      rows.append({"table": "final", "name": name, "batch": b, "ms": e[key], "images_per_s": e[f"images_per_s_b{b}"],
                   "speedup": dense_ms / e[key], "macs_ratio": summary["dense"]["macs"] / e["macs"],
                   "accuracy": e["accuracy"], "params": e["params"], "macs": e["macs"],
                   "blocks": len(e["blocks_kept"])})
  return rows


def bench_rows(bench: Optional[dict]) -> list[dict]:
  rows = []
  for r in (bench or {}).get("train_step", []):
    rows.append({"table": "train_step", "name": r["mode"], "batch": r["batch"], "dtype": r["dtype"],
                 "images_per_s": r["images_per_s"], "ms": 1e3 * r["step_s"], "compile_s": r["first_call_s"]})
  inf = (bench or {}).get("inference") or {}
  for n in inf.get("networks", []):
    base = {"table": "inference", "name": n["name"], "dtype": "float32", "macs_ratio": n["macs_ratio"],
            "params": n["params"], "macs": n["macs"], "blocks": n["blocks"]}
    rows.append({**base, "batch": 1, "ms": n["batch1_latency_ms"], "images_per_s": 1e3 / n["batch1_latency_ms"],
                 "speedup": n["batch1_speedup"]})
    for b in inf["large_batches"]:
      rows.append({**base, "batch": b, "images_per_s": n[f"batch{b}_images_per_s"],
                   "ms": 1e3 * b / n[f"batch{b}_images_per_s"], "speedup": n[f"batch{b}_speedup"]})
  return rows


def _fmt(v, digits=3) -> str:
  if v is None or v == "":
    return "-"
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


def markdown(rows: list[dict], cols: list[tuple[str, str]]) -> str:
  from benchmarks.common import markdown_table

  def cell(r, k):  # accuracies are fractions in the JSON/CSV and percent in the tables
    v = r.get(k)
    return f"{100 * v:.2f}" if k == "accuracy" and isinstance(v, (int, float)) else _fmt(v)

  return markdown_table([h for h, _ in cols], [[cell(r, k) for _, k in cols] for r in rows])


def assemble(args, settings: Settings, phases: dict, t0: float, log) -> dict:
  """Write results.{md,json,csv}, metrics.jsonl and plots.png into ``args.out`` from what the phases left."""
  bench = _load(os.path.join(args.workdir, "bench.json"))
  recipe = _load(os.path.join(args.workdir, "recipe.json"))
  run_dir = os.path.join(args.workdir, "run")
  metrics = _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  rows = bench_rows(bench) + recipe_rows(recipe, metrics)
  env = (bench or {}).get("environment") or {}
  machine = ((recipe or {}).get("summary") or {}).get("machine") or {}
  device = env.get("device", {}).get("device_kind") or machine.get("device_kind") or "unknown"
  platform_ = env.get("device", {}).get("platform") or machine.get("platform") or "unknown"

  with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, CSV_COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
  if metrics:
    with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in metrics)
  plots = write_plots(os.path.join(args.out, "plots.png"), rows, metrics)

  total = time.time() - t0
  record = {
      "device": device, "platform": platform_, "environment": env, "quick": settings.quick,
      "budget_s": args.budget, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "timings": {"total_s": total, **{f"{k}_s": v["seconds"] for k, v in phases.items()},
                  **{f"bench_{k}": v for k, v in ((bench or {}).get("timings") or {}).items()}},
      "phases": phases, "settings": dataclasses.asdict(settings), "rows": rows, "bench": bench, "recipe": recipe,
      "plots": plots,
  }
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(results_markdown(record, metrics))
  # the JSON last, with the final total (the other files took a moment)
  record["timings"]["total_s"] = time.time() - t0
  _write_json(os.path.join(args.out, "results.json"), record)
  return record


def results_markdown(record: dict, metrics: list[dict]) -> str:
  env, rows = record["environment"], record["rows"]
  versions = env.get("versions", {})
  t = record["timings"]
  parts = [f"# Accelerator run{' (--quick: a smoke run, not a measurement)' if record['quick'] else ''}\n",
           f"Device: {record['device']} ({record['platform']}); jax {versions.get('jax', '?')}, "
           f"flax {versions.get('flax', '?')}; {env.get('date', '')}. Budget {record['budget_s']:.0f} s, total "
           f"{t['total_s']:.0f} s (" + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items()
                                                 if k != "total_s" and isinstance(v, float)) + ").\n",
           f"`{record['command']}`\n"]
  late = [f"- {name} phase: " + ("killed" if p["killed"] else "interrupted at its deadline" if p["interrupted"]
                                  else f"exit status {p['returncode']} (see log.txt)")
          for name, p in record["phases"].items() if p["interrupted"] or p["killed"] or p["returncode"]]
  if late:
    parts.append("\n".join(late) + "\n")
  train = [r for r in rows if r["table"] == "train_step"]
  parts.append("\n## Train steps (pmap, images/s; first call = compilation, several at a time)\n")
  parts.append(markdown(train, [("step", "name"), ("batch", "batch"), ("dtype", "dtype"), ("images/s", "images_per_s"),
                                ("ms/step", "ms"), ("first call s", "compile_s")]) if train else "not measured")
  inf = [r for r in rows if r["table"] == "inference"]
  parts.append("\n## Inference of materialized networks (deployed, weights compiled in; random weights)\n")
  parts.append(markdown(inf, [("network", "name"), ("blocks", "blocks"), ("MACs ratio", "macs_ratio"),
                              ("batch", "batch"), ("ms/call", "ms"), ("images/s", "images_per_s"),
                              ("speed-up", "speedup")]) if inf else "not measured")
  recipe = record.get("recipe") or {}
  rec = [r for r in rows if r["table"] == "recipe"]
  data = recipe.get("data", {})
  parts.append(f"\n## Shortened BPCP recipe ({recipe.get('config', {}).get('model', '?')}, "
               f"{data.get('train_images', '?')} training / {data.get('test_images', '?')} test images): "
               f"{recipe.get('status', 'not run')}\n")
  parts.append(markdown(rec, [("stage", "name"), ("epochs", "epochs"), ("wall s", "seconds"),
                              ("train images/s", "images_per_s"), ("test acc %", "accuracy"), ("params", "params"),
                              ("MACs", "macs"), ("blocks", "blocks")]) if rec else "no stage finished an epoch")
  if rec:
    parts.append("\nWall s: from the stage's start to the next one's (the last stage's includes the summary: "
                 "profiling both networks); train images/s: the median epoch's, the first one compiling.\n")
  fin = [r for r in rows if r["table"] == "final"]
  if fin:
    parts.append("\nDense vs pruned (the pipeline's summary; latency of the deployed network):\n")
    parts.append(markdown(fin, [("network", "name"), ("test acc %", "accuracy"), ("params", "params"),
                                ("MACs", "macs"), ("blocks", "blocks"), ("batch", "batch"), ("ms", "ms"),
                                ("speed-up", "speedup"), ("MACs ratio", "macs_ratio")]))
  plan = recipe.get("plan") or []
  if plan:
    parts.append("\nEpochs planned before each stage (time left after the reserve for the summary):\n")
    parts.append(markdown([p for p in plan if "epochs" in p],
                          [("stage", "stage"), ("s left", "available_s"), ("epochs", "epochs"),
                           ("s/epoch est.", "epoch_estimate_s"), ("start-up s est.", "overhead_estimate_s")]))
  gates = [r for r in metrics if r.get("stage") == "search" and "gate_probs" in r]
  if gates:
    last = gates[-1]["gate_probs"]
    removed = sorted(k for k, p in last.items() if p < 0.5)
    parts.append(f"\nBlock search: {len(last) - len(removed)} of {len(last)} blocks kept after "
                 f"{gates[-1]['epoch']} epoch(s); removed: {', '.join(removed) or 'none'}.\n")
  parts.append("\n" + ("![plots](plots.png)\n" if record["plots"] else
                       "Plots skipped: matplotlib is not installed.\n"))
  return "\n".join(parts) + "\n"


def write_plots(path: str, rows: list[dict], metrics: list[dict]) -> bool:
  """One figure: train-step images/s, inference speed-ups, accuracy over the stages, gate probabilities."""
  try:
    import matplotlib
  except ImportError:
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the report helpers import jax; nothing runs on a device here
  from bpcp_jax.run.report import plot_accuracy, plot_gates

  fig, axes = plt.subplots(2, 2, figsize=(13, 8))
  ax = axes[0, 0]
  train = [r for r in rows if r["table"] == "train_step"]
  keys = list(dict.fromkeys((r["batch"], r["dtype"]) for r in train))
  for i, mode in enumerate(MODES):
    vals = {(r["batch"], r["dtype"]): r["images_per_s"] for r in train if r["name"] == mode}
    ax.bar([k + 0.27 * (i - 1) for k in range(len(keys))], [vals.get(k, 0) for k in keys], 0.27, label=mode)
  ax.set_xticks(range(len(keys)), [f"b{b} {d}" for b, d in keys])
  ax.set_ylabel("train images/s")
  ax.set_title("train steps")
  if train:
    ax.legend(fontsize=7)
  ax = axes[0, 1]
  inf = [r for r in rows if r["table"] == "inference"]
  for batch in dict.fromkeys(r["batch"] for r in inf):
    rs = [r for r in inf if r["batch"] == batch]
    ax.plot([r["macs_ratio"] for r in rs], [r["speedup"] for r in rs], "o", label=f"batch {batch}")
  if inf:
    top = max(r["macs_ratio"] for r in inf)
    ax.plot([1, top], [1, top], "k:", lw=0.8, label="speed-up = MACs ratio")
    ax.legend(fontsize=7)
  ax.set_xlabel("MACs ratio (dense / pruned)")
  ax.set_ylabel("inference speed-up")
  ax.set_title("materialized networks")
  if metrics:
    plot_accuracy(metrics, ax=axes[1, 0])
  axes[1, 0].set_title("recipe: accuracy")
  if plot_gates(metrics, ax=axes[1, 1]) is None:
    axes[1, 1].text(0.5, 0.5, "no search epoch", ha="center")
  axes[1, 1].set_title("block search: keep probabilities")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog="--config.KEY=VALUE overrides the recipe's config (e.g. --config.batch_size=256)")
  p.add_argument("--out", default=None, help="where the results go (default: $OUT, else ./accelerator_run)")
  p.add_argument("--data", default=None,
                 help="CIFAR-10 archive (default: .data/cifar10-jpeg.tar.gz in the repository if present, else "
                      "$BPCP_DATA or ../shared/data/cifar10-jpeg.tar.gz)")
  p.add_argument("--budget", type=float, default=None, help="wall-time budget in seconds (default 540; --quick 240)")
  p.add_argument("--quick", action="store_true", help="tiny networks and data on CPU: a smoke run for CI")
  p.add_argument("--parts", default="bench,recipe", help="bench (throughput and inference) and/or recipe")
  p.add_argument("--stage-weights", default=DEFAULT_WEIGHTS, help="how the recipe's time is shared by its stages")
  p.add_argument("--compile-threads", type=int, default=0, help="parallel compilations (default: half the cores)")
  p.add_argument("--workdir", default=None, help="checkpoints and intermediate files (default: a temporary folder)")
  p.add_argument("--_phase", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  args.config_overrides = rest
  settings = QUICK if args.quick else FULL
  args.parts = [s for s in args.parts.split(",") if s]
  bad = [s for s in args.parts if s not in ("bench", "recipe")]
  if bad or not args.parts:
    p.error(f"--parts {','.join(args.parts)}: choose from bench, recipe")
  parse_weights(args.stage_weights)
  args.budget = settings.budget_s if args.budget is None else args.budget
  if args.budget < 2 * (GRACE_S + ASSEMBLY_S) and args._phase is None:
    p.error(f"--budget {args.budget:.0f} s is too short (at least {2 * (GRACE_S + ASSEMBLY_S):.0f} s)")
  if args.data is None:
    local = os.path.join(REPO, ".data", "cifar10-jpeg.tar.gz")
    args.data = local if os.path.exists(local) else None  # None: the pipeline's default
  if args.data and not os.path.exists(args.data):
    p.error(f"--data {args.data}: no such file")
  if args.data:
    args.data = os.path.abspath(args.data)
  args.out = os.path.abspath(args.out or os.environ.get("OUT") or "accelerator_run")
  args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bpcp-accelerator-"))
  return args, settings


def main(argv=None):
  args, settings = parse_args(argv)
  if args._phase == "bench":
    return bench_phase(args, settings)
  if args._phase == "recipe":
    return recipe_phase(args, settings)
  return supervisor(args, settings)


if __name__ == "__main__":
  main()
