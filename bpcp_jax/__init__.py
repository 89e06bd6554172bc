"""bpcp_jax: block pruning + channel pruning (BPCP) of residual networks in JAX/Flax.

The curated public API. A typical session::

    import bpcp_jax as bp
    model = bp.create_model("resnet_v2_56", num_classes=10)
    variables = model.init(rng, images, train=False)
    masks = bp.init_masks(model)
    small, small_vars = bp.materialize(model, variables, masks)
    bp.count_params_macs(small)
"""

from bpcp_jax.pruning.block_search import decide_blocks, gate_penalty, gate_probabilities, hard_gates, sample_gates
from bpcp_jax.pruning.block_controls import block_scores, lowest_blocks, select_blocks
from bpcp_jax.pruning.network import PrunableNetwork, network_from_description
from bpcp_jax.families.provider import FamilyNetwork
from bpcp_jax.tracer.provider import FlaxNetwork
from bpcp_jax.training.checkpoint import load_network, load_stage
from bpcp_jax.training.weights import load_weights
from bpcp_jax.training.batch_stats import recalibrate_batch_stats
from bpcp_jax.families.counting import count_leaves, count_params_macs, layer_report
from bpcp_jax.pruning.masks import check_masks, init_masks, kept_blocks, pruned_spec
from bpcp_jax.families.materialize import materialize, materialize_masks
from bpcp_jax.families import ResNet, group_widths, layer_table
from bpcp_jax.tracer.network import (
    PrunedNetwork,
    TracedNetwork,
    check_traced_masks,
    count_traced,
    init_traced_masks,
    masked_apply,
    materialize_traced,
    trace_network,
)
from bpcp_jax.tracer.rebuild import (PLAN_FORMAT, RebuildError, RebuildReport, RebuildWarning, narrow, plan_of,
                                     pruning_plan, rebuild)
from bpcp_jax.tracer.nnx import (NnxFlaxNetwork, NnxNetwork, NnxTracedNetwork, Skipped, Zeroed, materialize_nnx,
                                 narrow_nnx, recalibrate_nnx, rebuild_nnx, trace_nnx)
from bpcp_jax.run.compile_cache import enable_compilation_cache
from bpcp_jax.deploy.latency import OpTimer, measure_latency
from bpcp_jax.deploy.predictor import make_predictor
from bpcp_jax.pruning.speed_select import Selection, select_pruning, select_resnet, traced_importance
from bpcp_jax.families.spec import FAMILIES, ArchSpec, BlockSpec, StageSpec, dense_spec, parse_model_name

__version__ = "0.1.0"


def create_model(name: str, num_classes: int = 10, **module_kwargs) -> ResNet:
  """A dense CIFAR network by name: ``"resnet_v2_56"``, ``"resnet_v1_bottleneck_29"``, ``"resnet_v1_20"``...

  ``module_kwargs`` go to ``ResNet`` (``dtype``, ``init_style``, ``bn_axis_name``, ``conv1x1``).
  Raises ``ValueError`` naming the family or depth when the name is not a valid network.
  """
  family, depth = parse_model_name(name)
  return ResNet(spec=dense_spec(family, depth, num_classes), **module_kwargs)


def model_from_spec(spec: ArchSpec, **module_kwargs) -> ResNet:
  """The network of a (possibly pruned) spec, e.g. one restored from a checkpoint."""
  return ResNet(spec=spec, **module_kwargs)


__all__ = [
    "ArchSpec", "BlockSpec", "FAMILIES", "FamilyNetwork", "FlaxNetwork", "NnxFlaxNetwork", "NnxNetwork", "NnxTracedNetwork",
    "OpTimer",
    "PLAN_FORMAT",
    "PrunableNetwork", "PrunedNetwork", "RebuildError", "RebuildReport", "RebuildWarning", "ResNet", "Selection",
    "Skipped", "Zeroed", "StageSpec", "load_network", "load_stage", "load_weights", "network_from_description", "select_blocks",
    "block_scores", "lowest_blocks",
    "TracedNetwork", "check_masks", "check_traced_masks", "count_leaves", "count_params_macs", "count_traced",
    "create_model", "decide_blocks", "dense_spec", "enable_compilation_cache", "gate_penalty", "gate_probabilities", "group_widths",
    "hard_gates", "init_masks", "init_traced_masks", "kept_blocks", "layer_report", "layer_table",
    "make_predictor", "masked_apply", "materialize", "materialize_masks", "materialize_nnx", "materialize_traced",
    "measure_latency", "model_from_spec", "narrow", "narrow_nnx", "parse_model_name", "plan_of", "pruned_spec",
    "pruning_plan", "rebuild", "rebuild_nnx", "recalibrate_batch_stats", "recalibrate_nnx", "sample_gates",
    "select_pruning", "select_resnet",
    "trace_network", "trace_nnx", "traced_importance",
]
