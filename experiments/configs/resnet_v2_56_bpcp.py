"""BPCP on ResNet-v2-56: every stage (pretrain, block search, fine-tune, channel prune, fine-tune).

Block pruning with gamma 0.05 removes whole residual blocks; then channel pruning by |BN scale|
removes 40% of the remaining channels (skip-connection channels coupled per stage); each step
is materialized into a smaller plain network and fine-tuned. The paper does not spell out the
CP criterion and ratio behind its headline numbers; these are default_config()'s. For the
network-slimming variant add --config.stages.pretrain.bn_l1=1e-4.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_bpcp.py --workdir runs/resnet_v2_56_bpcp
Sweep gamma x ratio x criterion around it: experiments/sweeps/bpcp_grid.py.

Expected result (paper, headline): 78.9% of the parameters and 80.3% of the MACs removed with
less than 3 points of accuracy drop from 93.74%, 3.17x faster at batch 1 on CPU. Here: not yet
measured here.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain,search,finetune_blocks,prune,finetune_channels"
  c.stages.search.gamma = 0.05
  c.stages.prune.criterion = "bn_scale"
  c.stages.prune.ratio = 0.4
  return c
