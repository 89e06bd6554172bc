"""Tiny run for tests and CI: every stage in seconds on real CIFAR-10 images (not for accuracy).

ResNet-v1-8 (basic blocks, one per stage) on 160 training and 100 test images, a few steps per
stage, checkpoints every 2 steps so a run can be killed and resumed mid-stage. The block search
has 10 steps, so its gates learn fast (gate lr 100, gamma 0.035) and decide: measured keep
probabilities 0.73, 0.12 and 0.29 (one block kept), each at least 0.2 from 0.5. With the
defaults (gate lr 0.1, gamma 0.1) they stayed within 0.005 of 0.5 and all three blocks were
removed by what amounts to coin flips.

Launch:
  bpcp-jax pipeline --config experiments/configs/tiny.py --workdir runs/tiny

Expected result: all run files written; accuracy near chance (it trains for seconds); every
block decision settled (no warning).
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v1_8"
  c.data.max_train_per_class = 16
  c.data.max_test_per_class = 10
  c.batch_size = 32
  c.eval_batch_size = 40
  c.stages.pretrain.epochs = 2
  c.stages.search.epochs = 2
  c.stages.search.gamma = 0.035
  c.optim.gate_lr = 100.0
  c.stages.finetune_blocks.epochs = 1
  c.stages.prune.ratio = 0.3
  c.stages.finetune_channels.epochs = 1
  c.checkpoint.every_steps = 2
  c.eval_every_epochs = 1
  c.log_every_steps = 1
  c.profile.batch_sizes = "1,8"
  c.profile.repeats = 3
  return c
