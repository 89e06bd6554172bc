"""experiments/bp_protocol.py: its verdict on a block search (which decisions were still changing at
its end), the order of its rows, the ablation's sets and table, and the wall time it records."""

import importlib.util
import json
import os

import pytest

from tests.conftest import REPO_ROOT


def _protocol():
  spec = importlib.util.spec_from_file_location("bp_protocol", os.path.join(REPO_ROOT, "experiments", "bp_protocol.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_unsettled_blocks_counts_decision_changes_in_the_last_quarter():
  probs = {"a": [0.9] * 8, "b": [0.6, 0.4, 0.6, 0.4, 0.3, 0.3, 0.3, 0.3],  # settled after step 4
           "c": [0.4] * 6 + [0.6, 0.4]}  # flips twice in the last quarter
  hist = [{"step": 20 * (i + 1), "gate_probs": {k: v[i] for k, v in probs.items()}} for i in range(8)]
  unsettled = _protocol().unsettled_blocks
  assert unsettled(hist) == {"c": 2}
  assert unsettled(hist, tail=1.0) == {"b": 3, "c": 2}
  assert unsettled([]) == {}


def test_each_search_is_followed_by_its_controls(tmp_path, monkeypatch):
  """Rows run in an order that leaves complete comparisons behind when a session ends early: every
  BP row, then its random_after row, then (once per number of removed blocks) the heuristic and
  the 3 random seeds; CP and BPCP last."""
  protocol = _protocol()
  blocks = [f"stage{s}_block{b}" for s in range(3) for b in range(6)]
  removed = {"bp_gamma0.1": 4, "bp_gamma0.2": 8, "bp_gamma0.3": 8, "bp_gamma0.4": 0}
  ran = []

  def fake_row(workdir, log, name, args, data=None, meta=None):
    ran.append(name)
    n = removed.get(name, 0)
    return {"dense": {"blocks_kept": blocks, "macs": 100.0}, "pruned": {"blocks_kept": blocks[n:], "macs": 100.0 - n}}

  monkeypatch.setattr(protocol, "run_row", fake_row)
  monkeypatch.setattr(protocol, "measure", lambda workdir: ran.append("measure"))
  monkeypatch.setattr(protocol, "report", lambda workdir, out: ran.append("report"))
  protocol.run(str(tmp_path), [0.1, 0.2, 0.3, 0.4])
  controls = lambda n: [f"heuristic_last_{n}"] + [f"random_blocks_{n}_seed{s}" for s in range(3)]
  assert ran == (["dense", "bp_gamma0.1", "random_after_bp_gamma0.1", *controls(4),
                  "bp_gamma0.2", "random_after_bp_gamma0.2", *controls(8),
                  "bp_gamma0.3", "random_after_bp_gamma0.3", "bp_gamma0.4",
                  "cp", "bpcp", "measure", "report"])


def test_greedy_set_takes_the_cheapest_blocks_but_never_a_whole_stage():
  blocks = ["s0_b0", "s0_b1", "s1_b0", "s1_b1", "s1_b2"]
  stages = {"s0_b0": 0, "s0_b1": 0, "s1_b0": 1, "s1_b1": 1, "s1_b2": 1}
  drop = {"s0_b0": 0.01, "s0_b1": 0.02, "s1_b0": 0.5, "s1_b1": 0.03, "s1_b2": 0.04}
  greedy = _protocol()._greedy_set
  assert greedy(blocks, stages, drop, 2) == ["s0_b0", "s0_b1"][:1] + ["s1_b1"]
  assert greedy(blocks, stages, drop, 3) == ["s0_b0", "s1_b1", "s1_b2"]


def test_report_shows_the_ablation(tmp_path):
  """results.md gets the no-fine-tune table of ablate (BP against the controls, random sets below
  BP counted) and ablation.png is drawn."""
  protocol = _protocol()
  work, out = tmp_path / "work", tmp_path / "out"
  (work / "runs").mkdir(parents=True)
  (work / "ablation").mkdir()
  accs = {"none": 0.8, "bp": 0.7, "last": 0.6, "greedy_single_drop": 0.72, **{f"random_seed{i}": 0.5 + 0.05 * i
                                                                                for i in range(4)}}
  abl = {"test_images": 5000, "bn_images": 5120, "bn": "augmented", "accuracy": {}, "single_drop": {"a": 0.01, "b": 0.2},
         "searches": {"bp_gamma0.2": {"blocks_removed": 8, "sets": {}, "search": accs, "dense": accs,
                                      "dense_not_recalibrated": {k: v / 4 for k, v in accs.items()}},
                      "bp_gamma0.3": {"blocks_removed": 9, "sets": {}, "search": accs, "dense": accs}}}  # cached before
  (work / "ablation" / "ablation.json").write_text(json.dumps(abl))
  protocol.report(str(work), str(out))
  md = (out / "results.md").read_text()
  assert "| bp_gamma0.2 | 8 | its search | 80.00 | 70.00 | 60.00 | 72.00 | 57.50 (50.00-65.00, 4) | 4 of 4 |" in md
  assert "| bp_gamma0.2 | 8 | dense, BN not recalibrated | 20.00 | 17.50 | 15.00 | 18.00 | 14.37 (12.50-16.25, 4) |" in md
  assert "| bp_gamma0.3 | 9 | dense | 80.00 |" in md and "| bp_gamma0.3 | 9 | dense, BN not" not in md
  assert "a 1.00, b 20.00" in md
  assert (out / "ablation.png").stat().st_size > 0 and (out / "ablation.json").exists()


def test_measure_replaces_latency_json_whole(tmp_path, monkeypatch):
  """report reads latency.json without the lock, and a failed measure must not leave it torn."""
  import numpy as np

  import benchmarks.common
  import bpcp_jax.training.checkpoint

  protocol = _protocol()
  (tmp_path / "runs" / "dense").mkdir(parents=True)
  (tmp_path / "runs" / "dense" / "summary.json").write_text("{}")
  before = {"repeats": 5, "networks": {"dense": {"latency_ms_b1": 1.0}}}
  (tmp_path / "latency.json").write_text(json.dumps(before))
  monkeypatch.setattr(bpcp_jax.training.checkpoint, "load_network", lambda path: (None, None))
  # a throughput array JSON cannot hold: the dump fails after part of the file would be written
  monkeypatch.setattr(benchmarks.common, "interleaved_inference",
                      lambda nets, *a, **k: ({"dense": [1e-3]}, {"dense": np.array([1.0, 2.0])}))
  with pytest.raises(TypeError):
    protocol.measure(str(tmp_path))
  assert json.loads((tmp_path / "latency.json").read_text()) == before
  assert sorted(os.listdir(tmp_path)) == ["latency.json", "runs"]


def test_measure_speedups_are_per_round_ratios(tmp_path, monkeypatch):
  """A speed-up compares each network with the dense one timed in the same round: load that
  drifts between rounds cancels (the ratio of the two medians would read 4x and 2.5x here)."""
  import benchmarks.common
  import bpcp_jax.training.checkpoint

  protocol = _protocol()
  for name in ("dense", "small"):
    (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / name / "summary.json").write_text("{}")
  monkeypatch.setattr(bpcp_jax.training.checkpoint, "load_network", lambda path: (None, None))
  lat = {"dense": [1e-3, 3e-3, 2e-3], "small": [0.5e-3, 3e-3, 0.5e-3]}
  thr = {"dense": [100.0, 50.0, 80.0], "small": [200.0, 50.0, 400.0]}
  monkeypatch.setattr(benchmarks.common, "interleaved_inference", lambda nets, *a, **k: (lat, thr))
  out = protocol.measure(str(tmp_path), repeats=3)
  assert out["small"]["speedup_b1"] == pytest.approx(2.0) and out["small"]["speedup_b128"] == pytest.approx(2.0)
  assert out["dense"]["speedup_b1"] == pytest.approx(1.0)
  saved = json.loads((tmp_path / "latency.json").read_text())
  assert saved["networks"]["small"]["speedup_b128"] == pytest.approx(2.0) and saved["repeats"] == 3
  assert saved["machine"]["cpu_count"] == os.cpu_count() and saved["wall_s"] >= 0


class _Stages:
  def __init__(self, stages):
    self.stages = stages

  def block_stages(self):
    return self.stages


def test_ablation_controls_follow_select_blocks_and_never_empty_a_stage():
  """BP may empty a stage; the controls then remove as many blocks as they can (as run's rows do)
  instead of select_blocks refusing, which ended ablate before the later searches."""
  from bpcp_jax.pruning.block_search import select_blocks

  protocol = _protocol()
  network = _Stages([("a0", "a1"), ("b0", "b1", "b2")])
  drop = {"a0": 0.3, "a1": 0.1, "b0": 0.2, "b1": 0.05, "b2": 0.4}
  for bp, n in ((["a0", "a1", "b0", "b1"], 3), (["a0", "b2"], 2)):
    sets = protocol._removal_sets(network, {}, bp, drop, 4)
    assert sets["bp"] == bp and sorted(sets) == ["bp", "greedy_single_drop", "last"] + [f"random_seed{s}" for s in range(4)]
    for label, removed in sets.items():
      if label != "bp":
        assert len(set(removed)) == n and {"a0", "a1"} - set(removed) and {"b0", "b1", "b2"} - set(removed), label
    for s in range(4):
      assert sets[f"random_seed{s}"] == [b for b, v in select_blocks(network, {}, "random", n, seed=s).items() if v < 0]
  assert sorted(protocol._removal_sets(network, {}, ["a0", "b2"], drop, 0)["greedy_single_drop"]) == ["a1", "b1"]


def test_ablation_table_without_random_sets_or_with_capped_controls():
  accs = {"none": 0.8, "bp": 0.7, "last": 0.6, "greedy_single_drop": 0.72}
  abl = {"test_images": 50, "bn_images": 128, "single_drop": {},
         "searches": {"bp_gamma1": {"blocks_removed": 4, "controls_removed": 3, "search": accs, "dense": accs}}}
  table = _protocol().ablation_table(abl)
  assert "| bp_gamma1 | 4 (controls 3) | its search | 80.00 | 70.00 | 60.00 | 72.00 | - | - |" in table


def test_a_rows_wall_time_is_saved_while_it_runs(tmp_path, monkeypatch):
  """protocol.json gets the running row's time every SAVE_EVERY_S, so killing the protocol (kill -9,
  a session's end) loses at most that much; a failed row raises with its time recorded."""
  import subprocess
  import sys

  protocol = _protocol()
  monkeypatch.setattr(protocol, "SAVE_EVERY_S", 0.2)
  real_popen = subprocess.Popen
  seen = []

  def fake_popen(cmd, **kwargs):  # the row's command replaced by a 1.5 s sleep that exits with `code`
    if cmd[0] != "bpcp-jax":  # (subprocess is one module: other callers go through)
      return real_popen(cmd, **kwargs)
    seen.append(cmd)
    return real_popen([sys.executable, "-c", f"import time, sys; time.sleep(1.5); sys.exit({code})"])

  monkeypatch.setattr(protocol.subprocess, "Popen", fake_popen)
  log = {"rows": {}}
  code = 0
  saved = []
  real_save = protocol._save_log
  monkeypatch.setattr(protocol, "_save_log", lambda w, l: (saved.append(l["rows"]["r"]["seconds"]), real_save(w, l)))
  assert protocol.run_row(str(tmp_path), log, "r", ["pipeline", "--from", "x"]) is None  # no summary.json: None
  assert seen[0][:2] == ["bpcp-jax", "pipeline"] and "--no-progress" in seen[0]
  # saved during the row (at least every 0.2 s of a >= 1.5 s row), then once more at its end
  assert len(saved) >= 4 and 0 < saved[0] < saved[-2] <= saved[-1] and 1.5 <= saved[-1] < 30
  code = 3
  with pytest.raises(protocol.RowFailed, match="row r failed with exit status 3; .* bpcp-jax pipeline") as e:
    protocol.run_row(str(tmp_path), log, "r", ["pipeline"])
  assert e.value.returncode == 3
  assert json.loads((tmp_path / "protocol.json").read_text())["rows"]["r"]["seconds"] >= 3.0  # both attempts


def test_spearman_ranks_with_ties():
  spearman = _protocol().spearman
  assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # ties take their mean rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
  assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)


@pytest.mark.parametrize("command", ["report", "measure", "calibrate", "ablate"])
def test_commands_on_a_work_directory_without_rows_say_so_and_create_nothing(tmp_path, monkeypatch, capsys, command):
  """Every command but run reads what run made: a work directory without it is one line naming the
  missing folder and the command that makes it, not a traceback, and no directory is created."""
  protocol = _protocol()
  workdir = tmp_path / "nowhere"
  monkeypatch.setattr("sys.argv", ["bp_protocol.py", command, "--workdir", str(workdir)])
  with pytest.raises(SystemExit) as e:
    protocol.main()
  assert str(workdir / "runs") in str(e.value) and f"run --workdir {workdir}" in str(e.value)
  assert not workdir.exists()


@pytest.mark.parametrize("command", ["calibrate", "ablate"])
def test_calibrate_and_ablate_need_the_dense_checkpoint(tmp_path, monkeypatch, command):
  protocol = _protocol()
  (tmp_path / "runs").mkdir()
  monkeypatch.setattr("sys.argv", ["bp_protocol.py", command, "--workdir", str(tmp_path)])
  with pytest.raises(SystemExit, match="dense row has no pretrained checkpoint") as e:
    protocol.main()
  assert os.path.join(str(tmp_path), "runs", "dense", "checkpoints", "pretrain") in str(e.value)
  # a folder there that holds no checkpoint (a cut copy): the checkpoint's own error, one line
  (tmp_path / "runs" / "dense" / "checkpoints" / "pretrain").mkdir(parents=True)
  with pytest.raises(SystemExit, match=f"bp_protocol {command}: .*holds no checkpoint"):
    protocol.main()


def test_ablation_cache_is_dropped_when_a_rows_weights_change(capsys):
  """A BP row deleted and run again has other search weights under the same name: the accuracies
  ablate cached at the old weights are forgotten (those of other rows kept)."""
  import numpy as np

  protocol = _protocol()
  variables = {"params": {"conv": {"kernel": np.ones((3, 3), np.float32)}}, "batch_stats": {"bn": {"mean": np.zeros(3)}}}
  fp = protocol.fingerprint(variables)
  assert fp == protocol.fingerprint({"batch_stats": variables["batch_stats"], "params": variables["params"]})
  changed = {"params": {"conv": {"kernel": np.full((3, 3), 1.0001, np.float32)}},
             "batch_stats": variables["batch_stats"]}
  assert protocol.fingerprint(changed) != fp
  stats_changed = {"params": variables["params"], "batch_stats": {"bn": {"mean": np.ones(3)}}}
  assert protocol.fingerprint(stats_changed) != fp

  out = {"accuracy": {"bp_gamma0.2|": 0.7, "bp_gamma0.2|a b": 0.6, "dense|a": 0.8, "bp_gamma0.25|a": 0.5}}
  protocol.forget_stale(out, "bp_gamma0.2", fp)  # a cache from before the fingerprints: kept
  protocol.forget_stale(out, "dense", "d1")
  assert len(out["accuracy"]) == 4
  protocol.forget_stale(out, "bp_gamma0.2", fp)  # the same weights: kept
  assert len(out["accuracy"]) == 4
  protocol.forget_stale(out, "bp_gamma0.2", protocol.fingerprint(changed))
  assert out["accuracy"] == {"dense|a": 0.8, "bp_gamma0.25|a": 0.5}
  assert out["weights"] == {"bp_gamma0.2": protocol.fingerprint(changed), "dense": "d1"}
  assert "bp_gamma0.2: other weights" in capsys.readouterr().out


def _write_log(workdir, **log):
  (workdir / "runs").mkdir(parents=True, exist_ok=True)
  (workdir / "protocol.json").write_text(json.dumps({"rows": {}, **log}))


def test_report_writes_the_committed_results_only_for_the_protocols_own_config(tmp_path, capsys):
  """A dry run (--config or --set in protocol.json) reports to <workdir>/results, never over the
  committed results; the report says where it wrote, and results.md names its setup."""
  protocol = _protocol()
  own, dry, other = tmp_path / "own", tmp_path / "dry", tmp_path / "other"
  _write_log(own, gammas=[0.1])
  _write_log(dry, config="experiments/configs/tiny.py", set=["model=resnet_v1_14"], gammas=[0.01, 0.2])
  _write_log(other, set=["data.cache_dir=/c"])
  assert protocol.default_out(str(own)) == protocol.OUT
  assert protocol.default_out(str(other)) == str(other / "results")
  protocol.report(str(dry))
  assert f"[report] written to {dry / 'results'}" in capsys.readouterr().out
  md = (dry / "results" / "results.md").read_text()
  assert md.startswith("Setup (protocol.json): config experiments/configs/tiny.py --set model=resnet_v1_14; "
                       "gammas [0.01, 0.2].")


def test_bn_sample_size_never_asks_for_more_images_than_the_training_set_has():
  size = _protocol().bn_sample_size
  assert size(50000, 40) == (40, 128, None)
  for n, want in ((160, (1, 128)), (1000, (7, 128)), (100, (1, 100))):
    batches, batch, note = size(n, 40)
    assert (batches, batch) == want and batches * batch <= n
    assert note == f"BN statistics re-estimated on {want[0]} x {want[1]} training images, not 40 x 128: the training set has {n}"


@pytest.mark.parametrize("command", ["run", "report", "ablate"])
def test_relative_paths_are_made_absolute_from_the_cwd(tmp_path, monkeypatch, command):
  """Rows run with cwd = the repository: --workdir, --data and --out are resolved where the user
  typed them, for every command; --config inside the repository is kept relative to it."""
  protocol = _protocol()
  monkeypatch.chdir(tmp_path)
  seen = {}
  monkeypatch.setattr(protocol, "run", lambda *a: seen.setdefault("run", a))
  monkeypatch.setattr(protocol, "report", lambda *a: seen.setdefault("report", a))
  monkeypatch.setattr("sys.argv", ["bp_protocol.py", command, "--workdir", "w", "--data", "d.tar.gz", "--out", "o",
                                   "--config", "experiments/configs/tiny.py", "--gammas", "0.1"])
  if command == "ablate":  # its check of the work directory names the absolute folder
    with pytest.raises(SystemExit, match=str(tmp_path / "w" / "runs")):
      protocol.main()
    return
  (tmp_path / "w" / "runs").mkdir(parents=True)
  protocol.main()
  if command == "run":
    assert seen["run"] == (str(tmp_path / "w"), [0.1], str(tmp_path / "d.tar.gz"), "experiments/configs/tiny.py", [],
                           str(tmp_path / "o"))
  else:
    assert seen["report"] == (str(tmp_path / "w"), str(tmp_path / "o"))


@pytest.mark.parametrize("gammas", ["abc", "auto2", "-0.1", "0.1,nan", "0.1,,x"])
def test_bad_gammas_are_refused_before_anything_is_saved_or_trained(tmp_path, monkeypatch, capsys, gammas):
  protocol = _protocol()
  monkeypatch.setattr(protocol, "run_row", lambda *a, **k: pytest.fail("a row ran"))
  monkeypatch.setattr("sys.argv", ["bp_protocol.py", "run", "--workdir", str(tmp_path / "w"), f"--gammas={gammas}"])
  with pytest.raises(SystemExit) as e:
    protocol.main()
  err = capsys.readouterr().err
  assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "is not a number >= 0" in err, err
  assert not (tmp_path / "w").exists()
  assert protocol.parse_gammas(" auto ") == "auto" and protocol.parse_gammas("0, 0.5,") == [0.0, 0.5]


def test_a_failed_row_ends_run_with_one_line(tmp_path, monkeypatch, capsys):
  protocol = _protocol()

  def failing(*a, **k):
    raise protocol.RowFailed("bp_gamma0.1", 3, ["bpcp-jax", "pipeline", "--workdir", "x"])

  monkeypatch.setattr(protocol, "run_row", failing)
  monkeypatch.setattr("sys.argv", ["bp_protocol.py", "run", "--workdir", str(tmp_path), "--gammas", "0.1"])
  with pytest.raises(SystemExit) as e:
    protocol.main()
  err = capsys.readouterr().err
  assert e.value.code == 3 and err == ("bp_protocol run: row bp_gamma0.1 failed with exit status 3; its output is "
                                       "above, its command: bpcp-jax pipeline --workdir x\n")
  assert json.loads((tmp_path / "protocol.json").read_text())["gammas"] == [0.1]


def test_a_rerun_with_another_setup_is_refused_once_a_row_has_run(tmp_path, monkeypatch):
  """protocol.json's --config/--set may change only while nothing has run (resume-free keys such as
  data.cache_dir excepted): later rows would start from another setup's checkpoints."""
  protocol = _protocol()
  monkeypatch.setattr(protocol, "run_row", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("row")))
  _write_log(tmp_path, config="experiments/configs/tiny.py", set=["model=resnet_v1_14", "data.cache_dir=/a"],
             gammas=[0.1])
  with pytest.raises(RuntimeError):  # nothing ran yet: a new setup is taken
    protocol.run(str(tmp_path), [], config="experiments/configs/tiny.py", sets=["model=resnet_v1_8"])
  log = json.loads((tmp_path / "protocol.json").read_text())
  assert log["set"] == ["model=resnet_v1_8"]
  log["rows"] = {"dense": {"seconds": 1.0}}
  (tmp_path / "protocol.json").write_text(json.dumps(log))
  with pytest.raises(SystemExit, match=r"started with --set \['model=resnet_v1_8'\], not \['model=resnet_v1_14'\]"):
    protocol.run(str(tmp_path), [], sets=["model=resnet_v1_14"])
  with pytest.raises(SystemExit, match="started with --config 'experiments/configs/tiny.py', not 'x.py'.*new --workdir"):
    protocol.run(str(tmp_path), [], config="x.py")
  with pytest.raises(RuntimeError):  # the same setup, another cache folder: goes on
    protocol.run(str(tmp_path), [0.2], config="experiments/configs/tiny.py", sets=["model=resnet_v1_8", "data.cache_dir=/b"])
  assert json.loads((tmp_path / "protocol.json").read_text())["gammas"] == [0.2]


