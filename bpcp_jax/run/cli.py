"""``bpcp-jax``: the command line. Thin: every subcommand parses, then calls the library.

  bpcp-jax pipeline       --config FILE --workdir DIR [--resume] [--data PATH] [--config.KEY=VALUE ...]
  bpcp-jax train          (dense pretraining only)
  bpcp-jax search-blocks  --from STAGE_DIR (block search from a trained network)
  bpcp-jax prune-channels --from STAGE_DIR
  bpcp-jax finetune       --from STAGE_DIR
  bpcp-jax eval           --from STAGE_DIR
  bpcp-jax profile        --from STAGE_DIR [--from STAGE_DIR ...] or --workdir DIR of a finished run
  bpcp-jax sweep          --sweep experiments/sweeps/FILE.py --workdir DIR

Errors in the input (config keys, data, checkpoints) end with a one-line message naming the
offending thing and exit status 2; a non-finite loss exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

SUBCOMMAND_STAGES = {
    "pipeline": None,
    "train": "pretrain",
    "search-blocks": "search",
    "prune-channels": "prune",
    "finetune": "finetune_channels",
}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bpcp-jax", description="Block + channel pruning of ResNets in JAX/Flax.",
                              epilog="Override any config field with --config.KEY=VALUE, "
                                     "e.g. --config.stages.search.gamma=0.1")
  sub = p.add_subparsers(dest="command", required=True)
  for name in (*SUBCOMMAND_STAGES, "eval", "profile"):
    s = sub.add_parser(name)
    s.add_argument("--config", help="experiment config file (experiments/configs/*.py)")
    s.add_argument("--workdir", help="run directory (config.json, checkpoints/, metrics.jsonl, summary.json)")
    s.add_argument("--data", help="image folder or .tar(.gz) archive (default: $BPCP_DATA or "
                                  "../shared/data/cifar10-jpeg.tar.gz)")
    s.add_argument("--from", dest="input_dirs", action="append", default=[],
                   help="a stage checkpoint directory to start from (<workdir>/checkpoints/<stage>)")
    s.add_argument("--resume", action="store_true", help="continue the run in --workdir where it stopped")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    if name == "finetune":
      s.add_argument("--stage", default="finetune_channels", choices=["finetune_blocks", "finetune_channels"])
  s = sub.add_parser("sweep", help="run every pipeline of a sweep file (experiments/sweeps/*.py), collect results")
  s.add_argument("--sweep", required=True, help="sweep file defining get_sweep()")
  s.add_argument("--workdir", required=True, help="sweep directory (runs/<name>/, results.csv, results.md, plots)")
  s.add_argument("--data", help="image folder or .tar(.gz) archive for every run")
  s.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def _load_config(args, overrides):
  from bpcp_jax.run.config import apply_overrides, default_config, load_config_file

  config = load_config_file(args.config) if args.config else default_config()
  return apply_overrides(config, overrides)


def _run(args, overrides) -> int:
  import jax

  from bpcp_jax.training import parallel

  parallel.maybe_initialize_distributed()
  if args.command == "sweep":
    from bpcp_jax.run.sweep import run_sweep_command

    return run_sweep_command(args.sweep, args.workdir, overrides, data_path=args.data, progress=not args.no_progress)
  config = _load_config(args, overrides)
  progress = not args.no_progress
  if args.command in SUBCOMMAND_STAGES:
    from bpcp_jax.run.pipeline import run_pipeline

    if not args.workdir:
      raise ValueError("--workdir is required")
    stage = SUBCOMMAND_STAGES[args.command]
    if args.command == "finetune":
      stage = args.stage
    if stage is not None:
      config.stages.run = stage
    if stage not in (None, "pretrain") and not args.input_dirs:
      raise ValueError(f"{args.command} needs --from <stage checkpoint dir> (e.g. runs/x/checkpoints/pretrain)")
    summary = run_pipeline(config, args.workdir, resume=args.resume, data_path=args.data,
                           input_dir=args.input_dirs[0] if args.input_dirs else None, progress=progress)
    if jax.process_index() == 0:
      from bpcp_jax.run.report import summary_table

      print(summary_table(summary))
      print(f"run directory: {os.path.abspath(args.workdir)} (summary.json, report.md)")
    return 0
  if args.command == "eval":
    return _eval(args, config, progress)
  return _profile(args, config)


def _eval(args, config, progress) -> int:
  from bpcp_jax.training.checkpoint import load_stage
  from bpcp_jax.run.pipeline import StageOutput, evaluate_output, load_data

  if not args.input_dirs:
    raise ValueError("eval needs --from <stage checkpoint dir>")
  _, test = load_data(config, args.data, progress=progress)
  for d in args.input_dirs:
    net, variables, meta = load_stage(d)
    acc = evaluate_output(config, StageOutput(net, variables, {}), test, progress)
    print(json.dumps({"checkpoint": d, "stage": meta.get("stage"), "accuracy": acc, "test_images": len(test.labels)}))
  return 0


def _profile(args, config) -> int:
  from bpcp_jax.training.checkpoint import load_stage
  from bpcp_jax.deploy.profile import profile_network

  dirs = list(args.input_dirs)
  if not dirs and args.workdir:
    ck = os.path.join(args.workdir, "checkpoints")
    dirs = [os.path.join(ck, s) for s in ("pretrain", "finetune_channels", "finetune_blocks", "prune")
            if os.path.isdir(os.path.join(ck, s))]
  if not dirs:
    raise ValueError("profile needs --from <stage checkpoint dir> (repeatable) or --workdir of a run")
  batch_sizes = tuple(int(b) for b in str(config.profile.batch_sizes).split(","))
  rows = []
  for d in dirs:
    net, variables, _ = load_stage(d)
    rows.append({"network": d, **profile_network(net, variables, batch_sizes, repeats=config.profile.repeats)})
  head = ["network", "params", "macs", "blocks"] + [f"latency_ms_b{b}" for b in batch_sizes]
  print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
  for r in rows:
    print("| " + " | ".join(f"{r[h]:,.2f}" if isinstance(r[h], float) else f"{r[h]:,}" if isinstance(r[h], int)
                            else str(r[h]) for h in head) + " |")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  if argv is None:  # run as a program: restart with a better host allocator first (see host.py)
    from bpcp_jax.run.compile_cache import enable_compilation_cache
    from bpcp_jax.run.host import reexec_with_allocator

    reexec_with_allocator(["-m", "bpcp_jax.run.cli", *sys.argv[1:]])
    enable_compilation_cache()  # every command is a fresh process: reuse what earlier ones compiled
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  from bpcp_jax.training.checkpoint import CheckpointError
  from bpcp_jax.run.config import ConfigError
  from bpcp_jax.training.data import DataError
  from bpcp_jax.training.loop import NonFiniteLoss

  import absl.logging

  absl.logging.set_verbosity("error")  # orbax's per-save info lines drown the progress bars
  try:
    return _run(args, overrides)
  except NonFiniteLoss as e:
    print(f"bpcp-jax: error: {e}", file=sys.stderr)
    return 3
  except (ConfigError, DataError, CheckpointError, ValueError) as e:
    print(f"bpcp-jax: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # unwritable or full work directory, missing files: name the path
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    print(f"bpcp-jax: error: {e.strerror or e}{where}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
