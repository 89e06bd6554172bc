"""One writer per run directory: a second process is refused with the holder named, nothing in the
directory is touched, the lock dies with its process, and a sweep leaves a run in use to its owner."""

import contextlib
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

from bpcp_jax.run import pipeline, sweep
from bpcp_jax.run.config import apply_overrides, load_config_file
from bpcp_jax.run.lock import LOCK_FILE, RunDirectoryInUse, hold_run_directory
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")


def _listing(root):
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(root) for f in files)


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom bpcp_jax.run.lock import hold_run_directory\n"
       f"with hold_run_directory({workdir!r}):\n  print('held', flush=True)\n  time.sleep(600)\n"],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryInUse, match=f"{workdir} is being written by process {holder.pid} on "):
      with hold_run_directory(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
  with hold_run_directory(workdir):  # killed -9: the kernel dropped its lock, nothing to clean
    with pytest.raises(RunDirectoryInUse, match=f"process {os.getpid()} "):
      with hold_run_directory(workdir):
        pass
  with hold_run_directory(workdir):  # released at the end of the with block
    pass


def test_the_command_line_refuses_a_run_being_written(tmp_path):
  workdir = str(tmp_path / "run")
  with hold_run_directory(workdir):
    before = _listing(workdir)
    p = subprocess.run([sys.executable, "-m", "bpcp_jax.run.cli", "train", "--config", TINY, "--workdir", workdir,
                        "--resume", "--no-progress", f"--config.data.cache_dir={tmp_path / 'cache'}"],
                       cwd=REPO_ROOT, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out, out
    assert f"{workdir} is being written by process {os.getpid()}" in out, out
    assert "--resume" in out.split("error:")[-1], out  # says how to continue afterwards
    assert _listing(workdir) == before == [(LOCK_FILE, before[0][1])]


def test_a_directory_made_meanwhile_by_another_process_is_refused(tmp_path, cifar_archive, monkeypatch):
  """The directory did not exist when the run was checked; another writer made and held it while
  this one loaded its data (the lock is taken only once the data loaded, so a refusal leaves no
  directory behind)."""
  workdir = str(tmp_path / "run")
  config = apply_overrides(load_config_file(TINY), [f"data.cache_dir={tmp_path / 'cache'}"])
  load_data = pipeline.load_data
  with contextlib.ExitStack() as other:

    def load_then_lose_the_race(*a, **k):
      out = load_data(*a, **k)
      other.enter_context(hold_run_directory(workdir))
      return out

    monkeypatch.setattr(pipeline, "load_data", load_then_lose_the_race)
    with pytest.raises(RunDirectoryInUse, match=f"{workdir} is being written"):
      pipeline.run_pipeline(config, workdir, data_path=cifar_archive, progress=False, log=lambda s: None)
    assert _listing(workdir)[0][0] == LOCK_FILE and len(_listing(workdir)) == 1


def test_a_sweep_leaves_a_run_in_use_to_its_writer(tmp_path, cifar_archive):
  path = tmp_path / "two.py"
  path.write_text(f"def get_sweep():\n  return {{'base': {TINY!r}, 'grid': {{'stages.search.gamma': [0.05, 0.2]}}}}\n")
  workdir = str(tmp_path / "sweep")
  lines = []
  with contextlib.ExitStack() as other:
    for name in ("gamma=0.05", "gamma=0.2"):
      other.enter_context(hold_run_directory(os.path.join(workdir, "runs", name)))
    rows = sweep.run_sweep(str(path), workdir, [f"data.cache_dir={tmp_path / 'cache'}"], data_path=cifar_archive,
                           progress=False, log=lines.append)
  assert [r["status"] for r in rows] == ["not run", "not run"], lines
  for name in ("gamma=0.05", "gamma=0.2"):
    assert any(line.startswith(f"[sweep") and f"{name}: skipped:" in line and "is being written by process" in line
               for line in lines), lines
    assert _listing(os.path.join(workdir, "runs", name)) == [(LOCK_FILE, _listing(os.path.join(workdir, "runs", name))[0][1])]


def test_a_run_that_finished_meanwhile_is_kept_as_it_is(tmp_path, monkeypatch):
  """--resume of a directory that did not exist yet: another process made it and finished its run
  while this one loaded its data; its summary is returned, no stage runs again."""
  workdir = str(tmp_path / "run")
  config = apply_overrides(load_config_file(TINY), [f"data.cache_dir={tmp_path / 'cache'}"])
  images = types.SimpleNamespace(images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int32),
                                 class_names=["a", "b"])

  def load_then_the_other_finishes(*a, **k):
    out = images, images
    os.makedirs(workdir)
    pipeline._write_json(os.path.join(workdir, "config.json"), config.to_dict())
    pipeline._write_json(os.path.join(workdir, "summary.json"), {"finished": "by the other process"})
    (tmp_path / "run" / "report.md").write_text("the other's report")
    return out

  def no_stages(*a, **k):
    raise AssertionError("the stages of a finished run ran again")

  # no network is built (seconds of compilation): what is checked is the order of lock, check and run
  start = types.SimpleNamespace(output=types.SimpleNamespace(network=types.SimpleNamespace(input_shape=(32, 32, 3))))
  monkeypatch.setattr(pipeline, "start_network", lambda *a: start)
  monkeypatch.setattr(pipeline, "check_stage_inputs", lambda *a: None)
  monkeypatch.setattr(pipeline, "describe_run", lambda *a: [])
  monkeypatch.setattr(pipeline, "load_data", load_then_the_other_finishes)
  monkeypatch.setattr(pipeline, "_run_locked", no_stages)
  summary = pipeline.run_pipeline(config, workdir, resume=True, progress=False,
                                  log=lambda s: None)
  assert summary == {"finished": "by the other process"}


def test_an_unwritable_run_directory_is_named_before_a_lock_file_is_made(tmp_path, monkeypatch):
  """An existing directory that cannot be written gets check_workdir's message, and no .lock is made in it
  (os.access stands in for the permissions: a test run as root may write anywhere)."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.path.abspath(p) == workdir else access(p, mode, **k))
  config = apply_overrides(load_config_file(TINY), [f"data.cache_dir={tmp_path / 'cache'}"])
  with pytest.raises(PermissionError, match="not writable") as e:
    pipeline.run_pipeline(config, workdir, progress=False, log=lambda s: None)
  assert e.value.filename == workdir
  assert os.listdir(workdir) == []


def test_every_process_of_a_job_learns_whether_process_0_got_the_lock(tmp_path, monkeypatch):
  """Multi-process jobs: process 0 tries the lock and broadcasts the outcome, so the other
  processes are refused with it instead of training on alone."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  workdir = str(tmp_path / "run")
  sent = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index, outcome in ((1, 1), (1, 0)):  # another process: process 0 was refused / got it
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x, o=outcome: np.int32(o))
    if outcome:
      with pytest.raises(RunDirectoryInUse, match="process 0 of this job was refused"):
        with hold_run_directory(workdir, job=True):
          pass
    else:
      with hold_run_directory(workdir, job=True):
        with hold_run_directory(workdir):  # process 1 holds nothing itself
          pass
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(int(x)) or x)
  with hold_run_directory(workdir):  # another job's process 0
    with pytest.raises(RunDirectoryInUse, match=f"is being written by process {os.getpid()}"):
      with hold_run_directory(workdir, job=True):
        pass
  with hold_run_directory(workdir, job=True):
    with pytest.raises(RunDirectoryInUse):
      with hold_run_directory(workdir):
        pass
  assert sent == [1, 0]


def test_a_lock_file_of_another_user_is_locked_read_only(tmp_path, monkeypatch):
  """A team's shared run directory: the .lock another user made cannot be opened for writing,
  yet it still locks (before: PermissionError on a directory the user may write)."""
  from bpcp_jax.run import lock

  workdir = str(tmp_path / "run")
  with hold_run_directory(workdir):
    pass
  real_open = os.open

  def not_writable(path, flags, *a):
    if path.endswith(LOCK_FILE) and flags & os.O_RDWR:
      raise PermissionError(13, "Permission denied", path)
    return real_open(path, flags, *a)

  monkeypatch.setattr(lock.os, "open", not_writable)
  with hold_run_directory(workdir):
    with pytest.raises(RunDirectoryInUse, match=f"{workdir} is being written by process {os.getpid()}"):
      with hold_run_directory(workdir):
        pass
