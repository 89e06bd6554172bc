"""Sweeps: many pipeline runs from one base config over a grid of overrides, and their results.

A sweep file (``experiments/sweeps/*.py``) defines ``get_sweep()`` returning a dict::

  {"base": "experiments/configs/resnet_v2_56_bpcp.py",   # relative to the repo root or the sweep file
   "grid": {"stages.search.gamma": [0.02, 0.05], "stages.prune.ratio": [0.3, 0.5]},
   "runs": [{"stages.prune.criterion": "l1"}],            # optional explicit runs, appended to the grid
   "overrides": {"data.max_train_per_class": 500}}        # optional, applied to every run

The runs are the cartesian product of ``grid`` (in key order) followed by the ``runs`` list;
with neither, the base config runs once. Every run is named from its own overrides
(``gamma=0.05,ratio=0.3``), works in ``<sweep dir>/runs/<name>`` and calls
``run_pipeline(..., resume=True)`` in this process, so a rerun skips finished runs (those with
a ``summary.json``) and continues interrupted ones. A failing run leaves ``error.txt`` (its
traceback) and the sweep goes on. A run another process is writing (``bpcp_jax.run.lock``) is
skipped, so two ``bpcp-jax sweep`` processes on one directory share its runs. At the end, ``results.csv``, ``results.md`` and the plots
(``pareto.png``, ``speedup.png``, ``blocks_vs_gamma.png`` when gamma is swept) are written
from every run's ``summary.json``; ``collect_results``, ``write_results``, ``read_results``,
``pareto_front`` and the ``plot_*`` functions are importable for notebooks.

Command line: ``bpcp-jax sweep --sweep FILE --workdir DIR [--data PATH] [--config.KEY=VALUE ...]``
(``--config.`` overrides apply to every run and may not name a swept key).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import traceback
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from bpcp_jax.run.config import call_python_file
from bpcp_jax.training import files

SWEEP_KEYS = ("base", "grid", "runs", "overrides")
MANIFEST = "sweep.json"
GAMMA_KEY = "stages.search.gamma"
TEXT_COLUMNS = ("name", "status", "message", "workdir")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._=,+-]")


class SweepError(ValueError):
  """A sweep file that cannot be used; the message names the file and the offending entry."""


def repo_root() -> str:
  """The checkout this package was installed from (editable install): the parent of bpcp_jax/."""
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # <repo>/bpcp_jax/run/


# ---------------------------------------------------------------------------------------------
# reading a sweep file


def load_sweep(path: str) -> dict[str, Any]:
  """Import ``get_sweep()`` from ``path``, check it and resolve ``base`` to an existing file."""
  sweep = call_python_file(path, "get_sweep", SweepError)
  if not isinstance(sweep, Mapping):
    raise SweepError(f"get_sweep() in {path} must return a dict, got {type(sweep).__name__}")
  unknown = [k for k in sweep if k not in SWEEP_KEYS]
  if unknown:
    raise SweepError(f"unknown key(s) {unknown} in the sweep of {path}; known: {', '.join(SWEEP_KEYS)}")
  if not isinstance(sweep.get("base"), str) or not sweep["base"]:
    raise SweepError(f"the sweep of {path} needs 'base': the path of a config file")
  grid = dict(sweep.get("grid") or {})
  for key, values in grid.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise SweepError(f"grid entry {key!r} in {path} must be a non-empty list of values, got {values!r}")
  runs = list(sweep.get("runs") or [])
  for i, run in enumerate(runs):
    if not isinstance(run, Mapping):
      raise SweepError(f"runs[{i}] in {path} must be a dict of overrides, got {run!r}")
  overrides = dict(sweep.get("overrides") or {})
  return {"path": os.path.abspath(path), "base": resolve_base(sweep["base"], path), "grid": grid,
          "runs": [dict(r) for r in runs], "overrides": overrides}


def resolve_base(base: str, sweep_path: str) -> str:
  """``base`` as given if absolute, else relative to the sweep file, the repo root or the cwd."""
  candidates = [base] if os.path.isabs(base) else [
      os.path.join(os.path.dirname(os.path.abspath(sweep_path)), base), os.path.join(repo_root(), base),
      os.path.abspath(base)]
  for c in candidates:
    if os.path.isfile(c):
      return os.path.abspath(c)
  raise SweepError(f"base config {base!r} of sweep file {sweep_path} not found (looked at: {', '.join(candidates)})")


def expand_runs(sweep: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The run list: the grid's cartesian product (first key slowest), then the explicit runs."""
  grid = sweep.get("grid") or {}
  runs = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
  runs += [dict(r) for r in sweep.get("runs") or []]
  return runs or [{}]


