"""A step watchdog: a run whose train steps stop finishing exits non-zero instead of hanging.

On a pod, one stuck process (alive, but never entering a collective) blocks every other process
inside that collective forever, and JAX has no timeout for it. The watchdog is a daemon thread that
the training loop feeds: :meth:`StepWatchdog.dispatched` when a train step has been compiled and
dispatched, :meth:`StepWatchdog.step_finished` when it is known to be complete. If no step finishes
within the limit, it prints one line naming the phase (compiling the train step, the first step, or
step N), the elapsed time and the process index, and ends the process (and every other process of
the job) with exit code :data:`WATCHDOG_EXIT_CODE` through :func:`softnce.failures.exit_run`, from
its own thread (the main thread may be blocked inside XLA), so that the scheduler restarts the job
from its last complete checkpoint (nothing is saved from the stuck state).

The clock runs from the start of the loop, so a hang in the very first step (or in its
compilation) is reported too. Limits:

- ``config.step_timeout_s``, if set, for every step, the first one and its compilation included;
- otherwise automatic: :data:`FIRST_STEP_TIMEOUT_S` (10 minutes: compilation, the first step, and
  every step until :data:`AUTO_MIN_SAMPLES` step times have been measured), then
  ``max(10 x the median step time, AUTO_MIN_TIMEOUT_S)``.

Phases that may compile or legitimately take long (evaluation, checkpointing, temperature fitting)
run inside :meth:`StepWatchdog.paused`, which stops the clock.
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
FIRST_STEP_TIMEOUT_S = 600.0  # the automatic limit until steps have been timed (compilation included)


class StepWatchdog:
    """Watches train-step completions from a daemon thread (use as a context manager around the loop).

    Args:
      timeout_s: fixed limit in seconds, or ``None`` for the automatic one (see the module docstring).
      process_index: printed in the message.
      exit_fn: called with the message and the exit code on a timeout (default
        :func:`softnce.failures.exit_run`: one line, and every process of the job exits; tests may replace it).
      poll_s: how often the thread looks at the clock.
      first_step_timeout_s: the automatic limit before steps have been timed.
    """

    def __init__(self, timeout_s: Optional[float], *, process_index: int = 0,
                 exit_fn: Optional[Callable[[str, int], None]] = None, poll_s: float = 0.5,
                 first_step_timeout_s: float = FIRST_STEP_TIMEOUT_S):
        self.fixed_timeout = timeout_s
        self.first_step_timeout = first_step_timeout_s
        self.process_index = process_index
        self.exit_fn = exit_fn or failures.exit_run
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._last_step: Optional[int] = None  # the last finished step (None: none yet)
        self._dispatched: Optional[int] = None  # the last dispatched step (None: the first is compiling)
        self._last_time: Optional[float] = None  # when the clock started; None while paused or stopped
        self._durations: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="softnce-step-watchdog", daemon=True)

    # -- the loop's side --------------------------------------------------------------------------
    def dispatched(self, step: int) -> None:
        """Records that train step ``step`` was compiled (if it had to be) and dispatched."""
        with self._lock:
            self._dispatched = step

    def step_finished(self, step: int) -> None:
        """Records that train step ``step`` is complete (restarts the clock)."""
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
            self._last_time = None
        try:
            yield
        finally:
            with self._lock:
                self._last_time = time.monotonic()

    def timeout(self) -> float:
        """The limit now in force (see the module docstring)."""
        if self.fixed_timeout is not None:
            return float(self.fixed_timeout)
        with self._lock:
            if len(self._durations) < AUTO_MIN_SAMPLES:
                return self.first_step_timeout
            median = statistics.median(self._durations)
        return max(AUTO_FACTOR * median, AUTO_MIN_TIMEOUT_S)

    def phase(self) -> str:
        """What the loop is waiting for: ``'compiling the train step'``, ``'the first step (step N)'`` or
        ``'step N'``."""
        with self._lock:
            last, dispatched = self._last_step, self._dispatched
        if last is None:
            return "compiling the train step" if dispatched is None else f"the first step (step {dispatched})"
        return f"step {last + 1}"

    # -- the thread -------------------------------------------------------------------------------
    def __enter__(self) -> "StepWatchdog":
        self._last_time = time.monotonic()
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
            if last_time is None:
                continue
            elapsed = time.monotonic() - last_time
            if elapsed > timeout:
                finished = "no step had finished" if last_step is None else f"the last finished step is {last_step}"
                self.exit_fn(
                    f"watchdog: stuck in {self.phase()} on process {self.process_index}: nothing finished for "
                    f"{elapsed:.1f} s (limit {timeout:.1f} s; {finished}); exiting with code {WATCHDOG_EXIT_CODE} so "
                    "that the job restarts from its last complete checkpoint (config.step_timeout_s sets the limit).",
                    WATCHDOG_EXIT_CODE,
                )
                return
