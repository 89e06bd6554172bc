"""Trained weights from outside a run: a flax msgpack file or an orbax checkpoint, checked against a network.

``load_weights(path, like)`` reads the variables a user saved from their own training and returns
them in the structure of ``like`` (the network's freshly initialised variables, ``{"params": ...,
"batch_stats": ...}``), so a run can start from them instead of pretraining. Accepted: a linen
variables dict or its ``params`` alone (``flax.serialization.to_bytes(variables)``, or an orbax
checkpoint of it), a bpcp_jax stage checkpoint, and an NNX module's state as users save it: an
orbax ``ocp.StandardCheckpointer().save(path, nnx.state(model))`` (or the state ``nnx.split(model)``
gives, whole or filtered to ``nnx.Param``), or the msgpack of ``nnx.state(model).to_pure_dict()``.
An NNX state holds each variable under its module path, without a collection, each found in
``like`` by that path; its RNG streams (``key``/``count``) are ignored. Everything that does not fit
is an error naming the file and the first variable that differs, with both shapes.
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

  The file may hold the whole variables dict, the ``params`` alone, or an NNX module's state (see
  the module docstring); a collection of ``like`` the file has nothing of (e.g. fresh BatchNorm
  statistics when only the parameters were saved) is kept from ``like``. Extra entries of a
  bpcp_jax stage checkpoint (optimizer state, step) are ignored. Raises ``WeightsError`` naming
  ``path`` and the first missing, unexpected or differently shaped variable (``params['head']['bias']``).
  """
  tree = _read(path)
  if not isinstance(tree, Mapping):
    raise WeightsError(f"init_from: {path} holds a {type(tree).__name__}, not a tree of variables")
  refs = {col: _flatten_like(ref) for col, ref in like.items()}
  found, extra = {}, []
  stored = _flatten(tree)
  sample = "/".join(next(iter(stored), ("(nothing)",)))
  if isinstance(tree.get("params"), Mapping):  # a variables dict (or a stage checkpoint)
    for col in like:
      got, more = _match(_flatten(tree[col]) if isinstance(tree.get(col), Mapping) else {}, {col: refs[col]})
      found[col] = got[col]
      extra += [_name(col, p) for p in more]
  else:  # a bare parameter tree or an NNX state: each variable found by its path alone
    found, more = _match(stored, refs)
    extra = ["/".join(_unwrapped(p)) for p in more]
  out = {}
  for col, ref in like.items():
    if not found[col] and col != "params":
      out[col] = ref
      continue
    out[col] = _fit(found[col], ref, refs[col], path, col, sample)
  if extra:
    raise WeightsError(f"init_from: {path} has variable {extra[0]} that the network does not have"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  return out


def _flatten(tree, prefix: tuple = ()) -> dict:
  """``{("blocks", "0", "kernel"): leaf}`` of a tree of mappings and lists (keys as strings)."""
  if isinstance(tree, Mapping):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(_flatten(v, prefix + (str(k),)))
  return out


def _flatten_like(ref) -> dict:
  """``_flatten`` of the network's variables, in the leaf order of ``jax.tree_util``."""
  leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
  return {tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p): x for p, x in leaves}


def _name(col: str, p: tuple) -> str:
  return col + "".join(f"[{k!r}]" for k in p)


_WRAPPERS = ("value", "raw_value")  # an NNX Variable saved by orbax: {"kernel": {"value": array}}


def _match(flat: Mapping, refs: Mapping) -> tuple[dict, list]:
  """``({col: {var path: stored leaf}}, unknown paths)``: the stored leaves ``flat`` assigned to the
  variables of ``refs`` (``{col: {var path: leaf}}``) by path, a trailing ``value`` of an NNX
  Variable dropped; an NNX RNG stream's ``key``/``count`` is skipped."""
  where = {p: col for col, ref in refs.items() for p in ref}
  rng_streams = {p[:-1] for p in map(_unwrapped, flat) if p[-1:] == ("key",)} & \
      {p[:-1] for p in map(_unwrapped, flat) if p[-1:] == ("count",)}
  out: dict = {col: {} for col in refs}
  extra = []
  for p, leaf in flat.items():
    q = p if p in where else _unwrapped(p)
    if q in where:
      out[where[q]][q] = leaf
    elif not (q[:-1] in rng_streams and q[-1] in ("key", "count")) and not _is_key(leaf):
      extra.append(p)
  return out, sorted(extra)


def _unwrapped(p: tuple) -> tuple:
  return p[:-1] if len(p) > 1 and p[-1] in _WRAPPERS else p


def _is_key(leaf) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _fit(found: Mapping, ref, flat_ref: Mapping, path: str, col: str, sample: str):
  for p, x in flat_ref.items():
    if p not in found:
      have = next(iter(found), None)
      raise WeightsError(f"init_from: {path} has no variable {_name(col, p)} (shape {tuple(np.shape(x))}) that "
                         f"the network needs; it has e.g. {_name(col, have) if have else sample}")
    got = found[p]
    if tuple(np.shape(got)) != tuple(np.shape(x)):
      raise WeightsError(f"init_from: {path}: variable {_name(col, p)} has shape {tuple(np.shape(got))}, "
                         f"the network's has shape {tuple(np.shape(x))}")
  leaves = [np.asarray(found[p], dtype=np.asarray(x).dtype) for p, x in flat_ref.items()]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(ref), leaves)
