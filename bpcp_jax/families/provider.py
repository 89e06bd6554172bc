"""The ResNet families as a ``PrunableNetwork``: the reference provider.

Everything is declared: the spec lists the blocks and the width of every channel group, the
layer table says which layer reads and writes which group, and ``ResNet`` applies masks and
gates itself. The pipeline's numerics for these networks are exactly the original code's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from bpcp_jax.families.counting import count_params_macs
from bpcp_jax.families.materialize import materialize
from bpcp_jax.families.resnet import ResNet
from bpcp_jax.families.spec import ArchSpec, dense_spec, parse_model_name
from bpcp_jax.families.structure import group_widths
from bpcp_jax.pruning.network import PrunableNetwork

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@functools.partial(jax.jit, static_argnames=("module", "input_shape"))
def _init_variables(module: ResNet, rng, input_shape: tuple) -> dict:
  """``module.init`` as one compiled program. Run op by op, a ResNet's initializers compile one
  random-number program per weight shape: 15 s for ResNet-v2-20 on the 2-core CPU, every process;
  compiled once, the persistent compilation cache (``run/compile_cache.py``) serves later processes.
  The values are the op-by-op ones: bit for bit with the Flax initializers, within float32 rounding
  (at most 1.2e-7) with ``init_style="original"`` (compared on ResNet-v1-8, v2-20, v1-bottleneck-11)."""
  return module.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)


@dataclasses.dataclass(eq=False)
class FamilyNetwork(PrunableNetwork):
  """A network of one of the ResNet families at a (possibly pruned) ``spec``."""

  spec: ArchSpec
  dtype: str = "float32"
  init_style: str = "flax"
  image_size: int = 32

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"config key 'dtype' must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    self.input_shape = (self.image_size, self.image_size, 3)
    self.label = _label(self.spec)

  @classmethod
  def create(cls, name: str, num_classes: int, **kw) -> "FamilyNetwork":
    """The dense network ``name`` (``"resnet_v2_56"``...); ``ValueError`` names a bad family or depth."""
    return cls(dense_spec(*parse_model_name(name), num_classes), **kw)

  @classmethod
  def of(cls, model: ResNet, image_size: int = 32) -> "FamilyNetwork":
    """The provider of an existing ``ResNet`` module (its spec, dtype and init style) for
    ``image_size`` x ``image_size`` images (the module itself takes any size)."""
    dtype = next(k for k, v in DTYPES.items() if jnp.dtype(v) == jnp.dtype(model.dtype))
    return cls(model.spec, dtype=dtype, init_style=model.init_style, image_size=image_size)

  @classmethod
  def from_description(cls, desc: Mapping[str, Any], **options) -> "FamilyNetwork":
    kw = {k: desc[k] for k in ("dtype", "init_style") if k in desc}
    kw.update(options)
    return cls(ArchSpec.from_dict(desc["spec"]), **kw)

  def describe(self) -> dict[str, Any]:
    return {"kind": "family", "spec": self.spec.to_dict(), "dtype": self.dtype, "init_style": self.init_style}

  def module(self, axis_name: Optional[str] = None) -> ResNet:
    return ResNet(spec=self.spec, dtype=DTYPES[self.dtype], init_style=self.init_style, bn_axis_name=axis_name)

  # -- structure -----------------------------------------------------------------------------
  @property
  def block_names(self) -> list[str]:
    return self.spec.block_names()

  @property
  def group_widths(self) -> dict[str, int]:
    return group_widths(self.spec)

  def block_stages(self) -> list[list[str]]:
    return [[n for n in self.block_names if n.startswith(f"stage{si}_")] for si in range(len(self.spec.stages))]

  # -- computing -----------------------------------------------------------------------------
  def init(self, rng) -> dict:
    return dict(_init_variables(self.module(), rng, tuple(self.input_shape)))

  def apply(self, variables, x, *, train, masks=None, block_gates=None, rng=None, axis_name=None):
    model = self.module(axis_name if train else None)
    if not train:
      return model.apply(variables, x, train=False, masks=masks, block_gates=block_gates)
    logits, updates = model.apply(variables, x, train=True, masks=masks, block_gates=block_gates,
                                  mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  def block_io(self, variables, x) -> dict:
    _, state = self.module().apply(variables, x, train=False, mutable=["intermediates"])
    return {name: tuple(pair[0]) for name, pair in state.get("intermediates", {}).items()}

  # -- pruning -------------------------------------------------------------------------------
  def materialize(self, variables, masks, opt_state=None):
    out = materialize(self.module(), variables, masks, opt_state)
    small = dataclasses.replace(self, spec=out[0].spec)
    return (small, *out[1:])

  def channel_importance(self, variables, criterion, *, reduce="max", key=None, masks=None):
    from bpcp_jax.pruning.channel_prune import channel_importance

    return channel_importance(self.module(), variables, criterion, masks=masks, reduce=reduce, key=key)

  def select_channels(self, scores, prune_ratio, *, masks=None, **select_kwargs):
    from bpcp_jax.pruning.channel_prune import select_channels

    return select_channels(self.module(), scores, prune_ratio, masks=masks, **select_kwargs)

  def select_speed(self, variables, *, criterion, reduce, key, **kwargs):
    from bpcp_jax.pruning.speed_select import select_resnet

    return select_resnet(self.module(), variables, criterion=criterion, reduce=reduce, key=key,
                         image_size=self.image_size, **kwargs)

  def zero_pruned(self, variables, masks):
    from bpcp_jax.pruning.channel_prune import zero_pruned_filters

    return zero_pruned_filters(self.module(), variables, masks)

  # -- measuring and deploying --------------------------------------------------------------
  def counts(self, variables=None) -> dict[str, int]:
    c = count_params_macs(self.spec, self.image_size)
    return {"params": c["params"], "macs": c["macs"], "blocks": c["blocks"]}

  def deployable(self) -> ResNet:
    return self.module()


def _label(spec: ArchSpec) -> str:
  return f"{spec.family}_{spec.dense_depth}"
