"""Networks as public code writes them, through the pipeline (tests/public_models/).

- A residual network without BatchNorm (no ``batch_stats`` at all; LayerNorm), linen and NNX: the
  block search's train step (``block_gates``, an empty ``batch_stats`` passed) runs.
- flax's ``examples/imagenet`` ResNet, whose BatchNorm takes ``axis_name="batch"``: the axis is
  found while tracing and the steps are mapped over it; on 4 devices its statistics are the whole
  batch's (equal to one device computing the whole batch), under any axis name.
- A ConvNeXt whose drop path draws from its own ``"drop_path"`` stream: every stream gets its own
  key from the step's key, the same in the plain and the masked (traced) call; two steps draw
  different masks.
- Outputs that hold the logits (an output object's ``.logits``, a tuple's item, a dict's key):
  read as ``model_output`` says, in the trace, the steps and the pruned network; what cannot be
  read is one error before training.
- A model file that imports the module beside it; gate logits of any size in the report; an
  unforeseen error after a stage is one line with the resume command, not a traceback.
- End to end: the ConvNeXt (its blocks imported from a sibling file, an output object, LayerNorm
  only, drop path and dropout) through block search, fine-tune, channel prune and fine-tune, then
  loaded in another process from another working directory (``bp.load_network``'s predictor and
  ``bpcp-jax eval``) to the accuracy ``summary.json`` reports, and resumed after losing its last
  stage to the same end; the imagenet ResNet through search and fine-tune on 4 devices, its
  BatchNorm statistics moved.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpcp_jax as bp
from bpcp_jax.run import pipeline
from bpcp_jax.run.config import apply_overrides, load_config_file
from bpcp_jax.run.report import block_decisions, block_decisions_markdown
from bpcp_jax.tracer.provider import FlaxNetwork, output_logits, resolve_factory, stream_keys
from bpcp_jax.training import data, parallel, steps
from bpcp_jax.training.checkpoint import StageCheckpoints
from bpcp_jax.training.optim import make_optimizer
from tests.conftest import REPO_ROOT
from tests.test_faults import _assert_same_run, _final

TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
PUBLIC = os.path.join(REPO_ROOT, "tests", "public_models")
CONVNEXT = os.path.join(PUBLIC, "convnext.py") + ":make_model"
RESNET = os.path.join(PUBLIC, "imagenet_resnet.py") + ":make_model"
NNX_NO_BN = os.path.join(PUBLIC, "nnx_no_bn.py") + ":make_model"
SHAPE = (32, 32, 3)


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _variables(net, seed=0):
  """Random variables of ``net``'s shapes (``net.init`` compiles every initializer, seconds each here)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: np.asarray(rng.uniform(0.5, 1.5, s.shape) if len(s.shape) <= 1 else
                                           rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype),
                      dict(net.variable_shapes()))


def _batch(n=8, seed=0, classes=10):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), "label": np.arange(n, dtype=np.int32) % classes}


# -- residual networks without BatchNorm ---------------------------------------------------------------------------

def test_block_search_step_on_a_residual_nnx_network_without_batch_stats():
  """The train step passes ``batch_stats: {}``; a network without statistics returns none (it crashed in
  ``out[1].get``: 'LinearizeTracer' object has no attribute 'get'). The linen ConvNeXt's search runs below."""
  net = FlaxNetwork.from_factory(NNX_NO_BN, 10, SHAPE)
  assert net.block_names and not net.has_batch_stats and "batch_stats" not in net.variable_shapes()
  variables = _variables(net)
  tx = make_optimizer(0.1, gate_learning_rate=10.0)
  state = steps.create_train_state(variables, tx, jax.random.PRNGKey(1), gates=net.init_masks()["blocks"])
  step = jax.jit(functools.partial(steps.train_step, network=net, tx=tx, mode="search", gamma=0.5))
  new, metrics = step(state, _batch())
  assert np.isfinite(float(metrics["loss"])) and new.batch_stats == {}
  assert any(float(v) != 0.0 for v in new.gates.values()), new.gates  # the gates learn
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0


# -- BatchNorm axis_name -------------------------------------------------------------------------------------------

