"""CP alone on ResNet-v2-56, COP (0.3): the paper's Table 2 row "COP (0.3)".

Pretrain the dense network, select channels globally by the `cop` criterion until a fraction
0.3 of the channels is gone (the skip-connection channels of a stage are one group, scored by
the max of its members), rebuild the smaller network and fine-tune it. No block pruning. A
channel's importance discounts its filter's redundancy with the others (COP).

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_cop_03.py --workdir runs/resnet_v2_56_cop_03

Expected result (paper, Table 2; time is batch 1 on the paper's CPU): 90.73% test accuracy,
0.22M parameters (60.8% cut), 30.88M MACs (64.7% cut), 33.17 ms, 1.53x speed-up over
the dense network (93.74%, 0.56M, 87.32M, 50.92 ms). Here: not yet measured here.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain,prune,finetune_channels"
  c.stages.prune.criterion = "cop"
  c.stages.prune.ratio = 0.3
  return c
