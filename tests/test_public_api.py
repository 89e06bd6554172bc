"""The curated public API: every name resolves, and ``import bpcp_jax`` loads nothing heavy."""

import subprocess
import sys

import pytest

import bpcp_jax as bp
from tests.conftest import REPO_ROOT


def test_every_public_name_resolves():
  for name in bp.__all__:
    assert getattr(bp, name) is not None, name
  assert {"FamilyNetwork", "recalibrate_batch_stats", "trace_nnx", "create_model"} <= set(bp.__all__)
  assert set(bp.__all__) <= set(dir(bp))
  assert bp.training.__name__ == "bpcp_jax.training"  # subpackages, as attributes
  with pytest.raises(AttributeError, match="no_such_name"):
    bp.no_such_name  # noqa: B018
  namespace: dict = {}
  exec("from bpcp_jax import *", namespace)
  assert set(bp.__all__) <= set(namespace)


def test_importing_the_package_and_the_command_line_loads_no_jax():
  # the command line restarts itself with a better allocator (run/host.py) before any work: what it
  # imported before the restart is paid twice
  code = ("import sys, bpcp_jax, bpcp_jax.run.cli, bpcp_jax.run.host, bpcp_jax.run.compile_cache; "
          "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'numpy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
