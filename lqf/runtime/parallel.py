"""Data parallelism with JAX's own sharding, on one host or many.

Every trainer runs its jitted step on a one-axis device mesh (`"data"`): the batch is
split along its first axis over the devices and the weights and optimiser state are
replicated. XLA inserts the cross-device sums (gradients, batch-norm statistics,
K-FAC's curvature factors), so a step computes the same function of the *global* batch
whatever the number of devices; only the order of float32 additions changes.

On several hosts (`jax.distributed`), the mesh spans every host's devices. Each host
computes the global batch's indices (a pure function of seed and step, see
`lqf.data.pipeline.batch_indices`) and feeds only its own rows.

The config block (`parallel`, in every job config; `config.parallel_config()`):
  devices: how many devices the mesh uses; 0 = all of them (on several hosts it must
    be all of them).
  distributed: start `jax.distributed` before anything else touches JAX.
  coordinator, num_processes, process_id: its arguments; empty/0/-1 lets JAX detect
    them from SLURM, Open MPI or a Cloud TPU slice (docs/CLUSTER.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from lqf.errors import UserError, require

PyTree = Any
AXIS = "data"


def check_config(p: Mapping[str, Any]) -> None:
  require(p["devices"] >= 0, f"parallel.devices must be ≥ 0 (0 = every device), got "
          f"{p['devices']}")
  require(p["num_processes"] >= 0, f"parallel.num_processes must be ≥ 0 (0 = detect), got "
          f"{p['num_processes']}")


_STARTED = False


def initialize(p: Mapping[str, Any]) -> None:
  """Starts `jax.distributed` when `p.distributed` (once per process)."""
  global _STARTED
  if not p["distributed"] or _STARTED:
    return
  kwargs = {}
  if p["coordinator"]:
    kwargs["coordinator_address"] = p["coordinator"]
  if p["num_processes"] > 0:
    kwargs["num_processes"] = int(p["num_processes"])
  if p["process_id"] >= 0:
    kwargs["process_id"] = int(p["process_id"])
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    raise UserError(f"jax.distributed could not start ({e}): set parallel.coordinator, "
                    "parallel.num_processes and parallel.process_id, or launch under SLURM / "
                    "a TPU slice (see docs/CLUSTER.md)") from None
  _STARTED = True


def make_mesh(devices: int = 0) -> Mesh:
  """A one-axis mesh over the first `devices` devices (0 = all, on every host)."""
  available = jax.devices()
  n = len(available) if devices == 0 else int(devices)
  require(1 <= n <= len(available), f"parallel.devices={devices} but this run sees "
          f"{len(available)} device(s): set --config.parallel.devices to at most "
          f"{len(available)} (0 = all)")
  require(jax.process_count() == 1 or n == len(available),
          f"a run on {jax.process_count()} hosts must use every device: set "
          "--config.parallel.devices=0")
  return Mesh(np.asarray(available[:n]), (AXIS,))


def mesh_for(cfg: Mapping[str, Any]) -> Mesh | None:
  """The mesh of a job config's `parallel` block, after starting `jax.distributed` when
  asked; None (the default device, no sharding) for one device on one host."""
  p = cfg.get("parallel") or {"devices": 1, "distributed": False, "num_processes": 0}
  check_config(p)
  initialize(p)
  if int(p["devices"]) == 1 and jax.process_count() == 1:
    return None
  return make_mesh(int(p["devices"]))


def check_batch(batch_size: int, mesh: Mesh, what: str) -> None:
  """A global batch must split evenly over the devices (each device gets B / n rows)."""
  require(batch_size % mesh.size == 0,
          f"{what} is {batch_size}, which does not split over the {mesh.size} devices: "
          f"make it a multiple of {mesh.size} or set --config.parallel.devices")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Every leaf copied onto every device of the mesh."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x)), tree)


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """A global batch (every leaf [B, ...], the same on every host) split along its rows.

  On several hosts each one hands over only the rows its own devices hold.
  """
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def local(x):
    x = np.asarray(x)
    rows = len(x) // jax.process_count()
    start = jax.process_index() * rows
    return jax.make_array_from_process_local_data(sharding, x[start:start + rows], x.shape)

  return jax.tree.map(local, tree)


def to_host(tree: PyTree) -> PyTree:
  """Every leaf as a whole numpy array on this host (for evaluation and export): a
  replicated array's local copy, a sharded one gathered (across hosts if need be)."""

  def host(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
      return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(host, tree)
