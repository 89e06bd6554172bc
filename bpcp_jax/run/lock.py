"""One writer per run directory: an exclusive advisory lock on ``<workdir>/.lock``.

Two processes writing one run directory (a chained job that starts a run still going on, a
sweep launched twice, a notebook cell run again while its first run trains in the background)
would interleave checkpoints, metrics and the summary. The process that runs a pipeline holds an
exclusive ``fcntl.flock`` on ``<workdir>/.lock`` until it returns; the kernel drops the lock when
the process ends in any way (exit, exception, ``kill -9``), so no stale lock is ever left to
clean. The file records the holder's PID, host and start time, which the refusal names.

In a multi-process job (``job=True``) process 0 takes the lock and every process learns the
outcome (``multihost_utils.broadcast_one_to_all``), so all of them go on or all are refused.
A lock file another user created is locked through a read-only descriptor (a team's shared run
directory). Where ``fcntl`` is missing (Windows) no lock is taken. ``flock`` is advisory and per
host: two machines writing one network file system directory are not told apart.
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


def _open_lock_file(path: str) -> tuple[int, bool]:
  """A descriptor of the lock file and whether the holder's record can be written to it."""
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644), True
  except PermissionError:
    if not os.path.isfile(path):  # not ours to create: the directory's own error names it
      raise
    return os.open(path, os.O_RDONLY), False  # another user's lock file: flock works read-only too


@contextlib.contextmanager
def _hold_here(workdir: str, then: str) -> Iterator[None]:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd, writable = _open_lock_file(path)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RunDirectoryInUse(
          f"{os.path.abspath(workdir)} is being written by {_holder(path)} ({os.path.abspath(path)} is locked); "
          f"wait for it to finish or stop it, then {then}") from None
    if writable:
      record = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps(record).encode())
    yield
  finally:
    os.close(fd)  # closing the only descriptor releases the lock


@contextlib.contextmanager
def hold_run_directory(workdir: str, *, then: str = "run again", job: bool = False) -> Iterator[None]:
  """Hold ``workdir``'s lock for the ``with`` block; creates ``workdir`` if missing.

  Raises ``RunDirectoryInUse`` (naming the directory and the holder, and ending with ``then``, what
  to do once it is free) when another process holds it; nothing in the directory is touched
  then. ``job=True`` in a multi-process jax job: process 0 holds the lock and every process
  raises when it was refused (call it from all processes at the same point). A platform without
  ``fcntl`` holds nothing.
  """
  if fcntl is None:
    yield
    return
  import jax

  if not job or jax.process_count() == 1:
    with _hold_here(workdir, then):
      yield
    return
  import numpy as np
  from jax.experimental import multihost_utils

  with contextlib.ExitStack() as held:
    refusal = None
    if jax.process_index() == 0:
      try:
        held.enter_context(_hold_here(workdir, then))
      except RunDirectoryInUse as e:
        refusal = e
    if int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))):
      raise refusal or RunDirectoryInUse(
          f"{os.path.abspath(workdir)} is being written by another process: process 0 of this job was refused (its "
          f"error names the holder); wait for it to finish or stop it, then {then}")
    yield
