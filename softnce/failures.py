"""How a run that cannot go on ends: one line on every process, a non-zero exit, nothing lost.

A training run can fail in ways that are nobody's bug: the disk fills up, another process of the
job dies, a loss turns non-finite, the data or the checkpoint is damaged, a step hangs. Each ends
the same way on the command line (``softnce.main``):

- **One line** on stderr, ``softnce: error: <what happened>; <what is kept and what to do>``, and
  no tracebacks: :func:`explain` turns the known causes into a :class:`RunFailure` whose message
  names the path, the free space, the step and the last complete checkpoint.
- **Every process stops.** On a multi-process job the failing process publishes its message in the
  coordination service's key-value store (:func:`exit_run`); a watcher thread on every other
  process (:func:`watch_for_failures`) prints the same line, acknowledges and exits with the same
  code, wherever its main thread is blocked (a collective waiting for the failed process, for
  instance). Process 0, which hosts the coordination service, waits for those acknowledgements
  (at most :data:`ACK_TIMEOUT_S`) and exits last, so no process sees the service vanish first.
  A checkpoint save that fails in orbax's background thread ends the job as soon as orbax logs it
  (:func:`end_job_on_failed_save`), before the other processes wait for it at orbax's barrier.
- **Exit without clean-up.** The process ends with ``os._exit`` after flushing its output: the
  background threads of orbax (an unfinished asynchronous save) and of JAX's distributed runtime
  (its shutdown barrier, which would wait for the failed process) are not run at interpreter
  shutdown, where they would print tracebacks or hang. Whatever is written before the failure
  stays written: an interrupted checkpoint save is left in orbax's temporary directory, which is
  never taken as a finished step, so the rerun resumes from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import threading
import traceback
from typing import NoReturn, Optional

from softnce.cli import PROG, one_line

EXIT_FAILURE = 1
ACK_TIMEOUT_S = 10.0
_POLL_MS = 500  # how often the watcher thread checks whether it should stop
_FAILURE_KEY = "softnce/failure"
_ACK_KEY = "softnce/failure_ack/"
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")
# tensorstore (orbax) names the file it failed to write as: Failed writing: "<path>" / local file "<path>".
_FAILED_PATH = re.compile(r'(?:Failed writing:|local file) "([^"]+)"')


class RunFailure(RuntimeError):
    """A run that cannot go on; its message is one line for the user (see the module docstring)."""


class OutOfSpaceError(RunFailure):
    """A write failed for lack of space (checkpoint, metadata, TensorBoard events, results)."""


class LostProcessError(RunFailure):
    """A collective failed: another process of the job stopped, or the network between them failed."""


class _BackgroundNoise(logging.Filter):
    """Drops the log records in which libraries report, from their own threads, what the run reports itself.

    orbax logs each failed part of an asynchronous save as an ERROR with its traceback (the trainer
    raises the same error at the next step, and :func:`explain` words it), and a WARNING each time
    a save is at JAX's preemption sync point (the trainer prints where it stopped); asyncio logs
    the futures of an aborted save as "exception was never retrieved".
    """

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        if "/orbax/" in path and (record.levelno >= logging.ERROR or "preemption sync point" in str(record.msg)):
            return False
        return not (record.name == "asyncio" and "never retrieved" in str(record.msg))


def quiet_background_errors() -> None:
    """Keeps library threads' reports of errors that the run reports itself off stderr (call once, in a CLI).

    Besides the log records of :class:`_BackgroundNoise`: exceptions that tensorstore's threads
    cannot hand to orbax's closed event loop after a failed save ("Event loop is closed"), which
    Python reports through ``sys.unraisablehook`` and ``threading.excepthook``.
    """
    noise = _BackgroundNoise()
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(noise)
    for name in ("absl", "asyncio"):  # records with no handler yet (Python's last-resort handler) too
        logging.getLogger(name).addFilter(noise)
    default_unraisable, default_thread_hook = sys.unraisablehook, threading.excepthook

    def unraisable(report):
        if not _is_closed_loop(report.exc_value):
            default_unraisable(report)

    def thread_hook(args):
        if not _is_closed_loop(args.exc_value):
            default_thread_hook(args)

    sys.unraisablehook, threading.excepthook = unraisable, thread_hook


def _is_closed_loop(error: Optional[BaseException]) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _causes(error: BaseException):
    """``error`` and the exceptions it was raised from or while handling, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def out_of_space_path(error: BaseException) -> Optional[str]:
    """The path a write failed on for lack of space (``''`` if unnamed), or ``None`` if ``error`` is another one."""
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE_ERRNOS:
            return os.fspath(cause.filename) if cause.filename else ""
        text = str(cause)
        if _NO_SPACE_TEXT.search(text):
            match = _FAILED_PATH.search(text)
            return match.group(1) if match else ""
    return None


