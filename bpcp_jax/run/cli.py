"""``bpcp-jax``: the command line. Thin: every subcommand parses, then calls the library.

  bpcp-jax pipeline       --config FILE --workdir DIR [--resume] [--data PATH] [--config.KEY=VALUE ...]
  bpcp-jax train          --workdir DIR (dense pretraining only)
  bpcp-jax search-blocks  --workdir DIR --from STAGE_DIR (block search from a trained network)
  bpcp-jax prune-channels --workdir DIR --from STAGE_DIR
  bpcp-jax finetune       --workdir DIR --from STAGE_DIR [--stage finetune_blocks|finetune_channels]
  bpcp-jax eval           --from STAGE_DIR [--from STAGE_DIR ...]
  bpcp-jax profile        --from STAGE_DIR [--from STAGE_DIR ...] or --workdir DIR of a finished run
  bpcp-jax sweep          --sweep experiments/sweeps/FILE.py --workdir DIR

Every command first says what it is about to run (config, network, stages and epochs, data,
devices). Errors in the input (config keys, data, checkpoints) end with a one-line message
naming the offending thing and exit status 2; a non-finite loss exits with status 3; Ctrl-C
says where the run stopped, its last checkpoint and the command that resumes it (status 130).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from typing import Optional, Sequence

SUBCOMMAND_STAGES = {
    "pipeline": None,
    "train": "pretrain",
    "search-blocks": "search",
    "prune-channels": "prune",
    "finetune": "finetune_channels",
}
EXAMPLE_FROM = {"search-blocks": "runs/dense/checkpoints/pretrain", "prune-channels": "runs/bp/checkpoints/search",
                "finetune": "runs/cp/checkpoints/prune", "eval": "runs/smoke/checkpoints/finetune_channels",
                "profile": "runs/smoke/checkpoints/finetune_channels", "pipeline": "runs/dense/checkpoints/pretrain"}
DESCRIPTIONS = {
    "pipeline": "Run every stage of the config's stages.run (pretrain -> block search -> fine-tune -> channel "
                "prune -> fine-tune) in --workdir, then write summary.json and report.md.",
    "train": "Dense pretraining only (the pretrain stage); its checkpoint feeds search-blocks or prune-channels.",
    "search-blocks": "Block search (BP) from a trained network: learns a keep gate per residual block and "
                     "removes the blocks whose keep probability ends below 0.5.",
    "prune-channels": "Channel pruning (CP) of a network, by the config's stages.prune criterion and ratio; a "
                      "searched network's block decisions are applied first.",
    "finetune": "Fine-tune a pruned network (after prune-channels, or with --stage finetune_blocks after "
                "search-blocks).",
    "eval": "Test accuracy of stage checkpoints on the config's test data.",
    "profile": "Parameters, MACs, blocks and deployed latency of stage checkpoints, timed side by side.",
    "sweep": "Run every pipeline of a sweep file (experiments/sweeps/*.py) and collect the results.",
}
SHORT_HELP = {"pipeline": "every stage of the config, one after the other", "train": "dense pretraining only",
              "search-blocks": "block search (BP) from a trained network", "prune-channels": "channel pruning (CP)",
              "finetune": "fine-tune a pruned network", "eval": "test accuracy of stage checkpoints",
              "profile": "params, MACs and latency of stage checkpoints", "sweep": "many pipeline runs from a sweep file"}
EPILOG = "Override any config field with --config.KEY=VALUE, e.g. --config.stages.search.gamma=0.1"


def _config_help(resumable: bool) -> str:
  from bpcp_jax.run.config import DEFAULT_CONFIG_TEXT

  return (f"experiment config file (experiments/configs/*.py). Default: {DEFAULT_CONFIG_TEXT}"
          + ("; with --resume and no --config, the run's own config.json" if resumable else ""))


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bpcp-jax", description="Block + channel pruning of ResNets in JAX/Flax.",
                              epilog=EPILOG)
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in (*SUBCOMMAND_STAGES, "eval", "profile", "sweep"):
    s = sub.add_parser(name, help=SHORT_HELP[name], description=DESCRIPTIONS[name],
                       epilog=EPILOG if name != "sweep" else "--config.KEY=VALUE overrides apply to every run")
    if name == "sweep":
      s.add_argument("--sweep", required=True, help="sweep file defining get_sweep()")
      s.add_argument("--workdir", required=True, help="sweep directory (runs/<name>/, results.csv, results.md, plots)")
      s.add_argument("--data", help="image folder or .tar(.gz) archive for every run")
      s.add_argument("--no-progress", action="store_true", help="no progress bars")
      continue
    s.add_argument("--config", help=_config_help(name in SUBCOMMAND_STAGES))
    if name in SUBCOMMAND_STAGES:
      s.add_argument("--workdir", required=True,
                     help="run directory (config.json, checkpoints/, metrics.jsonl, summary.json, report.md)")
    elif name == "profile":
      s.add_argument("--workdir", help="a run directory: profile its stage checkpoints")
    if name != "profile":
      s.add_argument("--data", help="image folder or .tar(.gz) archive (default: $BPCP_DATA or "
                                    "../shared/data/cifar10-jpeg.tar.gz)")
    if name in ("eval", "profile"):
      s.add_argument("--from", dest="input_dirs", action="append", default=[], metavar="STAGE_DIR",
                     help=f"a stage checkpoint directory, repeatable (e.g. {EXAMPLE_FROM[name]})")
    elif name != "train":
      s.add_argument("--from", dest="input_dir", metavar="STAGE_DIR",
                     help=f"the stage checkpoint directory to start from (e.g. {EXAMPLE_FROM[name]})"
                          + ("" if name == "pipeline" else "; required"))
    if name in SUBCOMMAND_STAGES:
      s.add_argument("--resume", action="store_true", help="continue the run in --workdir where it stopped")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    if name == "finetune":
      s.add_argument("--stage", default="finetune_channels", choices=["finetune_blocks", "finetune_channels"],
                     help="finetune_channels after prune-channels (default), finetune_blocks after search-blocks")
  return p


def _say(text: str) -> None:
  import jax

  if jax.process_index() == 0:
    print(text, flush=True)


def _load_config(args, overrides):
  """The config and a line saying where it came from."""
  from bpcp_jax.run.config import DEFAULT_CONFIG_TEXT, apply_overrides, default_config, load_config_file, load_config_json

  saved = os.path.join(args.workdir, "config.json") if getattr(args, "workdir", None) else ""
  if args.config:
    config, source = load_config_file(args.config), f"config: {args.config}"
  elif getattr(args, "resume", False) and os.path.isfile(saved):
    config, source = load_config_json(saved), f"config: the run's own {saved} (--resume without --config)"
  else:
    config, source = default_config(), f"config: none given (--config), so the default: {DEFAULT_CONFIG_TEXT}"
  if overrides:
    source += "; overrides: " + " ".join(o[len("--config."):] for o in overrides)
  return apply_overrides(config, overrides), source


def _run(args, overrides) -> int:
  import jax

  from bpcp_jax.training import parallel

  parallel.maybe_initialize_distributed()
  if args.command == "sweep":
    from bpcp_jax.run.sweep import run_sweep_command

    return run_sweep_command(args.sweep, args.workdir, overrides, data_path=args.data, progress=not args.no_progress)
  config, source = _load_config(args, overrides)
  progress = not args.no_progress
  if args.command in SUBCOMMAND_STAGES:
    from bpcp_jax.run.pipeline import run_pipeline

    stage = args.stage if args.command == "finetune" else SUBCOMMAND_STAGES[args.command]
    if stage is not None:
      config.stages.run = stage
    input_dir = getattr(args, "input_dir", None)
    if stage not in (None, "pretrain") and not input_dir:
      raise ValueError(f"{args.command} needs --from <stage checkpoint dir> (e.g. {EXAMPLE_FROM[args.command]})")
    _say(f"bpcp-jax {args.command}: {source}")
    summary = run_pipeline(config, args.workdir, resume=args.resume, data_path=args.data, input_dir=input_dir,
                           progress=progress)
    if jax.process_index() == 0:
      from bpcp_jax.run.report import summary_table

      print(summary_table(summary))
      print(f"run directory: {os.path.abspath(args.workdir)} (summary.json, report.md)")
    return 0
  if args.command == "eval":
    return _eval(args, config, source, progress)
  return _profile(args, config, source)


def _eval(args, config, source, progress) -> int:
  import jax

  from bpcp_jax.run.pipeline import StageOutput, evaluate_output, load_data
  from bpcp_jax.training.checkpoint import load_stage

  if not args.input_dirs:
    raise ValueError(f"eval needs --from <stage checkpoint dir> (e.g. {EXAMPLE_FROM['eval']})")
  nets = [(d, *load_stage(d)) for d in args.input_dirs]  # every checkpoint checked before the data loads
  _say(f"bpcp-jax eval: {source}")
  for d, net, _, meta in nets:
    _say(f"checkpoint: {d} (stage {meta.get('stage')}, step {meta.get('step')}): {net.label}, "
         f"{len(net.block_names)} blocks")
  _say(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, eval batch {config.eval_batch_size}")
  _, test = load_data(config, args.data, progress=progress)
  _say(f"data: {len(test.labels):,} test images")
  for d, net, variables, meta in nets:
    acc = evaluate_output(config, StageOutput(net, variables, {}), test, progress)
    print(json.dumps({"checkpoint": d, "stage": meta.get("stage"), "accuracy": acc, "test_images": len(test.labels)}))
  return 0


def _profile(args, config, source) -> int:
  import jax

  from bpcp_jax.deploy.latency import paired_ratio
  from bpcp_jax.deploy.profile import profile_networks
  from bpcp_jax.run.config import STAGES
  from bpcp_jax.run.pipeline import profile_batch_sizes
  from bpcp_jax.run.report import format_ms
  from bpcp_jax.training.checkpoint import load_stage

  dirs = list(args.input_dirs)
  if not dirs and args.workdir:
    ck = os.path.join(args.workdir, "checkpoints")
    dirs = [os.path.join(ck, s) for s in STAGES if os.path.isdir(os.path.join(ck, s)) and os.listdir(os.path.join(ck, s))]
    if not dirs:
      raise ValueError(f"no stage checkpoints under {ck}; profile needs --from <stage checkpoint dir> or the "
                       "--workdir of a run")
  if not dirs:
    raise ValueError("profile needs --from <stage checkpoint dir> (repeatable) or --workdir of a run")
  batch_sizes = profile_batch_sizes(config)
  loaded = {d: load_stage(d)[:2] for d in dirs}

  def arch(net):
    return json.dumps(net.describe().get("spec") or net.describe(), sort_keys=True)

  # one architecture is timed once: identical networks get identical numbers by construction
  distinct: dict[str, str] = {}
  for d, (net, _) in loaded.items():
    distinct.setdefault(arch(net), d)
  _say(f"bpcp-jax profile: {source}")
  _say(f"timing {len(distinct)} distinct network(s) of {len(dirs)} at batch {', '.join(map(str, batch_sizes))} on "
       f"{jax.devices()[0].platform} ({config.profile.repeats} interleaved rounds)")
  entries, samples = profile_networks({d: loaded[d] for d in distinct.values()}, batch_sizes,
                                      rounds=config.profile.repeats)
  first = distinct[arch(loaded[dirs[0]][0])]
  head = ["network", "params", "MACs", "blocks"] + [f"latency b{b} ms" for b in batch_sizes] + \
         [f"speed-up b{b}" for b in batch_sizes]
  print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
  for d in dirs:
    timed = distinct[arch(loaded[d][0])]
    e = entries[timed]
    cells = [d, f"{e['params']:,}", f"{e['macs']:,}", str(e["blocks"])]
    for b in batch_sizes:
      s = e["latency_spread_ms"][f"b{b}"]
      cells.append(f"{format_ms(s['median'])} ({format_ms(s['q25'])}-{format_ms(s['q75'])})")
    for b in batch_sizes:
      if timed == first:  # the reference itself, or the same architecture: by construction
        cells.append("1.00x" + (" (same architecture)" if d != dirs[0] else ""))
      else:
        r = paired_ratio(samples[first][f"b{b}"], samples[timed][f"b{b}"])
        cells.append(f"{r['median']:.2f}x ({r['q25']:.2f}-{r['q75']:.2f})")
    print("| " + " | ".join(cells) + " |")
  print(f"latency: median ms (interquartile range) over {config.profile.repeats} interleaved rounds; "
        f"speed-up against {dirs[0]}, round by round")
  return 0


def _resume_command(argv: Sequence[str], command: str) -> str:
  if command in SUBCOMMAND_STAGES and "--resume" not in argv:
    argv = [*argv, "--resume"]
  return "bpcp-jax " + shlex.join(argv)


def _last_checkpoint(workdir: Optional[str]) -> Optional[str]:
  """The newest checkpoint directory of the last stage that has one (by name: nothing is read)."""
  from bpcp_jax.run.config import STAGES

  if not workdir:
    return None
  for stage in reversed(STAGES):
    d = os.path.join(workdir, "checkpoints", stage)
    steps = sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
    if steps:
      return os.path.join(os.path.abspath(d), str(steps[-1]))
  return None


def _interrupted(error: KeyboardInterrupt, args, argv: Sequence[str]) -> int:
  from bpcp_jax.training.loop import StageInterrupted

  lines = []
  if isinstance(error, StageInterrupted):
    lines.append(f"bpcp-jax: interrupted in stage {error.stage} at step {error.step} "
                 f"(epoch {error.epoch} of {error.epochs})")
    last = error.checkpoint or (_last_checkpoint(args.workdir) if args.command != "sweep" else None)
  else:
    lines.append(f"bpcp-jax: interrupted ({args.command}, outside a training stage)")
    last = _last_checkpoint(getattr(args, "workdir", None)) if args.command != "sweep" else None
  if args.command in SUBCOMMAND_STAGES or (args.command == "sweep" and last):
    lines.append(f"last checkpoint: {last}" if last else "no checkpoint was written yet")
  if args.command in SUBCOMMAND_STAGES or args.command == "sweep":  # a sweep continues where it stopped
    lines.append(f"resume with: {_resume_command(argv, args.command)}")
  print("\n".join(lines), file=sys.stderr, flush=True)
  return 130


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
  """Our own warnings as one line (``bpcp-jax: warning: ...``); others as Python shows them."""
  from bpcp_jax.training.checkpoint import CheckpointWarning

  if issubclass(category, CheckpointWarning):
    print(f"bpcp-jax: warning: {message}", file=sys.stderr, flush=True)
  else:
    _default(message, category, filename, lineno, file, line)


def main(argv: Optional[Sequence[str]] = None) -> int:
  if argv is None:  # run as a program: restart with a better host allocator first (see host.py)
    from bpcp_jax.run.compile_cache import enable_compilation_cache
    from bpcp_jax.run.host import reexec_with_allocator

    reexec_with_allocator(["-m", "bpcp_jax.run.cli", *sys.argv[1:]])
    enable_compilation_cache()  # every command is a fresh process: reuse what earlier ones compiled
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  from bpcp_jax.run.config import ConfigError
  from bpcp_jax.run.lock import RunDirectoryInUse
  from bpcp_jax.training.checkpoint import CheckpointError
  from bpcp_jax.training.data import DataError
  from bpcp_jax.training.loop import NonFiniteLoss

  import absl.logging

  absl.logging.set_verbosity("error")  # orbax's per-save info lines drown the progress bars
  warnings.showwarning = _show_warning
  try:
    return _run(args, overrides)
  except KeyboardInterrupt as e:
    return _interrupted(e, args, argv)
  except NonFiniteLoss as e:
    print(f"bpcp-jax: error: {e}", file=sys.stderr)
    return 3
  except (ConfigError, DataError, CheckpointError, RunDirectoryInUse, ValueError) as e:
    if os.environ.get("BPCP_JAX_TRACEBACK"):  # for bug reports: the whole traceback
      raise
    print(f"bpcp-jax: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # unwritable or full work directory, missing files: name the path
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    print(f"bpcp-jax: error: {e.strerror or e}{where}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - unforeseen (a bug, or an input nothing checked): no raw traceback
    if os.environ.get("BPCP_JAX_TRACEBACK"):
      raise
    print(_unexpected(e, args, argv), file=sys.stderr, flush=True)
    return 1


def _unexpected(error: Exception, args, argv: Sequence[str]) -> str:
  """What an unforeseen error says: the error in one line, then (for the stage commands) the last
  checkpoint written and the command that resumes from it, and how to see the whole traceback."""
  text = " ".join(str(error).split()) or "(no message)"
  lines = [f"bpcp-jax: error: {type(error).__name__}: {text[:2000]}"]
  if args.command in SUBCOMMAND_STAGES:
    last = _last_checkpoint(getattr(args, "workdir", None))
    lines.append(f"last checkpoint: {last}" if last else "no checkpoint was written yet")
    if last:
      lines.append(f"resume with: {_resume_command(argv, args.command)}")
  lines.append("this is unexpected: run again with BPCP_JAX_TRACEBACK=1 for the whole traceback (for a bug report)")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
