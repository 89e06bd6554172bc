"""The command line's restart with a host allocator: done once, the best available, the user's choice kept."""

import os
import subprocess
import sys

import pytest

from bpcp_jax.run import host

PRINT_ENV = ("import os; from bpcp_jax.run.host import current_allocator; "
             "print(current_allocator(), os.environ.get('LD_PRELOAD', '-'), os.environ.get('GLIBC_TUNABLES', '-'))")
SCRIPT = ("import sys; from bpcp_jax.run.host import reexec_with_allocator; "
          f"reexec_with_allocator(['-c', {PRINT_ENV!r}]); print('not restarted')")
VARIABLES = (*host.SET_VARIABLES, host.OPT_OUT, host.CHOICE, host.DONE)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the restart is Linux-only")


def _run(env):
  env = {k: v for k, v in os.environ.items() if k not in VARIABLES} | env
  return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout


def test_restarts_once_with_the_best_available_allocator():
  name, variables = host.choose_allocator({})
  assert name == host.available_allocators()[0]
  allocator, preload, tunables = _run({}).split()
  assert allocator == name
  assert preload == variables.get("LD_PRELOAD", "-") and tunables == variables.get("GLIBC_TUNABLES", "-")


def test_the_users_choice_is_kept():
  assert _run({host.OPT_OUT: "1"}).strip() == "not restarted"
  assert _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}).strip() == "not restarted"
  assert _run({"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}).strip() == "not restarted"
  assert _run({host.CHOICE: "glibc-hugetlb"}).split() == ["glibc-hugetlb", "-", "glibc.malloc.hugetlb=1"]
  assert _run({host.CHOICE: "glibc"}).split() == ["glibc", "-", "-"]


@pytest.mark.skipif(host.mimalloc_library() is None, reason="cmeel-mimalloc is not installed")
def test_mimalloc_is_preloaded_and_keeps_freed_pages_a_while():
  allocator, preload, _ = _run({host.CHOICE: "mimalloc"}).split()
  assert allocator == "mimalloc" and preload.endswith(".so") and "libmimalloc" in preload
  assert host.allocator_environment("mimalloc")["MIMALLOC_PURGE_DELAY"] == "1000"


def test_an_unknown_or_missing_allocator_is_named():
  with pytest.raises(ValueError, match="'jemalloc' unknown"):
    host.choose_allocator({host.CHOICE: "jemalloc"})
  missing = [a for a in host.ALLOCATORS if a not in host.available_allocators()]
  for name in missing:
    with pytest.raises(SystemExit, match=f"{host.CHOICE}={name}: not available"):
      host.choose_allocator({host.CHOICE: name})
