"""One writer per run directory: an exclusive advisory lock on ``<workdir>/.lock``.

Two processes writing one run directory (a chained job that starts a run still going on, a
sweep launched twice, a notebook cell run again while its first run trains in the background)
would interleave checkpoints, metrics and the summary. The process that runs a pipeline holds an
exclusive ``fcntl.flock`` on ``<workdir>/.lock`` until it returns; the kernel drops the lock when
the process ends in any way (exit, exception, ``kill -9``), so no stale lock is ever left to
clean. The file records the holder's PID, host and start time, which the refusal names.

Only jax process 0 takes the lock (the processes of one multi-process run share the directory).
Where ``fcntl`` is missing (Windows) no lock is taken. ``flock`` is advisory and per host: two
machines writing one network file system directory are not told apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Iterator

try:
  import fcntl
except ImportError:  # pragma: no cover - Windows
  fcntl = None

LOCK_FILE = ".lock"


class RunDirectoryInUse(RuntimeError):
  """Another process is writing the run directory (its PID, host and start time in the message)."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      h = json.load(f)
    return f"process {h['pid']} on {h['host']}, started {h['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


@contextlib.contextmanager
def hold_run_directory(workdir: str, *, enabled: bool = True, then: str = "run again") -> Iterator[None]:
  """Hold ``workdir``'s lock for the ``with`` block; creates ``workdir`` if missing.

  Raises ``RunDirectoryInUse`` (naming the directory and the holder, and ending with ``then``, what
  to do once it is free) when another process holds it; nothing in the directory is touched
  then. ``enabled=False`` (processes other than 0) or a platform without ``fcntl`` holds nothing.
  """
  if not enabled or fcntl is None:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RunDirectoryInUse(
          f"{os.path.abspath(workdir)} is being written by {_holder(path)} ({path} is locked); wait for it "
          f"to finish or stop it, then {then}") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    yield
  finally:
    os.close(fd)  # closing the only descriptor releases the lock
