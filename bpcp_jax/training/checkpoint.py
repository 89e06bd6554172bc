"""Orbax checkpoints for every stage; the architecture spec travels with the weights.

One ``CheckpointManager`` per stage directory (``<workdir>/checkpoints/<stage>``) keeps the
last few checkpoints and the best by test accuracy. Each checkpoint holds the whole
``TrainState`` (params, batch stats, optimizer state, gate logits, channel masks, step, PRNG
key) and a JSON ``meta`` item: the spec, the stage, the epoch, whether the stage is done. A
pruned network restores from its own checkpoint alone. Orbax writes to a temporary directory
and renames it at the end, so a process killed during a save leaves the previous checkpoints
readable.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from bpcp_jax.families.spec import ArchSpec


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used here: names the directory and what does not fit."""


class NonFiniteState(CheckpointError):
  """A state with NaN or Inf was about to be saved; nothing was written."""


def _to_saveable(state) -> dict:
  return jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))


class StageCheckpoints:
  """Checkpoints of one stage: ``save`` after an epoch, ``restore`` the latest to resume."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(max_to_keep),
        pp.BestN(get_metric_fn=lambda m: m["accuracy"], reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda m: m["accuracy"], best_mode="max", create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta"))
    except (OSError, PermissionError) as e:
      raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from e

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def save(self, step: int, state, meta: dict[str, Any], metrics: Optional[dict[str, float]] = None) -> None:
    """Save ``state`` (host or device arrays; never a non-finite one) with its ``meta``."""
    tree = _to_saveable(state)
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
           if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(np.isfinite(x))]
    if bad:
      raise NonFiniteState(f"refusing to save a non-finite state in {self.directory} (e.g. {bad[0]})")
    try:
      self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
      self._manager.wait_until_finished()
    except (OSError, PermissionError) as e:
      raise CheckpointError(f"could not write a checkpoint in {self.directory}: {e}; "
                            "the previous checkpoints are untouched") from e

  def read_meta(self, step: Optional[int] = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, target_state, step: Optional[int] = None):
    """Restore into the structure of ``target_state``; returns ``(state, meta)``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    target = _to_saveable(target_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = flax.serialization.from_state_dict(target_state, restored["state"])
    return state, restored["meta"]

  def restore_raw(self, step: Optional[int] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved tree as nested dicts of arrays, without knowing its structure in advance."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def close(self):
    self._manager.close()


def spec_from_meta(meta: dict[str, Any], where: str = "checkpoint") -> ArchSpec:
  try:
    return ArchSpec.from_dict(meta["spec"])
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{where} has no usable architecture spec: {e}") from e


def network_meta(meta: dict[str, Any], key: str = "network", where: str = "checkpoint") -> dict[str, Any]:
  """The network description a checkpoint's meta holds under ``key`` (``"network"``, or
  ``"input_network"`` for the prune stage's input). Checkpoints written before user networks
  hold a family spec under ``"spec"`` / ``"input_spec"``: read as a family description."""
  if key in meta:
    return meta[key]
  legacy = {"network": "spec", "input_network": "input_spec"}[key]
  if legacy in meta:
    return {"kind": "family", "spec": meta[legacy]}
  raise CheckpointError(f"{where} has no network description (meta key {key!r}); it was not written by bpcp_jax")


def load_stage(directory: str, step: Optional[int] = None, **network_options):
  """A stage checkpoint alone as ``(PrunableNetwork, variables, meta)`` (any provider).

  ``directory`` is a stage directory (``<workdir>/checkpoints/<stage>``). The network description
  stored with the weights rebuilds the (possibly pruned) network; nothing of the dense network is
  needed. ``CheckpointError`` names the directory when it is missing or unusable.
  """
  from bpcp_jax.pruning.network import network_from_description

  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory not found: {directory}")
  ckpt = StageCheckpoints(directory, read_only=True)
  try:
    tree, meta = ckpt.restore_raw(step)
  finally:
    ckpt.close()
  desc = network_meta(meta, where=directory)
  try:
    network = network_from_description(desc, **network_options)
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{directory} holds a network description that cannot be rebuilt: {e}") from e
  variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
  return network, variables, meta


def load_network(directory: str, step: Optional[int] = None):
  """``(model, variables)`` of any stage checkpoint: the Flax module (a ResNet of the families, or
  the user's network, pruned as the checkpoint says) and its variables, ready for
  ``model.apply(variables, images)`` or ``bp.make_predictor(model, variables)``.

  ``directory``: ``<workdir>/checkpoints/<stage>``; ``step``: a checkpoint step (default the latest).
  """
  network, variables, _ = load_stage(directory, step)
  return network.deployable(), variables
