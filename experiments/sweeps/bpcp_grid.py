"""BPCP on ResNet-v2-56 over gamma x channel ratio x CP criterion: the ablation behind the Pareto plot.

3 gammas x 3 ratios x 3 criteria = 27 full BPCP runs (pretrain, block search, fine-tune,
channel prune, fine-tune at 160 epochs each) from experiments/configs/resnet_v2_56_bpcp.py.
Every run pretrains its own dense network with the same seed, so the dense rows agree; a
finished run is skipped on a rerun and an interrupted one resumes, so the sweep can be
restarted as often as needed. Analyse with notebooks/ablation.ipynb (SWEEP_DIR = the workdir).

Launch (from the repo root; a GPU host):
  bpcp-jax sweep --sweep experiments/sweeps/bpcp_grid.py --workdir runs/sweeps/bpcp_grid --no-progress

Expected result: not yet measured here. The paper's headline point (78.9% fewer parameters,
80.3% fewer MACs, <3 points below 93.74%, 3.17x faster at batch 1) should lie on or near the
Pareto front; blocks kept should fall as gamma grows.
"""


def get_sweep():
  return {
      "base": "experiments/configs/resnet_v2_56_bpcp.py",  # relative to the repo root
      "grid": {
          "stages.search.gamma": [0.02, 0.05, 0.1],
          "stages.prune.ratio": [0.3, 0.4, 0.5],
          "stages.prune.criterion": ["bn_scale", "l1", "cop"],
      },
  }
