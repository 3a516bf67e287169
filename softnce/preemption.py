"""Preemption: SIGTERM becomes a checkpoint at one step that every process agrees on, then exit 0.

A scheduler preempts a job by sending SIGTERM to its processes (to all of them, to some, at any
moment: inside a step, a collective, start-up or a checkpoint save), then SIGKILL after a grace
period (about 30 s on Cloud TPU and most clusters). The training loop asks :meth:`Preemption.requested`
once per train step, with the step's number, and saves and stops at the first step it answers True.

- **One process.** A Python SIGTERM handler sets a flag; the loop stops after the step in flight.
- **Several processes** (``jax.distributed`` initialised). JAX's preemption service owns SIGTERM:
  its handler, in C++, works while Python is blocked inside XLA. The first SIGTERM on any process
  is reported to the coordination service, which tells every process; each sends the number of
  the latest step it asked about, and all agree on ``max + 1``, the next step that none has
  started. Every process sees ``requested`` True at that same step, saves that step and exits 0.
  A SIGTERM to only some of the processes therefore stops the whole job in the same way (nothing
  is lost, and the relaunch resumes from the agreed step); further SIGTERMs change nothing. The
  counters are the train steps themselves, as orbax's ``CheckpointManager`` (which asks the same
  service while saving) passes them.
- **During start-up.** :func:`catch_early_sigterm` (called first thing by ``softnce.main``) keeps a
  SIGTERM that arrives before ``jax.distributed.initialize`` and hands it on to JAX's handler. The
  loop then asks once about the step it starts from, and a notice that reached the service before
  that (restoring, compiling) is agreed on by all processes with one all-gather: they all stop
  after the loop's first step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

_early_sigterm = threading.Event()


def _record_early_sigterm(signum, frame) -> None:
    del signum, frame
    _early_sigterm.set()


def catch_early_sigterm() -> None:
    """Keeps a SIGTERM received from now until the training loop starts (see the module docstring)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _record_early_sigterm)


class Preemption:
    """SIGTERM as a stop request checked once per train step (a context manager around the loop).

    Args:
      start_step: the step the loop starts from (the state's step): its first step is ``start_step + 1``.
    """

    _NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # where JAX's preemption service records a SIGTERM

    def __init__(self, start_step: int):
        self.start_step = start_step
        self._flag = threading.Event()
        self._old_handler: Optional[object] = None
        self._installed = False
        self._stop_at_first_step = False
        self.coordinated = False

    def __enter__(self) -> "Preemption":
        import jax

        self.coordinated = jax.distributed.is_initialized()
        if self.coordinated:
            # jax.distributed.initialize installed JAX's own handler (replacing catch_early_sigterm's):
            # a SIGTERM that came before is sent again, now to JAX's handler.
            if _early_sigterm.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
            self._agree_on_an_early_notice()
        elif threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
            if _early_sigterm.is_set():
                self._flag.set()
        return self

    def _agree_on_an_early_notice(self) -> None:
        """Asks about ``start_step`` (so that a notice from now on gives ``start_step + 1``), then stops
        at the first step on every process if any process sees a notice that came before."""
        import numpy as np
        from jax.experimental import multihost_utils

        from softnce import distributed

        multihost_utils.reached_preemption_sync_point(self.start_step)
        try:
            seen = distributed.coordination_client().key_value_try_get(self._NOTICE_KEY) is not None
        except Exception:  # noqa: BLE001  (NOT_FOUND: no notice yet)
            seen = False
        self._stop_at_first_step = bool(np.any(multihost_utils.process_allgather(np.asarray(seen))))

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._flag.set()

    def requested(self, step: int) -> bool:
        """Whether to save and stop after train step ``step``.

        On several processes every process must call this at every step of the loop, in order.
        """
        if self.coordinated:
            from jax.experimental import multihost_utils

            reached = multihost_utils.reached_preemption_sync_point(step)
            return reached or (self._stop_at_first_step and step == self.start_step + 1)
        return self._flag.is_set()

    def __exit__(self, *exc) -> None:
        _early_sigterm.clear()
        if self._installed:
            signal.signal(signal.SIGTERM, self._old_handler if self._old_handler is not None else signal.SIG_DFL)
            self._installed = False
