"""Preemption, reruns and failures of real multi-process runs (2 processes x 2 CPU devices over 127.0.0.1).

Every test runs the real CLI (``python -m softnce.main``) on digits through the helpers of the stress
script (``softnce.experiments.stress_preemption``), which sends SIGTERM at random moments instead of
after the first logged step:

- SIGTERM to both processes, or to one: every process saves the same step and exits 0 within the
  30 s grace period of a Cloud TPU preemption, and the relaunch ends equal to an uninterrupted run.
- Rerunning a finished run, on 2 processes or 1, exits 0 with one line and changes no file.
- A lost process (SIGKILL; the loss of process 0 is handled by JAX itself), a full disk (a small
  tmpfs), a non-finite loss and a damaged checkpoint each end the run with exit code 1 and exactly
  one error line per process, without tracebacks.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_reliability import corrupt_checkpoint

from softnce import preemption, watchdog
from softnce.experiments.stress_preemption import REPO, cli_env, equal, final_params, launch, run_args, wait_all

STEPS = 300
CHECKPOINT_EVERY = 100
GRACE_S = 30.0  # SIGTERM to SIGKILL on a Cloud TPU preemption
ARGS = run_args(STEPS, CHECKPOINT_EVERY)  # digits, a progress line every 30 steps
LONG_ARGS = run_args(3000, 1000)  # a run that is still training when the test acts on it


def _logs(root, count=2):
    return [str(root / f"process{i}.log") for i in range(count)]


def _read(logs):
    """The outputs of the processes, without the lines that gloo's C++ code prints when it connects (its
    threads' lines can be cut into pieces)."""
    return ["".join(line for line in open(log) if "[Gloo] " not in line and "peer ranks" not in line) for log in logs]


def _wait_for_training(log, processes, timeout_s=300.0):
    """Returns once ``log`` shows a train step's progress line (compilation and the first steps are done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(line.startswith("step ") for line in open(log)):
            return
        assert all(p.poll() is None for p in processes), open(log).read()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"no train step after {timeout_s} s: {open(log).read()[-3000:]}")


def _error_lines(text):
    return [line for line in text.splitlines() if "error" in line.lower() or "Traceback" in line]


def _files(workdir):
    """``{path: (size, mtime)}`` of every file under ``workdir``."""
    return {path: (os.path.getsize(path), os.path.getmtime(path))
            for path in glob.glob(os.path.join(workdir, "**"), recursive=True) if os.path.isfile(path)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 2-process run: ``(workdir, params of its last step)``."""
    root = tmp_path_factory.mktemp("finished")
    workdir, logs = str(root / "run"), _logs(root)
    codes, _ = wait_all(launch(ARGS, workdir, logs), 600)
    assert codes == [0, 0], _read(logs)
    step, params = final_params(workdir)
    assert step == STEPS
    return workdir, params


# --------------------------------------------------------------------------------------------------
# SIGTERM: one agreed step, saved, exit 0 well inside the grace period.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(0, 1), (1,)], ids=["both", "process_1_only"])
def test_sigterm_saves_one_agreed_step_exits_0_and_the_relaunch_equals_an_uninterrupted_run(
        target, finished_run, tmp_path):
    workdir, logs = str(tmp_path / "run"), _logs(tmp_path)
    processes = launch(ARGS, workdir, logs)
    _wait_for_training(logs[0], processes)
    for i in target:
        processes[i].send_signal(signal.SIGTERM)
    codes, took = wait_all(processes, GRACE_S)
    outputs = _read(logs)
    assert codes == [0, 0], outputs
    assert took < GRACE_S / 2, took
    step, _ = final_params(workdir)
    assert 0 < step < STEPS
    assert f"stopped at step {step}" in outputs[0], outputs[0][-3000:]  # process 0 speaks for the job
    assert not any(_error_lines(out) for out in outputs), outputs
    checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
    assert all(name.isdigit() for name in checkpoints), checkpoints  # no half-written step
    data_states = sorted(glob.glob("process_*", root_dir=os.path.join(workdir, "checkpoints", str(step), "data")))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]  # every process's input position

    codes, _ = wait_all(launch(ARGS, workdir, logs), 600)
    assert codes == [0, 0], _read(logs)
    final_step, params = final_params(workdir)
    assert final_step == STEPS
    assert equal(params, finished_run[1])


# --------------------------------------------------------------------------------------------------
# A stuck step (tests/stuck_step.py: a step of process 1 never finishes): the watchdog from the first
# step on, and SIGTERM during the hang.
# --------------------------------------------------------------------------------------------------

STUCK_ARGS = ["--import_modules=stuck_step", "--config=configs/digits.py:loss=nll,steps=100",
              "--config.loss.name=stuck_nll", "--config.checkpoint_every_steps=20", "--config.log_every_steps=10"]


