"""Dense ResNet-56 of He et al. (basic blocks, 16/32/64 channels) on CIFAR-10, the paper's recipe.

The network most other pruning papers report on (27 basic blocks, 1x1-conv+BN projection
shortcuts where a stage changes width or stride); only the pretraining stage runs. (The paper's
post-activation *bottleneck* v1 network is `resnet_v1_bottleneck_56`, see
resnet_v1_bottleneck_56_bpcp.py.)

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v1_56_dense.py --workdir runs/resnet_v1_56_dense

Expected result (literature, BPCP.md): about 93.0-93.6% test accuracy, about 0.85M parameters
and 125M MACs. Our counts: 855,770 parameters, 125,747,840 conv+FC MACs. Accuracy and latency
here: not yet measured here.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v1_56"
  c.stages.run = "pretrain"
  return c
