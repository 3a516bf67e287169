"""Reliability: long 8-device runs, bounded dispatch, checkpoint fallback, config checks, the watchdog."""

import errno
import glob
import importlib
import logging
import math
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import latest_params, small_config

from softnce import assembly, config_checks, failures, train, watchdog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# Eight devices, several hundred steps, evaluations and checkpoints in between.
# --------------------------------------------------------------------------------------------------


def test_eight_device_cli_run_of_600_steps_finishes(tmp_path, cli_env):
    """The digits default (600 steps, checkpoints and evaluations at 300 and 600) on 8 CPU devices.

    With every step dispatched asynchronously, jax 0.10's XLA:CPU aborted most such runs in an
    all-gather rendezvous (exit 134) before step 100.
    """
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/digits.py", "--num_cpu_devices=8",
           f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "eval at step 300" in out and "eval at step 600" in out
    assert latest_params(str(tmp_path))[0] == 600


def test_steps_in_flight_are_bounded_and_reported_to_the_watchdog():
    finished, dispatched = [], []

    class Recorder:
        def dispatched(self, step):
            dispatched.append(step)

        def step_finished(self, step):
            finished.append(step)

    in_flight = train.StepsInFlight(2, Recorder())
    for step in range(1, 6):
        in_flight.dispatched(step, jnp.ones(3) * step)
        assert len(in_flight.pending) <= 1  # plus the next one dispatched: at most 2 in flight
    assert finished == [1, 2, 3, 4] and dispatched == [1, 2, 3, 4, 5]
    in_flight.drain()
    assert finished == [1, 2, 3, 4, 5] and not in_flight.pending
    synchronous = train.StepsInFlight(1, Recorder())
    synchronous.dispatched(6, jnp.ones(3))
    assert finished[-1] == 6 and not synchronous.pending


def test_one_step_in_flight_on_cpu_unless_configured():
    config = small_config()
    assert jax.default_backend() == "cpu" and train.max_steps_in_flight(config) == 1
    config.max_steps_in_flight = 3
    assert train.max_steps_in_flight(config) == 3


# --------------------------------------------------------------------------------------------------
# A damaged newest checkpoint.
# --------------------------------------------------------------------------------------------------


