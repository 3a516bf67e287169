"""Orbax checkpoints of the train state: periodic saves, resume from the latest, clean preemption.

Orbax writes each step to a temporary directory and renames it only once complete, so an
interrupted save is never listed as the latest step; ``latest_step`` and ``restore`` only ever see
finished checkpoints.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


def resolve(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: local paths made absolute, URLs (``gs://...``) kept as they are."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def make_manager(directory: str | os.PathLike, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``directory`` (local or ``gs://``; saves are triggered by the trainer)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(resolve(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves ``state`` at ``step`` (asynchronously; call ``manager.wait_until_finished()`` to block)."""
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(manager: ocp.CheckpointManager, target: Any, step: Optional[int] = None) -> Any:
    """Restores the checkpoint at ``step`` (default: latest) into the structure/shardings of ``target``.

    ``target`` may be a concrete state or its ``jax.eval_shape``; arrays come back with the
    shardings of ``target`` (replicated over the mesh for the trainer's state).
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {manager.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_on_this_host(manager: ocp.CheckpointManager, step: Optional[int] = None) -> Any:
    """The whole saved tree of ``step`` (default: latest) on this process's first device.

    Works whatever topology saved it (e.g. a 2-process run read by one process): where the stored
    shardings name devices this process does not have, a single-device sharding is used.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {manager.directory}.")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return manager.restore(step, args=ocp.args.StandardRestore(fallback_sharding=device))


def restore_params(path: str | os.PathLike, target_params: Any) -> Any:
    """Loads only the ``params`` of the latest step in a trainer checkpoint directory (``.../checkpoints``).

    Used to start a new run from an earlier run's weights (``config.init.checkpoint``).
    """
    path = resolve(path)
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"config.init.checkpoint='{path}' holds no finished checkpoint; give the 'checkpoints' "
            "directory inside an earlier run's workdir."
        )
    params = restore_on_this_host(manager, step)["params"]
    return jax.tree.map(lambda t, x: jax.numpy.asarray(x, t.dtype).reshape(t.shape), target_params, params)
