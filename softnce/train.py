"""The training loop: the train step of a config (:mod:`softnce.steps`, built by :mod:`softnce.assembly`)
over a one-axis device mesh, with evaluation, checkpoints, preemption and failure handling around it.

``train_and_evaluate(config, workdir)`` is the library entry point (``softnce.main`` is its CLI). It
is :func:`set_up` (config checks, mesh, data, state, restore) followed by :func:`train_loop`.

Start-up order: resume from the newest intact checkpoint in ``workdir/checkpoints`` (a damaged newer
one is reported and moved aside; the training batches' iterator restarts at its saved position),
else the params of ``config.init.checkpoint`` (an earlier run), else ``config.init.pretrained``
(converted MAE weights without the head), else from scratch.

Dispatch: at most ``config.max_steps_in_flight`` train steps are dispatched ahead of the host (1 on
CPU, 2 on accelerators by default), and nothing else with collectives is dispatched while a step is
in flight. With jax 0.10's XLA:CPU, steps of a program with collectives left to queue up behind each
other on simulated CPU devices stall in a collective rendezvous (``Termination timeout for all
gather``, exit 134) in most 8-device runs; one step in flight on CPU avoids it at no cost there.

Post-hoc calibration: at the end, one temperature ``t*`` is fitted on the validation split's NLL
(:func:`softnce.evaluation.fit_validation_temperature`; the test split is never used to fit anything),
and the test metrics are reported at ``t*`` too: ``t_star``, ``nll_calibrated``, ``ece_calibrated``.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import collections
import dataclasses
import functools
import json
import time
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from softnce import (
    assembly,
    checkpoint_metadata,
    checkpointing,
    distill,
    distributed,
    evaluation,
    failures,
    preemption,
    steps,
)
from softnce.config_checks import ConfigError
from softnce.data.base import Batch, Dataset
from softnce.metric_writer import MetricWriter
from softnce.watchdog import StepWatchdog

# --------------------------------------------------------------------------------------------------
# Set-up: config checks, the state, the prior, restore.
# --------------------------------------------------------------------------------------------------


def max_steps_in_flight(config: ml_collections.ConfigDict) -> int:
    """``config.max_steps_in_flight``, or 1 on CPU and 2 on accelerators (see the module docstring)."""
    configured = config.get("max_steps_in_flight")
    if configured is not None:
        return int(configured)
    return 1 if jax.default_backend() == "cpu" else 2


@dataclasses.dataclass
class Run:
    """Everything :func:`train_loop` needs, made by :func:`set_up`."""

    config: ml_collections.ConfigDict
    workdir: epath.Path  # local or gs://
    mesh: Mesh
    dataset: Dataset
    batches: Iterator[Batch]  # the training batches from the state's step on (checkpointed with it)
    state: steps.TrainState
    schedule: optax.Schedule
    train_rng: jax.Array
    log_noise_probs: Optional[jax.Array]
    step_fn: steps.TrainStepFn
    eval_fn: steps.EvalStepFn
    logits_fn: steps.LogitsStepFn
    manager: ocp.CheckpointManager
    ckpt_dir: str
    last_saved: Optional[int]
    writer: MetricWriter
    local_batch: int
    local_eval_batch: int
    is_chief: bool

    @property
    def start_step(self) -> int:
        return int(self.state.step)


def _print_chief(is_chief: bool, text: str) -> None:
    if is_chief:
        print(text, flush=True)


def set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks the config, builds the mesh, data, model and state, and restores the newest intact checkpoint."""
    from jax.experimental import multihost_utils

    assembly.validate_config(config)
    mesh = distributed.make_mesh()
    is_chief = jax.process_index() == 0
    local_batch = distributed.check_batch_size(config.data.batch_size, mesh)
    local_eval_batch = distributed.check_batch_size(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")
    dataset, model = assembly.make_dataset_and_model(config)
    log_noise_probs = assembly.log_noise_probs(config, dataset)
    teacher = assembly.load_teacher(config, dataset)  # None without config.distill; checked before any write
    if teacher is not None:
        _print_chief(is_chief, distill.describe(teacher, config))

    workdir = checkpointing.resolve(workdir)  # local or gs://; every write below is on process 0 only
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        evaluation.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))

    init_rng, train_rng = assembly.run_keys(jax.random.PRNGKey(config.seed))
    ckpt_dir = str(workdir / "checkpoints")
    manager = checkpointing.make_manager(ckpt_dir, max_to_keep=config.get("max_checkpoints", 3))
    resuming = manager.latest_step() is not None  # then neither init.checkpoint nor init.pretrained is read
    state, schedule = assembly.create_train_state(
        config, model, dataset.example_shape, init_rng, mesh, config.data.batch_size, use_init=not resuming
    )
    last_saved = None
    batches = dataset.train_batches(local_batch, seed=config.seed)
    if resuming:
        sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else (lambda name: None)
        state, last_saved, iterator_restored = checkpointing.restore_newest_intact(
            manager, state, log=functools.partial(_print_chief, is_chief), is_chief=is_chief, sync=sync,
            data_iterator=batches,
        )
        if not iterator_restored:  # no iterator state for this process: restart the stream at the step
            batches = dataset.train_batches(local_batch, seed=config.seed, start_step=last_saved)
        _print_chief(is_chief, f"resumed from the checkpoint of step {last_saved} in {ckpt_dir}")

    step_fn = assembly.make_train_step(config, dataset, mesh, teacher)
    eval_fn, logits_fn = assembly.make_eval_fns(mesh, model, dataset)
    # Last, so that a start-up that fails leaves no writer (and no writer thread) behind.
    writer = MetricWriter(str(workdir) if is_chief else None)
    return Run(
        config=config, workdir=workdir, mesh=mesh, dataset=dataset, batches=batches, state=state, schedule=schedule,
        train_rng=train_rng, log_noise_probs=log_noise_probs, step_fn=step_fn,
        eval_fn=eval_fn, logits_fn=logits_fn,
        manager=manager, ckpt_dir=ckpt_dir, last_saved=last_saved, writer=writer, local_batch=local_batch,
        local_eval_batch=local_eval_batch, is_chief=is_chief,
    )


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------


