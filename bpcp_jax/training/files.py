"""Files written whole or not at all.

``replace_file`` has a writer fill a temporary file beside the target and renames it over the
target (``os.replace``, atomic on POSIX and Windows within one file system): a reader, a
second process writing the same file, or a kill mid-write never sees half a file, and the
previous version stays until the new one is complete. Metrics, gate logs, summaries, data
caches and sweep results are written this way, so ``--resume`` never trips over a torn file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable


def replace_file(path: str, write: Callable[[str], None]) -> None:
  """``write(tmp)`` fills a temporary path beside ``path``, which then replaces ``path`` whole.

  The temporary name carries the process id and a random part, so concurrent writers never share
  one, not even processes with the same id on two hosts or containers sharing the directory (a
  data cache in a shared home); it is removed when ``write`` (or the rename) raises, and the
  exception propagates with ``path`` untouched. The new file gets the usual permissions (umask),
  as a plain ``open`` would.
  """
  tmp = f"{path}.{os.getpid()}-{os.urandom(6).hex()}.tmp"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """``text`` as the whole of ``path`` (UTF-8), written by ``replace_file``."""

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  replace_file(path, write)


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """``obj`` as JSON (``indent=2, sort_keys=True`` unless given), written by ``replace_file``."""
  write_text(path, json.dumps(obj, **{"indent": 2, "sort_keys": True, **dump_kwargs}))
