"""A Flax NNX network in the pipeline: ``model=file.py:factory`` where the factory returns an ``nnx.Module``.

A small NNX residual network (BatchNorm, two identity blocks, dropout; ``tests/user_models.py``) runs
every stage of ``run_pipeline`` on a few random 32x32 images; its materialized networks equal the
masked ones in eval and train mode; the final checkpoint loads with ``bp.load_network`` to the same
outputs; a run resumed after its last stage was lost ends bit for bit where the uninterrupted one
ended (marked slow); a factory that returns an NNX module but takes no ``rngs`` is refused by name.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import bpcp_jax as bp
from bpcp_jax.run import pipeline
from bpcp_jax.run.config import apply_overrides, load_config_file
from bpcp_jax.tracer.nnx import NnxFlaxNetwork
from bpcp_jax.tracer.provider import ModelSourceError
from bpcp_jax.training import data
from tests.conftest import REPO_ROOT
from tests.test_faults import _assert_same_run, _final

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
USER_MODELS = os.path.join(REPO_ROOT, "tests", "user_models.py")
FACTORY = f"{USER_MODELS}:make_nnx_resnet"


def _perturbed(variables, seed=3):
  """``variables`` with random values (positive vectors: scales, variances), so that every
  statistic and bias matters in a comparison."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(rng.uniform(0.5, 1.5, a.shape) if a.ndim == 1 else
                                           rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1])), np.float32),
                      variables)


def _masks(net):
  masks = net.init_masks()
  masks["blocks"]["blocks/1"] = np.float32(-1.0)  # removed
  masks["channels"]["stem"] = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32)
  masks["channels"]["blocks/0/conv1"] = np.array([0, 1, 1, 0, 1, 1], np.float32)
  return masks


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_nnx_factory_materialized_equals_masked_in_eval_and_train_mode_and_rebuilds_from_its_description():
  net = bp.FlaxNetwork.from_factory(FACTORY, 3, (32, 32, 3), {"dropout": 0.0})
  assert isinstance(net, NnxFlaxNetwork) and net.block_names == ["blocks/0", "blocks/1"]
  variables = _perturbed(net.module.variables())  # the factory's module, zeros: no initializer runs
  masks = _masks(net)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  small, small_vars = net.materialize(variables, masks)
  assert isinstance(small, NnxFlaxNetwork) and small.block_names == ["blocks/0"]
  assert small.group_widths == {"stem": 6, "blocks/0/conv1": 4}
  assert small.counts()["params"] < net.counts()["params"]
  _close(small.apply(small_vars, x, train=False), net.apply(variables, x, train=False, masks=masks))
  out, stats = small.apply(small_vars, x, train=True, rng=jax.random.key(2))
  masked_out, masked_stats = net.apply(variables, x, train=True, masks=masks, rng=jax.random.key(2))
  _close(out, masked_out)
  # the updated statistics: those of the masked network, sliced as the variables are
  _, want = bp.materialize_traced(net.traced, {**variables, "batch_stats": masked_stats}, masks)
  assert jax.tree.structure(stats) == jax.tree.structure(want["batch_stats"])
  _close(stats, want["batch_stats"])
  # the user's own classes, narrowed, with the variables written in
  model = small.deployable().merge(small_vars)
  assert type(model).__name__ == "NnxResNet" and isinstance(model.blocks[1], bp.Skipped)
  assert model.stem.out_features == 6 and model.blocks[0].conv1.out_features == 4
  model.eval()
  _close(model(x), net.apply(variables, x, train=False, masks=masks))
  # what a checkpoint stores rebuilds the same network
  again = bp.network_from_description(small.describe())
  assert isinstance(again, NnxFlaxNetwork) and again.describe() == small.describe()
  _close(again.apply(small_vars, x, train=False), small.apply(small_vars, x, train=False))
  with pytest.raises(ValueError, match="only the network its factory makes can be initialised"):
    small.init(jax.random.PRNGKey(0))


