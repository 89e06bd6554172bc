"""The command line's restart with huge-page malloc: done once, respects the user's settings."""

import os
import subprocess
import sys

import pytest

PRINT_ENV = "import os; print(os.environ.get('GLIBC_TUNABLES', '-'))"
SCRIPT = ("import sys; from bpcp_jax.host import reexec_with_huge_pages; "
          f"reexec_with_huge_pages(['-c', {PRINT_ENV!r}]); print('not restarted')")


def _run(env):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BPCP_NO_HOST_TUNING")} | env
  return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_restarts_with_huge_pages_unless_told_otherwise():
  assert _run({}).strip() == "glibc.malloc.hugetlb=1"
  assert _run({"BPCP_NO_HOST_TUNING": "1"}).strip() == "not restarted"
  assert _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}).strip() == "not restarted"