def free_space(path: str) -> str:
    """The free space of the filesystem holding ``path`` (or its nearest existing parent), e.g. ``'12 kB'``."""
    directory = os.path.abspath(path or ".")
    while not os.path.exists(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000
    return "unknown"


def last_complete_checkpoint(ckpt_dir: str) -> str:
    """``'step N in <dir>'`` for the newest finished checkpoint in ``ckpt_dir``, or ``'none'``."""
    import orbax.checkpoint as ocp

    # A listing of finished step directories, not a CheckpointManager: on several processes that
    # would synchronise them, and a failing process must not wait for the others.
    try:
        latest = ocp.step.latest_step_metadata(ckpt_dir, ocp.step.standard_name_format())
    except OSError:  # no directory, or one that cannot be read: there is none to name
        latest = None
    return "none" if latest is None else f"step {latest.step} in {ckpt_dir}"


def _short(error: BaseException, limit: int = 200) -> str:
    text = one_line(f"{type(error).__name__}: {error}")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def explain(error: BaseException, ckpt_dir: str) -> BaseException:
    """A :class:`RunFailure` with a one-line message for the known causes of ``error``, else ``error``."""
    if isinstance(error, RunFailure):
        return error
    kept = f"the last complete checkpoint is {last_complete_checkpoint(ckpt_dir)}"
    path = out_of_space_path(error)
    if path is not None:
        step = re.search(r"/(\d+)\.orbax-checkpoint-tmp", path)
        # A write that fails at close names no file; every write of a run goes under its workdir.
        where = f" writing {path}" if path else f" holding {os.path.dirname(os.path.normpath(ckpt_dir))}"
        if step:  # a file deep inside orbax's temporary directory: name the checkpoint instead
            where = f" writing the checkpoint of step {step.group(1)} in {ckpt_dir}"
        return OutOfSpaceError(
            f"no space left on the device{where} ({free_space(path or ckpt_dir)} free); {kept}. "
            "Free some space (or lower config.max_checkpoints) and rerun the same command to resume."
        )
    import jax

    if jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError):
        return LostProcessError(
            f"a collective failed, so another process of this job stopped or the network failed "
            f"({_short(error)}); {kept}. Rerun the job (all processes) to resume."
        )
    return error


# --------------------------------------------------------------------------------------------------
# Every process stops: the failure message through the coordination service.
# --------------------------------------------------------------------------------------------------


def _client():
    from softnce import distributed

    return distributed.coordination_client()


