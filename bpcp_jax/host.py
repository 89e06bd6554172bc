"""Host settings that make XLA's CPU runtime faster; glibc reads them only when a process starts.

XLA's CPU backend allocates a training step's temporaries afresh every step (about 1.7 GB for a
ResNet-v2-56 step at batch 128) and glibc serves each with a new ``mmap`` that page-faults 4 KiB
at a time. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` asks malloc for transparent huge pages
instead. Measured on the 2-core Xeon VM (``benchmarks/results/train_throughput.md``): dense step
80.8 -> 93.1 images/s, search step 81.5 -> 91.6, peak RSS 2.83 -> 2.57 GiB. The command line
therefore re-executes itself once with the setting; an existing ``GLIBC_TUNABLES`` is respected,
and ``BPCP_NO_HOST_TUNING=1`` turns this off. Other systems (no glibc, macOS) are left alone;
an older glibc ignores the unknown tunable.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

OPT_OUT = "BPCP_NO_HOST_TUNING"
TUNABLES = "glibc.malloc.hugetlb=1"


def wants_reexec() -> bool:
  return sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ and not os.environ.get(OPT_OUT)


def reexec_with_huge_pages(python_args: Sequence[str]) -> None:
  """Replace this process by ``python <python_args>`` with huge-page malloc, unless not wanted.

  Call it first thing in a program's entry point, before any work (nothing is lost: the same
  process id continues with the same arguments).
  """
  if not wants_reexec():
    return
  env = dict(os.environ, GLIBC_TUNABLES=TUNABLES)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *python_args], env)