def corrupt_checkpoint(step_dir) -> int:
    """Overwrites the second half of every stored array file of one orbax step with garbage bytes."""
    files = [f for f in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
             if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
    assert files, f"no array data files under {step_dir}: {os.listdir(step_dir)}"
    rng = np.random.default_rng(0)
    for path in files:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(rng.integers(0, 256, size - size // 2, dtype=np.uint8).tobytes())
    return len(files)


def test_corrupt_newest_checkpoint_falls_back_and_ends_like_an_uninterrupted_run(tmp_path, capsys):
    train.train_and_evaluate(small_config(), str(tmp_path / "reference"))
    workdir = tmp_path / "run"
    train.train_and_evaluate(small_config(), str(workdir), stop_at_step=8)  # keeps steps 4 and 8
    corrupt_checkpoint(workdir / "checkpoints" / "8")
    capsys.readouterr()

    result = train.train_and_evaluate(small_config(), str(workdir))

    out = capsys.readouterr().out
    assert "checkpoint at step 8" in out and "could not be restored" in out
    assert "resumed from the checkpoint of step 4" in out
    assert (workdir / "checkpoints.corrupt" / "8").is_dir()  # moved aside, never deleted
    assert result["step"] == 12
    step, params = latest_params(str(workdir))
    ref_step, ref_params = latest_params(str(tmp_path / "reference"))
    assert step == ref_step == 12
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_no_intact_checkpoint_is_one_error_naming_the_directory(tmp_path):
    train.train_and_evaluate(small_config(), str(tmp_path), stop_at_step=8)
    for step in (4, 8):
        corrupt_checkpoint(tmp_path / "checkpoints" / str(step))
    with pytest.raises(RuntimeError, match=r"no checkpoint in .*checkpoints can be restored \(tried steps 8, 4"):
        train.train_and_evaluate(small_config(), str(tmp_path))
    assert sorted(ocp.CheckpointManager(str(tmp_path / "checkpoints")).all_steps()) == [4, 8]  # nothing moved


# --------------------------------------------------------------------------------------------------
# Numeric config fields.
# --------------------------------------------------------------------------------------------------


def bad_values(rule: config_checks.Range) -> list:
    """Values just outside ``rule`` (below, above, non-integer, None where not allowed)."""
    values = []
    if rule.low > -math.inf:
        values.append(rule.low if rule.low_open else rule.low - 1)
    if rule.high < math.inf:
        values.append(rule.high if rule.high_open else rule.high + 0.5)
    if rule.integer:
        values.append(rule.low + 1.5)
    if not rule.allow_none:
        values.append(None)
    return values


CASES = [(path, value) for path, rule in config_checks.RULES.items() for value in bad_values(rule)]


@pytest.mark.parametrize("path, value", CASES, ids=[f"{p}={v}" for p, v in CASES])
def test_every_numeric_field_out_of_range_is_named_with_value_and_range(path, value):
    config = ml_collections.ConfigDict(small_config().to_dict(), type_safe=False)  # any value, any field
    section, _, field = path.rpartition(".")
    (config[section] if section else config)[field] = value
    with pytest.raises(config_checks.ConfigError) as error:
        assembly.validate_config(config)
    message = str(error.value)
    assert message.startswith(f"config.{path} = ") and " is out of range: must be " in message, message
    if value is not None:
        assert float(message.split(" = ")[1].split(" is out")[0]) == value
    assert "\n" not in message


def test_every_field_of_the_shipped_configs_passes_and_has_a_rule():
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "[!_]*.py"))):  # base.py too; not __init__.py
        module = importlib.import_module(f"softnce.configs.{os.path.basename(path)[:-3]}")
        config = module.get_config()
        components = assembly.config_components(config) if config.get("model") else []  # base.py names none
        config_checks.check_config(config, components=components)  # raises on a numeric field without a rule
        assert list(config_checks.numeric_leaves(config)), path


def test_relations_between_fields_are_checked():
    warmup = r"warmup_steps = 12 is out of range: must be < config.num_train_steps = 12"
    with pytest.raises(config_checks.ConfigError, match=warmup):
        assembly.validate_config(small_config(**{"optim.warmup_steps": 12}))
    min_lr = r"min_lr = 0.1 is out of range: must be <= config.optim.base_lr"
    with pytest.raises(config_checks.ConfigError, match=min_lr):
        assembly.validate_config(small_config(**{"optim.min_lr": 0.1}))


def test_negative_learning_rate_fails_before_the_first_step_in_one_line(tmp_path, cli_env):
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/digits.py", "--config.optim.base_lr=-1",
           f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "softnce: error" in line]
    assert errors == ["softnce: error: config.optim.base_lr = -1.0 is out of range: must be a number > 0 "
                      "(the peak learning rate per 256 examples)."], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "step 1" not in proc.stdout
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# The step watchdog.
# --------------------------------------------------------------------------------------------------


def test_watchdog_reports_a_first_step_that_never_compiles_or_finishes():
    for dispatch, phase in ((False, "compiling the train step"), (True, "the first step (step 1)")):
        exits = []
        record = lambda message, code: exits.append((message, code))  # noqa: E731
        with watchdog.StepWatchdog(0.3, exit_fn=record, poll_s=0.02) as dog:
            if dispatch:
                dog.dispatched(1)
            time.sleep(0.6)
        assert len(exits) == 1 and exits[0][1] == watchdog.WATCHDOG_EXIT_CODE
        assert exits[0][0].startswith(f"watchdog: stuck in {phase} on process 0: nothing finished for 0."), exits
        assert "no step had finished" in exits[0][0]