def test_batchnorm_axis_name_is_bound_to_the_axis_the_steps_run_under():
  """flax's imagenet ResNet under another axis name than the pipeline's ("devices"): traced with the axis
  bound, its steps mapped over it; on 4 devices the train mode equals one device
  computing the whole batch without an axis (BatchNorm statistics of the whole batch)."""
  assert jax.local_device_count() == 4
  net = FlaxNetwork.from_factory(RESNET, 10, SHAPE, kwargs={"axis_name": "devices"})
  assert net.axis_names == ("devices",) and parallel.step_axis(net) == "devices"
  assert FlaxNetwork.from_factory(RESNET, 10, SHAPE).axis_names == ("batch",)  # as the example writes it
  ref = FlaxNetwork.from_factory(RESNET, 10, SHAPE, kwargs={"axis_name": None})
  assert ref.axis_names == () and parallel.step_axis(ref) == parallel.AXIS
  variables = _variables(net)
  x = jnp.asarray(data.normalize(_batch()["image"]))
  mapped = jax.pmap(lambda v, x: net.apply(v, x, train=True, axis_name="devices"), axis_name="devices",
                    in_axes=(None, 0))(variables, x.reshape(4, 2, *SHAPE))
  whole = jax.jit(lambda v, x: ref.apply(v, x, train=True))(variables, x)  # (the traced program: below, end to end)
  _close(mapped[0].reshape(8, 10), whole[0], 1e-4)
  _close(jax.tree.map(lambda s: s[0], mapped[1]), whole[1], 1e-5)
  # the pipeline's step wrappers: sharded over the network's axis, compiled once for two steps
  tx = make_optimizer(0.1)
  p_step = parallel.parallel_train_step(net, tx)
  state = parallel.replicate(steps.create_train_state(variables, tx, jax.random.PRNGKey(1)), "devices")
  for seed in range(2):
    state, metrics = p_step(state, parallel.shard_batch(_batch(seed=seed), axis="devices"))
  assert np.isfinite(np.asarray(metrics["loss"])).all()


def test_collectives_over_several_axes_are_refused_in_one_line():
  class Two:
    axis_names, label = ("batch", "model"), "two-axis net"

  with pytest.raises(ValueError, match=r"two-axis net: its collectives use the named axes 'batch', 'model'"):
    parallel.step_axis(Two())


# -- random streams ------------------------------------------------------------------------------------------------

def test_every_random_stream_gets_its_own_key_from_the_step_key():
  """The ConvNeXt draws drop path from "drop_path" (flax's InvalidRngError before) and dropout from "dropout"."""
  net = FlaxNetwork.from_factory(CONVNEXT, 10, SHAPE)
  assert net.rng_streams == ("dropout", "drop_path")
  assert "drop_path" in net.traced.traced("train", (net.example(),))[0].rng_names
  keys = stream_keys(jax.random.PRNGKey(5), net.rng_streams)
  assert not np.array_equal(keys["dropout"], keys["drop_path"])
  variables = _variables(net)
  x = jnp.asarray(data.normalize(_batch()["image"]))
  plain = jax.jit(lambda v, x, k: net.apply(v, x, train=True, rng=k)[0])
  masked = jax.jit(lambda v, x, k: net.apply(v, x, train=True, rng=k, masks=net.init_masks())[0])
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  _close(plain(variables, x, k1), masked(variables, x, k1))  # the same key per stream in both
  assert float(jnp.max(jnp.abs(plain(variables, x, k1) - plain(variables, x, k2)))) > 1e-3  # two steps, two masks


# -- outputs that hold the logits ----------------------------------------------------------------------------------

@flax.struct.dataclass
class _Output:
  logits: jax.Array
  pooled: jax.Array


