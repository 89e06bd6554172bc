"""CP alone on ResNet-v2-56 with random channel selection: the control for every criterion.

Same stages and ratio as resnet_v2_56_slim_04.py / resnet_v2_56_l1_04.py (pretrain, remove 40%
of the channels globally, fine-tune), but the channels are drawn at random (seeded by
config.seed). A criterion that does not beat this after fine-tuning is not selecting anything.
Other ratios: --config.stages.prune.ratio=0.3.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_random.py --workdir runs/resnet_v2_56_random

Expected result: not yet measured here (no paper figure; compare with the Table 2 rows at 0.4:
Slim 92.06%, L1 81.27%).
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain,prune,finetune_channels"
  c.stages.prune.criterion = "random"
  c.stages.prune.ratio = 0.4
  return c
