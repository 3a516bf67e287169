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
    else:
        tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") not in ("", "localhost")
        if tpu_pod or any(int(os.environ.get(v, "0") or 0) > 1 for v in _MULTIPROCESS_ENV[:2]) or (
            "JAX_COORDINATOR_ADDRESS" in os.environ
        ):
            jax.distributed.initialize()
    avoid_cached_cpu_collectives()


# jaxlib releases whose CPU executables, once loaded from the persistent compilation cache, hang in
# their first cross-process collective (gloo): every process waits in the collective, using no CPU.
# Found in 0.12.1 (0.10.2, 0.11.2 and 0.12.0 are not affected); newer releases count as affected until
# a run of `tests/test_multihost.py` with a warm cache shows otherwise (docs/running_at_scale.md).
FIRST_JAXLIB_WITH_CACHED_CPU_COLLECTIVES_HANG = (0, 12, 1)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def cached_cpu_collectives_hang(jaxlib_version: Optional[str] = None) -> bool:
    """Whether this jaxlib hangs cross-process CPU collectives of executables from the compilation cache."""
    if jaxlib_version is None:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    return _version_tuple(jaxlib_version) >= FIRST_JAXLIB_WITH_CACHED_CPU_COLLECTIVES_HANG


def avoid_cached_cpu_collectives() -> bool:
    """Turns JAX's persistent compilation cache off for a multi-process CPU job on an affected jaxlib.

    Every process then compiles its programs (as on a cold cache) and none reads an executable from
    the cache (see :data:`FIRST_JAXLIB_WITH_CACHED_CPU_COLLECTIVES_HANG`); an INFO log record says so
    (the run's output keeps its one-line promises). Returns whether the cache was turned off. Call
    after ``jax.distributed.initialize`` and before the first compilation.
    """
    if jax.process_count() == 1 or jax.devices()[0].platform != "cpu" or not cached_cpu_collectives_hang():
        return False
    if not jax.config.jax_enable_compilation_cache:
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    import jaxlib
    from absl import logging

    logging.info("softnce: the persistent compilation cache is off for this multi-process CPU run: with jaxlib %s, "
                 "executables loaded from it hang in their first collective across processes "
                 "(docs/running_at_scale.md).", jaxlib.__version__)
    return True


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
