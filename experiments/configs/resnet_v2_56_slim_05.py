"""CP alone on ResNet-v2-56, Slim (0.5): the paper's Table 2 row "Slim (0.5)".

Pretrain the dense network with an L1 penalty of 1e-4 on the BN scales (as network slimming
does), select channels globally by the `bn_scale` criterion until a fraction 0.5 of the
channels is gone (the skip-connection channels of a stage are one group, scored by the max of
its members), rebuild the smaller network and fine-tune it. No block pruning. A channel's
importance is the |scale| of the BN that follows it (network slimming).

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_slim_05.py --workdir runs/resnet_v2_56_slim_05

Expected result (paper, Table 2; time is batch 1 on the paper's CPU): 91.19% test accuracy,
0.25M parameters (55.4% cut), 30.34M MACs (65.3% cut), 32.12 ms, 1.58x speed-up over
the dense network (93.74%, 0.56M, 87.32M, 50.92 ms). Here: not yet measured here.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain,prune,finetune_channels"
  c.stages.pretrain.bn_l1 = 1e-4  # sparse BN scales make |scale| a usable ranking
  c.stages.prune.criterion = "bn_scale"
  c.stages.prune.ratio = 0.5
  return c
