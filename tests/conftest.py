"""Test setup: several fake CPU devices, strict rank promotion, warnings as errors (setup.cfg), one
empty compilation cache per session for the command lines the tests start, and no allocator restart
in them (but where a test asks for it)."""

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
# the command lines the tests start skip the allocator restart (bpcp_jax/run/host.py: a second Python
# start and import, ~2 s per command here); tests/test_host.py tests the restart, and the
# kill-and-resume test in tests/test_faults.py runs its commands with it
os.environ.setdefault("BPCP_NO_HOST_TUNING", "1")

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
