"""Orbax checkpoints of the train state and the data iterator: periodic saves, resume, clean preemption.

A step's checkpoint holds two items: ``default``, the train state (``StandardSave``), and ``data``,
the state of the training batches' Grain iterator (``grain.checkpoint.CheckpointSave``, one small
JSON file per process), so that a resumed run reads exactly the batches an uninterrupted one would.
Readers of the weights (evaluation, inference, export, fine-tuning) read ``default`` alone.

Orbax writes each step to a temporary directory and renames it only once complete, so an
interrupted save is never listed as the latest step; ``latest_step`` and ``restore`` only ever see
finished checkpoints. A finished checkpoint can still be damaged later (a disk or bucket error):
:func:`restore_newest_intact` then falls back to the newest checkpoint that restores, and moves the
damaged ones aside (never deletes them) to ``<checkpoints>.corrupt/<step>``.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import os
import time
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "default"  # the train state (the item a single-item manager reads)
DATA_ITEM = "data"  # the training iterator's state (grain)


class CheckpointError(RuntimeError):
    """No checkpoint in a directory can be restored (each one's reason is reported before)."""


def resolve(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: local paths made absolute, URLs (``gs://...``) kept as they are."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def make_manager(directory: str | os.PathLike, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``directory`` (local or ``gs://``; saves are triggered by the trainer)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(resolve(directory), options=options, item_names=(STATE_ITEM, DATA_ITEM))


def has_iterator_state(iterator: Any) -> bool:
    """Whether ``iterator`` can be checkpointed (a ``grain.DatasetIterator``, or any with get/set_state)."""
    return callable(getattr(iterator, "get_state", None)) and callable(getattr(iterator, "set_state", None))


def save(manager: ocp.CheckpointManager, step: int, state: Any, metadata: Optional[dict] = None,
         data_iterator: Any = None) -> None:
    """Saves ``state`` (and ``data_iterator``'s position) at ``step``, asynchronously.

    Call ``manager.wait_until_finished()`` to block. The iterator's state is taken now, in this
    thread. ``metadata`` (JSON-serialisable, :mod:`softnce.checkpoint_metadata`) is stored with the
    step in orbax's step metadata (``custom_metadata``), written atomically with the checkpoint.
    """
    custom = None if metadata is None else {METADATA_KEY: metadata}
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if has_iterator_state(data_iterator):
        items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True, custom_metadata=custom)


def raise_if_save_failed(manager: ocp.CheckpointManager) -> None:
    """Raises the error of a finished asynchronous save that failed (e.g. a full disk); never blocks.

    The trainer calls it after every step, so a failed save ends the run within a step of failing
    instead of at the next save, possibly hours later.
    """
    if not manager.is_saving_in_progress():
        manager.wait_until_finished()  # returns at once; raises the background save's error, if any


METADATA_KEY = "softnce"  # the key of :func:`save`'s metadata in orbax's custom_metadata


def step_dir(directory: str | os.PathLike, step: int) -> epath.Path:
    """The directory of checkpoint ``step`` in a checkpoint directory (``<directory>/<step>``)."""
    return resolve(directory) / str(step)


def read_only_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for reading the trainer's checkpoints in ``directory`` (evaluation, inference).

    It never creates the directory and is never asked to save (orbax's ``read_only`` option would
    log three warnings each time).
    """
    return ocp.CheckpointManager(resolve(directory), item_handlers=ocp.StandardCheckpointHandler(),
                                 options=ocp.CheckpointManagerOptions(create=False))


def saved_metadata(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
    """The ``metadata`` that :func:`save` stored with ``step``, or ``None`` (a checkpoint saved without it)."""
    try:
        custom = manager.metadata(step).custom_metadata or {}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return custom.get(METADATA_KEY)


def _split_variables(variables: dict) -> dict:
    """A model's variables ``{'params', **model_state}`` as the train state stores them: ``{'params',
    'model_state'}`` (``model_state`` only when the model has state)."""
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return {"params": variables["params"], **({"model_state": model_state} if model_state else {})}


def restore_variables_only(directory: str | os.PathLike, step: int, abstract_variables: dict) -> dict:
    """Only the model's variables (``params`` and its state, e.g. ``batch_stats``) of the trainer checkpoint
    ``step`` in ``directory``, into ``abstract_variables``.

    ``abstract_variables`` is the variables' ``jax.eval_shape`` with the wanted shardings (e.g. replicated
    over a mesh of any size, or one device): the optimiser state is not read, and the checkpoint may
    come from any device or process count.
    """
    item = step_dir(directory, step) / "default"
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _split_variables(abstract_variables))
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
    return {"params": restored["params"], **restored.get("model_state", {})}


def restore(manager: ocp.CheckpointManager, target: Any, step: Optional[int] = None,
            data_iterator: Any = None) -> tuple[Any, bool]:
    """Restores the checkpoint at ``step`` (default: latest) into the structure/shardings of ``target``.

    ``target`` may be a concrete state or its ``jax.eval_shape``; arrays come back with the
    shardings of ``target`` (replicated over the mesh for the trainer's state). ``data_iterator``
    is set to the saved position when the step holds one for this process.

    Returns:
      ``(state, iterator_restored)``: ``iterator_restored`` is False when the step holds no
      iterator state for this process (saved by a plain iterator, or by another process count); the
      caller then restarts its iterator at the step.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {manager.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract)}
    with_iterator = has_iterator_state(data_iterator) and _iterator_state_file(manager, step).exists()
    if with_iterator:
        items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))[STATE_ITEM], with_iterator


