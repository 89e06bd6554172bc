"""Test setup: several fake CPU devices, strict rank promotion, warnings as errors (setup.cfg), and one
empty compilation cache per session for the command lines the tests start."""

import atexit
import os
import shutil
import tempfile

# must happen before jax is imported anywhere: 4 fake CPU devices for the multi-device paths
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the command lines the tests start share one compilation cache, empty at the start of the session
_XLA_CACHE = tempfile.mkdtemp(prefix="bpcp-test-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("BPCP_COMPILATION_CACHE", _XLA_CACHE)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_ARCHIVE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "cifar10-jpeg.tar.gz")


@pytest.fixture(scope="session")
def cifar_archive():
  path = os.environ.get("BPCP_DATA", CIFAR_ARCHIVE)
  if not os.path.exists(path):
    pytest.skip(f"real CIFAR-10 archive not found at {path}")
  return path
