"""Dense ResNet-v2-56 on CIFAR-10: the unpruned baseline every other row is measured against.

The paper's recipe (default_config): SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128,
160 epochs, lr x0.1 at 50% and 75%; only the pretraining stage runs.

Launch (from the repo root):
  bpcp-jax pipeline --config experiments/configs/resnet_v2_56_dense.py --workdir runs/resnet_v2_56_dense

Expected result (paper, Table 2): 93.74% test accuracy, 0.56M parameters, 87.32M MACs,
50.92 ms per image at batch 1 on the paper's CPU. Our counts for this network: 590,426
parameters and 87,214,592 conv+FC MACs (thop, which the paper used, also counts BN and
pooling: 91.56M). Accuracy and latency here: not yet measured here.
"""

from bpcp_jax.run.config import default_config


def get_config():
  c = default_config()
  c.model = "resnet_v2_56"
  c.stages.run = "pretrain"
  return c
