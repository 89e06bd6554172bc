"""The CPU protocol: dense, BP, CP, BPCP and a random control on real CIFAR-10, well under 90 minutes on 2 cores.

A reduced budget of the paper's recipe for machines without an accelerator: ResNet-v2-20 (the
paper's pre-activation bottleneck family at n=2, 6 blocks) on 20,000 training images (2,000 per
class), evaluated on all 10,000 test images; cosine schedules; short stages. All five rows
start from the same dense network, so the comparison is between pruning choices, not between
pretraining runs. The channel rows prune to an equal MACs budget (50% of the MACs), so CP
(|BN scale|, trained with an L1 penalty on the scales) and the random control are compared at
equal cost.

Launch (runs every row in order, resumable, writes experiments/results/cpu_protocol/):
  python experiments/cpu_protocol.py --workdir runs/cpu_protocol

or one row at a time, e.g. the dense network:
  bpcp-jax train --config experiments/configs/cpu_protocol.py --workdir runs/cpu_protocol/runs/dense

Expected result: see experiments/RESULTS.md (measured here; the JPEG copy of CIFAR-10).
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_20"
  c.data.max_train_per_class = 2000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.optim.schedule = "cosine"
  c.stages.pretrain.epochs = 8
  c.stages.pretrain.lr = 0.1
  c.stages.pretrain.bn_l1 = 1e-4
  c.stages.search.epochs = 2
  c.stages.search.lr = 0.02
  c.stages.search.gamma = 0.1  # 0.05 (the paper, 160 search epochs) kept every block in 2 epochs
  c.optim.gate_lr = 0.1
  c.stages.finetune_blocks.epochs = 2
  c.stages.finetune_blocks.lr = 0.02
  c.stages.prune.criterion = "bn_scale"
  c.stages.prune.target = "macs"
  c.stages.prune.ratio = 0.5
  c.stages.prune.round_to = 4
  c.stages.finetune_channels.epochs = 2
  c.stages.finetune_channels.lr = 0.02
  c.eval_every_epochs = 0
  c.checkpoint.every_steps = 50
  return c