def _exit_now(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Watcher(threading.Thread):
    """Waits for another process's failure message; prints it, acknowledges and exits with its code."""

    def __init__(self, client, process_index: int):
        super().__init__(name="softnce-failure-watcher", daemon=True)
        self.client, self.process_index = client, process_index
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                value = self.client.blocking_key_value_get(_FAILURE_KEY, _POLL_MS)
            except Exception as error:  # noqa: BLE001  (a timeout, or the service is gone)
                if self.stopping.is_set() or "DEADLINE_EXCEEDED" in str(error):
                    continue
                lost_job(str(error))
                return  # another thread of this process is ending it
            code, origin, message = value.split("|", 2)
            if self.stopping.is_set() or int(origin) == self.process_index:
                return  # this process is exiting already (its own failure, or its work is done)
            if not _claim_exit():
                return
            _print_error(f"process {origin}: {message}")
            _finish(self.client, self.process_index, int(code))


_watcher: Optional[_Watcher] = None
_exiting = threading.Event()  # this process is ending (exit_run or a failure message): report nothing more
_exit_lock = threading.Lock()


def _claim_exit() -> bool:
    """True for the first thread of this process that ends it; any later one must report nothing."""
    with _exit_lock:
        first = not _exiting.is_set()
        _exiting.set()
        return first


def _wait_for_the_exit() -> NoReturn:
    """Blocks a thread while the thread that claimed the exit ends the process."""
    while True:
        threading.Event().wait(3600)


def lost_job(reason: str) -> None:
    """Ends this process with one line when the coordination service's key-value store stops answering.

    (When process 0, which hosts the service, dies, JAX's runtime usually ends the other processes
    first, with its own message: see "What happens on resume, stop and failure" in the README.)
    """
    if not _claim_exit():
        return
    _print_error(f"lost contact with the job: another process stopped, or process 0 (the coordination "
                 f"service) is gone ({_short(RuntimeError(reason), 160)}); rerun the job (all processes) "
                 "to resume from its last complete checkpoint.")
    _exit_now(EXIT_FAILURE)


def watch_for_failures() -> None:
    """Starts the watcher thread on a multi-process job (a no-op on one process); see the module docstring."""
    global _watcher
    client = _client()
    if client is None or _watcher is not None:
        return
    import jax

    _watcher = _Watcher(client, jax.process_index())
    _watcher.start()


def stop_watching() -> None:
    """Stops the watcher before a normal exit (call on every process once they all finished their work)."""
    global _watcher
    watcher, _watcher = _watcher, None
    if watcher is not None:
        watcher.stopping.set()
        if watcher is not threading.current_thread():
            # Wait for its key-value poll (at most _POLL_MS) to return: a daemon thread still inside
            # a C++ call when the interpreter shuts down aborts the process ("exception not rethrown").
            watcher.join(timeout=5 * _POLL_MS / 1000)


def all_finished(timeout_s: float = 3600.0) -> None:
    """Waits until every process has finished its work, then stops the watcher (a no-op on one process).

    Until every process is here, one of them may still fail and need the others to stop with it.
    """
    client = _client()
    if client is not None:
        client.wait_at_barrier("softnce/all_finished", int(timeout_s * 1000))
    stop_watching()


class _FailedSaveWatch(logging.Filter):
    """Ends the job when orbax logs that a background save failed here (see :func:`end_job_on_failed_save`)."""

    def __init__(self, ckpt_dir: str):
        super().__init__()
        self.ckpt_dir = ckpt_dir

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and "/orbax/" in record.pathname.replace(os.sep, "/"):
            exit_run(str(explain(record.exc_info[1], self.ckpt_dir)))
        return True


@contextlib.contextmanager
def end_job_on_failed_save(ckpt_dir: str):
    """On several processes: a checkpoint save that fails in orbax's background thread ends the job at once.

    The failing process skips the barrier at which the others wait for its part of the save, so
    they would wait for orbax's barrier timeout (minutes), and so would it, at the next barrier of
    the save. orbax logs the failure (an ERROR with the exception) from its thread as it happens:
    that record ends the job through :func:`exit_run`, with the message of :func:`explain`. A no-op
    on one process, where the trainer raises the error within a step (``raise_if_save_failed``).
    """
    if _client() is None:
        yield
        return
    watch, logger = _FailedSaveWatch(ckpt_dir), logging.getLogger("absl")  # orbax logs through absl
    # First among the logger's filters: a logger stops at the first filter that rejects a record, and
    # quiet_background_errors drops these very records (the job would then hang at orbax's barrier).
    logger.filters.insert(0, watch)
    try:
        yield
    finally:
        logger.removeFilter(watch)


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)


def _finish(client, process_index: int, code: int) -> NoReturn:
    """Acknowledges (processes > 0) or waits for every acknowledgement (process 0), then exits with ``code``."""
    import jax

    try:
        if process_index:
            client.key_value_set(f"{_ACK_KEY}{process_index}", "1")
        else:
            for other in range(1, jax.process_count()):
                client.blocking_key_value_get(f"{_ACK_KEY}{other}", int(ACK_TIMEOUT_S * 1000))
    except Exception:  # noqa: BLE001  (a process that is gone cannot acknowledge; exit all the same)
        pass
    _exit_now(code)


def exit_run(message: str, code: int = EXIT_FAILURE, *, error: Optional[BaseException] = None) -> NoReturn:
    """Ends this process (and, on a multi-process job, every other one) after printing ``message`` in one line.

    ``error``, if given, is an unexpected exception (a bug to report): its traceback is printed first.
    """
    if not _claim_exit():  # another thread of this process is ending it already (with its own message)
        _wait_for_the_exit()
    if error is not None:
        traceback.print_exception(error)
    _print_error(message)
    client = _client()
    if client is None:
        _exit_now(code)
    import jax

    stop_watching()
    try:
        client.key_value_set(_FAILURE_KEY, f"{code}|{jax.process_index()}|{one_line(message)}")
    except Exception:  # noqa: BLE001  (another process failed first, or the service is gone)
        pass
    _finish(client, jax.process_index(), code)
