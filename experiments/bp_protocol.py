"""The block-search protocol (issue 14): does BP pick better blocks than random or a simple rule?

ResNet-v2-56 (18 blocks) on all 50,000 CIFAR-10 training images, evaluated on all 10,000 test
images. Every row starts from one dense network (experiments/configs/bp_protocol.py) and gets
the same fine-tune budget:

- ``dense``: the pretraining;
- ``bp_gamma<g>``: BP block search at gamma ``g`` + fine-tune of the kept blocks;
- ``random_blocks_<n>_seed<s>``: ``n`` blocks removed at random (never a whole stage) + the same fine-tune,
  for every ``n`` a BP row removed, 3 seeds;
- ``heuristic_last_<n>``: the last blocks of every stage removed + the same fine-tune;
- ``cp``: channels only (|BN scale|, widths x4) to 20% of the dense MACs + fine-tune;
- ``bpcp``: channels of the middle BP row's network to the same 20% of the dense MACs + fine-tune;
- ``random_after_bp_gamma<g>``: the BP row's searched weights (its search trained them for
  ``stages.search.epochs`` more than the other controls got), as many blocks removed at random
  (seed 0) instead of the searched ones + the same fine-tune: block choice alone differs.

Commands (every step resumable; rows with a summary.json are skipped, interrupted ones resume):

  python experiments/bp_protocol.py calibrate --workdir runs/bp_protocol   # per-block dL/dg, suggested gammas
  python experiments/bp_protocol.py run --workdir runs/bp_protocol --gammas 0.01,0.02,0.04   # or --gammas auto
  python experiments/bp_protocol.py measure --workdir runs/bp_protocol     # b1/b128 latency, interleaved
  python experiments/bp_protocol.py ablate --workdir runs/bp_protocol      # block choice alone, no fine-tune
  python experiments/bp_protocol.py report --workdir runs/bp_protocol      # CSV, markdown, plots

``run`` ends with ``measure`` and ``report``. Results (results.csv, results.md, protocol.json with
every command, wall time and the machine, plots) go to ``--out``: by default
experiments/results/bp_protocol/ for this protocol's own config, <workdir>/results after
``--config`` or ``--set`` (a dry run). For every search, results.md gives the final keep
probabilities and the blocks whose keep decision (p >= 0.5) still changed in the last quarter of
its logged steps (``unsettled_blocks`` in the CSV; 0 = none). Paths are taken from the cwd; a
failed row ends ``run`` with one line naming it (finished rows kept; run again to resume).
``ablate`` (beside or after ``run``) judges each searched removal without any fine-tune, against the
heuristics and 10 random removals of as many blocks, at the dense and at the search's weights, BN
statistics re-estimated for each (results.md's last section, ablation.png).
One ``run``, ``calibrate`` or ``measure`` at a time per work directory: a second is refused naming the
first's PID; ``report`` reads only, so a partial report can be made while a run goes on.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bpcp_jax.training import files  # noqa: E402  (this checkout's package, installed or not)

CONFIG = os.path.join("experiments", "configs", "bp_protocol.py")
OUT = os.path.join(REPO, "experiments", "results", "bp_protocol")
SEEDS = (0, 1, 2)
MACS_KEPT = 0.2  # BPCP and CP: 20% of the dense MACs (the paper: -80.3%)
# what CP's and BPCP's prune.ratio means (a fraction of the MACs, |BN scale|, widths x4), passed
# explicitly so that another base config (--config) cannot turn it into a fraction of the channels
PRUNE_SETTINGS = ("--config.stages.prune.target=macs", "--config.stages.prune.criterion=bn_scale",
                  "--config.stages.prune.round_to=4")
SAVE_EVERY_S = 60.0  # a running row's wall time is saved this often


# -- bookkeeping -------------------------------------------------------------------------------

def _run_dir(workdir, name):
  return os.path.join(workdir, "runs", name)


def _ckpt(workdir, name, stage):
  return os.path.join(_run_dir(workdir, name), "checkpoints", stage)


def _load_log(workdir):
  return _read_json(os.path.join(workdir, "protocol.json")) or {"rows": {}}


def _save_log(workdir, log):
  log["machine"] = _machine()
  files.write_json(os.path.join(workdir, "protocol.json"), log)


@functools.lru_cache(maxsize=None)
def _machine():
  """This machine, read once per process (the log is saved every minute while a row runs)."""
  from bpcp_jax.run.host import cpu_fields

  return {"platform": platform.platform(), "processor": cpu_fields().get("model name") or platform.processor(),
          "cpu_count": os.cpu_count(), "python": platform.python_version()}


def _read_json(path):
  """The file's JSON, or None where there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _summary(workdir, name):
  return _read_json(os.path.join(_run_dir(workdir, name), "summary.json"))


class RowFailed(Exception):
  """A row's command exited with an error (``returncode``); its output is above it in the log."""

  def __init__(self, name, returncode, cmd):
    super().__init__(f"row {name} failed with exit status {returncode}; its output is above, its command: "
                     + " ".join(cmd))
    self.returncode = returncode


def run_row(workdir, log, name, args, data=None, meta=None):
  """Run one row through the command line (skipped when finished, resumed when interrupted); a failed
  row raises RowFailed with its time recorded."""
  if _summary(workdir, name) is not None:
    print(f"[{name}] done already, skipping", flush=True)
    return _summary(workdir, name)
  # the row's own settings after the protocol's --set overrides, so that they hold whatever those say
  cmd = ["bpcp-jax", args[0], "--config", log.get("config", CONFIG), "--workdir", _run_dir(workdir, name),
         *[f"--config.{s}" for s in log.get("set", [])], *args[1:], "--no-progress"]
  if data:
    cmd += ["--data", data]
  if os.path.isdir(os.path.join(_run_dir(workdir, name), "checkpoints")):
    cmd.append("--resume")
  print("$ " + " ".join(cmd), flush=True)
  row = log["rows"].setdefault(name, {"command": " ".join(c for c in cmd if c != "--resume"), "seconds": 0.0})
  row.update(meta or {})
  # an interrupted attempt's time counts too (its resume continues from its checkpoints): the time is
  # saved every minute while the row runs, so even a kill -9 of this process loses at most a minute
  start, t0 = row["seconds"], time.time()
  proc = subprocess.Popen(cmd, cwd=REPO)
  try:
    while True:
      try:
        proc.wait(timeout=SAVE_EVERY_S)
        break
      except subprocess.TimeoutExpired:
        row["seconds"] = start + time.time() - t0
        _save_log(workdir, log)
  finally:
    if proc.poll() is None:  # this process is unwinding (Ctrl-C, SIGTERM): the row stops with it
      proc.terminate()
      proc.wait()
    row["seconds"] = start + time.time() - t0
    _save_log(workdir, log)
  if proc.returncode:
    raise RowFailed(name, proc.returncode, cmd)
  return _summary(workdir, name)


