"""Training metrics as TensorBoard event files, written without TensorFlow (tensorboardX).

``tensorboard --logdir runs/`` shows them: one ``events.out.tfevents.*`` file per run directory,
written by process 0 only; the other processes get a writer that drops every value.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import os
from typing import Mapping, Optional

from tensorboardX import SummaryWriter


class MetricWriter:
    """Scalars per step into ``logdir`` (``None``: a writer that writes nothing, for processes > 0)."""

    def __init__(self, logdir: Optional[str]):
        # flush_secs: the background flush of tensorboardX; flush() also forces one.
        self._writer = None if logdir is None else SummaryWriter(logdir=os.fspath(logdir), flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Adds ``scalars`` (name -> number) at ``step``."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` of every scalar in the event files of ``logdir`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(os.fspath(logdir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}
