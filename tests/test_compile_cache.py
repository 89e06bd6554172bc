"""The persistent compilation cache: a second process loads what the first compiled, with the same results."""

import json
import os
import subprocess
import sys

import pytest

from bpcp_jax.run import compile_cache
from tests.conftest import REPO_ROOT

# compiles a small train-like step, prints whether the cache was hit and the result's bytes
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from bpcp_jax.run.compile_cache import enable_compilation_cache

hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
where = enable_compilation_cache(min_compile_time_s=0.0)

@jax.jit
def step(w, x):
  loss = lambda w: jnp.mean(jnp.tanh(x @ w) ** 2)
  return w - 0.1 * jax.grad(loss)(w)

w = jax.random.normal(jax.random.key(0), (64, 64))
x = jax.random.normal(jax.random.key(1), (32, 64))
out = step(w, x)
print(json.dumps({"dir": where, "hits": len(hits), "out": out.tobytes().hex()}))
"""


def _run(env):
  p = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO_ROOT, env={**os.environ, **env},
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_first_ones_compilation(tmp_path):
  env = {"BPCP_COMPILATION_CACHE": str(tmp_path / "xla")}
  first, second = _run(env), _run(env)
  assert first["dir"] == second["dir"] == str(tmp_path / "xla")
  assert first["hits"] == 0 and os.listdir(tmp_path / "xla")
  assert second["hits"] >= 1
  assert first["out"] == second["out"]  # the loaded executable computes exactly what the compiled one did


def test_off_compiles_every_time(tmp_path):
  env = {"BPCP_COMPILATION_CACHE": "off", "BPCP_CACHE": str(tmp_path)}
  out = _run(env)
  assert out["dir"] is None and out["hits"] == 0
  assert not os.path.exists(tmp_path / "xla")


def test_default_directory_is_per_host(monkeypatch, tmp_path):
  monkeypatch.setenv("BPCP_CACHE", str(tmp_path))
  path = compile_cache.default_cache_dir()
  assert os.path.dirname(path) == str(tmp_path / "xla")
  assert os.path.basename(path) == compile_cache.host_fingerprint()
  assert compile_cache.host_fingerprint() == compile_cache.host_fingerprint()


def test_the_users_jax_cache_is_kept(monkeypatch, tmp_path):
  monkeypatch.delenv("BPCP_COMPILATION_CACHE", raising=False)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
  assert compile_cache.enable_compilation_cache() == str(tmp_path / "mine")


@pytest.mark.parametrize("setting", ["off", "OFF", "none"])
def test_off_settings(monkeypatch, setting):
  monkeypatch.setenv("BPCP_COMPILATION_CACHE", setting)
  assert compile_cache.enable_compilation_cache() is None


def test_unwritable_directory_is_named_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("BPCP_COMPILATION_CACHE", str(blocker / "xla"))
  assert compile_cache.enable_compilation_cache() is None
  err = capsys.readouterr().err
  assert str(blocker / "xla") in err and "BPCP_COMPILATION_CACHE" in err
