"""A step watchdog: a run whose train steps stop finishing exits non-zero instead of hanging.

On a pod, one stuck process (alive, but never entering a collective) blocks every other process
inside that collective forever, and JAX has no timeout for it. The watchdog is a daemon thread that
the training loop feeds with :meth:`StepWatchdog.step_finished` each time a train step is known to
be complete. If no step finishes within the timeout, it prints one line with the last finished
step, the elapsed time and the process index, and ends the process (and every other process of
the job) with exit code :data:`WATCHDOG_EXIT_CODE` through :func:`softnce.failures.exit_run`, from
its own thread (the main thread may be blocked inside XLA), so that the scheduler restarts the job
from its last checkpoint.

Timeout: ``config.step_timeout_s`` if set; otherwise automatic, ``max(10 x the median step time,
AUTO_MIN_TIMEOUT_S)`` once :data:`AUTO_MIN_SAMPLES` step times have been measured. The clock
never runs during compilation (it is armed by the first finished step, after the step program has
compiled), and phases that may compile or legitimately take long (evaluation, checkpointing,
temperature fitting) run inside :meth:`StepWatchdog.paused`.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from typing import Callable, Optional

from softnce import failures

WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", i.e. restart from the last checkpoint
AUTO_FACTOR = 10.0
AUTO_MIN_TIMEOUT_S = 60.0
AUTO_MIN_SAMPLES = 10


class StepWatchdog:
    """Watches train-step completions from a daemon thread (use as a context manager).

    Args:
      timeout_s: fixed timeout in seconds, or ``None`` for the automatic one (see module doc).
      process_index: printed in the message.
      exit_fn: called with the message and the exit code on a timeout (default
        :func:`softnce.failures.exit_run`: one line, and every process of the job exits; tests may replace it).
      poll_s: how often the thread looks at the clock.
    """

    def __init__(self, timeout_s: Optional[float], *, process_index: int = 0,
                 exit_fn: Optional[Callable[[str, int], None]] = None, poll_s: float = 0.5):
        self.fixed_timeout = timeout_s
        self.process_index = process_index
        self.exit_fn = exit_fn or failures.exit_run
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._last_step: Optional[int] = None
        self._last_time: Optional[float] = None  # None: not armed (compiling, or paused)
        self._durations: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="softnce-step-watchdog", daemon=True)

    # -- the loop's side --------------------------------------------------------------------------
    def step_finished(self, step: int) -> None:
        """Records that train step ``step`` is complete (arms the watchdog on the first call)."""
        now = time.monotonic()
        with self._lock:
            if self._last_time is not None and self._last_step is not None and step > self._last_step:
                self._durations.append((now - self._last_time) / (step - self._last_step))
                del self._durations[:-1000]
            self._last_step, self._last_time = step, now

    @contextlib.contextmanager
    def paused(self):
        """Stops the clock inside the block (evaluation, saving); it restarts at the block's end."""
        with self._lock:
            armed = self._last_time is not None
            self._last_time = None
        try:
            yield
        finally:
            with self._lock:
                if armed:
                    self._last_time = time.monotonic()

    def timeout(self) -> Optional[float]:
        """The timeout now in force (``None`` while the automatic one has too few samples)."""
        if self.fixed_timeout is not None:
            return float(self.fixed_timeout)
        with self._lock:
            if len(self._durations) < AUTO_MIN_SAMPLES:
                return None
            median = statistics.median(self._durations)
        return max(AUTO_FACTOR * median, AUTO_MIN_TIMEOUT_S)

    # -- the thread -------------------------------------------------------------------------------
    def __enter__(self) -> "StepWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.poll_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            timeout = self.timeout()
            with self._lock:
                last_time, last_step = self._last_time, self._last_step
            if timeout is None or last_time is None:
                continue
            elapsed = time.monotonic() - last_time
            if elapsed > timeout:
                self.exit_fn(
                    f"watchdog: no train step finished for {elapsed:.1f} s (timeout {timeout:.1f} s) after step "
                    f"{last_step} on process {self.process_index}; exiting with code {WATCHDOG_EXIT_CODE} so that "
                    "the job restarts from its last checkpoint (config.step_timeout_s sets the timeout).",
                    WATCHDOG_EXIT_CODE,
                )
                return
