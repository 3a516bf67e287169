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
- **During a hang.** A stop needs the loop to reach the agreed step, which a stuck step or
  collective never lets it do. A daemon thread (:class:`_StopDeadline`) sees the SIGTERM wherever
  the main thread is blocked (JAX's notice in the coordination service on several processes; the
  signal's wakeup file descriptor on one) and, if the stop step is not reached within
  :data:`STOP_BOUND_S` of it (of the loop's start, for a SIGTERM that came during start-up), ends
  every process with one line and :data:`STOPPED_UNSAVED_EXIT_CODE` through
  :func:`softnce.failures.exit_run`. Nothing is saved from the stuck state: the relaunch resumes from
  the last complete checkpoint. The bound leaves time for the exit (at most
  :data:`softnce.failures.ACK_TIMEOUT_S` more) within a 30 s grace period.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Optional

STOP_BOUND_S = 15.0  # from the SIGTERM to the agreed stop step; then the stuck run exits unsaved
STOPPED_UNSAVED_EXIT_CODE = 143  # 128 + SIGTERM: what a process killed by the signal reports
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # where JAX's preemption service records a SIGTERM
_POLL_S = 0.5

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
      ckpt_dir: named, with its last complete checkpoint, when a stuck run exits unsaved.
      bound_s: the time allowed from a SIGTERM to the stop step (:data:`STOP_BOUND_S`).
    """

    def __init__(self, start_step: int, *, ckpt_dir: Optional[str] = None, bound_s: float = STOP_BOUND_S):
        self.start_step = start_step
        self._flag = threading.Event()
        self._old_handler: Optional[object] = None
        self._installed = False
        self._stop_at_first_step = False
        self.coordinated = False
        self._deadline = _StopDeadline(ckpt_dir, bound_s)

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
        self._deadline.start_watching(self.coordinated, early=_early_sigterm.is_set() or self._stop_at_first_step)
        return self

    def _agree_on_an_early_notice(self) -> None:
        """Asks about ``start_step`` (so that a notice from now on gives ``start_step + 1``), then stops
        at the first step on every process if any process sees a notice that came before."""
        import numpy as np
        from jax.experimental import multihost_utils

        from softnce import distributed

        multihost_utils.reached_preemption_sync_point(self.start_step)
        try:
            seen = distributed.coordination_client().key_value_try_get(_NOTICE_KEY) is not None
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
            stop = reached or (self._stop_at_first_step and step == self.start_step + 1)
        else:
            stop = self._flag.is_set()
        if stop:
            self._deadline.reached.set()
        return stop

    def __exit__(self, *exc) -> None:
        self._deadline.stop_watching()
        _early_sigterm.clear()
        if self._installed:
            signal.signal(signal.SIGTERM, self._old_handler if self._old_handler is not None else signal.SIG_DFL)
            self._installed = False


class _StopDeadline:
    """Ends a run that received SIGTERM but does not reach its stop step within ``bound_s`` (see the module doc)."""

    def __init__(self, ckpt_dir: Optional[str], bound_s: float):
        self.ckpt_dir, self.bound_s = ckpt_dir, bound_s
        self.reached = threading.Event()  # the loop is at the stop step (or has left)
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wakeup: Optional[tuple[int, int]] = None  # (read end, the wakeup fd it replaced), one process

    def start_watching(self, coordinated: bool, *, early: bool) -> None:
        if not coordinated:
            if threading.current_thread() is not threading.main_thread():
                return  # signals reach only the main thread's handlers: nothing to watch
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            self._wakeup = (read_end, signal.set_wakeup_fd(write_end, warn_on_full_buffer=False))
        self._thread = threading.Thread(target=self._run, args=(coordinated, early), daemon=True,
                                        name="softnce-stop-deadline")
        self._thread.start()

    def stop_watching(self) -> None:
        self.reached.set()
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=4 * _POLL_S)  # its coordination-service poll returns within _POLL_S
        if self._wakeup is not None:
            read_end, previous = self._wakeup
            os.close(signal.set_wakeup_fd(previous))
            os.close(read_end)
            self._wakeup = None

    def _signalled(self, coordinated: bool) -> bool:
        """Waits at most ``_POLL_S`` for a SIGTERM; whether one has come."""
        if coordinated:
            from softnce import distributed

            try:
                distributed.coordination_client().blocking_key_value_get(_NOTICE_KEY, int(_POLL_S * 1000))
                return True
            except Exception as error:  # noqa: BLE001  (no notice yet; a lost service is softnce.failures' to report)
                if "DEADLINE_EXCEEDED" not in str(error):
                    self._stopping.wait(_POLL_S)
                return False
        read_end = self._wakeup[0]
        if not select.select([read_end], [], [], _POLL_S)[0]:
            return False
        return signal.SIGTERM in os.read(read_end, 512)

    def _run(self, coordinated: bool, early: bool) -> None:
        signalled = early
        while not signalled:
            if self._stopping.is_set():
                return
            signalled = self._signalled(coordinated)
        if self.reached.wait(self.bound_s):  # stop_watching sets it too
            return
        from softnce import failures

        kept = "" if self.ckpt_dir is None else f" ({failures.last_complete_checkpoint(self.ckpt_dir)})"
        failures.exit_run(
            f"stopping for SIGTERM: the stop step was not reached within {self.bound_s:.0f} s, so a step or a "
            f"collective is stuck; exiting with code {STOPPED_UNSAVED_EXIT_CODE} without saving. Rerun the same "
            f"command to resume from the last complete checkpoint{kept}.",
            STOPPED_UNSAVED_EXIT_CODE,
        )
