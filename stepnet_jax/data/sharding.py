"""Data parallelism with ``jax.sharding``: one mesh over every device, batches split along it.

* ``mesh()``: all devices of all hosts on one ``'data'`` axis.
* Batches are sharded along their leading axis (``batch_sharding``); parameters,
  batch statistics and optimizer state are replicated (``replicated``). The train step
  is jitted with these as explicit in/out shardings, so XLA inserts the gradient and
  BatchNorm all-reduces itself: a 4-device step computes the 1-device step on the same
  global batch (tested).
* Every host reads only its own slice of each global batch (``local_rows``) and the
  global array is assembled with ``jax.make_array_from_process_local_data``.
* ``initialize()`` starts ``jax.distributed`` when a cluster environment is present
  (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or what
  ``jax.distributed.initialize()`` detects itself: SLURM, Open MPI, TPU pods).

Nothing here assumes a backend: on one CPU device every sharding is the default placement.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepnet_jax.config import SettingsError

DATA = 'data'
_CLUSTER_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE')


def initialize() -> bool:
  """Starts multi-host JAX when a cluster environment is present (once); True if it did."""
  if not any(os.environ.get(v) for v in _CLUSTER_VARIABLES) or jax.distributed.is_initialized():
    return False
  given = {
    key: int(os.environ[var])
    for key, var in (('num_processes', 'JAX_NUM_PROCESSES'), ('process_id', 'JAX_PROCESS_ID'))
    if os.environ.get(var)
  }
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts (ignored by GPU/TPU)
  jax.distributed.initialize(**given)  # the coordinator from JAX_COORDINATOR_ADDRESS, the rest detected
  return True


@functools.lru_cache(maxsize=1)
def mesh() -> Mesh:
  """Every device of every host on the ``'data'`` axis."""
  return Mesh(np.asarray(jax.devices()), (DATA,))


def batch_sharding() -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh(), PartitionSpec(DATA))


def replicated() -> NamedSharding:
  """The sharding that keeps a full copy on every device (parameters, optimizer state)."""
  return NamedSharding(mesh(), PartitionSpec())


def num_devices() -> int:
  """Devices in the mesh, over all hosts."""
  return mesh().devices.size


def describe() -> str:
  """What a run logs at start: devices, hosts and the mesh."""
  return (
    f'{num_devices()} {jax.default_backend()} device(s) on {jax.process_count()} host(s); '
    f'mesh {DATA}={num_devices()} (batch sharded, parameters replicated)'
  )


def check_batch_size(batch_size: int, what: str = 'train.batch_size') -> None:
  """A global batch must split evenly over the devices: ``SettingsError`` naming both numbers."""
  if batch_size % num_devices():
    raise SettingsError(
      f'{what}={batch_size} does not divide by the {num_devices()} devices of the mesh; '
      f'use a multiple of {num_devices()}'
    )


def padded_size(n: int) -> int:
  """``n`` rounded up to a multiple of the device count (evaluation pads its last batch to it)."""
  d = num_devices()
  return -(-n // d) * d


def local_rows(global_size: int) -> slice:
  """The rows of a global batch this host reads (hosts split it in process order)."""
  per_host = global_size // jax.process_count()
  return slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)


def to_device(local: np.ndarray, global_size: int) -> jax.Array:
  """A global batch from this host's rows: sharded along the batch axis when it splits over
  the devices, otherwise (a batch that cannot be split) placed as is."""
  if num_devices() == 1:
    return jax.device_put(local)
  if global_size % num_devices():
    if jax.process_count() > 1:
      raise ValueError(
        f'a batch of {global_size} does not split over {num_devices()} devices on {jax.process_count()} hosts'
      )
    return jax.device_put(local)
  if jax.process_count() == 1:
    return jax.device_put(local, batch_sharding())
  return jax.make_array_from_process_local_data(batch_sharding(), local, (global_size,) + local.shape[1:])


def barrier(name: str) -> None:
  """Waits for every host (no-op on one). Hosts must read a workdir before any of them
  writes it: otherwise one sees what another just created, and their collective calls
  (Orbax's included) stop matching."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) array as one numpy array on every host."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
