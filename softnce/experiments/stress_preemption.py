"""Stress test: SIGTERM at random moments to a 2-process run; prints ``trials: N, failed: F``.

Each trial launches ``python -m softnce.main`` as 2 processes x 2 CPU devices over 127.0.0.1
(digits, ``--steps`` steps, a checkpoint every ``--checkpoint_every``) and, after a random delay
(uniform from 0.2 s after the launch to the length of an uninterrupted run, so start-up, steps,
collectives, checkpoint saves and the final evaluation are all hit), sends SIGTERM to both
processes, to process 0 only or to process 1 only (in turn). A trial passes when:

- every process exits with code 0 within ``--grace`` seconds (30: a Cloud TPU preemption) of the signal;
- the newest checkpoint is the step the processes stopped at (or the last step, for a signal that
  came after training), and no unfinished checkpoint is left as a step;
- relaunching the same command ends with parameters equal, bit for bit, to an uninterrupted run's.

The first 0.2 s are left out: the interpreter has not run a line of softnce yet, so a SIGTERM kills
it (exit -15) before it has done anything that could be lost.

``--full_disk N`` (as root) also runs ``N`` trials of a 2-process run whose workdir is a fresh 3 MB
tmpfs, with a checkpoint every 10 steps and none deleted, so that the disk fills during a save. A
trial passes when both processes exit with code 1 within ``--grace`` seconds of the launch, each
prints exactly one line ``softnce: error: no space left ...`` and no traceback, and the checkpoint
that line names as the last complete one is restorable.

``--test NODE_ID`` runs one test of the suite alone, ``--test_runs`` times (10), each in a fresh pytest
process, as a developer runs it (the suite's persistent compilation cache, warm after the first run).

``--compilation_cache DIR`` runs every process with JAX's persistent compilation cache in ``DIR``
(warmed by the uninterrupted run), as the test suite runs them.

Usage::

    python experiments/stress_preemption.py --trials 20 --full_disk 10 --compilation_cache /tmp/cache  # BENCHMARKS.md
    python experiments/stress_preemption.py --trials 0 --test_runs 10 \
        --test "tests/test_preemption.py::test_a_full_disk_is_one_error_line_and_the_workdir_resumes_elsewhere[2]"
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from softnce import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ("both", "process 0", "process 1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict:
    """The environment for CLI subprocesses: no inherited XLA device flags, no TF/XLA start-up logs."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def launch(args: Sequence[str], workdir: str, logs: Sequence[str], *, devices_per_process: int = 2,
           env: Optional[dict] = None, cwd: str = REPO) -> list[subprocess.Popen]:
    """``python -m softnce.main <args> --workdir=<workdir>`` as ``len(logs)`` processes over 127.0.0.1.

    Process ``i`` writes its output (stdout and stderr) to ``logs[i]``; one process runs without the
    multi-process flags.
    """
    base = [sys.executable, "-m", "softnce.main", *args, f"--workdir={workdir}",
            f"--num_cpu_devices={devices_per_process}"]
    if len(logs) > 1:
        address = f"127.0.0.1:{_free_port()}"
        flags = [[f"--coordinator_address={address}", f"--num_processes={len(logs)}", f"--process_id={i}"]
                 for i in range(len(logs))]
    else:
        flags = [[]]
    env = cli_env() if env is None else env
    return [subprocess.Popen(base + extra, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            for extra, log in zip(flags, logs)]


def wait_all(processes: Sequence[subprocess.Popen], timeout_s: float) -> tuple[list[Optional[int]], float]:
    """Waits for every process, at most ``timeout_s`` in all; returns their exit codes (``None``: still
    running, then killed) and the seconds until the last one ended."""
    start = time.monotonic()
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.0, timeout_s - (time.monotonic() - start))))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            codes.append(None)
    return codes, time.monotonic() - start


def run_args(steps: int, checkpoint_every: int) -> list[str]:
    return [f"--config=configs/digits.py:steps={steps}", f"--config.checkpoint_every_steps={checkpoint_every}",
            "--config.max_checkpoints=2", f"--config.log_every_steps={max(1, steps // 10)}",
            f"--config.eval_every_steps={steps}"]


def final_params(workdir: str):
    """``(step, params)`` of the newest checkpoint in ``workdir``."""
    from softnce import checkpointing

    manager = checkpointing.read_only_manager(os.path.join(workdir, "checkpoints"))
    return manager.latest_step(), checkpointing.restore_on_this_host(manager)["params"]


def equal(a, b) -> bool:
    import jax
    import numpy as np

    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def trial(args: Sequence[str], root: str, delay_s: float, target: str, grace_s: float, reference,
          env: Optional[dict] = None) -> tuple[str, float]:
    """One trial (see the module docstring); returns ``''`` if it passed, else what went wrong, and the
    seconds from the signal until the last process exited."""
    workdir = os.path.join(root, "run")
    logs = [os.path.join(root, f"process{i}.log") for i in (0, 1)]
    processes = launch(args, workdir, logs, env=env)
    time.sleep(delay_s)
    for i, process in enumerate(processes):
        if target in ("both", f"process {i}"):
            process.send_signal(signal.SIGTERM)
    codes, took = wait_all(processes, grace_s)
    if codes != [0, 0]:
        return f"exit codes {codes}", took
    leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if not d.isdigit()]
    if leftovers:
        return f"unfinished checkpoints left: {leftovers}", took
    stopped = final_params(workdir)[0]
    relaunch, _ = wait_all(launch(args, workdir, logs, env=env), 600)
    if relaunch != [0, 0]:
        return f"relaunch after the stop at step {stopped}: exit codes {relaunch}", took
    if not equal(final_params(workdir)[1], reference):
        return f"relaunch after the stop at step {stopped} does not equal the uninterrupted run", took
    return "", took


