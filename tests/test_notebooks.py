"""The notebooks execute: quickstart on the tiny config and real CIFAR-10 images, ablation on a
results.csv written by ``bpcp_jax.run.sweep.write_results`` (made-up numbers: a rendering test)."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from bpcp_jax.run import sweep
from tests.conftest import REPO_ROOT

NB_DIR = os.path.join(REPO_ROOT, "notebooks")
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")


def _execute(name, params, timeout=240):
  """Run a notebook from notebooks/ with ``params`` in a cell right after the `parameters` one."""
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]  # as papermill does
  nb.cells.insert(tagged[0] + 1, cell)
  NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": NB_DIR}}).execute()
  return nb


def _outputs(nb, mime):
  return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if mime in o.get("data", {})]


def _text(nb):
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "ablation.ipynb", "prune_your_model.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  nbformat.validate(nb)
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_quickstart_runs_the_pipeline(tmp_path, cifar_archive):
  workdir = str(tmp_path / "run")
  nb = _execute("quickstart.ipynb", {
      "CONFIG": TINY, "WORKDIR": workdir, "DATA_SOURCE": "folder", "DATA_PATH": cifar_archive, "INSTALL": False,
      "OVERRIDES": [f"data.cache_dir={tmp_path / 'cache'}"]})
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["model"] == "resnet_v1_8" and summary["data"]["test_images"] == 100
  assert any("| dense, pretrained |" in md and "pruned, after finetune_channels |" in md
             for md in _outputs(nb, "text/markdown"))
  assert len(_outputs(nb, "image/png")) == 3  # accuracy, gates, channels
  text = _text(nb)
  assert "network: resnet_v1_8" in text and "data loaded: 160 train" in text  # it says what it runs
  assert "WARNING:absl" not in text and "did not provide metrics" not in text, text  # nothing at every save


def test_quickstart_settings_without_a_checkout_are_the_smoke_config():
  """Installed without a checkout (Colab), the notebook runs the smoke settings it carries."""
  from bpcp_jax.run.config import apply_overrides, default_config, load_config_file

  nb = nbformat.read(os.path.join(NB_DIR, "quickstart.ipynb"), as_version=4)
  source = next(c.source for c in nb.cells if "SMOKE = {" in c.source)
  namespace = {}
  exec(source[source.index("SMOKE = {"):source.index("}", source.index("SMOKE = {")) + 1], namespace)
  inline = apply_overrides(default_config(), [f"{k}={v}" for k, v in namespace["SMOKE"].items()])
  assert inline.to_dict() == load_config_file(os.path.join(REPO_ROOT, "experiments", "configs", "smoke.py")).to_dict()


def _row(name, gamma, status, acc=None, macs=None, speedup=None, blocks=None):
  done = status == "done"
  return {"name": name, "stages.search.gamma": gamma, "stages.prune.ratio": 0.4, "status": status,
          "pruned_accuracy": acc, "dense_accuracy": 0.935 if done else None,
          "accuracy_drop_pct_points": 100 * (0.935 - acc) if done else None,
          "pruned_params": 200000 if done else None, "dense_params": 590426 if done else None,
          "pruned_macs": macs, "dense_macs": 87214592 if done else None,
          "params_removed_pct": 66.1 if done else None, "macs_removed_pct": 100 * (1 - macs / 87214592) if done else None,
          "pruned_blocks": blocks, "dense_blocks": 18 if done else None,
          "pruned_latency_ms_b1": 3.0 if done else None, "dense_latency_ms_b1": 3.0 * speedup if done else None,
          "speedup_b1": speedup, "message": "" if done else "ValueError: made up", "workdir": f"runs/{name}"}


def test_ablation_draws_the_sweep_plots(tmp_path):
  rows = [_row("gamma=0.02,ratio=0.4", 0.02, "done", 0.921, 30e6, 1.6, 15),
          _row("gamma=0.05,ratio=0.4", 0.05, "done", 0.915, 20e6, 2.9, 10),
          _row("gamma=0.1,ratio=0.4", 0.1, "failed")]
  sweep.write_results(str(tmp_path), rows)
  assert sweep.read_results(str(tmp_path)) == rows
  nb = _execute("ablation.ipynb", {"SWEEP_DIR": str(tmp_path)})
  assert len(_outputs(nb, "image/png")) == 3  # Pareto, speed-up, blocks vs gamma
  text = _text(nb)
  assert "3 runs in" in text and "gamma=0.05,ratio=0.4: 91.50% at 20.00M MACs" in text, text
  assert any("1 failed" in md for md in _outputs(nb, "text/markdown"))


def test_prune_your_model_runs_on_a_user_network(tmp_path, cifar_archive):
  workdir = str(tmp_path / "mine")
  nb = _execute("prune_your_model.ipynb", {
      "CONFIG": TINY, "WORKDIR": workdir, "DATA_SOURCE": "folder", "DATA_PATH": cifar_archive, "INSTALL": False,
      "TRAIN_STEPS": 3, "TRAIN_IMAGES_PER_CLASS": 8, "OVERRIDES": [f"data.cache_dir={tmp_path / 'cache'}"]},
      timeout=400)
  with open(os.path.join(workdir, "run", "summary.json")) as f:
    summary = json.load(f)
  assert summary["model"].endswith("my_model.py:make_model") and summary["data"]["test_images"] == 100
  assert summary["pruned"]["network"]["kind"] == "flax" and summary["pruned"]["params"] < summary["dense"]["params"]
  assert summary["dense"]["label"] == "dense, your weights"
  assert any("| dense, your weights |" in md and "pruned, after finetune_channels |" in md
             for md in _outputs(nb, "text/markdown"))
  text = _text(nb)
  assert "residual blocks" in text and "predictions:" in text, text
