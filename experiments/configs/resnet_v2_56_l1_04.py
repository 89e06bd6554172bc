"""CP alone on ResNet-v2-56, L1 (0.4): the paper's Table 2 row "L1 (0.4)".

Pretrain the dense network, select channels globally by the `l1` criterion until a fraction 0.4
of the channels is gone (the skip-connection channels of a stage are one group, scored by the
max of its members), rebuild the smaller network and fine-tune it. No block pruning. A
channel's importance is the L1 norm of the filter that produces it (Li et al.).

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_l1_04.py --workdir runs/resnet_v2_56_l1_04

Expected result (paper, Table 2; time is batch 1 on the paper's CPU): 81.27% test accuracy,
0.39M parameters (30.4% cut), 35.54M MACs (59.3% cut), 32.91 ms, 1.55x speed-up over
the dense network (93.74%, 0.56M, 87.32M, 50.92 ms). Here: not yet measured here.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain,prune,finetune_channels"
  c.stages.prune.criterion = "l1"
  c.stages.prune.ratio = 0.4
  return c
