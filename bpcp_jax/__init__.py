"""bpcp_jax: block pruning + channel pruning (BPCP) of residual networks in JAX/Flax.

The curated public API. A typical session::

    import bpcp_jax as bp
    model = bp.create_model("resnet_v2_56", num_classes=10)
    variables = model.init(rng, images, train=False)
    masks = bp.init_masks(model)
    small, small_vars = bp.materialize(model, variables, masks)
    bp.count_params_macs(small)
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name loads on first use (below)
  from bpcp_jax.families import ResNet
  from bpcp_jax.families.spec import ArchSpec

# name -> the module it lives in. Imported on first use (PEP 562), so ``import bpcp_jax`` costs
# nothing: the command line restarts itself with a better allocator before JAX is loaded, and a
# script that needs one function does not pay for the tracer, the NNX adapter and orbax.
_EXPORTS = {
    "bpcp_jax.pruning.block_search": ("decide_blocks", "gate_penalty", "gate_probabilities", "hard_gates",
                                      "sample_gates", "select_blocks"),
    "bpcp_jax.pruning.network": ("PrunableNetwork", "network_from_description"),
    "bpcp_jax.pruning.masks": ("check_masks", "init_masks", "kept_blocks", "pruned_spec"),
    "bpcp_jax.pruning.speed_select": ("Selection", "select_pruning", "select_resnet", "traced_importance"),
    "bpcp_jax.families": ("ResNet", "group_widths", "layer_table"),
    "bpcp_jax.families.provider": ("FamilyNetwork",),
    "bpcp_jax.families.counting": ("count_leaves", "count_params_macs", "layer_report"),
    "bpcp_jax.families.materialize": ("materialize", "materialize_masks"),
    "bpcp_jax.families.spec": ("FAMILIES", "ArchSpec", "BlockSpec", "StageSpec", "dense_spec", "parse_model_name"),
    "bpcp_jax.tracer.provider": ("FlaxNetwork",),
    "bpcp_jax.tracer.network": ("PrunedNetwork", "TracedNetwork", "check_traced_masks", "count_traced",
                                "init_traced_masks", "masked_apply", "materialize_traced", "trace_network"),
    "bpcp_jax.tracer.rebuild": ("PLAN_FORMAT", "RebuildError", "RebuildReport", "RebuildWarning", "narrow", "plan_of",
                                "pruning_plan", "rebuild"),
    "bpcp_jax.tracer.nnx": ("NnxNetwork", "Skipped", "materialize_nnx", "narrow_nnx", "trace_nnx"),
    "bpcp_jax.training.checkpoint": ("load_network", "load_stage"),
    "bpcp_jax.training.weights": ("load_weights",),
    "bpcp_jax.training.batch_stats": ("recalibrate_batch_stats",),
    "bpcp_jax.run.compile_cache": ("enable_compilation_cache",),
    "bpcp_jax.deploy.latency": ("OpTimer", "measure_latency"),
    "bpcp_jax.deploy.predictor": ("make_predictor",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBPACKAGES = ("deploy", "families", "pruning", "run", "tracer", "training")

__version__ = "0.1.0"


def create_model(name: str, num_classes: int = 10, **module_kwargs) -> "ResNet":
  """A dense CIFAR network by name: ``"resnet_v2_56"``, ``"resnet_v1_bottleneck_29"``, ``"resnet_v1_20"``...

  ``module_kwargs`` go to ``ResNet`` (``dtype``, ``init_style``, ``bn_axis_name``, ``conv1x1``).
  Raises ``ValueError`` naming the family or depth when the name is not a valid network.
  """
  from bpcp_jax.families import ResNet
  from bpcp_jax.families.spec import dense_spec, parse_model_name

  family, depth = parse_model_name(name)
  return ResNet(spec=dense_spec(family, depth, num_classes), **module_kwargs)


def model_from_spec(spec: "ArchSpec", **module_kwargs) -> "ResNet":
  """The network of a (possibly pruned) spec, e.g. one restored from a checkpoint."""
  from bpcp_jax.families import ResNet

  return ResNet(spec=spec, **module_kwargs)


__all__ = sorted([*_WHERE, "create_model", "model_from_spec"])


def __getattr__(name: str) -> Any:
  """The public name ``name``, imported from its module on first use (then cached here)."""
  if name in _WHERE:
    value = getattr(importlib.import_module(_WHERE[name]), name)
  elif name in _SUBPACKAGES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__, *_SUBPACKAGES})
