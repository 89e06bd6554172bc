"""What every benchmark shares: the restart with the host allocator, timing, the environment record, outputs.

Each benchmark prints a markdown table and writes JSON holding the device, the versions, the
exact command and the results, so a number can always be traced to the machine and the call
that produced it. Ratios are measured side by side in one process (rounds interleaved), so
load from other processes affects both sides of a ratio alike.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Callable, Iterable, Sequence


def restart_with_allocator(module: str, argv: Sequence[str]) -> None:
  """Restart ``python -m module argv`` with the allocator the command line uses (bpcp_jax/run/host.py).

  ``--allocator NAME`` on the command line forces one (``auto`` picks as the command line does);
  call this before jax is imported. Benchmarks time what ``bpcp-jax`` runs.
  """
  from bpcp_jax.run import host

  argv = list(argv)
  if "--allocator" in argv and argv.index("--allocator") + 1 < len(argv):
    choice = argv[argv.index("--allocator") + 1]
    if choice != "auto" and not os.environ.get(host.DONE):
      os.environ[host.CHOICE] = choice
      os.environ.pop(host.OPT_OUT, None)  # a named allocator overrides BPCP_NO_HOST_TUNING
  host.reexec_with_allocator(["-m", module, *argv])


def add_common_args(parser) -> None:
  parser.add_argument("--json", default=None, help="write the results here (JSON)")
  parser.add_argument("--md", default=None, help="write the markdown table here")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported")
  parser.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke run, not a measurement")
  parser.add_argument("--allocator", default="auto",
                      help="host allocator: auto (as the command line), mimalloc, tcmalloc, glibc-hugetlb or glibc")


def peak_rss_gib() -> float:
  """This program's maximum resident set size so far, in GiB.

  On Linux from ``/proc/self/status`` (VmHWM: since the last ``exec``). ``getrusage``'s maximum
  survives ``exec`` and, for a child started by ``subprocess`` (vfork), starts at the parent's
  peak, so a child would report at least what its parent used."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / (1024.0**2)
  except OSError:
    pass
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kib / (1024.0**2) if sys.platform != "darwin" else kib / 1024.0**3


def environment() -> dict[str, Any]:
  import flax
  import jax
  import jaxlib
  import optax

  from bpcp_jax.run.host import current_allocator

  dev = jax.devices()[0]
  return {
      "device": {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
                 "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                 "cpu_model": _cpu_model()},
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "python": platform.python_version()},
      "command": " ".join([os.path.basename(sys.executable), "-m", _module_name()] + sys.argv[1:]),
      "argv": list(sys.argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_allocator": current_allocator(),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
  }


def _cpu_model() -> str:
  from bpcp_jax.run.host import cpu_fields

  return cpu_fields().get("model name") or platform.processor()


def _module_name() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


def fast_init(model, seed: int = 0) -> dict:
  """Variables of ``model``'s shapes drawn with numpy (He-normal kernels, BN at identity).

  ``model.init`` compiles a graph of random ops that takes XLA's CPU compiler 7-10 s; timing
  does not depend on the values, and this takes milliseconds.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return np.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape), s.dtype)
    if name in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def block(x):
  import jax

  return jax.block_until_ready(x)


def median(xs: Iterable[float]) -> float:
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def timed(fn: Callable[[], Any]) -> float:
  t = time.perf_counter()
  block(fn())
  return time.perf_counter() - t


def interleaved_inference(nets: Sequence[tuple], x_small, x_large, repeats: int, calls: int,
                          large_calls: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Time eval-mode inference of every ``(name, model, variables[, weights])`` in interleaved
  rounds (load drifts hit every network alike). ``weights`` is ``"constant"`` (the default: the
  deployed form, ``bp.make_predictor``) or ``"argument"`` (``jax.jit(model.apply)`` with the
  variables on the device). Per round and network: the median seconds of ``calls`` calls on
  ``x_small`` and the images/s of ``large_calls`` calls on ``x_large``."""
  lat, thr = interleaved_inference_batches(nets, x_small, [x_large], repeats, calls, large_calls)
  return lat, thr[x_large.shape[0]]


def interleaved_inference_batches(nets: Sequence[tuple], x_small, xs_large: Sequence, repeats: int, calls: int,
                                  large_calls: int, threads: int = 1
                                  ) -> tuple[dict[str, list[float]], dict[int, dict[str, list[float]]]]:
  """``interleaved_inference`` at several large batches: ``(latency rounds, {batch: images/s rounds})``.

  Every network is compiled for ``x_small`` and each of ``xs_large`` before any timing, by
  ``threads`` threads (compilations of different networks overlap; the timing itself is serial)."""
  import concurrent.futures

  import jax

  import bpcp_jax as bp

  def prepare(net):
    name, model, variables, *weights = net
    if (weights or ["constant"])[0] == "constant":
      predict = bp.make_predictor(model, variables)
      call = lambda x, p=predict: p(x)  # noqa: E731
    else:
      apply = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
      on_device = jax.device_put(variables)  # as a trained model holds them: no copy per call
      call = lambda x, a=apply, v=on_device: a(v, x)  # noqa: E731
    for x in (x_small, *xs_large):  # compile every shape before timing
      block(call(x))
    return name, call

  if threads > 1:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      fns = list(pool.map(prepare, nets))
  else:
    fns = [prepare(net) for net in nets]
  lat = {name: [] for name, _ in fns}
  thr = {int(x.shape[0]): {name: [] for name, _ in fns} for x in xs_large}
  for _ in range(repeats):
    for name, call in fns:
      lat[name].append(median([timed(lambda: call(x_small)) for _ in range(calls)]))
      for x in xs_large:
        thr[int(x.shape[0])][name].append(large_calls * x.shape[0] / sum(timed(lambda: call(x))
                                                                          for _ in range(large_calls)))
  return lat, thr


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_outputs(name: str, args, results: dict[str, Any], table: str) -> dict[str, Any]:
  """Print the table, and write JSON (environment + results) and markdown where asked."""
  env = environment()
  record = {"benchmark": name, **env, "results": results}
  header = (f"# {name}\n\n{env['device']['cpu_model']} ({env['device']['cpu_count']} cores, "
            f"{env['device']['platform']}), jax {env['versions']['jax']}, flax {env['versions']['flax']}, "
            f"host allocator: {env['host_allocator']}, {env['date']}\n\n"
            f"`{env['command']}`\n\n")
  print(header + table)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
  if args.md:
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
      f.write(header + table + "\n")
  return record
