"""experiments/bp_protocol.py's verdict on a block search: which decisions were still changing at
its end (the issue asks whether the decisions had settled)."""

import importlib.util
import os

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
