"""BPCP on the post-activation bottleneck ResNet-v1-56: the paper's other block-pruning network.

Conv-BN-ReLU order with the ReLU after the add, 18 bottleneck blocks (9n+2, n=6), the same
widths as ResNet-v2-56; every stage: block search (gamma 0.05), fine-tune, 40% of the channels
removed by |BN scale|, fine-tune.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v1_bottleneck_56_bpcp.py --workdir runs/resnet_v1_bottleneck_56_bpcp

Expected result: not yet measured here (BPCP.md quotes no figure for this network). Dense
counts: 590,426 parameters, 87,214,592 conv+FC MACs.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v1_bottleneck_56"
  c.stages.run = "pretrain,search,finetune_blocks,prune,finetune_channels"
  c.stages.search.gamma = 0.05
  c.stages.prune.criterion = "bn_scale"
  c.stages.prune.ratio = 0.4
  return c