def swept_keys(runs: Iterable[Mapping[str, Any]]) -> list[str]:
  """Every key some run overrides, in first-seen order."""
  return list(dict.fromkeys(k for r in runs for k in r))


def short_names(keys: Sequence[str]) -> dict[str, str]:
  """The shortest dotted suffix of each key that no other key ends with (``gamma``, ``search.lr``)."""
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
        break
    out[key] = suffix
  return out


def format_value(value: Any) -> str:
  """The override text of a value (what ``apply_overrides`` parses back to the field's type)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(overrides: Mapping[str, Any], keys: Sequence[str]) -> str:
  """A stable directory name from a run's overrides, e.g. ``gamma=0.05,ratio=0.3``."""
  if not overrides:
    return "base"
  short = short_names(list(keys))
  name = ",".join(f"{short.get(k, k)}={format_value(v)}" for k, v in overrides.items())
  name = _NAME_BAD.sub("_", name)  # no "/" or spaces: one plain directory name
  if len(name) > 120:  # keep it a legal file name, still unique
    name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def plan(sweep: Mapping[str, Any], cli_overrides: Sequence[str] = ()):
  """The base config (sweep overrides and ``cli_overrides`` applied) and the named runs.

  Checked before anything runs: every swept key exists in the config, no command-line override
  names a swept key, no two runs get the same name. A run's *values* are checked when it runs.
  """
  from bpcp_jax.run.config import _flatten, apply_overrides, load_config_file

  where = sweep.get("path", "the sweep")
  base = load_config_file(sweep["base"])
  fixed = [f"{k}={format_value(v)}" for k, v in (sweep.get("overrides") or {}).items()]
  base = apply_overrides(base, fixed)
  base = apply_overrides(base, cli_overrides)
  runs = expand_runs(sweep)
  keys = swept_keys(runs)
  known = _flatten(base)
  for k in keys:
    if k not in known:
      raise SweepError(f"swept key {k!r} in {where} is not a config key")
  clash = sorted({o.split("=", 1)[0].removeprefix("--config.") for o in cli_overrides} & set(keys))
  if clash:
    raise SweepError(f"command-line override(s) of swept key(s) {clash} would make every run of {where} the same")
  names = [run_name(r, keys) for r in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f"runs of {where} share the name(s) {dupes}; make their overrides differ")
  values = [{k: r.get(k, known[k]) for k in keys} for r in runs]
  return base, keys, [{"name": n, "overrides": r, "values": v} for n, r, v in zip(names, runs, values)]


# ---------------------------------------------------------------------------------------------
# running