def test_logits_are_read_from_arrays_output_objects_tuples_and_dicts():
  a, b = jnp.ones((2, 3)), jnp.zeros((2, 4))
  assert output_logits(a) is a
  assert output_logits(_Output(a, b)) is a
  assert output_logits({"logits": a, "x": b}) is a
  assert output_logits((b, a), "1") is a
  assert output_logits({"out": _Output(a, b)}, "out.logits") is a
  assert output_logits([a, b], "-2") is a
  with pytest.raises(ValueError, match=r"net returns a tuple of 2 items, not an array of logits: set model_output"):
    output_logits((a, b), "auto", "net")
  with pytest.raises(ValueError, match=r"a dict with keys \['scores'\], not an array.*model_output"):
    output_logits({"scores": a})
  with pytest.raises(ValueError, match=r"model_output='logit', but a _Output \(fields logits, pooled\) has no field"):
    output_logits(_Output(a, b), "logit")
  with pytest.raises(ValueError, match=r"model_output='2', but a tuple of 2 items has no field, key or item '2'"):
    output_logits((a, b), "2")


class _TupleNet(nn.Module):
  """Returns ``(logits, features)``, as many classifiers do; a residual block and BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3), strides=4)(x)))
    h = h + nn.Conv(8, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(h)))
    feats = h.mean((1, 2))
    return nn.Dense(10)(feats), feats


def test_a_tuple_output_is_refused_before_training_and_read_when_model_output_says_where():
  with pytest.raises(ValueError, match=r"tuple net returns a tuple of 2 items, not an array of logits.*model_output"):
    _ = FlaxNetwork(_TupleNet(), SHAPE, label="tuple net").traced
  net = FlaxNetwork(_TupleNet(), SHAPE, label="tuple net", output="0")
  assert net.block_names and net.counts()["macs"] > 0
  variables = _variables(net)
  x = jnp.asarray(data.normalize(_batch()["image"]))
  masks = net.init_masks()
  masks["blocks"] = {b: np.float32(-1.0) for b in net.block_names}
  small, small_vars = net.materialize(variables, masks)
  assert small.output == "0"
  for train in (False, True):
    want = net.apply(variables, x, train=train, masks=masks)
    got = small.apply(small_vars, x, train=train)
    _close(got, want)
    assert (got[0] if train else got).shape == (8, 10)
  tx = make_optimizer(0.1)
  state = steps.create_train_state(small_vars, tx, jax.random.PRNGKey(1))
  new, metrics = jax.jit(functools.partial(steps.train_step, network=small, tx=tx))(state, _batch())
  assert np.isfinite(float(metrics["loss"]))
  assert not np.allclose(new.batch_stats[next(iter(new.batch_stats))]["mean"], 0.0)  # statistics moved


# -- model files, the report, the command line ---------------------------------------------------------------------

def test_a_model_file_imports_the_modules_beside_it(tmp_path):
  folder = tmp_path / "project"
  folder.mkdir()
  (folder / "sibling_of_model_26.py").write_text("WIDTH = 6\n")
  (folder / "model.py").write_text(textwrap.dedent("""
      import flax.linen as nn
      from sibling_of_model_26 import WIDTH

      def make_model(num_classes=10):
        from lazy_sibling_26 import name  # imported when the factory runs
        return nn.Dense(num_classes * WIDTH, name=name)
      """))
  (folder / "lazy_sibling_26.py").write_text("name = 'head'\n")
  before = list(sys.path)
  fn = resolve_factory(f"{folder / 'model.py'}:make_model")
  assert sys.path == before  # the folder was on the import path only while the file was imported
  net = FlaxNetwork.from_factory(f"{folder / 'model.py'}:make_model", 2, (4,))
  assert net.module.features == 12 and net.module.name == "head" and fn.__name__ == "make_model"
  assert sys.path == before


def test_gate_logits_of_any_size_are_reported():
  """An NNX search drove logits to +-1e4: math.exp overflowed in block_decisions and the run was lost."""
  gates = {"a": np.float32(1e4), "b": np.float32(-1e4), "c": -1e300, "d": float("inf"), "e": float("-inf"),
           "f": np.float32(-1e-30), "g": float("nan")}
  d = block_decisions(gates)
  probs = {n: b["keep_prob"] for n, b in d["blocks"].items()}
  assert probs["a"] == probs["d"] == 1.0 and probs["b"] == probs["c"] == probs["e"] == 0.0 and np.isnan(probs["g"])
  assert [n for n, b in d["blocks"].items() if b["kept"]] == ["a", "d"]  # as materialize decides: logit >= 0
  assert d["unsettled"] == ["f", "g"] and d["removed"] == 5
  assert "| b | 0.0000 | 0.5000 | remove | yes |" in block_decisions_markdown(d)
  json.dumps(d)


def test_an_unforeseen_error_after_a_stage_is_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
  from bpcp_jax.run import cli

  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "search" / "6").mkdir(parents=True)

  def boom(*args, **kwargs):
    raise OverflowError("math range error")

  monkeypatch.setattr(pipeline, "run_pipeline", boom)
  code = cli.main(["pipeline", "--config", TINY, "--workdir", str(workdir), "--no-progress"])
  err = capsys.readouterr().err
  assert code == 1 and "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert lines[0] == "bpcp-jax: error: OverflowError: math range error", err
  assert f"last checkpoint: {workdir / 'checkpoints' / 'search' / '6'}" in lines
  assert any(line.startswith("resume with: bpcp-jax pipeline") and line.endswith("--resume") for line in lines), err


# -- end to end ----------------------------------------------------------------------------------------------------

def _split(n, seed, classes=3):
  rng = np.random.default_rng(seed)
  return data.Split(images=rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8),
                    labels=np.arange(n, dtype=np.int32) % classes, class_names=tuple("abc"[:classes]))


SHORT = ["num_classes=3", "batch_size=8", "eval_batch_size=8", "profile.batch_sizes=2", "profile.repeats=1",
         "stages.search.gamma=1.0"]


def _run(tmp_path_factory, name, overrides):
  workdir = str(tmp_path_factory.mktemp(name) / "run")
  config = apply_overrides(load_config_file(TINY), SHORT + overrides)
  splits = (_split(24, 0), _split(8, 1))
  mp = pytest.MonkeyPatch()
  mp.setattr(pipeline, "load_data", lambda *a, **k: splits)
  lines = []
  try:
    summary = pipeline.run_pipeline(config, workdir, progress=False, log=lines.append)
  except BaseException:
    mp.undo()
    raise
  return config, workdir, summary, lines, splits, mp


@pytest.fixture(scope="module")
def convnext_run(tmp_path_factory):
  """The ConvNeXt through block search, channel prune and fine-tune (no pretrain, no fine-tune between the
  search and the pruning: compilations less)."""
  run = _run(tmp_path_factory, "convnext", [f"model={CONVNEXT}", "stages.run=search,prune,finetune_channels"])
  try:
    yield run
  finally:
    run[-1].undo()


def test_public_convnext_through_every_stage_loads_elsewhere_to_its_reported_accuracy(convnext_run, tmp_path):
  config, workdir, summary, lines, (_, test), _ = convnext_run
  assert sorted(summary["stages"]) == ["finetune_channels", "prune", "search"], summary["stages"]
  assert len(summary["pruned"]["blocks_kept"]) < len(summary["dense"]["blocks_kept"]), summary["block_search"]
  assert summary["pruned"]["params"] < summary["dense"]["params"]
  # the search trained: weights and gates moved from one of its checkpoints to the next
  ck = StageCheckpoints(os.path.join(workdir, "checkpoints", "search"), read_only=True)
  (early, _), (late, _) = (ck.restore_raw(step) for step in (min(ck.all_steps()), max(ck.all_steps())))
  ck.close()
  assert late["batch_stats"] in ({}, None) and max(abs(float(v)) for v in late["gates"].values()) > 0.1
  assert max(abs(float(a) - float(b)) for a, b in zip(late["gates"].values(), early["gates"].values())) > 0.01
  assert not np.allclose(late["params"]["stage0_block0"]["pwconv1"]["kernel"],
                         early["params"]["stage0_block0"]["pwconv1"]["kernel"])
  # another process, in another working directory (tests/ not on its path): the final checkpoint loads with
  # its factory's sibling import, bp.load_network's predictor returns the output object, `bpcp-jax eval` scores it
  final = os.path.join(workdir, "checkpoints", "finetune_channels")
  np.savez(tmp_path / "test.npz", images=test.images, labels=test.labels)
  program = f"""
