"""BP alone on ResNet-v2-56: pretrain, block search (gamma 0.05), fine-tune the kept blocks.

Each residual block gets a Bernoulli gate trained beside the weights with the penalty
gamma * sum |g|; a block is kept iff its keep probability is >= 0.5. No channel pruning.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_bp.py --workdir runs/resnet_v2_56_bp

Expected result: not yet measured here (the paper reports no BP-alone row for this network
in the figures we have). Dense reference: 93.74% (paper), 590,426 parameters, 87,214,592 MACs.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain,search,finetune_blocks"
  c.stages.search.gamma = 0.05
  return c
