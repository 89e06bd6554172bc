"""CP alone on ResNet-v2-56 with SFP's criterion: the L2 norm of each filter, 30% per layer.

Soft filter pruning (He et al., IJCAI 2018) ranks the filters of each layer by L2 norm, so
the selection is per group (scope per_group) rather than global, at ratio 0.3. Note: SFP's
soft schedule (zero the lowest-norm filters at the end of every epoch, let them recover, remove
them at the end) is available as `bpcp_jax.pruning.channel_prune.zero_pruned_filters`, but the pipeline
applies the hard selection once after pretraining, then fine-tunes: this row is "SFP's
criterion with a hard prune", not the full soft method.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_sfp.py --workdir runs/resnet_v2_56_sfp

Expected result: not yet measured here (SFP's published figures are for other networks and
ImageNet; the paper's Table 2 has no SFP row). Compare with resnet_v2_56_l1_03.py (L1, global).
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain,prune,finetune_channels"
  c.stages.prune.criterion = "l2"
  c.stages.prune.scope = "per_group"  # SFP prunes the same fraction of every layer
  c.stages.prune.ratio = 0.3
  return c
