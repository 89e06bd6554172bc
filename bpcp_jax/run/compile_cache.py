"""A persistent XLA compilation cache: a process that compiles what an earlier one compiled loads it.

Every ``bpcp-jax`` command is a fresh process, and so is every run of a sweep, every resume and
every notebook restart: each compiled the same training, search and evaluation steps again. On
the 2-core CPU the tiny pipeline (experiments/configs/tiny.py) took 31 s from a cold start and
9 s with the cache filled by an earlier run; a ResNet-v2-56 step takes tens of seconds to compile.

The command line turns JAX's persistent compilation cache on before it compiles anything
(``enable_compilation_cache``), in ``$BPCP_CACHE/xla/<host>`` (default
``~/.cache/bpcp_jax/xla/<host>``). ``<host>`` names the CPU (model, instruction-set flags) and
the jaxlib version: XLA compiles CPU code for the CPU it runs on, and JAX's cache key does not
say which, so a home directory shared by different machines must not share entries.

``BPCP_COMPILATION_CACHE=DIR`` puts it elsewhere, ``BPCP_COMPILATION_CACHE=off`` turns it off,
and a ``JAX_COMPILATION_CACHE_DIR`` of the user's own is left as it is. In a notebook call
``bp.enable_compilation_cache()`` once, before the first compilation.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from typing import Optional

ENV = "BPCP_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false")


def host_fingerprint() -> str:
  """A short name for what compiled code depends on here: CPU model and flags, jaxlib version."""
  import jaxlib

  from bpcp_jax.run.host import cpu_fields

  cpu = cpu_fields()
  parts = [platform.machine(), getattr(jaxlib, "__version__", "?")]
  # off Linux the processor string is what there is
  parts += [cpu.get(k, "") for k in ("model name", "flags", "Features")] if cpu else [platform.processor()]
  return f"{platform.machine()}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:12]}"


def default_cache_dir() -> str:
  from bpcp_jax.training.data import cache_root

  return os.path.join(cache_root(), "xla", host_fingerprint())


def enable_compilation_cache(path: Optional[str] = None, *, min_compile_time_s: float = 0.3) -> Optional[str]:
  """Turn on JAX's persistent compilation cache; returns the directory, or None when off.

  ``path`` None: ``$BPCP_COMPILATION_CACHE`` (``off`` turns it off), else the user's own
  ``JAX_COMPILATION_CACHE_DIR`` (kept), else ``default_cache_dir()``. Programs that take less
  than ``min_compile_time_s`` to compile are not stored. A directory that cannot be written is
  reported on stderr and the run goes on without the cache.
  """
  import jax

  if path is None:
    chosen = os.environ.get(ENV, "")
    if chosen.lower() in OFF:
      return None
    if not chosen and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
      return os.environ["JAX_COMPILATION_CACHE_DIR"]  # JAX reads it itself
    path = chosen or default_cache_dir()
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(f"not writable: {path}")
  except OSError as e:
    print(f"compilation cache off: cannot use {path} ({e}); set {ENV}=DIR or {ENV}=off", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
  return path
