"""Training metrics as TensorBoard event files, written without TensorFlow (tensorboardX's record writer).

``tensorboard --logdir runs/`` shows them: one ``events.out.tfevents.*`` file per run directory,
written by process 0 only; the other processes get a writer that drops every value.

Events are written and flushed in the calling thread, once per :meth:`MetricWriter.write_scalars`
(the trainer calls it every ``config.log_every_steps``): there is no background writer thread, so
a write that fails (a full disk) raises ``OSError`` in the training loop, at the step that wrote it,
instead of killing a thread and losing every later value.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import os
import time
from typing import Mapping, Optional

from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2


class MetricWriter:
    """Scalars per step into ``logdir`` (``None``: a writer that writes nothing, for processes > 0)."""

    def __init__(self, logdir: Optional[str]):
        self._writer = None
        if logdir is not None:
            if "://" not in os.fspath(logdir):  # gs:// and s3:// need no directory
                os.makedirs(logdir, exist_ok=True)
            self._writer = EventsWriter(os.path.join(os.fspath(logdir), "events"))
            self._writer.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends ``scalars`` (name -> number) at ``step`` and flushes them to the file."""
        if self._writer is None:
            return
        wall_time = time.time()
        for name, value in scalars.items():
            event = event_pb2.Event(wall_time=wall_time, step=int(step),
                                    summary=tb_summary.scalar(name, float(value)))
            self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` of every scalar in the event files of ``logdir`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(os.fspath(logdir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}