class Progress:
    """Prints ``step i/T | metrics | steps/s | ETA`` lines on process 0."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.time()

    def line(self, step: int, metrics: dict) -> str:
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = (step - self.start) / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        return f"step {step}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {eta_text}"


class StepsInFlight:
    """Bounds how many dispatched train steps may be unfinished at once (the one place dispatch is throttled).

    :meth:`dispatched` records a step's output and then blocks on the oldest pending steps until
    fewer than ``limit`` remain, reporting each to the watchdog: at most ``limit`` steps are ever in
    flight, and ``limit = 1`` runs each step to completion before the host prepares the next.
    :meth:`drain` blocks on all of them (before evaluation, checkpointing or any other program
    with collectives).
    """

    def __init__(self, limit: int, watchdog: StepWatchdog):
        self.limit, self.watchdog = limit, watchdog
        self.pending: collections.deque = collections.deque()

    def dispatched(self, step: int, output: Any) -> None:
        self.watchdog.dispatched(step)
        self.pending.append((step, output))
        while len(self.pending) >= self.limit:
            self._finish_oldest()

    def drain(self) -> None:
        while self.pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        step, output = self.pending.popleft()
        jax.block_until_ready(output)
        self.watchdog.step_finished(step)


def _check_finite(history: list[tuple[int, dict]], last_saved: Optional[int], ckpt_dir: str) -> list[dict]:
    """Fetches pending step metrics; raises ``FloatingPointError`` at the first non-finite one."""
    fetched = [(step, jax.device_get(m)) for step, m in history]
    for step, metrics in fetched:
        for name in sorted(metrics, key=lambda k: k != "loss"):  # report the loss first
            value = metrics[name]
            if not np.all(np.isfinite(value)):
                kept = "no checkpoint was written yet"
                if last_saved:
                    kept = f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}"
                raise FloatingPointError(
                    f"non-finite {name} ({float(value)}) at step {step}; training stopped and {kept}. "
                    "Lower the learning rate or enable config.optim.grad_clip_norm."
                )
    return [m for _, m in fetched]


def _log_train_metrics(run: Run, history, *, step: int, progress: Progress) -> None:
    """Checks the pending step metrics for non-finite values, then logs their mean.

    On a non-finite value the last good (possibly still asynchronous) save is finished before the
    ``FloatingPointError`` propagates, so it stays the latest checkpoint.
    """
    try:
        fetched = _check_finite(history, run.last_saved, run.ckpt_dir)
    except FloatingPointError:
        run.manager.wait_until_finished()
        raise
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    mean["learning_rate"] = float(run.schedule(step - 1))
    run.writer.write_scalars(step, {f"train/{k}": v for k, v in mean.items()})
    _print_chief(run.is_chief, progress.line(step, mean))


def _evaluate_test(run: Run) -> tuple[dict, dict]:
    """Test metrics at the training temperature ``config.loss.temperature``."""
    batches = run.dataset.eval_batches(run.local_eval_batch)
    return evaluation.evaluate(run.eval_fn, run.state.variables, batches, run.mesh, run.config.loss.temperature)


def calibrate(run: Run) -> Optional[tuple[dict, dict]]:
    """Fits ``t*`` on the validation NLL and evaluates the test split at ``t*``.

    Returns ``({'t_star', 'nll_calibrated', 'ece_calibrated'}, sums at t*)``, or ``None`` when
    the dataset has no validation split (``config.data.validation_fraction = 0``).
    """
    if not run.dataset.num_validation_examples:
        return None
    t_star = evaluation.fit_validation_temperature(run.logits_fn, run.state.variables, run.dataset,
                                                   run.local_eval_batch, run.mesh)
    summary, sums = evaluation.evaluate(
        run.eval_fn, run.state.variables, run.dataset.eval_batches(run.local_eval_batch), run.mesh, t_star
    )
    return {"t_star": t_star, "nll_calibrated": summary["nll"], "ece_calibrated": summary["ece"]}, sums


def _write_results(run: Run, summary: dict, sums: dict, calibrated_sums: Optional[dict]) -> None:
    """``metrics.json``, ``eval_sums.json`` (and ``eval_sums_calibrated.json`` at ``t*``) and ``reliability.png``
    in the workdir (process 0 only)."""
    if run.is_chief:
        evaluation.write_results(run.workdir, run.config, summary, sums, calibrated_sums)


def _print_eval(run: Run, step: int, summary: dict, *, prefix: str = "eval", label: str = "eval") -> None:
    """Writes ``summary`` as ``<prefix>/<metric>`` scalars and prints ``<label> at step <step>: ...`` (process 0)."""
    run.writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in summary.items()})
    _print_chief(run.is_chief, f"{label} at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))


def tracks_validation(config: ml_collections.ConfigDict) -> bool:
    """Whether a run records validation metrics: ``config.validation_every_steps`` set, or
    ``config.evaluate_test`` False (a selection run, which never reads the test split)."""
    return bool(config.get("validation_every_steps")) or not config.get("evaluate_test", True)


def _evaluate_validation(run: Run, step: int, curve: list[dict]) -> dict:
    """Validation metrics at ``config.loss.temperature``: logged as ``val/*``, appended to ``curve`` and
    written to ``history.json`` (the learning curve; process 0)."""
    batches = run.dataset.validation_batches(run.local_eval_batch)
    summary, _ = evaluation.evaluate(run.eval_fn, run.state.variables, batches, run.mesh, run.config.loss.temperature)
    _print_eval(run, step, summary, prefix="val", label="validation")
    curve.append(dict(summary, step=step))
    if run.is_chief:
        evaluation.write_json(run.workdir / "history.json", curve)
    return summary


def _load_curve(run: Run) -> list[dict]:
    """The points of ``history.json`` up to the step a resumed run restarts from (empty for a fresh run)."""
    path = run.workdir / "history.json"
    if not run.start_step or not path.exists():
        return []
    return [point for point in json.loads(path.read_text()) if point["step"] <= run.start_step]


def _final_validation(run: Run, curve: list[dict], calibrated: Optional[tuple[dict, dict]]) -> dict:
    """The final validation metrics and ``t*`` (fitted on them), written to ``validation_metrics.json``."""
    step = int(run.state.step)
    last = curve[-1] if curve and curve[-1]["step"] == step else None
    summary = dict(last) if last is not None else dict(_evaluate_validation(run, step, curve), step=step)
    if calibrated is not None:
        t_star = calibrated[0]["t_star"]
    else:
        t_star = evaluation.fit_validation_temperature(run.logits_fn, run.state.variables, run.dataset,
                                                       run.local_eval_batch, run.mesh)
    summary.update(t_star=t_star, split="validation")
    if run.is_chief:
        evaluation.write_json(run.workdir / "validation_metrics.json", summary)
    return summary


def train_loop(run: Run, *, stop_at_step: Optional[int] = None) -> dict:
    """Trains from ``run.state`` to ``config.num_train_steps``; evaluates, calibrates and writes the results.

    With ``config.validation_every_steps`` the validation split is evaluated every that many steps
    and at the end (``history.json``); with ``config.evaluate_test = False`` the test split is never
    read (no ``metrics.json``). Either way ``validation_metrics.json`` holds the final validation
    metrics and ``t*``, also returned as ``'validation'``.

    Returns the final metrics (``{'preempted_at_step': s}`` if stopped early).
    """
    config, total = run.config, run.config.num_train_steps
    evaluate_test, validation_every = config.get("evaluate_test", True), config.get("validation_every_steps")
    if tracks_validation(config) and not run.dataset.num_validation_examples:
        raise ConfigError(
            "config.validation_every_steps and config.evaluate_test = False need a validation split; set "
            "config.data.validation_fraction > 0."
        )
    curve = _load_curve(run) if tracks_validation(config) else []
    progress = Progress(total, run.start_step)
    history: list[tuple[int, dict]] = []
    summary: dict = {}
    sums: dict = {}
    watchdog = StepWatchdog(config.get("step_timeout_s"), process_index=jax.process_index())
    in_flight = StepsInFlight(max_steps_in_flight(config), watchdog)
    metadata = checkpoint_metadata.build(config, run.dataset, run.log_noise_probs)  # saved with every checkpoint

    with (preemption.Preemption(run.start_step, ckpt_dir=run.ckpt_dir) as stop_request, watchdog,
          failures.end_job_on_failed_save(run.ckpt_dir)):
        for step in range(run.start_step + 1, total + 1):
            batch = distributed.global_batch(run.mesh, next(run.batches))
            run.state, metrics = run.step_fn(run.state, batch, run.train_rng, run.log_noise_probs)
            in_flight.dispatched(step, metrics)
            history.append((step, metrics))
            checkpointing.raise_if_save_failed(run.manager)
            is_last = step == total
            preempted = stop_request.requested(step) or step == stop_at_step
            save_now = is_last or preempted or step % config.checkpoint_every_steps == 0
            evaluate_now = is_last or step % config.eval_every_steps == 0
            validate_now = bool(validation_every) and (is_last or step % validation_every == 0)
            if not (save_now or evaluate_now or validate_now or step % config.log_every_steps == 0):
                continue
            in_flight.drain()
            with watchdog.paused():
                _log_train_metrics(run, history, step=step, progress=progress)
                history = []
                if save_now:
                    checkpointing.save(run.manager, step, run.state, checkpoint_metadata.for_step(metadata, step),
                                       data_iterator=run.batches)
                    run.last_saved = step
                if validate_now:  # before a stop, so that a resumed run's curve has this step
                    _evaluate_validation(run, step, curve)
                if preempted and not is_last:
                    run.manager.wait_until_finished()
                    _print_chief(run.is_chief, f"stopped at step {step} (preempted or stop_at_step); saved to "
                                 f"{run.ckpt_dir}; rerun the same command to resume.")
                    return {"preempted_at_step": step}
                if evaluate_now and evaluate_test:
                    summary, sums = _evaluate_test(run)
                    _print_eval(run, step, summary)
        in_flight.drain()
        with watchdog.paused():
            run.manager.wait_until_finished()
            if evaluate_test and not summary:  # the run had already finished: evaluate the restored state
                summary, sums = _evaluate_test(run)
            calibrated = calibrate(run) if evaluate_test else None
            validation = _final_validation(run, curve, calibrated) if tracks_validation(config) else None
    summary = dict(summary, step=int(run.state.step))
    calibrated_sums = None
    if calibrated is not None:
        calibration, calibrated_sums = calibrated
        summary.update(calibration)
        _print_eval(run, summary["step"], calibration)
    if run.is_chief and run.last_saved == summary["step"]:  # the final checkpoint's metadata, now with t*
        t_star = summary.get("t_star") if evaluate_test else validation["t_star"]
        checkpoint_metadata.write(run.ckpt_dir, summary["step"],
                                  checkpoint_metadata.for_step(metadata, summary["step"], t_star=t_star))
    if evaluate_test:
        _write_results(run, summary, sums, calibrated_sums)
    if validation is not None:
        summary["validation"] = validation
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: Optional[int] = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final eval metrics.

    ``stop_at_step`` ends this invocation early at that step, saving a checkpoint as a preemption
    would (the schedule still follows ``config.num_train_steps``); running again resumes.

    Writes ``config.json``, TensorBoard scalars, ``checkpoints/``, ``metrics.json`` (test metrics at
    the training temperature, plus ``t_star``, ``nll_calibrated`` and ``ece_calibrated`` when
    the data has a validation split), ``eval_sums.json`` (the calibration-bin sums) and
    ``reliability.png`` to ``workdir`` (process 0). Validation tracking (``config.validation_every_steps``,
    ``config.evaluate_test``) adds ``history.json`` and ``validation_metrics.json`` (:func:`train_loop`).

    A run that already finished in ``workdir`` (:func:`completed_results`) is not touched: its
    results are read back and returned. Raises ``FloatingPointError`` on a non-finite loss, keeping
    the last good checkpoint, and a :class:`softnce.failures.RunFailure` with a one-line message for
    a full disk or a lost process; the step watchdog ends a stuck process (see :mod:`softnce.watchdog`).
    """
    results = completed_results(config, workdir)
    if results is not None:
        summary = json.loads(results.read_text())
        _print_chief(jax.process_index() == 0, f"the run in {workdir} is complete (step {summary['step']}); its "
                     f"results are in {results}; nothing was changed.")
        return summary
    run = None
    try:
        run = set_up(config, workdir)
        summary = train_loop(run, stop_at_step=stop_at_step)
        run.writer.close()
        return summary
    except Exception as error:
        if run is not None:
            _close_after_failure(run.writer)
        explained = failures.explain(error, str(checkpointing.resolve(workdir) / "checkpoints"))
        if explained is error:
            raise
        raise explained from error


def _close_after_failure(writer: MetricWriter) -> None:
    """Closes the event file of a run that failed; a second error (a full disk) would hide the first."""
    try:
        writer.close()
    except OSError:
        pass


def completed_results(config: ml_collections.ConfigDict, workdir: str) -> Optional[epath.Path]:
    """The results file of a run of ``config`` that already finished in ``workdir``, else ``None``.

    Finished means: the checkpoint of step ``config.num_train_steps`` exists with its final metadata
    (``softnce_metadata.json``, written after ``t*``), and the last results file the run writes
    (``metrics.json``, or ``validation_metrics.json`` when ``config.evaluate_test`` is False) reports
    that step. Anything less (a run that stopped during its final evaluation, say) is not finished.
    """
    workdir = checkpointing.resolve(workdir)
    results = workdir / ("metrics.json" if config.get("evaluate_test", True) else "validation_metrics.json")
    final_step = checkpointing.step_dir(workdir / "checkpoints", config.num_train_steps)
    final_metadata = final_step / checkpoint_metadata.FILENAME
    if not (results.exists() and final_metadata.exists()):
        return None
    try:
        reported = json.loads(results.read_text()).get("step")
    except ValueError:  # a results file cut short
        return None
    return results if reported == config.num_train_steps else None
