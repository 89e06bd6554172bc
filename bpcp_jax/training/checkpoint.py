"""Orbax checkpoints for every stage; the architecture spec travels with the weights.

One ``CheckpointManager`` per stage directory (``<workdir>/checkpoints/<stage>``) keeps the
last few checkpoints and the best by test accuracy. Each checkpoint holds the whole
``TrainState`` (params, batch stats, optimizer state, gate logits, channel masks, step, PRNG
key) and a JSON ``meta`` item: the spec, the stage, the epoch, whether the stage is done. A
pruned network restores from its own checkpoint alone. Orbax writes to a temporary directory
and renames it at the end, so a process killed during a save leaves the previous checkpoints
readable.

A checkpoint damaged afterwards (a full disk, a copy cut short: truncated or emptied files,
garbled metadata, an empty step directory, missing files) is found by restoring it: what orbax
raises then is caught, the checkpoint is skipped with a ``CheckpointWarning`` naming its
directory, and the next older one is tried (``StageCheckpoints.restore_newest``). In a
writable stage directory the damaged step is moved aside to ``<step>.damaged`` so the run can
write that step again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from bpcp_jax.families.spec import ArchSpec

# What orbax raises for a checkpoint whose files cannot be read: truncated or garbled JSON
# (json.JSONDecodeError, UnicodeDecodeError), tensorstore read errors (ValueError), missing
# files (FileNotFoundError), an empty step directory (KeyError: "Available items: []"), JSON of
# the wrong shape (TypeError, AttributeError).
UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, OSError)
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used here: names the directory and what does not fit."""


class NonFiniteState(CheckpointError):
  """A state with NaN or Inf was about to be saved; nothing was written."""


class CheckpointWarning(UserWarning):
  """An unreadable checkpoint was skipped; the message names its directory."""


def _to_saveable(state) -> dict:
  return jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))


def _short(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _drop_closed_loop_callbacks() -> None:
  """Silence the echoes of a failed restore (installed once per process).

  When one read of a restore fails, orbax stops waiting while tensorstore still completes the
  restore's other reads: each completion either calls back into orbax's closed event loop
  (Python reports an unraisable ``RuntimeError('Event loop is closed')``) or leaves an asyncio
  task whose exception nobody retrieves (asyncio logs "Task exception was never retrieved" with
  a traceback): dozens of tracebacks for a checkpoint already reported. Exactly those are
  dropped; every other unraisable exception and log record goes on as before.
  """
  previous = sys.unraisablehook
  if not getattr(previous, "drops_closed_loop_callbacks", False):
    def hook(args):
      if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
        return
      previous(args)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _NoUnretrievedReadErrors) for f in logger.filters):
    logger.addFilter(_NoUnretrievedReadErrors())


class _NoUnretrievedReadErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for tensorstore read errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not str(record.msg).startswith("Task exception was never retrieved"):
      return True
    error = record.exc_info[1] if record.exc_info else None
    text = str(error) if error is not None else record.getMessage()
    return not (isinstance(error, UNREADABLE) or error is None) or not ("Error reading" in text or "Error opening" in text)


class _NoMissingMetricNotice(logging.Filter):
  """Drops orbax's "did not provide metrics" warning: a checkpoint without a test accuracy
  (mid-epoch, or an epoch without evaluation) is saved on purpose, at every such save."""

  MESSAGE = "Requested `tracked_metric`; did not provide metrics."

  def filter(self, record: logging.LogRecord) -> bool:
    return record.getMessage() != self.MESSAGE


def _quiet_missing_metric_notice() -> None:
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _NoMissingMetricNotice) for f in logger.filters):
    logger.addFilter(_NoMissingMetricNotice())


def _has_steps(path: str) -> bool:
  try:
    return any(name.isdigit() for name in os.listdir(path))
  except OSError:
    return False


def stage_dir_hint(directory: str) -> str:
  """``" (did you mean ...?)"`` naming stage checkpoint directories near ``directory``, or ``""``.

  A run directory or its ``checkpoints/`` folder given where a stage directory was meant, or
  a misspelt stage name, gets the ``<workdir>/checkpoints/<stage>`` directories that exist.
  """
  from bpcp_jax.run.config import STAGES

  directory = os.path.abspath(directory)
  roots = [os.path.join(directory, "checkpoints"), directory, os.path.dirname(directory)]
  found = []
  for root in roots:
    if os.path.isdir(root):
      names = sorted(os.listdir(root), key=lambda n: (STAGES.index(n) if n in STAGES else len(STAGES), n))
      found += [os.path.join(root, n) for n in names if _has_steps(os.path.join(root, n))]
    if found:
      break
  found = [f for f in dict.fromkeys(found) if f != directory]
  return f" (did you mean {' or '.join(found[:5])}?)" if found else ""


def _finish_before_interrupt(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` with Ctrl-C (SIGINT) held back until it returns, then delivered.

  Orbax writes a checkpoint with helper threads; interrupted half-way, they fail at interpreter
  exit with tracebacks, and the checkpoint is lost anyway. A save takes well under a second for
  these networks, so the interrupt waits for it: the checkpoint is complete, then the previous
  SIGINT handler runs (``KeyboardInterrupt``). Outside the main thread signals cannot be held.
  """
  if threading.current_thread() is not threading.main_thread():
    return fn(*args, **kwargs)
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
  try:
    return fn(*args, **kwargs)
  finally:
    signal.signal(signal.SIGINT, previous)
    if received:
      if callable(previous):
        previous(signal.SIGINT, received[0])
      elif previous == signal.SIG_DFL:
        raise KeyboardInterrupt


class StageCheckpoints:
  """Checkpoints of one stage: ``save`` after an epoch, ``restore_newest`` to resume."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self.max_to_keep = max_to_keep
    self.skipped: list[str] = []  # the unreadable checkpoints found so far (their directories)
    _drop_closed_loop_callbacks()
    _quiet_missing_metric_notice()
    try:
      self._manager = self._open() if read_only else self._open_writable()
    except (OSError, PermissionError) as e:
      raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from e

  def _open(self, read_only: Optional[bool] = None) -> ocp.CheckpointManager:
    read_only = self.read_only if read_only is None else read_only
    if read_only:  # nothing is saved or deleted: no preservation policy, no metrics read at opening
      options = ocp.CheckpointManagerOptions(create=False, read_only=True, lightweight_initialize=True,
                                             enable_async_checkpointing=False)
    else:
      policy = pp.AnyPreservationPolicy([
          pp.LatestN(self.max_to_keep),
          pp.BestN(get_metric_fn=lambda m: m["accuracy"], reverse=False, n=1, keep_checkpoints_without_metrics=False),
      ])
      options = ocp.CheckpointManagerOptions(
          preservation_policy=policy, best_fn=lambda m: m["accuracy"], best_mode="max", create=True,
          enable_async_checkpointing=False, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def _open_writable(self) -> ocp.CheckpointManager:
    """A writable manager; opening reads every step's metrics, so unreadable steps go aside first."""
    try:
      return self._open()
    except UNREADABLE as first:
      if isinstance(first, (FileNotFoundError, PermissionError)) or not os.path.isdir(self.directory):
        raise
      view = self._open(read_only=True)
      for step in sorted(view.all_steps(), reverse=True):
        try:
          view.metrics(step)
          self._restore_items(view, step, None)
        except UNREADABLE as e:
          self._skip(step, e)
      view.close()
      try:
        return self._open()
      except UNREADABLE as e:
        raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {_short(e)}") from e

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state, meta: dict[str, Any], metrics: Optional[dict[str, float]] = None) -> None:
    """Save ``state`` (host or device arrays; never a non-finite one) with its ``meta``."""
    tree = _to_saveable(state)
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
           if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(np.isfinite(x))]
    if bad:
      raise NonFiniteState(f"refusing to save a non-finite state in {self.directory} (e.g. {bad[0]})")
    try:
      _finish_before_interrupt(self._save, step, tree, meta, metrics)
    except (OSError, PermissionError) as e:
      raise CheckpointError(f"could not write a checkpoint in {self.directory}: {e}; "
                            "the previous checkpoints are untouched") from e

  def _save(self, step, tree, meta, metrics):
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                       metrics=metrics, force=True)
    self._manager.wait_until_finished()

  # -- reading ---------------------------------------------------------------------------------

  @staticmethod
  def _restore_meta(manager, step: int) -> dict[str, Any]:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict):
      raise TypeError(f"meta is a JSON {type(meta).__name__}, not an object")
    return meta

  @staticmethod
  def _restore_items(manager, step: int, target_state):
    """The state (into ``target_state``'s structure, or raw nested dicts when None) and the meta."""
    target = None if target_state is None else _to_saveable(target_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if not isinstance(meta, dict):
      raise TypeError(f"meta is a JSON {type(meta).__name__}, not an object")
    if target_state is None:
      return restored["state"], meta
    return flax.serialization.from_state_dict(target_state, restored["state"]), meta

  def _skip(self, step: int, error: BaseException) -> None:
    """Warn about an unreadable step; in a writable directory move it aside (process 0)."""
    path = self.step_dir(step)
    self.skipped.append(path)
    where = ""
    if not self.read_only and jax.process_index() == 0 and os.path.exists(path):
      aside, n = path + DAMAGED_SUFFIX, 1
      while os.path.exists(aside):
        n += 1
        aside = f"{path}{DAMAGED_SUFFIX}-{n}"
      os.rename(path, aside)
      where = f"; moved to {aside}"
    warnings.warn(CheckpointWarning(f"skipping unreadable checkpoint {path} ({_short(error)}){where}"), stacklevel=3)

  def _forget(self) -> None:
    """Re-read the directory after steps were moved aside."""
    if self.read_only:
      return
    self._manager.close()
    self._manager = self._open_writable()

  def restore_newest(self, target_state=None, check: Optional[Callable[[dict], None]] = None):
    """The newest checkpoint that restores: ``(state, meta, step)``, or None if none does.

    ``target_state`` gives the structure to restore into (None: nested dicts of arrays).
    ``check(meta)`` runs on each candidate's meta before its arrays are read; what it raises
    propagates (a checkpoint of another stage or architecture is an error, not damage). Every
    unreadable checkpoint on the way is skipped with a ``CheckpointWarning`` naming its directory
    (and, when writable, moved aside to ``<step>.damaged``).
    """
    found, moved = None, False
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self._restore_meta(self._manager, step)
      except UNREADABLE as e:
        self._skip(step, e)
        moved = True
        continue
      if check is not None:
        check(meta)
      try:
        state, meta = self._restore_items(self._manager, step, target_state)
      except UNREADABLE as e:
        self._skip(step, e)
        moved = True
        continue
      found = (state, meta, step)
      break
    if moved:
      self._forget()
    return found

  def _restore_step(self, step: Optional[int], target_state):
    if step is None:
      found = self.restore_newest(target_state)
      if found is None:
        raise CheckpointError(self.nothing_readable())
      return found[0], found[1]
    try:
      return self._restore_items(self._manager, step, target_state)
    except UNREADABLE as e:
      raise CheckpointError(f"checkpoint {self.step_dir(step)} cannot be read: {_short(e)}") from e

  def nothing_readable(self) -> str:
    """The message for a stage directory without a readable checkpoint."""
    if self.skipped:
      return f"no readable checkpoint in {self.directory}: every one is damaged ({', '.join(self.skipped)})"
    return f"no checkpoint in {self.directory}{stage_dir_hint(self.directory)}"

  def read_meta(self, step: Optional[int] = None) -> dict[str, Any]:
    if step is None:
      found = self.restore_newest()
      if found is None:
        raise CheckpointError(self.nothing_readable())
      return found[1]
    try:
      return self._restore_meta(self._manager, step)
    except UNREADABLE as e:
      raise CheckpointError(f"checkpoint {self.step_dir(step)} cannot be read: {_short(e)}") from e

  def restore(self, target_state, step: Optional[int] = None):
    """Restore into the structure of ``target_state`` (the newest readable step by default);
    returns ``(state, meta)``."""
    return self._restore_step(step, target_state)

  def restore_raw(self, step: Optional[int] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved tree as nested dicts of arrays, without knowing its structure in advance."""
    return self._restore_step(step, None)

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


def read_stage_checkpoint(directory: str, step: Optional[int] = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """The newest readable checkpoint of a stage directory (or ``step``): ``(tree, meta)``.

  Raises ``CheckpointError`` naming the directory when it does not exist, holds no checkpoint
  (suggesting the ``<workdir>/checkpoints/<stage>`` directories nearby), or only damaged ones.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory not found: {directory}{stage_dir_hint(directory)}")
  ckpt = StageCheckpoints(directory, read_only=True)
  try:
    if not ckpt.all_steps():
      raise CheckpointError(f"{os.path.abspath(directory)} holds no checkpoint{stage_dir_hint(directory)}")
    return ckpt.restore_raw(step)
  finally:
    ckpt.close()


def load_stage(directory: str, step: Optional[int] = None, **network_options):
  """A stage checkpoint alone as ``(PrunableNetwork, variables, meta)`` (any provider).

  ``directory`` is a stage directory (``<workdir>/checkpoints/<stage>``). The network description
  stored with the weights rebuilds the (possibly pruned) network; nothing of the dense network is
  needed. The newest readable checkpoint is used (damaged ones are skipped with a warning);
  ``CheckpointError`` names the directory when it is missing or unusable.
  """
  from bpcp_jax.pruning.network import network_from_description

  tree, meta = read_stage_checkpoint(directory, step)
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
  ``model.apply(variables, images)`` or ``bp.make_predictor(model, variables)``. For a ``flax.nnx``
  network ``model`` is its ``bp.NnxNetwork`` view; ``model.merge(variables)`` is the ``nnx.Module``.

  ``directory``: ``<workdir>/checkpoints/<stage>``; ``step``: a checkpoint step (default the newest
  readable one: damaged checkpoints are skipped with a warning).
  """
  network, variables, _ = load_stage(directory, step)
  return network.deployable(), variables
