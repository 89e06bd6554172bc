"""Materialization: masks in, a smaller ordinary network of the same family out.

Removed blocks disappear with all their parameters; every kept layer's kernel, BN scale, bias
and running statistics are sliced to the kept channels of the groups it reads and writes. The
optimizer state can be sliced the same way so training continues where it stopped. The result
holds no mask and no gate: it is ``ResNet(spec=smaller_spec)`` and runs without ``masks``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import optax

from bpcp_jax.pruning.masks import check_masks, init_masks, kept_indices, pruned_spec, take_kept
from bpcp_jax.families.resnet import ResNet
from bpcp_jax.families.structure import layer_table


def _slicer(spec, masks):
  """name -> function slicing that layer's parameter/statistic arrays to the kept channels."""
  idx = {g: kept_indices(m) for g, m in masks["channels"].items()}
  small = {layer.name for layer in layer_table(pruned_spec(spec, masks))}
  fns = {}
  for layer in layer_table(spec):
    if layer.name not in small:
      continue
    i_in = idx[layer.in_group] if layer.in_group is not None else None
    i_out = idx[layer.out_group] if layer.out_group is not None else None

    def fn(key, x, layer=layer, i_in=i_in, i_out=i_out):
      if layer.kind == "conv":  # kernel (k, k, in, out)
        return take_kept(x, (None, None, i_in, i_out))
      if layer.kind == "bn":  # scale, bias, mean, var: (C,)
        return take_kept(x, (i_out,))
      if key == "kernel":  # dense (in, out)
        return take_kept(x, (i_in, None))
      return x  # dense bias (classes)

    fns[layer.name] = fn
  return fns


def _slice_collection(tree: Mapping[str, Any], fns) -> dict[str, Any]:
  out = {}
  for name, leaves in tree.items():
    if name in fns:
      out[name] = {k: fns[name](k, v) for k, v in leaves.items()}
  return out


def _slice_like_params(state, params_keys, fns):
  """Slice every sub-tree of an optimizer state that mirrors the parameter dict."""
  if isinstance(state, Mapping) and set(state.keys()) == params_keys:
    return {name: {k: (v if isinstance(v, optax.MaskedNode) else fns[name](k, v)) for k, v in leaves.items()}
            for name, leaves in state.items() if name in fns}
  if isinstance(state, Mapping):
    return {k: _slice_like_params(v, params_keys, fns) for k, v in state.items()}
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    return type(state)(*(_slice_like_params(v, params_keys, fns) for v in state))
  if isinstance(state, (tuple, list)):
    return type(state)(_slice_like_params(v, params_keys, fns) for v in state)
  return state


def materialize(
    model: ResNet,
    variables: Mapping[str, Any],
    masks: Mapping[str, Any],
    opt_state: Optional[Any] = None,
):
  """Rebuild ``model`` without the removed blocks and channels.

  Returns ``(small_model, small_variables)``, or ``(small_model, small_variables,
  small_opt_state)`` when ``opt_state`` is given (any optax state whose sub-trees mirror
  ``variables["params"]``; gate-logit sub-trees keyed by block name are filtered to the kept
  blocks).
  """
  spec = model.spec
  check_masks(spec, masks)
  small_spec = pruned_spec(spec, masks)
  fns = _slicer(spec, masks)
  small_vars = {col: _slice_collection(tree, fns) for col, tree in variables.items()}
  small_model = dataclasses.replace(model, spec=small_spec, parent=None, name=None)
  if opt_state is None:
    return small_model, small_vars
  keys = set(variables["params"].keys())
  small_opt = _slice_like_params(opt_state, keys, fns)
  small_opt = _filter_block_trees(small_opt, set(spec.block_names()), set(small_spec.block_names()))
  return small_model, small_vars, small_opt


def _filter_block_trees(state, all_blocks, kept):
  """Gate-logit trees in the optimizer state: keep the entries of kept blocks only."""
  if isinstance(state, Mapping) and state and set(state.keys()) == all_blocks:
    return {k: v for k, v in state.items() if k in kept}
  if isinstance(state, Mapping):
    return {k: _filter_block_trees(v, all_blocks, kept) for k, v in state.items()}
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    return type(state)(*(_filter_block_trees(v, all_blocks, kept) for v in state))
  if isinstance(state, (tuple, list)):
    return type(state)(_filter_block_trees(v, all_blocks, kept) for v in state)
  return state


def materialize_masks(model: ResNet, masks: Mapping[str, Any]) -> dict[str, Any]:
  """The kept blocks' logits carried over to the materialized network, all channels kept."""
  small = init_masks(pruned_spec(model.spec, masks))
  small["blocks"] = {k: masks["blocks"][k] for k in small["blocks"]}
  return small