def _stuck_env(after_steps, marker=None):
    env = dict(cli_env(), STUCK_AFTER_STEPS=str(after_steps), STUCK_PROCESS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    if marker:
        env["STUCK_MARKER"] = str(marker)
    return env


def test_a_step_stuck_from_the_first_on_one_process_ends_both_through_the_watchdog(tmp_path):
    """The limit covers compilation and the first step; both processes exit with the watchdog's code and one
    line naming the phase: the first step, or compiling it where a loaded machine compiles for longer than
    the limit. (The limit stays below the 30 s after which XLA:CPU's gloo collectives give up, which would
    end the job as a lost process instead; a pod's collectives wait for ever.)"""
    workdir, logs, marker = str(tmp_path / "run"), _logs(tmp_path), tmp_path / "stuck"
    limit = 25.0
    codes, took = wait_all(launch(STUCK_ARGS + [f"--config.step_timeout_s={limit}"], workdir, logs,
                                  env=_stuck_env(0, marker)), 240)
    outputs = _read(logs)
    assert codes == [watchdog.WATCHDOG_EXIT_CODE] * 2, outputs
    assert marker.read_text() == "1"  # process 1 was stuck in step 1
    assert limit < took < limit + 60, took  # start-up and the exit on top of the limit
    for out in outputs:
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1, out  # no progress line: no step finished
        assert re.match(r"softnce: error: (process \d: )?watchdog: stuck in (the first step \(step 1\)|compiling the "
                        r"train step) on process \d: nothing finished for", lines[0]), lines
        assert f"limit {limit:.1f} s; no step had finished" in lines[0]


def test_sigterm_during_a_stuck_step_ends_both_within_the_grace_period_and_the_relaunch_resumes(tmp_path):
    """The stop step is never reached: each process exits unsaved with one line and the preemption code
    within 30 s; the last complete checkpoint (step 40) stays the latest, and the relaunch resumes from it."""
    workdir, logs, marker = str(tmp_path / "run"), _logs(tmp_path), tmp_path / "stuck"
    processes = launch(STUCK_ARGS, workdir, logs, env=_stuck_env(50, marker))
    deadline = time.monotonic() + 300
    while not marker.exists():  # process 1 is inside step 51
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), _read(logs)
        time.sleep(0.2)
    time.sleep(2.0)  # process 0 waits in the step's collective
    for process in processes:
        process.send_signal(signal.SIGTERM)
    codes, took = wait_all(processes, GRACE_S)
    outputs = _read(logs)
    assert codes == [preemption.STOPPED_UNSAVED_EXIT_CODE] * 2, (codes, outputs)
    assert preemption.STOP_BOUND_S <= took < GRACE_S, took
    for out in outputs:
        errors = _error_lines(out)
        assert len(errors) == 1, out
        assert errors[0].startswith("softnce: error: stopping for SIGTERM: the stop step was not reached"), errors
        assert f"(step 40 in {os.path.join(workdir, 'checkpoints')})" in errors[0], errors[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]  # nothing saved since

    codes, _ = wait_all(launch(STUCK_ARGS, workdir, logs, env=_stuck_env(10 ** 6)), 300)
    outputs = _read(logs)
    assert codes == [0, 0], outputs
    assert "resumed from the checkpoint of step 40" in outputs[0], outputs[0][-3000:]
    assert final_params(workdir)[0] == 100


def test_sigterm_during_a_stuck_step_on_one_process_ends_it_unsaved(tmp_path):
    """On one process the SIGTERM handler cannot run while the main thread waits inside XLA; the signal's
    wakeup descriptor still lets the run end within the bound."""
    workdir, logs, marker = str(tmp_path / "run"), _logs(tmp_path, 1), tmp_path / "stuck"
    env = dict(_stuck_env(50, marker), STUCK_PROCESS="0")
    (process,) = launch(STUCK_ARGS, workdir, logs, env=env, devices_per_process=2)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline and process.poll() is None, _read(logs)
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    codes, took = wait_all([process], GRACE_S)
    (out,) = _read(logs)
    assert codes == [preemption.STOPPED_UNSAVED_EXIT_CODE], (codes, out)
    assert preemption.STOP_BOUND_S <= took < GRACE_S, took
    errors = _error_lines(out)
    assert len(errors) == 1 and errors[0].startswith("softnce: error: stopping for SIGTERM"), out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]


