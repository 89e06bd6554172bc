"""The block-search protocol: ResNet-v2-56 on all 50,000 CIFAR-10 training images (issue 14).

One dense pretraining (15 epochs, cosine from lr 0.1, L1 1e-4 on the BN scales for the channel
rows) that every row of experiments/bp_protocol.py starts from; block searches at several gammas,
random and heuristic block controls, BPCP and CP at about -80% MACs, every row fine-tuned with the
same budget and evaluated on all 10,000 test images. Sized for a 2-core CPU over a few hours;
every run is resumable (checkpoints every 100 steps).

Launch (all rows, resumable; writes experiments/results/bp_protocol/):
  python experiments/bp_protocol.py run --workdir runs/bp_protocol --gammas auto

or the dense network alone:
  bpcp-jax train --config experiments/configs/bp_protocol.py --workdir runs/bp_protocol/runs/dense

Expected result: dense >= 85% test accuracy (the JPEG copy of CIFAR-10); the rows in
experiments/RESULTS.md ("Block search on ResNet-v2-56").
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.batch_size = 128
  c.eval_batch_size = 500
  c.optim.schedule = "cosine"
  c.stages.pretrain.epochs = 15
  c.stages.pretrain.lr = 0.1
  c.stages.pretrain.bn_l1 = 1e-4
  c.stages.search.epochs = 2
  c.stages.search.lr = 0.01
  c.stages.search.gamma = 0.05
  c.optim.gate_lr = 0.1
  c.stages.finetune_blocks.epochs = 1
  c.stages.finetune_blocks.lr = 0.01
  c.stages.prune.criterion = "bn_scale"
  c.stages.prune.target = "macs"
  c.stages.prune.ratio = 0.8
  c.stages.prune.round_to = 4
  c.stages.finetune_channels.epochs = 1
  c.stages.finetune_channels.lr = 0.01
  c.eval_every_epochs = 1
  c.checkpoint.every_steps = 100
  c.profile.batch_sizes = "1,128"
  return c