import json, sys, numpy as np, bpcp_jax as bp
from bpcp_jax.run import cli, pipeline
from bpcp_jax.training import data
saved = np.load("test.npz")
test = data.Split(images=saved["images"], labels=saved["labels"], class_names=("a", "b", "c"))
model, variables = bp.load_network({final!r})
out = bp.make_predictor(model, variables)(data.normalize(test.images))
print(json.dumps({{"type": type(out).__name__, "accuracy": float(np.mean(np.argmax(out.logits, -1) == test.labels))}}))
pipeline.load_data = lambda *a, **k: (test, test)
sys.exit(cli.main(["eval", "--from", {final!r}, "--no-progress", "--config.num_classes=3",
                   "--config.eval_batch_size=8"]))
"""
  res = subprocess.run([sys.executable, "-c", program], cwd=str(tmp_path), capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": ""}, timeout=300)
  assert res.returncode == 0, res.stdout + res.stderr
  printed = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
  assert printed[0] == {"type": "ImageClassifierOutput", "accuracy": summary["pruned"]["accuracy"]}, printed
  assert printed[1]["accuracy"] == summary["pruned"]["accuracy"] and printed[1]["stage"] == "finetune_channels"


@pytest.mark.slow  # 10-16 s more (README: pytest -m slow), as the other networks' resume tests
def test_public_convnext_resumed_after_losing_its_last_stage_ends_as_the_uninterrupted_one(convnext_run, tmp_path):
  config, workdir, _, _, _, _ = convnext_run
  work = str(tmp_path / "resumed")
  shutil.copytree(workdir, work)
  for name in ("summary.json", "report.md"):
    os.remove(os.path.join(work, name))
  shutil.rmtree(os.path.join(work, "checkpoints", "finetune_channels"))
  pipeline.run_pipeline(config, work, resume=True, progress=False, log=lambda s: None)
  _assert_same_run(_final(workdir), _final(work))


def test_flax_imagenet_resnet_runs_with_its_batchnorm_axis_on_four_devices(tmp_path_factory):
  """BatchNorm(axis_name="batch") as flax's example writes it: the block search on 4 devices, its decisions
  materialized and the result evaluated (it stopped with "Found an unbound axis name: batch"); its running
  statistics moved."""
  config, workdir, summary, lines, _, mp = _run(tmp_path_factory, "resnet", [f"model={RESNET}", "stages.run=search"])
  mp.undo()
  assert any("statistics span the devices (axis 'batch')" in line for line in lines), lines
  assert list(summary["stages"]) == ["search"] and summary["pruned"]["accuracy"] is not None
  ck = StageCheckpoints(os.path.join(workdir, "checkpoints", "search"), read_only=True)
  tree, _ = ck.restore_raw()
  ck.close()
  means = [np.asarray(v["mean"]) for v in tree["batch_stats"].values() if "mean" in v]
  assert means and all(np.abs(m).max() > 1e-3 for m in means), "BatchNorm running means did not move"


def test_a_mistyped_factory_name_gets_the_closest_one():
  from bpcp_jax.tracer.provider import ModelSourceError, resolve_factory

  zoo = os.path.join(REPO_ROOT, "tests", "zoo.py")
  with pytest.raises(ModelSourceError, match=r"no function 'make_vitt' .*; did you mean 'make_vit'\?"):
    resolve_factory(f"{zoo}:make_vitt")
  with pytest.raises(ModelSourceError, match=r"no function 'zzz' .*; it defines make_bit, "):
    resolve_factory(f"{zoo}:zzz")


def test_materializing_says_in_one_line_that_the_network_is_rebuilt_as_your_class(capsys):
  """The run says which the pruned network is (README): its own class narrowed, or the traced program."""
  net = bp.FlaxNetwork.from_factory(f"{os.path.join(REPO_ROOT, 'tests', 'zoo.py')}:make_mixer", 10, (32, 32, 3))
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.1, s.dtype), net.variable_shapes())
  masks = net.init_masks()
  masks["blocks"]["block1_2"] = np.float32(-1.0)
  net.materialize(variables, masks)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[materialize]")]
  assert len(lines) == 1 and "rebuilt as your own LinenMixer, narrowed" in lines[0], lines
