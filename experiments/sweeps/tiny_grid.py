"""Tiny sweep for tests and CI: tiny.py over block-search gamma x channel-prune ratio (2 x 2 runs).

Each run takes well under a minute on a CPU; the numbers mean nothing (it trains for seconds),
the point is that every run directory, results.csv, results.md and the plots get written.

Launch (from the repo root):
  bpcp-jax sweep --sweep experiments/sweeps/tiny_grid.py --workdir runs/sweeps/tiny_grid

Expected result: 4 runs named gamma=...,ratio=..., all "done"; a rerun skips all four.
"""


def get_sweep():
  return {
      "base": "../configs/tiny.py",  # relative to this file
      "grid": {"stages.search.gamma": [0.05, 0.2], "stages.prune.ratio": [0.3, 0.5]},
  }
