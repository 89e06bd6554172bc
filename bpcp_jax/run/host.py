"""The host memory allocator the command line restarts itself with (XLA's CPU runtime needs a good one).

XLA's CPU backend allocates a training step's temporaries afresh every step (about 1.7 GB for a
ResNet-v2-56 step at batch 128). glibc serves each with a new ``mmap`` and unmaps it on ``free``,
so every step page-faults and zeroes 1.7 GB again. An allocator that keeps freed memory for
reuse removes that. Measured on the 2-core AMD EPYC (``python -m benchmarks.train_throughput
--compare-allocators``, ``benchmarks/results/train_throughput.md``): glibc as it is loses about
a third of the step to the kernel; tcmalloc removes it, run after run; mimalloc mostly does but
varied more between runs; glibc with transparent huge pages removes most of it but stalls now
and then on compaction.

The first of these that is available is used (``BPCP_ALLOCATOR`` names one to force it):

- ``tcmalloc``: the system's ``libtcmalloc_minimal`` or ``libtcmalloc`` (Debian:
  ``apt-get install libtcmalloc-minimal4``; Colab preloads it already);
- ``mimalloc``: from the ``cmeel-mimalloc`` wheel (``pip install "bpcp-jax[cpu]"``, for machines
  where no system package can be installed), freed pages kept for a second
  (``MIMALLOC_PURGE_DELAY=1000``: a step reuses the last step's memory; never returning it,
  ``-1``, let the resident size balloon to 6 GiB in some runs);
- ``glibc-hugetlb``: glibc with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``;
- ``glibc``: nothing changed.

An allocator is loaded only when a process starts, so programs call ``reexec_with_allocator``
first thing; it replaces the process once (same arguments, same pid) and is a no-op when the
user already chose (an allocator in ``LD_PRELOAD``, or ``GLIBC_TUNABLES`` set), when
``BPCP_NO_HOST_TUNING=1``, or off Linux. In a notebook, start the kernel with the variables set.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import sys
from typing import Optional, Sequence

OPT_OUT = "BPCP_NO_HOST_TUNING"
CHOICE = "BPCP_ALLOCATOR"  # set by the user to force one; set by the restart to record the choice
DONE = "BPCP_ALLOCATOR_SET"  # marks the restarted process, so it never restarts again
ALLOCATORS = ("tcmalloc", "mimalloc", "glibc-hugetlb", "glibc")
HUGETLB = "glibc.malloc.hugetlb=1"
SET_VARIABLES = ("LD_PRELOAD", "GLIBC_TUNABLES", "MIMALLOC_PURGE_DELAY")  # what the choices set
_KNOWN_PRELOADS = ("malloc", "jemalloc")  # libtcmalloc*, libjemalloc*, libmimalloc*


def cpu_fields() -> dict[str, str]:
  """The first processor's fields in ``/proc/cpuinfo`` (``model name``, ``flags``...); empty off Linux."""
  try:
    with open("/proc/cpuinfo") as f:
      block = f.read().split("\n\n")[0]
  except OSError:
    return {}
  return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines()) if k.strip()}


def mimalloc_library() -> Optional[str]:
  """Path of ``libmimalloc.so`` from the ``cmeel-mimalloc`` wheel, or None."""
  try:
    dist = importlib.metadata.distribution("cmeel-mimalloc")
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in dist.files or ():
    name = str(f)
    if name.endswith(".so") and "libmimalloc" in name:
      path = str(dist.locate_file(f))
      if os.path.exists(path):
        return path
  return None


def tcmalloc_library() -> Optional[str]:
  """The system tcmalloc's library name (for ``LD_PRELOAD``), or None."""
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def allocator_environment(choice: str) -> Optional[dict]:
  """The variables that select ``choice`` in a new process, or None where it is not available."""
  if choice == "mimalloc":
    lib = mimalloc_library()
    return None if lib is None else {"LD_PRELOAD": lib, "MIMALLOC_PURGE_DELAY": "1000"}
  if choice == "tcmalloc":
    lib = tcmalloc_library()
    return None if lib is None else {"LD_PRELOAD": lib}
  if choice == "glibc-hugetlb":
    return {"GLIBC_TUNABLES": HUGETLB}
  if choice == "glibc":
    return {}
  raise ValueError(f"{CHOICE}={choice!r} unknown; choose from {ALLOCATORS}")


def available_allocators() -> list[str]:
  """The allocators this machine can run with, in order of preference."""
  return [a for a in ALLOCATORS if allocator_environment(a) is not None]


def user_chose(env=None) -> bool:
  env = os.environ if env is None else env
  preload = os.path.basename(env.get("LD_PRELOAD", ""))
  return "GLIBC_TUNABLES" in env or any(k in preload for k in _KNOWN_PRELOADS)


def choose_allocator(env=None) -> tuple[str, dict]:
  """``(name, variables)`` of the allocator a restart would use (``BPCP_ALLOCATOR`` forces one)."""
  env = os.environ if env is None else env
  forced = env.get(CHOICE)
  if forced:
    variables = allocator_environment(forced)
    if variables is None:
      raise SystemExit(f"{CHOICE}={forced}: not available here (mimalloc needs `pip install cmeel-mimalloc`, "
                       "tcmalloc needs libtcmalloc_minimal from the system)")
    return forced, variables
  name = available_allocators()[0]  # plain glibc is always available
  return name, allocator_environment(name)


def current_allocator() -> str:
  """What this process runs with: the restart's choice, the user's setting, or plain glibc."""
  if os.environ.get(DONE):
    return os.environ.get(CHOICE, "glibc")
  preload = os.environ.get("LD_PRELOAD", "")
  for name in ("mimalloc", "tcmalloc", "jemalloc"):
    if name in preload:
      return f"{name} (LD_PRELOAD)"
  if HUGETLB in os.environ.get("GLIBC_TUNABLES", ""):
    return "glibc-hugetlb"
  return "glibc"


def wants_reexec() -> bool:
  env = os.environ
  if not sys.platform.startswith("linux") or env.get(OPT_OUT) or env.get(DONE):
    return False
  return bool(env.get(CHOICE)) or not user_chose(env)


def reexec_with_allocator(python_args: Sequence[str]) -> None:
  """Replace this process by ``python <python_args>`` with the best available allocator, once.

  Call it first thing in a program's entry point, before any work (nothing is lost: the same
  process id continues with the same arguments).
  """
  if not wants_reexec():
    return
  name, variables = choose_allocator()
  env = dict(os.environ, **variables, **{CHOICE: name, DONE: "1"})
  if "LD_PRELOAD" in variables and os.environ.get("LD_PRELOAD"):
    env["LD_PRELOAD"] = variables["LD_PRELOAD"] + ":" + os.environ["LD_PRELOAD"]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *python_args], env)
