"""Speed-aware vs MACs-only selection on ResNet-v2-56 at an equal MACs budget (issue: prune to a latency budget).

A CPU-sized protocol on real CIFAR-10: ResNet-v2-56 pretrained for 4 epochs on 10,000 training
images (1,000 per class, |BN scale| L1 penalty so the scores mean something), then pruned to
at most 40% of its MACs by three selections from the same dense network, each fine-tuned for 2
epochs and evaluated on all 10,000 test images:

- ``macs``: importance per MAC saved, widths free (the paper's kind of budget);
- ``macs_r8``: the same with widths kept at multiples of 8;
- ``latency``: importance per millisecond saved, from per-layer times measured on this
  machine at batch 1, widths at multiples of 8, blocks and channels both candidates.

Launch everything (resumable; writes benchmarks/results/speed_select.{json,md}):
  python -m benchmarks.speed_select --workdir runs/speed_select

or one row, e.g. the latency-aware one from the dense checkpoint:
  bpcp-jax pipeline --config experiments/configs/speed_select.py --workdir runs/speed_select/latency \\
    --from runs/speed_select/dense/checkpoints/pretrain --config.stages.run=prune,finetune_channels

Expected result: benchmarks/results/speed_select.md (measured here).
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.data.max_train_per_class = 1000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.optim.schedule = "cosine"
  c.stages.pretrain.epochs = 4
  c.stages.pretrain.lr = 0.1
  c.stages.pretrain.bn_l1 = 1e-4
  c.stages.prune.selection = "speed"
  c.stages.prune.cost = "latency"
  c.stages.prune.latency_batch = 1
  c.stages.prune.target = "macs"
  c.stages.prune.ratio = 0.6  # remove 60% of the MACs
  c.stages.prune.round_to = 8
  c.stages.finetune_channels.epochs = 2
  c.stages.finetune_channels.lr = 0.02
  c.eval_every_epochs = 0
  c.checkpoint.every_steps = 50
  return c
