"""bpcp_jax.training.files: a file is replaced whole or not at all."""

import json
import os
import stat

import pytest

from bpcp_jax.training import files


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
  path = str(tmp_path / "summary.json")
  files.write_json(path, {"accuracy": 0.8})

  def half_then_fail(tmp):
    with open(tmp, "w") as f:
      f.write('{"accura')
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space left"):
    files.replace_file(path, half_then_fail)
  with open(path) as f:
    assert json.load(f) == {"accuracy": 0.8}
  assert os.listdir(tmp_path) == ["summary.json"]


def test_write_text_and_json_replace_the_whole_file_with_plain_permissions(tmp_path):
  path = tmp_path / "metrics.jsonl"
  files.write_text(str(path), "a much longer first version\n")
  files.write_text(str(path), "short\n")
  assert path.read_text() == "short\n"
  files.write_json(str(path), {"b": 1, "a": [1, 2]}, indent=None)
  assert path.read_text() == '{"a": [1, 2], "b": 1}'
  umask = os.umask(0)
  os.umask(umask)
  plain = tmp_path / "plain"
  plain.write_text("x")
  assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


def test_writers_with_the_same_process_and_thread_id_never_share_a_temporary(tmp_path, monkeypatch):
  """Two hosts (or containers) writing one shared file can have the same pid and thread id: the
  second writer, finishing while the first is half way, must not tear or steal the first's file."""
  import threading

  monkeypatch.setattr(os, "getpid", lambda: 7)
  monkeypatch.setattr(threading, "get_ident", lambda: 1)
  path = str(tmp_path / "cache.json")

  def first(tmp):
    with open(tmp, "w") as f:
      f.write('{"writer": ')
      f.flush()
      files.write_json(path, {"writer": "second"})  # the other host, in the meantime
      f.write('"first"}')

  files.replace_file(path, first)
  with open(path) as f:
    assert json.load(f) == {"writer": "first"}
  assert os.listdir(tmp_path) == ["cache.json"]
