"""A user module (``--import_modules=stuck_step``) whose loss makes a train step never finish.

``config.loss.name = "stuck_nll"`` is NLL, plus a host callback in every step that, on process
``$STUCK_PROCESS`` (default 1), sleeps for an hour from train step ``$STUCK_AFTER_STEPS + 1`` on
(default 0: the first step), after writing the file ``$STUCK_MARKER`` (if set). The other processes
then wait for it inside the step's collectives, as they would for a stuck process on a pod.
"""

import os
import threading
import time

import jax

from softnce import losses

_calls = []
_lock = threading.Lock()


def _maybe_stick(_):
    with _lock:
        _calls.append(1)
        step = (len(_calls) - 1) // jax.local_device_count() + 1  # one call per local device and step
    if jax.process_index() != int(os.environ.get("STUCK_PROCESS", "1")):
        return
    if step > int(os.environ.get("STUCK_AFTER_STEPS", "0")):
        marker = os.environ.get("STUCK_MARKER")
        if marker:
            with open(marker, "w") as f:
                f.write(str(step))
        time.sleep(3600)


@losses.register_loss("stuck_nll", reads_labels_only=True)
def stuck_nll(logits, inputs):
    jax.debug.callback(_maybe_stick, logits[0, 0])
    return losses.nll(logits, inputs.labels, where=inputs.where)
