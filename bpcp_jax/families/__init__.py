"""The CIFAR ResNet families: specs in, Flax modules out."""

from bpcp_jax.families.resnet import ResNet
from bpcp_jax.families.structure import Layer, group_widths, layer_table, stream_group

__all__ = ["ResNet", "Layer", "group_widths", "layer_table", "stream_group"]
