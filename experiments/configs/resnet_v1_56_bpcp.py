"""BPCP on the ResNet-56 of He et al. (basic blocks): every stage, as resnet_v2_56_bpcp.py.

Block search with gamma 0.05 over its 27 basic blocks, fine-tune, then 40% of the channels
removed by |BN scale| (skip-connection channels coupled per stage), fine-tune. This puts BPCP
on the network other pruning papers report on, to compare with them on their own ground.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v1_56_bpcp.py --workdir runs/resnet_v1_56_bpcp

Expected result: not yet measured here (the paper reports BPCP on ResNet-v2 and the bottleneck
v1 only). Dense reference: resnet_v1_56_dense.py (about 93.0-93.6%, 855,770 parameters,
125,747,840 MACs).
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v1_56"
  c.stages.run = "pretrain,search,finetune_blocks,prune,finetune_channels"
  c.stages.search.gamma = 0.05
  c.stages.prune.criterion = "bn_scale"
  c.stages.prune.ratio = 0.4
  return c