def _iterator_state_file(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Where grain's handler keeps this process's iterator state in checkpoint ``step``."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return epath.Path(manager.directory) / str(step) / DATA_ITEM / name


def corrupt_dir(manager: ocp.CheckpointManager) -> epath.Path:
    """Where damaged checkpoints of ``manager`` are moved: the sibling ``<directory>.corrupt``."""
    directory = epath.Path(manager.directory)
    return directory.parent / f"{directory.name}.corrupt"


def restore_newest_intact(
    manager: ocp.CheckpointManager,
    target: Any,
    *,
    log: Callable[[str], None] = print,
    is_chief: bool = True,
    sync: Callable[[str], None] = lambda name: None,
    data_iterator: Any = None,
) -> tuple[Any, int, bool]:
    """Restores the newest checkpoint that can be restored, newest first.

    Each checkpoint that fails is reported in one line (step and reason). If an older one then
    restores, the newer damaged ones are moved to :func:`corrupt_dir` (by process 0, after
    ``sync``) and ``manager`` is reloaded, so that later saves do not collide with them. If none
    restores, nothing is moved and one :class:`CheckpointError` names the directory.

    Returns:
      ``(state, step, iterator_restored)`` (see :func:`restore`).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {manager.directory}.")
    failed: list[int] = []
    for step in steps:
        try:
            state, iterator_restored = restore(manager, target, step, data_iterator)
        except Exception as error:  # noqa: BLE001  (any failure to read a step means: try an older one)
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            log(f"checkpoint at step {step} in {manager.directory} could not be restored ({reason[:300]})")
            failed.append(step)
            continue
        if failed:
            _move_aside(manager, failed, is_chief=is_chief, sync=sync, log=log)
        return state, step, iterator_restored
    raise CheckpointError(
        f"no checkpoint in {manager.directory} can be restored (tried steps {', '.join(map(str, steps))}; "
        "the reasons are above). Move or delete that directory to start the run from scratch, or restore "
        "an intact copy of it."
    )


def _move_aside(manager: ocp.CheckpointManager, steps: list[int], *, is_chief: bool, sync, log) -> None:
    """Moves the checkpoints of ``steps`` into :func:`corrupt_dir` and reloads ``manager``."""
    directory = epath.Path(manager.directory)
    sync("softnce_checkpoint_fallback_before_move")
    target_dir = corrupt_dir(manager)
    if is_chief:
        target_dir.mkdir(parents=True, exist_ok=True)
        for step in steps:
            destination = target_dir / str(step)
            if destination.exists():
                destination = target_dir / f"{step}.{int(time.time())}"
            (directory / str(step)).rename(destination)
            log(f"moved the damaged checkpoint of step {step} to {destination}")
    sync("softnce_checkpoint_fallback_after_move")
    manager.reload()


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


def restore_variables(path: str | os.PathLike, target_variables: dict) -> dict:
    """Loads only the model's variables (``params`` and its state) of the latest step in a trainer checkpoint
    directory (``.../checkpoints``), as ``target_variables``' shapes and dtypes.

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
    saved = restore_on_this_host(manager, step)
    variables = {"params": saved["params"], **(saved.get("model_state") or {})}
    return jax.tree.map(lambda t, x: jax.numpy.asarray(x, t.dtype).reshape(t.shape), target_variables, variables)