def test_watchdog_names_the_stuck_step_and_stops_its_clock_while_paused():
    exits = []
    with watchdog.StepWatchdog(0.3, exit_fn=lambda message, code: exits.append(message), poll_s=0.02) as dog:
        dog.dispatched(1)
        dog.step_finished(1)
        with dog.paused():  # evaluation / checkpointing
            time.sleep(0.6)
        assert exits == []
        dog.dispatched(2)
        time.sleep(0.8)
    assert len(exits) == 1 and "stuck in step 2 on process 0" in exits[0] and "the last finished step is 1" in exits[0]


def test_automatic_timeout_is_bounded_from_the_start_and_generous_once_steps_are_timed():
    dog = watchdog.StepWatchdog(None, exit_fn=lambda message, code: None)
    assert dog.timeout() == watchdog.FIRST_STEP_TIMEOUT_S == 600.0  # compilation and the first steps
    for step in range(1, watchdog.AUTO_MIN_SAMPLES + 1):
        dog.step_finished(step)
        assert dog.timeout() == watchdog.FIRST_STEP_TIMEOUT_S
    dog.step_finished(watchdog.AUTO_MIN_SAMPLES + 1)
    assert dog.timeout() == watchdog.AUTO_MIN_TIMEOUT_S  # 10 x a tiny median is below the floor


SLEEPY_LOSS = textwrap.dedent('''
    """A loss whose step sleeps for ten minutes from its 31st call on (a stuck process)."""
    import time

    import jax

    from softnce import losses

    calls = []


    def _maybe_sleep(_):
        calls.append(1)
        if len(calls) > 30:
            time.sleep(600)


    @losses.register_loss("sleepy_nll")
    def sleepy_nll(logits, inputs):
        jax.debug.callback(_maybe_sleep, logits[0, 0])
        return losses.nll(logits, inputs.labels)
''')


def test_watchdog_ends_a_run_whose_step_sleeps(tmp_path, cli_env):
    (tmp_path / "sleepy_loss.py").write_text(SLEEPY_LOSS)
    env = dict(cli_env, PYTHONPATH=f"{tmp_path}{os.pathsep}{cli_env.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "softnce.main", "--import_modules=sleepy_loss",
           "--config=configs/digits.py:loss=nll,steps=200", "--config.loss.name=sleepy_nll",
           "--config.step_timeout_s=10", "--num_cpu_devices=1", f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # < the sleep
    assert proc.returncode == watchdog.WATCHDOG_EXIT_CODE, (proc.stdout + proc.stderr)[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines  # one line, no tracebacks from the threads left running
    assert lines[0].startswith("softnce: error: watchdog: stuck in step 31 on process 0: nothing finished for")
    assert "the last finished step is 30" in lines[0]


def test_a_failed_background_save_ends_the_job_even_though_its_log_record_is_kept_off_stderr(monkeypatch):
    """softnce.main keeps orbax's error records off stderr (quiet_background_errors), and a logger stops at the
    first filter that rejects a record: the failed-save watch must still see it, or the other processes
    wait at orbax's barrier for minutes (the two-process full disk)."""
    ended = []
    monkeypatch.setattr(failures, "_client", lambda: object())  # as on a multi-process job
    monkeypatch.setattr(failures, "exit_run", lambda message, code=failures.EXIT_FAILURE: ended.append(message))
    logger, noise = logging.getLogger("absl"), failures._BackgroundNoise()
    logger.addFilter(noise)
    try:
        with failures.end_job_on_failed_save("/nonexistent/checkpoints"):
            error = OSError(errno.ENOSPC, "No space left on device")
            record = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/async.py", 1,
                                       "background save failed", None, (OSError, error, None))
            assert not logger.filter(record)  # kept off stderr
    finally:
        logger.removeFilter(noise)
    assert len(ended) == 1 and ended[0].startswith("no space left on the device"), ended
