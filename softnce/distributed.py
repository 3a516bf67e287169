"""Distributed set-up: multi-host initialisation, the data-parallel mesh, and global batches.

One mesh axis, ``'data'``, over all devices of all processes. Each process feeds its own share of
the global batch; ``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from softnce.cli import check_process_args

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several" (Cloud TPU pods are detected by
# jax itself; SLURM / Open MPI / explicit coordinator variables cover GPU nodes).
_MULTIPROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> None:
    """Calls ``jax.distributed.initialize`` when this is a multi-process job; a no-op otherwise.

    With explicit arguments (e.g. two processes on one machine) they are passed through; without,
    JAX auto-detects Cloud TPU pods, SLURM and Open MPI. A single process without any of these
    environments skips initialisation, so the same entry point runs on a laptop.

    Raises:
      ValueError: only some of the explicit arguments are given (see :func:`softnce.cli.check_process_args`).
    """
    check_process_args(coordinator_address, num_processes, process_id)
    if coordinator_address is not None:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
        return
    tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") not in ("", "localhost")
    if tpu_pod or any(int(os.environ.get(v, "0") or 0) > 1 for v in _MULTIPROCESS_ENV[:2]) or (
        "JAX_COORDINATOR_ADDRESS" in os.environ
    ):
        jax.distributed.initialize()


def coordination_client():
    """The client of JAX's coordination service (its key-value store and barriers), or ``None`` on a
    single process. JAX has no public accessor for it; orbax reads it the same way."""
    if not jax.distributed.is_initialized():
        return None
    from jax._src import distributed

    return distributed.global_state.client


def make_mesh(devices=None) -> Mesh:
    """A one-axis mesh ``('data',)`` over all devices (Auto axes, as ``shard_map`` expects)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "config.data.batch_size") -> int:
    """Checks that ``global_batch`` divides over devices and processes; returns the per-process share."""
    num_devices = mesh.devices.size
    if global_batch <= 0 or global_batch % num_devices:
        from softnce.config_checks import ConfigError

        raise ConfigError(
            f"{what}={global_batch} does not divide over the {num_devices} devices of the mesh; "
            f"use a multiple of {num_devices} (e.g. {max(1, global_batch // num_devices) * num_devices})."
        )
    return global_batch // jax.process_count()


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Assembles each process's share ``{key: [B_local, ...]}`` into global arrays sharded on 'data'."""
    sharding = data_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
