"""Smoke run: every BPCP stage on the real CIFAR-10 in a few minutes on a 2-core CPU.

ResNet-v2-20 on 5,000 training images (500 per class), 3 pretraining epochs, 1 epoch each of
block search and the two fine-tunes, channel pruning by |BN scale| at 30%, evaluated on all
10,000 test images. The one search epoch (78 steps) decides because the gates learn fast
(gate lr 50): measured keep probabilities 1.00, 1.00, 1.00, 1.00, 0.007 and 0.001 (stage 2's
two blocks removed). With the default gate lr 0.1 they ended within 0.004 of 0.5 (blocks kept
or removed by coin flip); 10 and 25 still left one or two within 0.2 of it.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/smoke.py --workdir runs/smoke

Expected result: test accuracy well above chance (about 40-50% dense after 3 epochs on this
subset), params and MACs reduced, summary.json with `dense` and `pruned` sections, every block
decision settled (no warning).
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_20"
  c.data.max_train_per_class = 500
  c.batch_size = 64
  c.eval_batch_size = 500
  c.stages.pretrain.epochs = 3
  c.stages.search.epochs = 1
  c.stages.search.gamma = 0.05
  c.optim.gate_lr = 50.0
  c.stages.finetune_blocks.epochs = 1
  c.stages.finetune_blocks.lr = 0.02
  c.stages.prune.ratio = 0.3
  c.stages.finetune_channels.epochs = 1
  c.stages.finetune_channels.lr = 0.02
  c.optim.schedule = "cosine"
  c.eval_every_epochs = 0
  c.profile.repeats = 10
  return c