def test_cp_and_bpcp_rows_prune_to_a_macs_fraction_whatever_the_base_config(tmp_path, monkeypatch, capsys):
  """tiny.py prunes channels (target channels, round_to 1): the cp/bpcp rows pass what their ratio
  means, after the protocol's --set overrides, and the protocol counts its rows."""
  from bpcp_jax.run.config import apply_overrides, load_config_file

  protocol = _protocol()
  blocks = [f"stage{s}_block{b}" for s in range(3) for b in range(2)]
  args = {}

  def fake_row(workdir, log, name, a, data=None, meta=None):
    args[name] = a
    n = 2 if name.startswith("bp_") else 0
    return {"dense": {"blocks_kept": blocks, "macs": 100.0}, "pruned": {"blocks_kept": blocks[n:], "macs": 100.0 - 10 * n}}

  monkeypatch.setattr(protocol, "run_row", fake_row)
  monkeypatch.setattr(protocol, "measure", lambda workdir: None)
  monkeypatch.setattr(protocol, "report", lambda workdir, out: None)
  sets = ["stages.prune.round_to=1"]
  protocol.run(str(tmp_path), [0.1], config="experiments/configs/tiny.py", sets=sets)
  tiny = load_config_file(os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py"))
  for name in ("cp", "bpcp"):
    c = apply_overrides(tiny, [*sets, *[x for x in args[name] if x.startswith("--config.")]])
    assert (c.stages.prune.target, c.stages.prune.criterion, c.stages.prune.round_to) == ("macs", "bn_scale", 4), name
  out = capsys.readouterr().out
  assert "row 1 of at most 9: dense" in out and "row 8 of at most 9: cp" in out and "row 9 of at most 9: bpcp" in out


def test_a_rows_own_settings_come_after_the_protocols_overrides(tmp_path, monkeypatch):
  protocol = _protocol()
  seen = []

  class Done:
    returncode = 0

    def wait(self, timeout=None):
      return 0

    def poll(self):
      return 0

  monkeypatch.setattr(protocol.subprocess, "Popen", lambda cmd, **k: seen.append(cmd) or Done())
  log = {"rows": {}, "set": ["stages.prune.target=channels"]}
  protocol.run_row(str(tmp_path), log, "cp", ["pipeline", "--config.stages.prune.target=macs"])
  assert seen[0].index("--config.stages.prune.target=channels") < seen[0].index("--config.stages.prune.target=macs")
