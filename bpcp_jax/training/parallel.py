"""Where the pure steps meet the devices: pmap wrappers, replication, sharding, multi-host start.

The same code runs on one device and on many: the global batch is split across all local
devices (and across hosts, each host feeding its own devices), the steps are mapped with
``jax.pmap`` over the axis ``AXIS`` (or over the axis a network's own collectives name, e.g. a
``BatchNorm(axis_name="devices")``: ``step_axis``), and the old state's buffers are donated. Each wrapper is
guarded by ``chex.assert_max_traces`` so a silent recompilation fails loudly.
"""

from __future__ import annotations

import functools
import os

import chex
import jax
import numpy as np

from bpcp_jax.training import steps

AXIS = "batch"
DONATE = (0,)  # the train step's old state: its buffers are reused for the new one
# environment variables that announce a multi-process launch (any one is enough)
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> bool:
  """Join a multi-host run when the environment says so; returns whether it did.

  Set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on
  every host (or run under a cluster jax detects by itself, e.g. SLURM or a TPU pod).
  """
  if not any(os.environ.get(k) for k in _DISTRIBUTED_ENV):
    return False
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True


def local_sharding(axis: str = AXIS):
  """Leading axis split over this host's devices: how pmap wants its inputs. ``axis``: the name
  of the axis the step is mapped over (``step_axis``): pmap gives its outputs a sharding over an
  axis of that name, and inputs sharded over another name would compile the step again."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (axis,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def replicate(tree, axis: str = AXIS):
  """Copy a host pytree onto every local device (leading device axis named ``axis``)."""
  n, sharding = jax.local_device_count(), local_sharding(axis)
  return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)), sharding),
                      tree)


def unreplicate(tree):
  """The first device's copy, fetched to the host as numpy."""
  return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def shard_batch(batch, num_devices: int | None = None, axis: str = AXIS):
  """[B, ...] host arrays -> [devices, B / devices, ...] on the devices (an axis named ``axis``), for pmap."""
  from bpcp_jax.training.data import shard

  return jax.device_put(shard(batch, num_devices or jax.local_device_count()), local_sharding(axis))


def _guarded(fn, n: int):
  """``chex.assert_max_traces`` for one step instance (chex keys its counter on source and name,
  so each instance gets a name of its own)."""

  def step(*args):
    return fn(*args)

  step.__name__ = f"{fn.func.__name__}_{id(fn):x}"
  return chex.assert_max_traces(step, n=n)


def step_axis(network) -> str:
  """The axis name the steps of ``network`` are mapped over: the one its collectives use (a
  ``BatchNorm(axis_name=...)``: the network's ``axis_names``, found by tracing it), else ``AXIS``.
  Raises ``ValueError`` naming the axes when they are several (the steps map over one)."""
  names = tuple(getattr(network, "axis_names", ()) or ())
  if len(names) > 1:
    raise ValueError(f"{getattr(network, 'label', type(network).__name__)}: its collectives use the named axes "
                     f"{', '.join(map(repr, names))}; the training steps map over one axis of devices: give every "
                     "BatchNorm (every collective) the same axis_name")
  return names[0] if names else AXIS


def train_step_fn(network, tx, *, mode: str = "dense", gamma: float = 0.0, bn_l1: float = 0.0,
                  augment: bool = True, distill=None, axis_name=AXIS, gate_seed: int = 0):
  """``steps.train_step`` with its static arguments bound: ``(state, batch[, teacher_variables]) ->
  (state, metrics)``, the function ``parallel_train_step`` maps (tests/test_export.py lowers the
  same one for GPU and TPU)."""
  return functools.partial(steps.train_step, network=network, tx=tx, mode=mode, gamma=gamma, bn_l1=bn_l1,
                           augment=augment, axis_name=axis_name, distill=distill, gate_seed=gate_seed)


def eval_step_fn(network, axis_name=AXIS):
  """``steps.eval_step`` with its static arguments bound: ``(state, batch) -> sums``."""
  return functools.partial(steps.eval_step, network=network, axis_name=axis_name)


def parallel_train_step(network, tx, *, mode: str = "dense", gamma: float = 0.0, bn_l1: float = 0.0,
                        augment: bool = True, distill=None, max_traces: int = 1, gate_seed: int = 0):
  """``train_step`` mapped over the local devices, donating the old state. With ``distill`` the
  mapped step takes the replicated teacher variables as a third argument."""
  axis = step_axis(network)
  fn = train_step_fn(network, tx, mode=mode, gamma=gamma, bn_l1=bn_l1, augment=augment, distill=distill,
                     axis_name=axis, gate_seed=gate_seed)
  return jax.pmap(_guarded(fn, max_traces), axis_name=axis, donate_argnums=DONATE)


def parallel_eval_step(network, max_traces: int = 1):
  """``eval_step`` mapped over the local devices (over the axis ``step_axis(network)``)."""
  axis = step_axis(network)
  return jax.pmap(_guarded(eval_step_fn(network, axis_name=axis), max_traces), axis_name=axis)