def test_nnx_factory_without_rngs_and_unsupported_variables_are_named():
  with pytest.raises(ModelSourceError, match="make_nnx_resnet_without_rngs returned a flax.nnx Module .* no 'rngs'"):
    bp.FlaxNetwork.from_factory(f"{USER_MODELS}:make_nnx_resnet_without_rngs", 3, (32, 32, 3))

  class Counted(nnx.Variable):
    pass

  net = bp.FlaxNetwork.from_factory(FACTORY, 3, (32, 32, 3))
  model = net.module.merge()
  model.calls = Counted(np.zeros((), np.int32))
  with pytest.raises(ValueError, match=r"variables calls \(Counted\) are not supported"):
    NnxFlaxNetwork(bp.NnxNetwork.of(model), (32, 32, 3), net.source, label="counted").traced


def _split(n, seed):
  rng = np.random.default_rng(seed)
  return data.Split(images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    labels=np.arange(n, dtype=np.int32) % 3, class_names=("a", "b", "c"))


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
  """The whole pipeline (pretrain, block search, fine-tune, channel prune, fine-tune) on the NNX factory."""
  workdir = str(tmp_path_factory.mktemp("nnx") / "run")
  # no pretrain (the search starts from the factory's initialisation): a compilation less
  config = apply_overrides(load_config_file(TINY), [f"model={FACTORY}", "num_classes=3", "batch_size=8",
                                                    "eval_batch_size=8", "profile.batch_sizes=2", "profile.repeats=1",
                                                    "stages.run=search,finetune_blocks,prune,finetune_channels"])
  splits = (_split(24, 0), _split(8, 1))
  mp = pytest.MonkeyPatch()
  mp.setattr(pipeline, "load_data", lambda *a, **k: splits)
  lines = []
  try:
    summary = pipeline.run_pipeline(config, workdir, progress=False, log=lines.append)
    yield config, workdir, summary, lines, mp
  finally:
    mp.undo()


def test_nnx_factory_runs_every_stage_and_its_checkpoint_loads(nnx_run):
  config, workdir, summary, lines, _ = nnx_run
  assert summary["pruned"]["network"]["kind"] == "nnx", summary
  assert summary["pruned"]["params"] < summary["dense"]["params"], summary
  assert sorted(summary["stages"]) == ["finetune_blocks", "finetune_channels", "prune", "search"], summary["stages"]
  final = os.path.join(workdir, "checkpoints", "finetune_channels")
  network, variables, _ = bp.load_stage(final)
  assert isinstance(network, NnxFlaxNetwork) and network.describe() == summary["pruned"]["network"]
  removed = sorted({"blocks/0", "blocks/1"} - set(summary["pruned"]["blocks_kept"]))
  assert network.plan["removed_blocks"] == removed, (network.plan, summary["pruned"])
  assert network.group_widths == summary["pruned"]["channels_per_group"]
  # init: fresh variables of the factory's module from the key (its initializers ran for the run)
  dense = bp.FlaxNetwork.from_factory(FACTORY, 3, (32, 32, 3))
  a, b = dense.init(jax.random.PRNGKey(1)), dense.init(jax.random.PRNGKey(2))
  assert jax.tree.map(np.shape, a) == jax.tree.map(lambda s: s.shape, dict(dense.variable_shapes()))
  assert not np.array_equal(a["params"]["stem"]["kernel"], b["params"]["stem"]["kernel"])
  model, same = bp.load_network(final)
  assert isinstance(model, bp.NnxNetwork)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  logits = bp.make_predictor(model, same)(x)
  _close(logits, network.apply(variables, x, train=False))
  m = model.merge(same)
  m.eval()
  _close(m(x), logits)


@pytest.mark.slow  # 12-14 s more (README: pytest -m slow), as the linen network's resume test
def test_nnx_run_resumed_after_losing_its_last_stage_ends_as_the_uninterrupted_one(nnx_run, tmp_path):
  config, workdir, _, _, _ = nnx_run
  work = str(tmp_path / "resumed")
  shutil.copytree(workdir, work)
  for name in ("summary.json", "report.md"):
    if os.path.exists(os.path.join(work, name)):
      os.remove(os.path.join(work, name))
  shutil.rmtree(os.path.join(work, "checkpoints", "finetune_channels"))  # its metrics lines stay: resume drops them
  pipeline.run_pipeline(config, work, resume=True, progress=False, log=lambda s: None)
  _assert_same_run(_final(workdir), _final(work))