# --------------------------------------------------------------------------------------------------
# Rerunning a finished run.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_processes", [2, 1])
def test_rerunning_a_finished_run_exits_0_with_one_line_and_changes_nothing(num_processes, finished_run, tmp_path):
    workdir = finished_run[0]
    before = _files(workdir)
    logs = _logs(tmp_path, num_processes)
    codes, _ = wait_all(launch(ARGS, workdir, logs, devices_per_process=4 // num_processes), 300)
    outputs = _read(logs)
    assert codes == [0] * num_processes, outputs
    expected = (f"the run in {workdir} is complete (step {STEPS}); its results are in "
                f"{os.path.join(workdir, 'metrics.json')}; nothing was changed.")
    assert outputs[0].splitlines() == [expected], outputs[0]
    assert all(not out.strip() for out in outputs[1:]), outputs  # process 0 speaks for the job
    assert _files(workdir) == before


# --------------------------------------------------------------------------------------------------
# Failures: exit code 1 and one error line on every process.
# --------------------------------------------------------------------------------------------------


def test_a_lost_process_ends_the_other_with_one_error_line(tmp_path):
    workdir, logs = str(tmp_path / "run"), _logs(tmp_path)
    processes = launch(LONG_ARGS, workdir, logs)
    _wait_for_training(logs[0], processes)
    processes[1].kill()
    codes, took = wait_all(processes, 120)
    out = _read(logs)[0]
    assert codes[0] == 1 and took < 30, (codes, took, out[-3000:])
    errors = _error_lines(out)
    assert len(errors) == 1 and errors[0].startswith("softnce: error: a collective failed"), out[-3000:]
    assert "the last complete checkpoint is" in errors[0]
    assert errors[0].endswith("Rerun the job (all processes) to resume.")


def test_losing_process_0_ends_the_others_through_jax(tmp_path):
    """Process 0 hosts JAX's coordination service: when it dies, the others end at once, through JAX's
    runtime with its own message (a C++ abort that softnce cannot intercept, documented in the README) or,
    when the failure watcher sees the lost service first, with softnce's one error line."""
    workdir, logs = str(tmp_path / "run"), _logs(tmp_path)
    processes = launch(LONG_ARGS, workdir, logs)
    _wait_for_training(logs[0], processes)
    processes[0].kill()
    codes, took = wait_all(processes, 120)
    assert codes[1] not in (0, None) and took < 30, (codes, took)
    out = _read(logs)[1]
    ours = _error_lines(out)
    assert "the JAX distributed service detected fatal errors" in out or (
        len(ours) == 1 and "process 0 (the coordination service) is gone" in ours[0]), out[-3000:]


def _mount_small_tmpfs(path, size="3m"):
    os.makedirs(path)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: digits' checkpoints (about 0.3 MB each, none deleted) fill it within 300 steps."""
    path = tmp_path / "small"
    _mount_small_tmpfs(path)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


FILLING_ARGS = run_args(STEPS, 10)[:2] + ["--config.max_checkpoints=1000", "--config.log_every_steps=30",
                                          f"--config.eval_every_steps={STEPS}"]


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_full_disk_is_one_error_line_and_the_workdir_resumes_elsewhere(num_processes, small_disk, tmp_path):
    workdir, logs = str(small_disk / "run"), _logs(tmp_path, num_processes)
    codes, took = wait_all(launch(FILLING_ARGS, workdir, logs, devices_per_process=4 // num_processes), 300)
    outputs = _read(logs)
    assert codes == [1] * num_processes, outputs
    last = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step()
    assert last is not None and 0 < last < STEPS, (last, outputs[0][-3000:])
    for out in outputs:
        errors = _error_lines(out)
        assert len(errors) == 1, out[-5000:]
        assert errors[0].startswith("softnce: error: ") and "no space left on the device" in errors[0], errors
        assert "free)" in errors[0] and f"the last complete checkpoint is step {last} in {workdir}" in errors[0]
        assert len(out.splitlines()) <= 20, out  # progress lines and the error: no cascade

    roomy = str(tmp_path / "roomy")
    shutil.copytree(workdir, roomy)
    codes, _ = wait_all(launch(FILLING_ARGS, roomy, logs, devices_per_process=4 // num_processes), 600)
    assert codes == [0] * num_processes, _read(logs)
    assert final_params(roomy)[0] == STEPS


def test_a_non_finite_loss_on_the_command_line_is_one_error_line(tmp_path, cli_env):
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/digits.py:loss=nll,steps=50",
           "--config.optim.base_lr=1e30", "--config.checkpoint_every_steps=1", "--num_cpu_devices=2",
           f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = _error_lines(proc.stdout + proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    match = re.match(r"softnce: error: non-finite loss \(nan\) at step (\d+); training stopped and the last "
                     r"good checkpoint \(step (\d+)\) is kept", errors[0])
    assert match and int(match[2]) < int(match[1]), errors
    step, params = final_params(str(tmp_path))
    assert step == int(match[2]) and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_damaged_checkpoint_on_the_command_line_is_one_error_line(tmp_path, cli_env):
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/digits.py:steps=20",
           "--config.checkpoint_every_steps=10", "--num_cpu_devices=2", f"--workdir={tmp_path}"]
    assert subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, timeout=300).returncode == 0
    for step in (10, 20):
        corrupt_checkpoint(tmp_path / "checkpoints" / str(step))
    os.remove(tmp_path / "metrics.json")  # not finished any more: the trainer must restore
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 3, lines  # the reason for each of the two checkpoints, then the error
    for line, step in zip(lines, (20, 10)):
        assert re.match(rf"checkpoint at step {step} in .* could not be restored", line), line
    assert re.match(r"softnce: error: no checkpoint in .*checkpoints can be restored \(tried steps 20, 10", lines[2])


def test_equal_compares_every_leaf():  # the helper the relaunch checks rely on
    a = {"w": np.zeros(3), "b": np.ones(2)}
    assert equal(a, jax.tree.map(np.copy, a))
    assert not equal(a, {"w": np.zeros(3), "b": np.array([1.0, 1.0 + 1e-7])})
