"""The prunable network: the one abstraction every stage, step, checkpoint and report runs on.

A ``PrunableNetwork`` is a network the pipeline can train densely, search (BP gates on its
residual blocks), prune (CP on its channel groups), materialize into a smaller network of the
same kind, count, deploy and save. Two providers implement it:

- ``bpcp_jax.families.provider.FamilyNetwork``: the declared CIFAR ResNet families (the
  reference: the layer table and groups are declared, numerics are the original code's);
- ``bpcp_jax.tracer.provider.FlaxNetwork``: any ``flax.linen`` classifier, its groups and blocks
  found by tracing it (``bpcp_jax.tracer``); its subclass ``bpcp_jax.tracer.nnx.NnxFlaxNetwork``
  any ``flax.nnx`` classifier, traced through the ``NnxNetwork`` view.

No stage knows which provider it runs. ``describe()`` gives a JSON description that
``network_from_description`` turns back into the same network (the checkpoint's ``network``
meta): for a family its spec, for a Flax network the factory it came from and the prunings
applied to it since.

Mask pytrees are the same for both: ``{"blocks": {name: logit}, "channels": {group: 0/1}}``.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping, Optional

import numpy as np

from bpcp_jax.pruning.masks import full_masks


class PrunableNetwork(abc.ABC):
  """What a stage needs of a network. Variables are ``{"params": ..., "batch_stats": ...}``."""

  #: a short label for tables and logs ("resnet_v2_56", "models.py:make_vgg")
  label: str
  #: shape of one input example, e.g. (32, 32, 3)
  input_shape: tuple

  # -- structure -----------------------------------------------------------------------------
  @property
  @abc.abstractmethod
  def block_names(self) -> list[str]:
    """Residual blocks that block search can gate and remove, in forward order."""

  @property
  @abc.abstractmethod
  def group_widths(self) -> dict[str, int]:
    """Width of every prunable channel group."""

  def block_stages(self) -> list[list[str]]:
    """Blocks grouped by the stage whose residual stream they share (one list when unknown); a
    block control never removes a whole stage."""
    return [list(self.block_names)] if self.block_names else []

  def init_masks(self) -> dict:
    """Every block undecided (logit 0, kept) and every channel kept."""
    return full_masks(self.block_names, self.group_widths)

  # -- computing -----------------------------------------------------------------------------
  @abc.abstractmethod
  def init(self, rng) -> dict:
    """Fresh variables for a batch of ``input_shape`` examples."""

  @abc.abstractmethod
  def apply(self, variables, x, *, train: bool, masks: Optional[Mapping] = None,
            block_gates: Optional[Mapping] = None, rng=None, axis_name: Optional[str] = None):
    """Logits ``[B, classes]`` (float32) for images ``x`` ``[B, *input_shape]``.

    ``train=True`` returns ``(logits, new_batch_stats)`` and uses batch statistics (averaged over
    ``axis_name`` when mapped) and ``rng`` for dropout. ``masks`` applies channel masks and the
    block decisions (logit >= 0); ``block_gates`` (sampled gates of the block search, possibly
    straight-through) replace the decisions. Pure; jit/pmap are applied by the caller.
    """

  def block_io(self, variables, x) -> dict:
    """``{block: (residual, branch)}``: the two summands of every residual block's add (the block's
    input, or its shortcut's output, and ``f(x)``; its output is their sum), computed in eval mode
    on ``x`` ``[B, *input_shape]`` with every block kept. What the block-importance controls
    (``pruning/block_controls.py``) score."""
    raise NotImplementedError(f"{type(self).__name__} gives no block inputs and outputs")

  # -- pruning -------------------------------------------------------------------------------
  @abc.abstractmethod
  def materialize(self, variables, masks: Mapping, opt_state=None):
    """``(smaller network, its variables[, its optimizer state])``: removed blocks and channels gone."""

  @abc.abstractmethod
  def channel_importance(self, variables, criterion: str, *, reduce: str = "max", key=None,
                         masks: Optional[Mapping] = None) -> dict[str, np.ndarray]:
    """One score per channel of every live group (higher = keep); criteria as ``channel_prune``."""

  @abc.abstractmethod
  def select_channels(self, scores: Mapping[str, np.ndarray], prune_ratio: float, *,
                      masks: Optional[Mapping] = None, **select_kwargs) -> tuple[dict, list]:
    """``(masks, report)``: remove the lowest-scored channels to ``prune_ratio`` of the channels or
    MACs (``channel_prune.select_channels``'s keywords)."""

  @abc.abstractmethod
  def select_speed(self, variables, *, criterion: str, reduce: str, key, **kwargs):
    """Speed-aware selection (``speed_select``): ``(masks, report, Selection)``."""

  def zero_pruned(self, variables, masks: Mapping):
    """SFP's soft step: zero the filters producing removed channels (not every provider has it)."""
    raise NotImplementedError(f"{type(self).__name__} has no soft filter pruning")

  # -- measuring and deploying --------------------------------------------------------------
  @abc.abstractmethod
  def counts(self, variables=None) -> dict[str, int]:
    """``{"params": int, "macs": int, "blocks": int}``: parameters (without BN statistics) and
    multiply-accumulates of convolutions and dense layers per example."""

  @abc.abstractmethod
  def deployable(self):
    """The plain Flax module for inference: ``module.apply(variables, x)`` in eval mode with no
    mask (``make_predictor`` and latency measurements use it)."""

  def structure(self) -> dict[str, Any]:
    """Blocks kept and channels per group, for reports."""
    return {"blocks_kept": list(self.block_names), "channels_per_group": dict(sorted(self.group_widths.items()))}

  # -- saving ---------------------------------------------------------------------------------
  @abc.abstractmethod
  def describe(self) -> dict[str, Any]:
    """JSON-serialisable description; ``network_from_description`` rebuilds the network from it."""


def network_from_description(desc: Mapping[str, Any], **options) -> PrunableNetwork:
  """The network a checkpoint's ``network`` meta describes (``options``: e.g. ``dtype``).

  A description without ``kind`` is a family spec (checkpoints written before user networks)."""
  kind = desc.get("kind", "family")
  if kind == "family":
    from bpcp_jax.families.provider import FamilyNetwork

    return FamilyNetwork.from_description(desc, **options)
  if kind == "flax":
    from bpcp_jax.tracer.provider import FlaxNetwork

    return FlaxNetwork.from_description(desc, **options)
  if kind == "nnx":
    from bpcp_jax.tracer.nnx import NnxFlaxNetwork

    return NnxFlaxNetwork.from_description(desc, **options)
  raise ValueError(f"unknown network kind {kind!r} in a network description (known: family, flax, nnx)")
