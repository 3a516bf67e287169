"""Start-up errors of the command lines: one line ``softnce: error: ...`` on stderr, exit code 2, and,
for what can be checked without them, before jax and TensorFlow are imported (well under 2 s)."""

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from softnce.configs import digits as digits_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a module as ``python -m`` would and records, at exit, which heavy modules it had imported.
WRAPPER = """
import atexit, json, runpy, sys
report, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(
    m for m in ("jax", "tensorflow", "tensorflow_datasets", "flax") if m in sys.modules))))
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_cli(module, args, tmp_path, env):
    """``(returncode, stdout, stderr, imported heavy modules, wall seconds, CPU seconds)`` of one CLI run."""
    report = tmp_path / "imported.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(report), module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    imported = json.loads(report.read_text()) if report.exists() else None
    return proc.returncode, proc.stdout, proc.stderr, imported, wall, cpu


def assert_one_line_error(rc, stdout, stderr, message):
    assert rc == 2, (stdout, stderr)
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr  # no traceback, no TensorFlow or absl start-up lines before it
    assert lines[0].startswith("softnce: error: "), stderr
    assert message in lines[0], lines[0]


MAIN_BEFORE_JAX = [
    (["--config=configs/nope.py"], "config file 'configs/nope.py' does not exist"),
    (["--config=configs/digts.py"], "did you mean 'configs/digits.py'"),
    (["--config=configs/digits.py:los=nll"], "unknown config argument 'los'; valid keys: loss, seed"),
    (["--config=configs/digits.py:loss"], "must look like key=value"),
    (["--config=configs/digits.py", "--config.modle.name=mlp"], "--config.modle.name: config has no field 'modle'; "
                                                                 "did you mean 'model'?"),
    (["--config=configs/digits.py", "--config.seed=1.5"], "--config.seed=1.5: expected an integer."),
    (["--config=configs/digits.py", "--config.seed"], "--config.seed needs a value"),
    (["--config=configs/digits.py", "--nope=1"], "unrecognized arguments: --nope=1"),
    (["--config=configs/digits.py", "extra"], "unrecognized arguments: extra"),
]


@pytest.mark.parametrize("args, message", MAIN_BEFORE_JAX)
def test_main_command_line_errors_come_before_jax(args, message, tmp_path, cli_env):
    workdir = tmp_path / "w"
    rc, out, err, imported, wall, cpu = run_cli("softnce.main", [*args, f"--workdir={workdir}"], tmp_path, cli_env)
    assert_one_line_error(rc, out, err, message)
    assert imported == [], imported  # neither jax nor TensorFlow was imported
    assert cpu < 2.0 and wall < 20.0, (cpu, wall)  # CPU time: about 0.2 s; wall time depends on the load
    print(f"{args}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert not workdir.exists()


@pytest.mark.parametrize("args, message", [
    (["--config.loss.name=softmax"], "unknown loss 'softmax'; valid losses:"),
    (["--config.model.hiden_sizes=(3,)"],
     "config.model.hiden_sizes: model 'mlp' takes no field 'hiden_sizes' (did you mean 'hidden_sizes'?); its fields: "
     "dropout_rate, hidden_sizes, name."),
    (["--config.optim.base_lr=-1"], "config.optim.base_lr = -1.0 is out of range"),
    (["--config.data.batch_size=60", "--num_cpu_devices=8"], "batch_size=60 does not divide over the 8 devices"),
    (["--num_processes=2"], "missing --coordinator_address, --process_id"),
])
def test_main_config_value_errors_come_before_any_data_library(args, message, tmp_path, cli_env):
    workdir = tmp_path / "w"
    rc, out, err, imported, wall, _ = run_cli(
        "softnce.main", ["--config=configs/digits.py", *args, f"--workdir={workdir}"], tmp_path, cli_env)
    assert_one_line_error(rc, out, err, message)
    assert "tensorflow" not in imported and "tensorflow_datasets" not in imported, imported
    print(f"{args}: {wall:.2f} s wall")
    assert not workdir.exists()


@pytest.fixture
def finished_config_only(tmp_path):
    """A workdir with only a ``config.json`` (enough for the command-line checks of softnce.evaluate)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(digits_config.get_config().to_json_best_effort())
    return workdir


@pytest.mark.parametrize("args, message", [
    (["--config.data.eval_batch_siz=8"], "--config.data.eval_batch_siz: config.data has no field 'eval_batch_siz'; "
                                         "did you mean 'eval_batch_size'?"),
    (["--config.data.eval_batch_size=many"], "--config.data.eval_batch_size=many: expected an integer"),
    (["--config.model.name=vit_b16"], "only config.data fields can be overridden"),
    (["--split=train"], "argument --split: invalid choice: 'train'"),
    (["--stpe=3"], "unrecognized arguments: --stpe=3"),
])
def test_evaluate_command_line_errors_come_before_jax(args, message, finished_config_only, tmp_path, cli_env):
    rc, out, err, imported, wall, cpu = run_cli(
        "softnce.evaluate", [f"--workdir={finished_config_only}", *args], tmp_path, cli_env)
    assert_one_line_error(rc, out, err, message)
    assert imported == [] and cpu < 2.0, (imported, cpu, wall)
    assert not (finished_config_only / "eval").exists()


def test_evaluate_and_export_of_a_missing_run_are_one_line(tmp_path, cli_env):
    rc, out, err, imported, _, _ = run_cli("softnce.evaluate", [f"--workdir={tmp_path / 'none'}"], tmp_path, cli_env)
    assert_one_line_error(rc, out, err, "config.json does not exist; is")
    assert imported == []
    rc, out, err, _, _, _ = run_cli(
        "softnce.export", [f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}"], tmp_path, cli_env)
    assert_one_line_error(rc, out, err, "does not exist (give a run's workdir or one of its checkpoints)")


@pytest.mark.parametrize("module, args, message", [
    ("softnce.experiments.fair_comparison", ["--stpe=3"], "unrecognized arguments: --stpe=3"),
    ("softnce.experiments.many_class", ["--config.data.batch_size"], "--config.data.batch_size needs a value"),
    ("softnce.experiments.baselines", ["--quick", "--out"], "argument --out: expected one argument"),
    ("softnce.experiments.toy", ["--setting=huge"], "argument --setting: invalid choice: 'huge'"),
    ("softnce.experiments.fair_comparison", ["--quick", "--setting=long"], "--quick is --setting quick"),
    ("softnce.experiments.many_class", ["--data_dir=/nonexistent/softnce-data"], "'fashion_mnist' is not prepared"),
    ("softnce.experiments.baselines", ["--comparison=none.json"], "none.json does not exist; run experiments/fair"),
    ("softnce.data.fashion_mnist", ["--bogus"], "unrecognized arguments: --bogus"),
    ("softnce.export", ["--workdir=x"], "the following arguments are required: --out"),
])
def test_every_command_line_reports_a_bad_argument_as_one_line(module, args, message, tmp_path, cli_env):
    rc, out, err, _, _, _ = run_cli(module, args, tmp_path, cli_env)
    assert_one_line_error(rc, out, err, message)