def full_disk_trial(root: str, grace_s: float, env: Optional[dict] = None) -> str:
    """One full-disk trial (see the module docstring); returns ``''`` if it passed, else what went wrong."""
    disk = os.path.join(root, "small")
    os.makedirs(disk)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", disk], check=True)
    try:
        args = run_args(300, 10) + ["--config.max_checkpoints=1000"]
        workdir, logs = os.path.join(disk, "run"), [os.path.join(root, f"process{i}.log") for i in (0, 1)]
        codes, took = wait_all(launch(args, workdir, logs, env=env), grace_s)
        if codes != [1, 1]:
            return f"exit codes {codes} after {took:.1f} s"
        for i, log in enumerate(logs):
            text = open(log).read()
            errors = [line for line in text.splitlines() if line.startswith("softnce: error:")]
            if len(errors) != 1 or "no space left" not in errors[0] or "Traceback" in text:
                return f"process {i} printed {len(errors)} error lines: {text[-2000:]}"
        named = re.search(r"the last complete checkpoint is step (\d+)", errors[0])
        if named and final_params(workdir)[0] != int(named.group(1)):
            return f"the last complete checkpoint is not step {named.group(1)}"
        return ""
    finally:
        subprocess.run(["umount", "-l", disk], check=False)


def repeat_test(node_id: str, runs: int) -> int:
    """Runs the test ``node_id`` alone ``runs`` times (``python -m pytest -q``, from the repository); prints each
    outcome and ``test runs: N, failed: F``; returns F."""
    failed = 0
    for index in range(runs):
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node_id], cwd=REPO,
                              capture_output=True, text=True)
        failed += bool(done.returncode)
        outcome = "ok" if not done.returncode else "FAILED: " + (done.stdout + done.stderr)[-1500:]
        print(f"test run {index}: {time.monotonic() - start:.0f} s: {outcome}", flush=True)
    print(f"test runs: {runs} of {node_id}, failed: {failed}", flush=True)
    return failed


def main(argv=None) -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="preempted-and-relaunched runs")
    parser.add_argument("--steps", type=int, default=300, help="train steps of each run")
    parser.add_argument("--checkpoint_every", type=int, default=100, help="steps between periodic checkpoints")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument("--seed", type=int, default=0, help="seed of the signal times")
    parser.add_argument("--full_disk", type=int, default=0, help="full-disk trials (needs root to mount a tmpfs)")
    parser.add_argument("--test", action="append", default=[],
                        help="a pytest node id to run alone --test_runs times, each in a fresh pytest process "
                             "(repeatable); e.g. the two-process full-disk test")
    parser.add_argument("--test_runs", type=int, default=10, help="runs of each --test")
    parser.add_argument("--compilation_cache", default=None,
                        help="JAX's persistent compilation cache for every run (as the test suite and many pods "
                             "use it), warmed by the uninterrupted run; default: none")
    options = parser.parse_args(argv)
    for node_id in options.test:
        repeat_test(node_id, options.test_runs)
    if not (options.trials or options.full_disk):
        return
    args = run_args(options.steps, options.checkpoint_every)
    rng = random.Random(options.seed)
    env = cli_env()
    if options.compilation_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(options.compilation_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        logs = [os.path.join(tmp, f"reference{i}.log") for i in (0, 1)]
        codes, _ = wait_all(launch(args, os.path.join(tmp, "reference"), logs, env=env), 600)
        if codes != [0, 0]:
            sys.exit(f"the uninterrupted run failed ({codes}); see {logs}")
        length = time.monotonic() - start
        reference = final_params(os.path.join(tmp, "reference"))[1]
        print(f"uninterrupted run: {length:.1f} s; SIGTERM after 0.2-{length:.1f} s", flush=True)
        failed, exit_times = 0, []
        for index in range(options.trials):
            delay, target = rng.uniform(0.2, length), TARGETS[index % len(TARGETS)]
            root = tempfile.mkdtemp(dir=tmp)
            problem, took = trial(args, root, delay, target, options.grace, reference, env)
            failed += bool(problem)
            exit_times.append(took)
            print(f"trial {index}: SIGTERM to {target} after {delay:.1f} s, exited {took:.1f} s later: "
                  f"{problem or 'ok'}", flush=True)
        if options.trials:
            print(f"trials: {options.trials}, failed: {failed}, signal to exit: {min(exit_times):.1f}-"
                  f"{max(exit_times):.1f} s", flush=True)
        failed = 0
        for index in range(options.full_disk):
            problem = full_disk_trial(tempfile.mkdtemp(dir=tmp), options.grace, env)
            failed += bool(problem)
            print(f"full-disk trial {index}: {problem or 'ok'}", flush=True)
        if options.full_disk:
            print(f"full-disk trials: {options.full_disk}, failed: {failed}")


if __name__ == "__main__":
    main()