def run_sweep(sweep_path: str, workdir: str, cli_overrides: Sequence[str] = (), *, data_path: Optional[str] = None,
              progress: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Run every run of the sweep not finished yet, then write the results; returns the result rows."""
  import jax

  from bpcp_jax.run.config import apply_overrides
  from bpcp_jax.run.lock import RunDirectoryInUse
  from bpcp_jax.run.pipeline import run_pipeline

  sweep = load_sweep(sweep_path)
  base, keys, runs = plan(sweep, cli_overrides)
  writer = jax.process_index() == 0
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  if writer:
    with open(os.path.join(workdir, MANIFEST), "w") as f:
      json.dump({"sweep_file": sweep["path"], "base": sweep["base"], "keys": keys, "cli_overrides": list(cli_overrides),
                 "runs": runs}, f, indent=2, default=str)
  for i, run in enumerate(runs, 1):
    rundir = os.path.join(workdir, "runs", run["name"])
    head = f"[sweep {i}/{len(runs)}] {run['name']}"
    if os.path.isfile(os.path.join(rundir, "summary.json")):
      log(f"{head}: skipped (summary.json exists)")
      continue
    error_path = os.path.join(rundir, "error.txt")
    if writer and os.path.exists(error_path):  # an earlier failure: this attempt decides anew
      os.remove(error_path)
    log(f"{head}: running in {rundir}")
    try:
      config = apply_overrides(base, [f"{k}={format_value(v)}" for k, v in run["overrides"].items()])
      summary = run_pipeline(config, rundir, resume=True, data_path=data_path, progress=progress)
    except RunDirectoryInUse as e:  # another process runs it (a second worker on the same sweep): leave it
      log(f"{head}: skipped: {e}")
      continue
    except Exception as e:  # one bad run must not stop the others: record it and go on
      if writer:
        os.makedirs(rundir, exist_ok=True)
        with open(error_path, "w") as f:
          f.write(traceback.format_exc())
      log(f"{head}: FAILED: {type(e).__name__}: {e}")
      continue
    r = summary["reduction"]
    log(f"{head}: done: accuracy {100 * summary['pruned']['accuracy']:.2f}%, "
        f"MACs -{r['macs_removed_pct']:.1f}%, params -{r['params_removed_pct']:.1f}%")
  rows = collect_results(workdir)
  if writer:
    write_results(workdir, rows)
  return rows


def run_sweep_command(sweep_path: str, workdir: str, cli_overrides: Sequence[str] = (), *,
                      data_path: Optional[str] = None, progress: bool = True) -> int:
  """``bpcp-jax sweep``: run, print the table; exit status 1 if any run failed, else 0."""
  import jax

  rows = run_sweep(sweep_path, workdir, cli_overrides, data_path=data_path, progress=progress,
                   log=lambda s: print(s, flush=True))
  failed = [r for r in rows if r["status"] == "failed"]
  if jax.process_index() == 0:
    print(results_markdown(rows, os.path.basename(os.path.abspath(workdir))))
    print(f"sweep directory: {os.path.abspath(workdir)} (results.csv, results.md, plots)")
    for r in failed:
      print(f"failed: {r['name']}: {r['message']} (see {os.path.join(workdir, r['workdir'], 'error.txt')})")
  return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# results


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _last_line(path: str) -> str:
  """The exception line of a traceback file (its last non-empty line)."""
  with open(path) as f:
    lines = [l.strip() for l in f if l.strip()]
  return lines[-1] if lines else ""


def _batch(key: str) -> int:
  m = re.search(r"_b(\d+)$", key)
  return int(m.group(1)) if m else 0


def summary_row(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The result columns of one finished run's ``summary.json``."""
  d, p, r = summary["dense"], summary["pruned"], summary["reduction"]
  row = {"pruned_accuracy": p["accuracy"], "dense_accuracy": d["accuracy"],
         "accuracy_drop_pct_points": r.get("accuracy_drop_pct_points"),
         "pruned_params": p["params"], "dense_params": d["params"], "pruned_macs": p["macs"], "dense_macs": d["macs"],
         "params_removed_pct": r.get("params_removed_pct"), "macs_removed_pct": r.get("macs_removed_pct"),
         "pruned_blocks": len(p["blocks_kept"]), "dense_blocks": len(d["blocks_kept"])}
  for key in sorted((k for k in p if k.startswith("latency_ms_b")), key=_batch):
    row[f"pruned_{key}"] = p[key]
    row[f"dense_{key}"] = d.get(key)
  spread = summary.get("speedup_spread") or {}
  for key in sorted((k for k in r if re.fullmatch(r"speedup_b\d+", k)), key=_batch):
    row[key] = r[key]
    if key[len("speedup_"):] in spread:  # the interquartile range of the per-round ratios
      row[f"{key}_q25"], row[f"{key}_q75"] = spread[key[len("speedup_"):]]["q25"], spread[key[len("speedup_"):]]["q75"]
  return row


# the columns of a sweep where no run has finished yet
_EMPTY_SUMMARY = {"dense": {"accuracy": None, "params": None, "macs": None, "blocks_kept": []},
                  "pruned": {"accuracy": None, "params": None, "macs": None, "blocks_kept": []}, "reduction": {}}


def collect_results(sweep_dir: str) -> list[dict[str, Any]]:
  """One row per run of the sweep in ``sweep_dir``, from its ``summary.json`` or ``error.txt``.

  Columns: ``name``, every swept key (dotted, the value that run used), ``status`` ("done",
  "failed" or "not run"), the metrics of ``summary_row`` (None where the run has none) and
  ``message`` (the exception of a failed run). Every row has the same columns. Without a
  ``sweep.json`` (a directory of runs gathered by hand) every ``runs/*/`` is a row, no keys.
  """
  manifest_path = os.path.join(sweep_dir, MANIFEST)
  runs_dir = os.path.join(sweep_dir, "runs")
  if os.path.isfile(manifest_path):
    manifest = _read_json(manifest_path)
    keys, runs = manifest["keys"], manifest["runs"]
  else:
    names = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
    keys, runs = [], [{"name": n, "values": {}} for n in names if os.path.isdir(os.path.join(runs_dir, n))]
  rows, metrics = [], []
  for run in runs:
    rundir = os.path.join(runs_dir, run["name"])
    row = {"name": run["name"], **{k: run["values"].get(k) for k in keys}, "status": "not run"}
    summary_path, error_path = os.path.join(rundir, "summary.json"), os.path.join(rundir, "error.txt")
    found = {}
    if os.path.isfile(summary_path):
      row["status"] = "done"
      found = summary_row(_read_json(summary_path))
    elif os.path.isfile(error_path):
      row["status"] = "failed"
    rows.append(row)
    metrics.append((found, _last_line(error_path) if row["status"] == "failed" else ""))
  columns = list(dict.fromkeys(c for found, _ in metrics for c in found))
  if not columns and rows:  # nothing finished yet: still the usual columns, empty
    columns = list(summary_row(_EMPTY_SUMMARY))
  for row, (found, message) in zip(rows, metrics):
    row.update({c: found.get(c) for c in columns})
    row["message"] = message
    row["workdir"] = os.path.join("runs", row["name"])
  return rows



def result_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  return list(dict.fromkeys(c for r in rows for c in r))


def swept_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The swept config keys among the columns: the dotted ones (no metric column has a dot)."""
  return [c for c in result_columns(rows) if "." in c]


def write_results(sweep_dir: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Write ``results.csv``, ``results.md`` and the plots (each replaced whole); returns {what: path}
  of every file written."""
  written = {}
  columns = result_columns(rows)

  def write_csv(tmp):
    with open(tmp, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=columns)
      w.writeheader()
      for r in rows:
        w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})

  written["csv"] = os.path.join(sweep_dir, "results.csv")
  files.replace_file(written["csv"], write_csv)
  plots = {}
  if _done(rows):
    plots["pareto"] = plot_pareto(rows)
    plots["speedup"] = plot_speedup(rows)
    if GAMMA_KEY in columns:
      plots["blocks_vs_gamma"] = plot_blocks_vs_gamma(rows)
  for name, fig in plots.items():
    if fig is None:
      continue
    written[name] = os.path.join(sweep_dir, f"{name}.png")
    files.replace_file(written[name], lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
  md = results_markdown(rows, os.path.basename(os.path.abspath(sweep_dir)),
                        images=[f"{n}.png" for n in plots if plots[n] is not None])
  written["md"] = os.path.join(sweep_dir, "results.md")
  files.write_text(written["md"], md)
  return written


def _parse_cell(text: str):
  if text == "":
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def read_results(sweep_dir_or_csv: str) -> list[dict[str, Any]]:
  """The rows of a ``results.csv`` (a sweep directory or the file), numbers parsed, "" as None."""
  path = sweep_dir_or_csv
  if os.path.isdir(path):
    path = os.path.join(path, "results.csv")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no results.csv at {path}; run the sweep (bpcp-jax sweep) first")
  with open(path, newline="") as f:
    return [{k: (v if k in TEXT_COLUMNS else _parse_cell(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _fmt(value, spec: str = "") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
    return format(value, spec)
  return str(value)


def _speedup_cell(row: Mapping[str, Any], column: str) -> str:
  q25, q75 = row.get(f"{column}_q25"), row.get(f"{column}_q75")
  spread = f" ({_fmt(q25, '.2f')}-{_fmt(q75, '.2f')})" if _finite(q25, q75) else ""
  return _fmt(row.get(column), ".2f") + (spread if _fmt(row.get(column)) else "")


def results_markdown(rows: Sequence[Mapping[str, Any]], title: str = "sweep", images: Sequence[str] = ()) -> str:
  """A markdown report: counts, one table row per run, the failures, the plots."""
  keys = swept_columns(rows)
  columns = result_columns(rows)
  speedups = [c for c in columns if re.fullmatch(r"speedup_b\d+", c)]
  head = ["run", *keys, "status", "acc %", "drop pts", "params", "MACs", "params cut %", "MACs cut %", "blocks",
          *[f"speed-up {c[len('speedup_'):]}" for c in speedups]]
  lines = [f"# Sweep results: {title}", ""]
  counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "not run")}
  lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    acc = r.get("pruned_accuracy")
    cells = [r["name"], *[_fmt(r.get(k)) for k in keys], r["status"], _fmt(None if acc is None else 100 * acc, ".2f"),
             _fmt(r.get("accuracy_drop_pct_points"), ".2f"), _fmt(r.get("pruned_params"), ","),
             _fmt(r.get("pruned_macs"), ","), _fmt(r.get("params_removed_pct"), ".1f"),
             _fmt(r.get("macs_removed_pct"), ".1f"), _fmt(r.get("pruned_blocks")),
             *[_speedup_cell(r, c) for c in speedups]]
    lines.append("| " + " | ".join(cells) + " |")
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    lines += ["", "## Failed runs", ""]
    lines += [f"- `{r['name']}`: {r.get('message', '')} ({r.get('workdir', '')}/error.txt)" for r in failed]
  if images:
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(i)[0]}]({i})" for i in images]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Pareto front and plots (matplotlib Figure objects, no pyplot state: they work under any backend)


def _finite(*values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
  """Indices of the (cost, value) points no other point beats, by increasing cost.

  Lower cost and higher value are better: a point is on the front iff no other point has
  cost <= and value >= with one of them strict. Of exact duplicates the first is kept; points
  with a missing or non-finite coordinate are ignored.
  """
  idx = [i for i, p in enumerate(points) if _finite(p[0], p[1])]
  idx.sort(key=lambda i: (points[i][0], -points[i][1], i))
  front, best = [], -math.inf
  for i in idx:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return front


def _done(rows):
  return [r for r in rows if r.get("status") == "done" and _finite(r.get("pruned_accuracy"))]


def _figure(size=(6.5, 4.2)):
  from matplotlib.figure import Figure

  fig = Figure(figsize=size)
  return fig, fig.add_subplot()


def _label_points(ax, xs, ys, names):
  for x, y, n in zip(xs, ys, names):
    ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
  ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points


def plot_pareto(rows: Sequence[Mapping[str, Any]]):
  """Accuracy vs MACs of every finished run, the dense networks, and the Pareto front."""
  runs = [r for r in _done(rows) if _finite(r.get("pruned_macs"))]
  fig, ax = _figure()
  xs = [r["pruned_macs"] / 1e6 for r in runs]
  ys = [100 * r["pruned_accuracy"] for r in runs]
  ax.scatter(xs, ys, color="C0", zorder=3, label="pruned")
  _label_points(ax, xs, ys, [r["name"] for r in runs])
  dense = sorted({(r["dense_macs"] / 1e6, 100 * r["dense_accuracy"]) for r in runs
                  if _finite(r.get("dense_macs"), r.get("dense_accuracy"))})
  if dense:
    ax.scatter(*zip(*dense), marker="*", s=90, color="0.4", zorder=3, label="dense")
  front = pareto_front(list(zip(xs, ys)))
  if front:
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="C3", lw=1.2, label="Pareto front")
  ax.set_xlabel("MACs (M)")
  ax.set_ylabel("test accuracy %")
  ax.set_title("accuracy vs MACs")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_speedup(rows: Sequence[Mapping[str, Any]], column: str = "speedup_b1"):
  """Accuracy vs measured speed-up (batch 1 by default) of every finished run."""
  runs = [r for r in _done(rows) if _finite(r.get(column))]
  fig, ax = _figure()
  xs = [r[column] for r in runs]
  ys = [100 * r["pruned_accuracy"] for r in runs]
  ax.scatter(xs, ys, color="C1", zorder=3)
  _label_points(ax, xs, ys, [r["name"] for r in runs])
  ax.axvline(1.0, color="0.5", lw=0.8, ls=":")
  ax.set_xlabel(f"measured speed-up over dense ({column[len('speedup_'):]})")
  ax.set_ylabel("test accuracy %")
  ax.set_title("accuracy vs speed-up")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def plot_blocks_vs_gamma(rows: Sequence[Mapping[str, Any]], key: str = GAMMA_KEY):
  """Blocks kept after the block search per gamma (every run a dot, the mean per gamma a line)."""
  runs = [r for r in _done(rows) if _finite(r.get(key), r.get("pruned_blocks"))]
  fig, ax = _figure((5.5, 3.8))
  ax.scatter([r[key] for r in runs], [r["pruned_blocks"] for r in runs], color="C2", zorder=3, label="runs")
  gammas = sorted({r[key] for r in runs})
  means = [sum(r["pruned_blocks"] for r in runs if r[key] == g) / sum(r[key] == g for r in runs) for g in gammas]
  if gammas:
    ax.plot(gammas, means, "-", color="C2", lw=1, label="mean")
  dense = {r["dense_blocks"] for r in runs if _finite(r.get("dense_blocks"))}
  for i, d in enumerate(sorted(dense)):
    ax.axhline(d, color="0.5", lw=0.8, ls=":", label="dense" if i == 0 else None)
  ax.set_xlabel(key.rsplit(".", 1)[-1])
  ax.set_ylabel("residual blocks kept")
  ax.set_title("blocks kept vs gamma")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig
