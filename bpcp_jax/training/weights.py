"""Trained weights from outside a run: a flax msgpack file or an orbax checkpoint, checked against a network.

``load_weights(path, like)`` reads the variables a user saved from their own training
(``flax.serialization.to_bytes(variables)``, or an orbax checkpoint of the variables or of a
bpcp_jax stage) and returns them in the structure of ``like`` (the network's freshly
initialised variables), so a run can start from them instead of pretraining. Everything that
does not fit is an error naming the file and the first variable that differs, with both shapes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import jax
import numpy as np


class WeightsError(ValueError):
  """Weights that cannot be read or do not fit the network; the message names the file and variable."""


def _read(path: str) -> Mapping[str, Any]:
  if not os.path.exists(path):
    raise WeightsError(f"init_from: no such file or directory: {path}")
  if os.path.isdir(path):
    return _read_orbax(path)
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return flax.serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several kinds of errors on a file of another format
    raise WeightsError(f"init_from: {path} is not a flax msgpack file (flax.serialization.to_bytes) "
                       f"nor an orbax checkpoint directory: {type(e).__name__}: {e}") from e


def _read_orbax(path: str) -> Mapping[str, Any]:
  import orbax.checkpoint as ocp

  from bpcp_jax.training.checkpoint import CheckpointError, StageCheckpoints

  try:  # a bpcp_jax stage directory, or any CheckpointManager directory with a "state" item
    ckpt = StageCheckpoints(path, read_only=True)
    try:
      if ckpt.latest_step() is not None:
        tree, _ = ckpt.restore_raw()
        return tree
    finally:
      ckpt.close()
  except (CheckpointError, KeyError, ValueError, FileNotFoundError):
    pass
  try:  # a plain PyTree checkpoint (ocp.StandardCheckpointer().save(path, variables))
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))
  except Exception as e:
    raise WeightsError(f"init_from: could not read the orbax checkpoint {path}: {type(e).__name__}: {e}") from e


def load_weights(path: str, like: Mapping[str, Any]) -> dict[str, Any]:
  """The variables stored at ``path``, in the structure of ``like`` (``{"params": ..., ...}``).

  The file may hold the whole variables dict, or the ``params`` alone (then ``like``'s other
  collections, e.g. fresh BatchNorm statistics, are kept). Extra entries of a bpcp_jax stage
  checkpoint (optimizer state, step) are ignored. Raises ``WeightsError`` naming ``path`` and
  the first missing, unexpected or differently shaped variable.
  """
  tree = dict(_read(path))
  if "params" not in tree:  # a bare parameter tree
    tree = {"params": tree}
  out = {}
  for col, ref in like.items():
    if col not in tree:
      if col == "params":
        raise WeightsError(f"init_from: {path} holds no 'params'")
      out[col] = ref
      continue
    out[col] = _fit(tree[col], ref, path, col)
  return out


def _fit(stored, ref, path: str, prefix: str):
  flat_ref = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(ref)[0]}
  flat_got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
  for key, x in flat_ref.items():
    if key not in flat_got:
      raise WeightsError(f"init_from: {path} has no variable {prefix}{key} (shape {tuple(np.shape(x))}) that "
                         f"the network needs; it has e.g. {prefix}{next(iter(flat_got), '(nothing)')}")
    got = flat_got[key]
    if tuple(np.shape(got)) != tuple(np.shape(x)):
      raise WeightsError(f"init_from: {path}: variable {prefix}{key} has shape {tuple(np.shape(got))}, "
                         f"the network's has shape {tuple(np.shape(x))}")
  extra = sorted(set(flat_got) - set(flat_ref))
  if extra:
    raise WeightsError(f"init_from: {path} has variable {prefix}{extra[0]} that the network does not have"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  leaves = [np.asarray(flat_got[jax.tree_util.keystr(p)], dtype=np.asarray(x).dtype)
            for p, x in jax.tree_util.tree_flatten_with_path(ref)[0]]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(ref), leaves)