def _train_seconds(workdir, name):
  """The training loop's own seconds for the row (epoch_seconds in its metrics.jsonl, over every
  session that resumed it); the wall time of a row run outside ``run_row``, such as the dense one."""
  path = os.path.join(_run_dir(workdir, name), "metrics.jsonl")
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    return sum(json.loads(x).get("epoch_seconds", 0.0) for x in f if x.strip())


def _protocol_config(workdir):
  """The rows' base config with the protocol's overrides (protocol.json), for the in-process steps;
  orbax's read-only notices silenced (one pair per checkpoint read)."""
  import absl.logging

  from bpcp_jax.run.config import apply_overrides, load_config_file

  absl.logging.set_verbosity("error")
  log = _load_log(workdir)
  return apply_overrides(load_config_file(os.path.join(REPO, log.get("config", CONFIG))), log.get("set", []))


# -- calibrate -----------------------------------------------------------------------------------

def calibrate(workdir, data=None, batches=40, batch_size=128):
  """Each block's benefit b_i = -E[dL/dg_i] under gates sampled at p = 0.5, at the dense weights.

  With the straight-through gradient and the penalty gamma * |g| (whose gradient is gamma only
  where g = 1), a gate's logit drifts by p(1-p) (gamma p - b_i): with fixed benefits it would settle
  near p = b_i / gamma, removing the blocks with b_i < gamma / 2. Measured on ResNet-v2-56
  (experiments/RESULTS.md) the searches removed about twice that: the blocks with b_i < gamma
  (gamma 0.216: 8 removed, 8 predicted, 7 shared; gamma 0.403: 15 removed, 16 predicted, all 15
  among them), since the benefits fall as the weights learn to do without blocks dropped at
  random. So the suggested gamma for removing k blocks is the midpoint of the k-th and (k+1)-th
  smallest benefits.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from bpcp_jax.pruning.block_search import sample_gates
  from bpcp_jax.run.pipeline import load_data
  from bpcp_jax.training import data as bdata
  from bpcp_jax.training.checkpoint import load_stage

  config = _protocol_config(workdir)
  network, variables, _ = load_stage(_ckpt(workdir, "dense", "pretrain"))  # before the data: fails fast
  config.data.max_test_per_class = 1
  train, _ = load_data(config, data, progress=False)
  names = network.block_names

  @jax.jit
  def grads(variables, images, labels, key):
    x = bdata.normalize(images)

    def loss(g):
      logits, _ = network.apply(variables, x, train=True, block_gates=g)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    gates = {k: v for k, v in sample_gates(key, {n: jnp.zeros(()) for n in names}).items()}
    return jax.grad(loss)(gates)

  rng = np.random.default_rng(0)
  total = {n: [] for n in names}
  for i in range(batches):
    idx = rng.choice(len(train.labels), batch_size, replace=False)
    g = grads(variables, train.images[idx], train.labels[idx], jax.random.PRNGKey(i))
    for n in names:
      total[n].append(float(g[n]))
  benefit = {n: -float(np.mean(v)) for n, v in total.items()}
  order = sorted(names, key=lambda n: benefit[n])
  out = {"benefit": benefit, "stderr": {n: float(np.std(total[n]) / np.sqrt(batches)) for n in names},
         "order": order, "suggested_gamma": {}}
  for k in [k for k in (4, 8, 12) if k < len(order)] or [k for k in range(1, len(order))]:
    lo, hi = benefit[order[k - 1]], benefit[order[k]]
    out["suggested_gamma"][str(k)] = float((lo + hi) / 2)
  print("| block | benefit -E[dL/dg] | stderr |\n|---|---|---|")
  for n in order:
    print(f"| {n} | {benefit[n]:.5f} | {out['stderr'][n]:.5f} |")
  print("suggested gammas (blocks removed: gamma):", out["suggested_gamma"])
  files.write_json(os.path.join(workdir, "calibration.json"), out)  # whole: report reads it without the lock
  return out


# -- ablate: block choice without fine-tuning ----------------------------------------------------

ABLATION = os.path.join("ablation", "ablation.json")  # in the work directory, with its own lock


def _removal_set(blocks, removed):
  return {b: 0.0 if b in removed else 1.0 for b in blocks}


def _greedy_set(blocks, stages, drop, n):
  """The n blocks whose removal alone costs the least accuracy, never every block of a stage."""
  removed = []
  for b in sorted(blocks, key=lambda b: (drop[b], b)):
    if len(removed) == n:
      break
    stage = stages[b]
    if sum(1 for x in blocks if stages[x] == stage and x not in removed) > 1:
      removed.append(b)
  return removed


def fingerprint(variables):
  """A short hash of a network's variables (weights and BN statistics), with their paths."""
  import hashlib

  import jax
  import numpy as np

  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted((jax.tree_util.keystr(p), v) for p, v in leaves):
    h.update(path.encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def forget_stale(out, label, weights):
  """Record that ablation.json's accuracies at ``label`` are at ``weights`` (a fingerprint), first
  dropping those measured at other weights (a row deleted and run again). A cache from before the
  fingerprints were kept takes the current ones."""
  then = out.setdefault("weights", {}).get(label)
  if then is not None and then != weights:
    stale = [k for k in out["accuracy"] if k.split("|")[0] == label]
    for k in stale:
      del out["accuracy"][k]
    print(f"[ablate] {label}: other weights than when ablation.json was written; {len(stale)} accuracies "
          "measured again", flush=True)
  out["weights"][label] = weights


def _removal_sets(network, variables, bp, drop, random_sets):
  """{label: removed blocks}: BP's, and the controls' with as many blocks (at most all but one of each
  stage, as ``run`` caps its control rows: BP may empty a stage, the controls never do)."""
  from bpcp_jax.pruning.block_search import select_blocks

  stage_blocks = [list(s) for s in network.block_stages() if s]
  stages = {b: i for i, s in enumerate(stage_blocks) for b in s}
  n = min(len(bp), sum(len(s) - 1 for s in stage_blocks))

  def chosen(method, seed=0):
    return [b for b, v in select_blocks(network, variables, method, n, seed=seed).items() if v < 0]

  sets = {"bp": list(bp), "last": chosen("last"), "greedy_single_drop": _greedy_set(list(stages), stages, drop, n)}
  for seed in range(random_sets):
    sets[f"random_seed{seed}"] = chosen("random", seed)
  return sets


def bn_sample_size(n_train, batches, batch=128):
  """(batches, batch size, note) for the BN re-estimation: ``batches`` x ``batch`` distinct training
  images where the training set has them, else fewer batches (or one smaller batch) and a note
  saying so (None when nothing was cut)."""
  if batches * batch <= n_train:
    return batches, batch, None
  got = (n_train // batch, batch) if n_train >= batch else (1, n_train)
  return (*got, f"BN statistics re-estimated on {got[0]} x {got[1]} training images, not {batches} x {batch}: "
                f"the training set has {n_train}")


def ablate(workdir, data=None, test_per_class=500, random_sets=10, bn_batches=40):
  """Test accuracy with blocks removed and nothing fine-tuned: how good is a block choice by itself?

  At the dense weights: every block removed alone (the single-block drop). Then, for every finished
  BP search, the same number of blocks removed by BP, by the last-blocks heuristic, by the
  single-block drops (greedy: the n cheapest alone, never a whole stage), and by ``random_sets``
  random draws (``select_blocks``' rule, seeds 0..): at the dense weights (where the controls
  start) and at the search's weights (trained under sampled gates, where BP chose). Where BP emptied
  a stage of blocks and removed more than the controls can (each stage keeps one block), the
  controls remove as many as they can, as ``run``'s control rows do (``controls_removed``).

  Before each evaluation the BN running statistics are re-estimated for the network with those
  blocks removed (``bn_batches`` x 128 training images, fewer where the training set is smaller
  (``bn_sample_size``, recorded in ablation.json), augmented as in training, the same for every
  removal; momentum 0.9, so 0.9**40 = 1.5% of the old statistics remain): without it, a removal is
  judged mostly by how far the statistics accumulated with the blocks in place are off (BN
  recalibration, as one-shot architecture searches do; ``bpcp_jax.recalibrate_batch_stats``).
  Gates of 0/1 go into one compiled recalibration and evaluation, so a removal costs
  ``bn_batches`` training-mode passes and one pass over ``test_per_class`` x classes test images
  (the rows "BN not recalibrated": the evaluation only); results are kept in ablation/ablation.json with a fingerprint of the weights they were
  measured at, and re-running evaluates only what is new (a row run again: its accuracies again).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bpcp_jax.run.pipeline import load_data
  from bpcp_jax.training import data as bdata
  from bpcp_jax.training.batch_stats import recalibrate_batch_stats
  from bpcp_jax.training.checkpoint import load_stage

  config = _protocol_config(workdir)
  network, dense_vars, _ = load_stage(_ckpt(workdir, "dense", "pretrain"))  # before the data: fails fast
  config.data.max_test_per_class = test_per_class
  train, test = load_data(config, data, progress=False)
  bn_batches, batch, note = bn_sample_size(len(train.labels), bn_batches)
  if note:
    print(f"[ablate] {note}", flush=True)
  pick = np.random.default_rng(0).choice(len(train.labels), bn_batches * batch, replace=False)
  # augmented as in training (pad-crop-flip): statistics of unaugmented images cost the dense
  # network 3 points (83.4% -> 80.3% on these test images), augmented ones none (83.5%)
  raw = jnp.asarray(train.images[pick].reshape(bn_batches, batch, *train.images.shape[1:]))
  bn_inputs = jax.vmap(bdata.augment)(jax.random.split(jax.random.PRNGKey(0), bn_batches), raw)
  path = os.path.join(workdir, ABLATION)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  out = _read_json(path) or {}
  if (out.get("test_images"), out.get("bn_images"), out.get("bn")) != (len(test.labels), bn_batches * batch, "augmented"):
    out = {"test_images": len(test.labels), "bn_images": bn_batches * batch, "bn": "augmented", "accuracy": {}}
  out.update(bn_batches=bn_batches, bn_batch_size=batch, bn_note=note)

  def weights_of(label, variables):  # cached accuracies are kept only at the same weights
    forget_stale(out, label, fingerprint(variables))
    return variables

  blocks = list(network.block_names)

  # momentum updates, as every cached accuracy was measured (the library's default is the exact average)
  recalibrate = jax.jit(lambda variables, gates: recalibrate_batch_stats(network, variables, bn_inputs,
                                                                          block_gates=gates, average="momentum"))

  @jax.jit
  def correct(variables, images, labels, gates):
    logits = network.apply(variables, bdata.normalize(images), train=False, block_gates=gates)
    return jnp.sum(jnp.argmax(logits, -1) == labels)

  def accuracy(weights, variables, removed, recalibrated=True):
    key = f"{weights}|{' '.join(sorted(removed))}" + ("" if recalibrated else "|not recalibrated")
    if key not in out["accuracy"]:
      gates = {b: jnp.float32(v) for b, v in _removal_set(blocks, removed).items()}
      if recalibrated:
        variables = recalibrate(variables, gates)
      hits = sum(int(correct(variables, test.images[i:i + 500], test.labels[i:i + 500], gates))
                 for i in range(0, len(test.labels), 500))
      out["accuracy"][key] = hits / len(test.labels)
      files.write_json(path, out, indent=1)
      print(f"[ablate] {weights} weights{'' if recalibrated else ' (BN not recalibrated)'}, removed {len(removed)} "
            f"({', '.join(sorted(removed)) or 'none'}): {100 * out['accuracy'][key]:.2f}%", flush=True)
    return out["accuracy"][key]

  weights_of("dense", dense_vars)
  base = accuracy("dense", dense_vars, [])
  drop = {b: base - accuracy("dense", dense_vars, [b]) for b in blocks}
  out["single_drop"] = drop
  out["searches"] = {}
  for name in sorted(os.listdir(os.path.join(workdir, "runs"))):
    s = _summary(workdir, name)
    if not name.startswith("bp_gamma") or s is None:
      continue
    bp = [b for b in blocks if b not in s["pruned"]["blocks_kept"]]
    n = len(bp)
    if not n:
      continue
    sets = _removal_sets(network, dense_vars, bp, drop, random_sets)
    search_vars = weights_of(name, load_stage(_ckpt(workdir, name, "search"))[1])
    res = {"blocks_removed": n, "controls_removed": len(sets["last"]), "sets": sets, "dense": {},
           "search": {"none": accuracy(name, search_vars, [])}}
    res["dense"]["none"] = base
    # what recalibration is for: the dense weights with the statistics gathered with every block in place
    res["dense_not_recalibrated"] = {"none": accuracy("dense", dense_vars, [], recalibrated=False)}
    for label, removed in sets.items():
      res["dense"][label] = accuracy("dense", dense_vars, removed)
      res["search"][label] = accuracy(name, search_vars, removed)
      res["dense_not_recalibrated"][label] = accuracy("dense", dense_vars, removed, recalibrated=False)
    out["searches"][name] = res
  files.write_json(path, out, indent=1)
  print(ablation_table(out))
  return out


def _ranks(values):
  """Ranks 0..n-1 (ties get their mean rank), for Spearman's rank correlation."""
  import numpy as np

  v = np.asarray(values, dtype=float)
  order = np.argsort(v, kind="stable")
  ranks = np.empty(len(v))
  ranks[order] = np.arange(len(v))
  for x in np.unique(v):
    ranks[v == x] = ranks[v == x].mean()
  return ranks


def spearman(a, b):
  """Spearman's rank correlation of two equally long sequences."""
  import numpy as np

  return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


WEIGHTS_LABEL = {"search": "its search", "dense": "dense", "dense_not_recalibrated": "dense, BN not recalibrated"}


def ablation_table(out, final_probs=None, benefit=None):
  """Markdown: per search, BP's removal against the controls' without fine-tuning; with
  ``final_probs`` ({search: {block: keep probability at its end}}) and ``benefit`` (calibrate's
  {block: -E[dL/dg]} at the dense weights), how well each ranks the blocks by their single-block
  drops (Spearman)."""
  import numpy as np

  lines = [f"Test accuracy (%) with the blocks removed and nothing fine-tuned but the BN statistics "
           f"(re-estimated on {out['bn_images']:,} augmented training images, but in the rows 'BN not "
           f"recalibrated'; {out['test_images']:,} test images):",
           "", "| search | blocks removed | weights | none removed | BP | last blocks | greedy single-drop | "
           "random mean (min-max, n) | random sets below BP |", "|---|---|---|---|---|---|---|---|---|"]
  for name, res in sorted(out.get("searches", {}).items()):
    for weights in [w for w in ("search", "dense", "dense_not_recalibrated") if w in res]:
      a = res[weights]
      rnd = np.array([v for k, v in a.items() if k.startswith("random_seed")])
      n, m = res["blocks_removed"], res.get("controls_removed", res["blocks_removed"])
      random = (f"{100 * rnd.mean():.2f} ({100 * rnd.min():.2f}-{100 * rnd.max():.2f}, {len(rnd)}) | "
                f"{int((rnd < a['bp']).sum())} of {len(rnd)}") if len(rnd) else "- | -"  # ablate --random-sets 0
      lines.append(f"| {name} | {n if m == n else f'{n} (controls {m})'} | "
                   f"{WEIGHTS_LABEL[weights]} | "
                   f"{100 * a['none']:.2f} | {100 * a['bp']:.2f} | {100 * a['last']:.2f} | "
                   f"{100 * a['greedy_single_drop']:.2f} | {random} |")
  drop = out.get("single_drop", {})
  if drop:
    lines += ["", "Single-block drop at the dense weights (accuracy points lost when the block alone is removed): "
              + ", ".join(f"{b} {100 * d:.2f}" for b, d in sorted(drop.items(), key=lambda kv: kv[1]))]
    for name, probs in sorted({**({"calibrate's benefits": benefit} if benefit else {}), **(final_probs or {})}.items()):
      blocks = sorted(set(probs) & set(drop))
      if len(blocks) > 2:
        what = name if name.startswith("calibrate") else f"{name}'s final keep probabilities"
        lines.append(f"\nSpearman rank correlation of {what} with the single-block "
                     f"drops: {spearman([probs[b] for b in blocks], [drop[b] for b in blocks]):.2f} "
                     f"({len(blocks)} blocks; 1 = the blocks ranked exactly by their drops)")
  return "\n".join(lines)


# -- the rows ----------------------------------------------------------------------------------

def _blocks_removed(summary):
  return len(summary["dense"]["blocks_kept"]) - len(summary["pruned"]["blocks_kept"])


def _check_same_setup(workdir, log, config, sets):
  """SystemExit naming the old and new value where ``config``/``sets`` (given) differ from those
  protocol.json recorded and a row has run already: later rows would start from checkpoints of
  another setup. Keys a run may change on resume (such as data.cache_dir) may differ."""
  from bpcp_jax.run.config import RESUME_FREE_KEYS

  runs = os.path.join(workdir, "runs")
  if not log.get("rows") and not (os.path.isdir(runs) and os.listdir(runs)):
    return
  strict = lambda v: [x for x in v if x.split("=", 1)[0] not in RESUME_FREE_KEYS]
  for key, new, old in (("--config", config, log.get("config", CONFIG)), ("--set", list(sets), log.get("set", []))):
    if new and (new != old if key == "--config" else strict(new) != strict(old)):
      raise SystemExit(f"bp_protocol run: {workdir} was started with {key} {old!r}, not {new!r}; its rows would "
                       "start from checkpoints of another setup: use a new --workdir (or the same values)")


def run(workdir, gammas, data=None, config=None, sets=(), out=None):
  log = _load_log(workdir)
  _check_same_setup(workdir, log, config, sets)
  if gammas:
    log["gammas"] = gammas
  if config:
    log["config"] = config
  if sets:
    log["set"] = list(sets)
  gammas = log.get("gammas")
  if not gammas:
    raise SystemExit("give --gammas (comma-separated, or auto: calibrate's suggestions); they are remembered "
                     "in protocol.json")
  _save_log(workdir, log)
  dense = _ckpt(workdir, "dense", "pretrain")
  # rows started, and at most how many in all (lowered as each search settles its controls; None: the
  # gammas come from calibrate, after the dense row)
  count = [0, None if gammas == "auto" else 3 + 6 * len(gammas)]

  def row(name, args, meta=None):
    count[0] += 1
    print(f"[bp_protocol] row {count[0]} of {'?' if count[1] is None else f'at most {count[1]}'}: {name}", flush=True)
    return run_row(workdir, log, name, args, data, meta)

  row("dense", ["train"])
  if gammas == "auto":  # the gammas calibrate suggests for removing about 4, 8 and 12 blocks
    cal = _read_json(os.path.join(workdir, "calibration.json")) or calibrate(workdir, data)
    gammas = sorted(float(f"{g:.3g}") for g in cal["suggested_gamma"].values())
    log["gammas"] = gammas
    _save_log(workdir, log)
    count[1] = 3 + 6 * len(gammas)
    print(f"gammas from calibrate: {gammas}", flush=True)
  bp_rows, most, controlled = {}, None, set()
  for g in gammas:
    name = f"bp_gamma{g:g}"
    s = bp_rows[name] = row(name, ["pipeline", "--from", dense, "--config.stages.run=search,finetune_blocks",
                                   f"--config.stages.search.gamma={g}"], {"gamma": g, "method": "bp"})
    if most is None:  # the controls never empty a stage: at most (blocks - stages) can go
      most = len(s["dense"]["blocks_kept"]) - len({b.split("_")[0] for b in s["dense"]["blocks_kept"]})
    n = min(_blocks_removed(s), most)
    count[1] -= 5 if not n else 4 if n in controlled else 0
    if not n:
      continue
    # right after each search, its controls, so that a protocol cut short by the end of a session
    # still leaves complete comparisons behind. First the sharpest: the search's own weights and
    # training, as many other blocks removed at random (one seed), so block choice alone differs
    row(f"random_after_{name}", [
        "pipeline", "--from", _ckpt(workdir, name, "search"), "--config.stages.run=search,finetune_blocks",
        "--config.stages.search.method=random", f"--config.stages.search.blocks={n}",
        f"--config.stages.search.select_seed={SEEDS[0]}"],
        {"method": "random_after_search", "blocks_removed": n, "seed": SEEDS[0], "from": name})
    if n in controlled:
      continue
    controlled.add(n)
    # then the dense-started controls with the same number of blocks: the heuristic and 3 random seeds
    row(f"heuristic_last_{n}", [
        "pipeline", "--from", dense, "--config.stages.run=search,finetune_blocks", "--config.stages.search.method=last",
        f"--config.stages.search.blocks={n}"], {"method": "last", "blocks_removed": n})
    for seed in SEEDS:
      row(f"random_blocks_{n}_seed{seed}", [
          "pipeline", "--from", dense, "--config.stages.run=search,finetune_blocks",
          "--config.stages.search.method=random", f"--config.stages.search.blocks={n}",
          f"--config.stages.search.select_seed={seed}"], {"method": "random", "blocks_removed": n, "seed": seed})
  row("cp", ["pipeline", "--from", dense, "--config.stages.run=prune,finetune_channels", *PRUNE_SETTINGS,
             f"--config.stages.prune.ratio={1 - MACS_KEPT}"], {"method": "cp"})
  # BPCP: the BP row nearest to 8 removed blocks whose network still has more MACs than the target,
  # its channels pruned to the same total MACs as CP
  room = {k: v for k, v in bp_rows.items() if v["pruned"]["macs"] > 1.05 * MACS_KEPT * v["dense"]["macs"]}
  if not room:
    print(f"[bpcp] skipped: every BP network already has at most {MACS_KEPT:.0%} of the dense MACs", flush=True)
  else:
    mid = min(room, key=lambda k: (abs(_blocks_removed(room[k]) - 8), k))
    s = room[mid]
    ratio = 1.0 - MACS_KEPT * s["dense"]["macs"] / s["pruned"]["macs"]
    row("bpcp", ["pipeline", "--from", _ckpt(workdir, mid, "finetune_blocks"), "--config.stages.run=prune,finetune_channels",
                 *PRUNE_SETTINGS, f"--config.stages.prune.ratio={ratio:.6f}"], {"method": "bpcp", "from": mid})
  measure(workdir)
  report(workdir, out)


# -- measure and report ------------------------------------------------------------------------

FINAL_STAGES = ("finetune_channels", "finetune_blocks", "pretrain")


def _final_checkpoint(workdir, name):
  for stage in FINAL_STAGES:
    d = _ckpt(workdir, name, stage)
    if os.path.isdir(d):
      return d
  return None


def measure(workdir, repeats=11):
  """Batch-1 and batch-128 latency of every finished row's network beside the dense one, in
  interleaved rounds in this one process (medians; a speed-up is the median of the rounds' ratios
  to the dense network)."""
  import numpy as np

  import absl.logging
  import jax

  from benchmarks.common import interleaved_inference, median
  from bpcp_jax.training.checkpoint import load_network

  absl.logging.set_verbosity("error")  # orbax's read-only notices, one pair per checkpoint

  start = time.time()
  names = [n for n in sorted(os.listdir(os.path.join(workdir, "runs"))) if _summary(workdir, n) is not None]
  print(f"[measure] loading {len(names)} networks, then compiling each and timing {repeats} interleaved rounds "
        "(keep the machine otherwise idle)", flush=True)
  nets = []
  for n in names:
    model, variables = load_network(_final_checkpoint(workdir, n))
    nets.append((n, model, variables))
  rng = np.random.default_rng(0)
  x1 = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
  x128 = rng.standard_normal((128, 32, 32, 3)).astype(np.float32)
  lat, thr = interleaved_inference(nets, x1, x128, repeats=repeats, calls=20, large_calls=3)
  # speed-ups: the median over rounds of each round's ratio to the dense network timed in the same
  # round, so load that drifts between rounds cancels (the ratio of the medians does not)
  out = {n: {"latency_ms_b1": 1e3 * median(lat[n]), "latency_ms_b1_all": [1e3 * v for v in lat[n]],
             "images_per_s_b128": median(thr[n]), "images_per_s_b128_all": thr[n],
             "speedup_b1": median([d / v for d, v in zip(lat["dense"], lat[n])]) if "dense" in lat else None,
             "speedup_b128": median([v / d for d, v in zip(thr["dense"], thr[n])]) if "dense" in thr else None}
         for n in names}
  files.write_json(os.path.join(workdir, "latency.json"),
                   {"repeats": repeats, "machine": _machine(), "jax": jax.__version__,
                    "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(start)),
                    "wall_s": round(time.time() - start, 1), "networks": out})
  print(f"[measure] done in {time.time() - start:.0f} s: {os.path.join(workdir, 'latency.json')}", flush=True)
  return out


COLUMNS = ("name", "method", "gamma", "seed", "blocks_removed", "pruned_blocks", "pruned_accuracy", "dense_accuracy",
           "pruned_params", "pruned_macs", "macs_removed_pct", "params_removed_pct", "speedup_b1", "speedup_b128",
           "latency_ms_b1", "images_per_s_b128", "wall_s", "train_s", "removed", "unsettled_blocks")


def collect(workdir):
  log = _load_log(workdir)
  lat_path = os.path.join(workdir, "latency.json")
  lat = (_read_json(lat_path) or {}).get("networks", {})
  dense = _summary(workdir, "dense")
  rows = []
  for name in sorted(os.listdir(os.path.join(workdir, "runs"))):
    s = _summary(workdir, name)
    if s is None:
      continue
    info = log["rows"].get(name, {})
    kept = s["pruned"]["blocks_kept"]
    all_blocks = dense["pruned"]["blocks_kept"] if dense else s["dense"]["blocks_kept"]
    d_macs, d_params = (dense["pruned"]["macs"], dense["pruned"]["params"]) if dense else (None, None)
    row = {"name": name, "method": info.get("method", "dense"), "gamma": info.get("gamma", ""),
           "seed": info.get("seed", ""), "blocks_removed": len(all_blocks) - len(kept), "pruned_blocks": len(kept),
           "pruned_accuracy": s["pruned"]["accuracy"], "dense_accuracy": dense["pruned"]["accuracy"] if dense else "",
           "pruned_params": s["pruned"]["params"], "pruned_macs": s["pruned"]["macs"],
           "macs_removed_pct": 100 * (1 - s["pruned"]["macs"] / d_macs) if d_macs else "",
           "params_removed_pct": 100 * (1 - s["pruned"]["params"] / d_params) if d_params else "",
           "wall_s": round(info.get("seconds", 0.0), 1), "train_s": round(_train_seconds(workdir, name), 1),
           "removed": " ".join(b for b in all_blocks if b not in kept), "test_images": s.get("data", {}).get("test_images")}
    if name in lat and "dense" in lat:
      row["latency_ms_b1"] = lat[name]["latency_ms_b1"]
      row["images_per_s_b128"] = lat[name]["images_per_s_b128"]
      row["speedup_b1"] = lat[name].get("speedup_b1")
      row["speedup_b128"] = lat[name].get("speedup_b128")
    rows.append(row)
  return rows


def _gate_history(workdir, name):
  """The keep probabilities during the search (gates.jsonl, every logged step)."""
  path = os.path.join(_run_dir(workdir, name), "gates.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(x) for x in f if x.strip()]


def unsettled_blocks(hist, tail=0.25):
  """{block: decision changes} at the logged steps of the last ``tail`` of a search (each compared
  with the log before it; keep iff p >= 0.5); empty when every decision had settled."""
  last = hist[max(int(len(hist) * (1 - tail)) - 1, 0):]
  flips = {}
  for k in (last[0]["gate_probs"] if last else {}):
    keep = [h["gate_probs"][k] >= 0.5 for h in last]
    n = sum(a != b for a, b in zip(keep, keep[1:]))
    if n:
      flips[k] = n
  return flips


def _save(plt, fig, ax, xlabel, ylabel, path):
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if ax.get_legend_handles_labels()[1]:  # a report before any row has none
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def default_out(workdir):
  """Where report writes by default: the committed results for the protocol's own config only (no
  --config or --set in protocol.json), else <workdir>/results."""
  log = _load_log(workdir)
  return OUT if log.get("config", CONFIG) == CONFIG and not log.get("set") else os.path.join(workdir, "results")


def report(workdir, out=None):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from bpcp_jax.run.report import SETTLED_MARGIN

  rows = collect(workdir)
  out = out or default_out(workdir)
  os.makedirs(out, exist_ok=True)

  def fmt(v, spec, unit=""):  # "-" for a figure not measured (yet)
    return format(v, spec) + unit if isinstance(v, (int, float)) else "-"

  lines = ["| row | blocks removed | test acc % | params | MACs | MACs cut | speed-up b1 | speed-up b128 | wall | training |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['blocks_removed']} | {100 * r['pruned_accuracy']:.2f} | {r['pruned_params']:,} | "
                 f"{r['pruned_macs'] / 1e6:.1f}M | {fmt(r['macs_removed_pct'], '.1f', '%')} | "
                 f"{fmt(r.get('speedup_b1'), '.2f', 'x')} | {fmt(r.get('speedup_b128'), '.2f', 'x')} | "
                 f"{fmt(r['wall_s'] / 60 if r['wall_s'] else None, '.1f', ' min')} | {r['train_s'] / 60:.1f} min |")
  # gate probabilities of every BP search, epoch by epoch
  gates, final_probs = [], {}
  for r in rows:
    if r["method"] == "bp":
      hist = _gate_history(workdir, r["name"])
      if hist:
        last = final_probs[r["name"]] = hist[-1]["gate_probs"]
        margins = sorted(abs(p - 0.5) for p in last.values())
        flips = unsettled_blocks(hist)
        steps = [h.get("step", i + 1) for i, h in enumerate(hist)]
        settled = ("no keep decision (p >= 0.5) changed in the last quarter of its logged steps" if not flips else
                   f"keep decisions (p >= 0.5) that changed in the last quarter of its logged steps "
                   f"({steps[int(len(steps) * 0.75)]}-{steps[-1]}): "
                   + ", ".join(f"{k} ({n}x)" for k, n in sorted(flips.items())))
        gates.append(f"- {r['name']}: keep probabilities at the end of the search: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sorted(last.items()))
                     + f"; smallest margin |p - 0.5| = {margins[0]:.3f}; {settled}")
        r["unsettled_blocks"] = len(flips)
  table = io.StringIO()
  w = csv.DictWriter(table, fieldnames=COLUMNS)
  w.writeheader()
  for r in rows:
    w.writerow({k: r.get(k, "") for k in COLUMNS})
  files.write_text(os.path.join(out, "results.csv"), table.getvalue())
  abl_path = os.path.join(workdir, ABLATION)
  abl = _read_json(abl_path)
  cal = (_read_json(os.path.join(workdir, "calibration.json")) or {}).get("benefit")
  log = _load_log(workdir)
  head = (f"Setup (protocol.json): config {log.get('config', CONFIG)}"
          + "".join(f" --set {x}" for x in log.get("set", [])) + f"; gammas {log.get('gammas', '-')}.\n\n")
  if gates:  # the pipeline's own summary (report.md) calls a decision unsettled by another rule
    gates.append(f"\n(The pipeline's report.md of a row uses another rule: a decision is unsettled when its keep "
                 f"probability ends within {SETTLED_MARGIN} of 0.5 or flipped in the last search epoch.)")
  files.write_text(os.path.join(out, "results.md"), head + "\n".join(lines) + "\n\nwall: the row's commands from start "
                   "to end over every attempt (data, compile, evaluation, materializing); training: its training loop's "
                   "epoch seconds (metrics.jsonl).\n\n" + "\n".join(gates) + "\n"
                   + (f"\n## Block choice alone (ablate)\n\n{ablation_table(abl, final_probs, cal)}\n" if abl else ""))
  print("\n".join(lines))

  # accuracy vs blocks removed: BP vs random (mean, min-max over seeds) vs heuristic
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  # the methods side by side at each number of blocks (dodged by `dx`), so equal x never hide each other
  for method, style, dx, label in (("bp", "o-", -0.15, "BP search"), ("last", "s--", 0.15, "last blocks of each stage"),
                                   ("random_after_search", "v", -0.05, "random blocks, BP's searched weights")):
    pts = sorted((r["blocks_removed"] + dx, 100 * r["pruned_accuracy"]) for r in rows if r["method"] == method)
    if pts:
      ax.plot(*zip(*pts), style, label=label)
  rnd = {}
  for r in rows:
    if r["method"] == "random":
      rnd.setdefault(r["blocks_removed"], []).append(100 * r["pruned_accuracy"])
  if rnd:
    ns = sorted(rnd)
    means = np.array([np.mean(rnd[n]) for n in ns])
    err = np.array([[means[i] - min(rnd[n]), max(rnd[n]) - means[i]] for i, n in enumerate(ns)]).T
    seeds = sorted({len(v) for v in rnd.values()})
    ax.errorbar(np.array(ns) + 0.05, means, yerr=err, fmt="^:", capsize=4,
                label=f"random blocks (mean, min-max of {'/'.join(map(str, seeds))} seeds)")
  ns = sorted({r["blocks_removed"] for r in rows if r["method"] in ("bp", "last", "random", "random_after_search")})
  if ns:
    ax.set_xticks(ns)
  dense = [r for r in rows if r["name"] == "dense"]
  if dense:
    ax.axhline(100 * dense[0]["pruned_accuracy"], color="k", lw=0.8, ls=":", label="dense")
  blocks = {r["pruned_blocks"] + r["blocks_removed"] for r in rows}
  tests = {r["test_images"] for r in rows if r["test_images"]}
  _save(plt, fig, ax, "residual blocks removed" + (f" (of {blocks.pop()})" if len(blocks) == 1 else ""),
        "test accuracy %" + (f" ({tests.pop():,} images)" if len(tests) == 1 else ""),
        os.path.join(out, "accuracy_vs_blocks.png"))

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  markers = {"dense": "k*", "bp": "o", "random": "^", "last": "s", "random_after_search": "v", "cp": "D", "bpcp": "P"}
  for method, m in markers.items():
    pts = [(r["pruned_macs"] / 1e6, 100 * r["pruned_accuracy"]) for r in rows if r["method"] == method]
    if pts:
      ax.plot(*zip(*pts), m, ls="none", label=method, ms=8 if method in ("cp", "bpcp") else 6)
  _save(plt, fig, ax, "MACs (M)", "test accuracy %", os.path.join(out, "accuracy_vs_macs.png"))

  hists = {r["name"]: _gate_history(workdir, r["name"]) for r in rows if r["method"] == "bp"}
  hists = {k: v for k, v in hists.items() if v}
  if hists:
    fig, axes = plt.subplots(1, len(hists), figsize=(4.2 * len(hists), 3.6), squeeze=False)
    for ax, (name, hist) in zip(axes[0], sorted(hists.items())):
      names = sorted(hist[0]["gate_probs"])
      xs = [h.get("step", i + 1) for i, h in enumerate(hist)]
      for n in names:
        ax.plot(xs, [h["gate_probs"][n] for h in hist], marker="o" if len(xs) < 4 else None, lw=1, label=n)
      ax.axhline(0.5, color="k", lw=0.8, ls=":")
      ax.set_title(name, fontsize=9)
      ax.set_xlabel("search step")
      ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("keep probability")
    axes[0][0].legend(fontsize=5, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gates.png"), dpi=110)
    plt.close(fig)
  if abl and abl.get("searches"):
    plot_ablation(plt, abl, os.path.join(out, "ablation.png"))
  for name in ("protocol.json", "calibration.json", "latency.json", ABLATION):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        files.write_text(os.path.join(out, os.path.basename(name)), f.read())
  print(f"[report] written to {out}", flush=True)
  return rows


def plot_ablation(plt, abl, path):
  """Per search: the accuracy of BP's removal, the heuristics' and the random draws' (no fine-tune)."""
  names = sorted(abl["searches"])
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
  for ax, weights, title in zip(axes, ("search", "dense"), ("at the search's weights", "at the dense weights")):
    for i, name in enumerate(names):
      a = abl["searches"][name][weights]
      rnd = [100 * v for k, v in a.items() if k.startswith("random_seed")]
      ax.plot([i] * len(rnd), rnd, "^", color="0.6", ls="none", label="random" if i == 0 else None)
      for key, m, c, label in (("bp", "o", "C3", "BP"), ("last", "s", "C0", "last blocks"),
                               ("greedy_single_drop", "D", "C2", "greedy single-drop"), ("none", "_", "k", "none removed")):
        ax.plot([i + 0.15], [100 * a[key]], m, color=c, ms=14 if key == "none" else 7, ls="none",
                label=label if i == 0 else None)
    ax.set_xticks(range(len(names)), [f"{n}\n{abl['searches'][n]['blocks_removed']} removed" for n in names], fontsize=7)
    ax.set_xlim(-0.5, len(names) - 0.3)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy %, BN re-estimated, no fine-tune")
  axes[1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def check_workdir(workdir, command):
  """What ``command`` needs in ``workdir`` before it starts, or SystemExit with one line naming the
  missing folder: every command but ``run`` reads rows that ``run`` made, and calibrate and ablate
  the dense row's checkpoint."""
  if command == "run":
    return
  start = f"start the protocol with `python experiments/bp_protocol.py run --workdir {workdir}`"
  runs = os.path.join(workdir, "runs")
  if not os.path.isdir(runs):
    raise SystemExit(f"bp_protocol {command}: {workdir} holds no protocol rows (no folder {runs}); {start}")
  dense = _ckpt(workdir, "dense", "pretrain")
  if command in ("calibrate", "ablate") and not os.path.isdir(dense):
    raise SystemExit(f"bp_protocol {command}: the dense row has no pretrained checkpoint ({dense} is missing); "
                     f"{start} (it trains the dense row first)")


def parse_gammas(text):
  """--gammas: "auto", a list of numbers >= 0, or [] when not given; ValueError naming the bad entry."""
  import math

  text = text.strip()
  if text == "auto":
    return text
  gammas = []
  for g in (g.strip() for g in text.split(",") if g.strip()):
    try:
      value = float(g)
    except ValueError:
      value = math.nan
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"--gammas {text!r}: {g!r} is not a number >= 0 (give comma-separated gammas such as "
                       "0.01,0.02,0.04, or auto for calibrate's suggestions)")
    gammas.append(value)
  return gammas


def _config_path(path):
  """--config as the rows' command (run in the repository) and protocol.json take it: relative to the
  repository where it lies in it (as given from there or from the cwd), else absolute."""
  path = os.path.abspath(path if os.path.exists(path) else os.path.join(REPO, path))
  return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("command", choices=("calibrate", "run", "measure", "ablate", "report"))
  ap.add_argument("--workdir", default="runs/bp_protocol")
  ap.add_argument("--data", default=None)
  ap.add_argument("--gammas", default="", help="comma-separated search gammas, or 'auto' for the ones calibrate "
                  "suggests (remembered in protocol.json)")
  ap.add_argument("--out", default=None, help=f"where report writes (default: {OUT} for the protocol's own config, "
                  "<workdir>/results after --config or --set)")
  ap.add_argument("--test-per-class", type=int, default=500, help="ablate: test images per class")
  ap.add_argument("--random-sets", type=int, default=10, help="ablate: random removals per search")
  ap.add_argument("--config", default=None, help=f"another base config than {CONFIG} (a dry run)")
  ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override for every row (a dry run)")
  a = ap.parse_args()
  # the rows run in the repository: every path is made absolute from the cwd here, for every command
  a.workdir, a.data, a.out = (p and os.path.abspath(p) for p in (a.workdir, a.data, a.out))
  a.config = a.config and _config_path(a.config)
  try:
    gammas = parse_gammas(a.gammas)
  except ValueError as e:
    ap.exit(2, f"bp_protocol {a.command}: {e}\n")
  # a SIGTERM (a session ending) unwinds like Ctrl-C, so the time of an interrupted row is recorded
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  check_workdir(a.workdir, a.command)
  os.makedirs(a.workdir, exist_ok=True)
  if a.command == "report":  # reads the work directory only: a partial report while a run goes on
    report(a.workdir, a.out)
    return
  from bpcp_jax.run.lock import RunDirectoryInUse, hold_run_directory
  from bpcp_jax.training.checkpoint import CheckpointError

  try:
    # one writer per work directory (protocol.json, calibration.json, latency.json); ablate writes
    # only its own folder, so it can run beside a run
    lock_dir = os.path.join(a.workdir, os.path.dirname(ABLATION)) if a.command == "ablate" else a.workdir
    with hold_run_directory(lock_dir, then="run the same command again"
                            + (" (finished rows are kept)" if a.command == "run" else "")):
      if a.command == "calibrate":
        calibrate(a.workdir, a.data)
      elif a.command == "measure":
        measure(a.workdir)
      elif a.command == "ablate":
        ablate(a.workdir, a.data, a.test_per_class, a.random_sets)
      else:
        run(a.workdir, gammas, a.data, a.config, a.set, a.out)
  except RunDirectoryInUse as e:
    raise SystemExit(f"bp_protocol: {e}") from None
  except CheckpointError as e:  # a checkpoint cut or from another version: it names the folder
    raise SystemExit(f"bp_protocol {a.command}: {e}") from None
  except RowFailed as e:  # finished rows and the failed one's time are saved in protocol.json
    ap.exit(e.returncode if 0 < e.returncode < 128 else 2, f"bp_protocol run: {e}\n")


if __name__ == "__main__":
  main()
