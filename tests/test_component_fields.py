"""Components declare their own config fields (softnce.config_checks.Component): a loss's keyword-only
parameters and a model factory's keyword arguments are fields ``config.loss.<field>`` and
``config.model.<field>``, with the ranges declared where they are registered. The user's module is
tests/user_registrations.py (a focal loss with ``gamma``, an MLP with ``width``), outside the package."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_reliability import bad_values
from test_train import REPO, latest_params, small_config

from softnce import assembly, config_checks, losses, models, train
from softnce.data import get_dataset
from softnce.losses import LossInputs


def focal_reference(logits, targets, gamma, temperature=1.0):
    """float64: ``-sum_c a_c (1 - p_c)^gamma log p_c`` with ``p = softmax(z / t)``."""
    z = np.asarray(logits, np.float64) / temperature
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    return -(np.asarray(targets, np.float64) * (1 - np.exp(log_p)) ** gamma * log_p).sum(1)


def inputs_of(targets):
    return LossInputs(targets=jnp.asarray(targets, jnp.float32), labels=jnp.argmax(targets, 1),
                      rng=jax.random.PRNGKey(0))


def test_a_loss_field_set_in_the_config_reaches_the_loss(user_module):
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(6, 4)) * 2, rng.dirichlet(np.ones(4), size=6)
    spec = losses.get_loss("user_focal")
    assert spec.fields == {"gamma": 2.0}
    config = small_config(**{"loss.name": "user_focal"})
    assembly.validate_config(config)  # gamma unset: the parameter's default
    np.testing.assert_allclose(spec.bind(config.loss)(jnp.asarray(logits, jnp.float32), inputs_of(targets)),
                               focal_reference(logits, targets, 2.0), rtol=1e-5)
    config.loss.gamma = 1.5
    assembly.validate_config(config)
    bound = spec.bind(config.loss)(jnp.asarray(logits, jnp.float32), inputs_of(targets))
    np.testing.assert_allclose(bound, focal_reference(logits, targets, 1.5), rtol=1e-5)
    assert not np.allclose(bound, focal_reference(logits, targets, 2.0), rtol=1e-3)


def test_the_field_reaches_the_train_step(tmp_path, user_module):
    """Focal with gamma = 0 is soft-target CE: the same run to the last digit; gamma = 2 is another run."""
    def run(name, **fields):
        config = small_config(**{"loss.name": name, "loss.noise": "uniform"})
        for field, value in fields.items():
            config.loss[field] = value
        workdir = str(tmp_path / f"{name}{fields}")
        train.train_and_evaluate(config, workdir)
        return jax.tree.leaves(latest_params(workdir)[1])

    soft_ce, focal_0, focal_2 = run("soft_target_cross_entropy"), run("user_focal", gamma=0.0), run("user_focal")
    for a, b, c in zip(soft_ce, focal_0, focal_2):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert max(float(np.abs(a - c).max()) for a, c in zip(soft_ce, focal_2)) > 1e-3


def message_of(config) -> str:
    with pytest.raises(config_checks.ConfigError) as error:
        assembly.validate_config(config)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_field_the_named_component_does_not_take_lists_those_it_takes(user_module):
    config = small_config(**{"loss.name": "user_focal"})
    config.loss.gama = 1.5
    assert message_of(config) == (
        "config.loss.gama: loss 'user_focal' takes no field 'gama' (did you mean 'gamma'?); its fields: gamma, name, "
        "noise, noise_probs, prior_smoothing, temperature.")
    config = small_config()
    config.loss.gamma = 1.5  # STI takes no gamma
    assert message_of(config).startswith("config.loss.gamma: loss 'soft_target_infonce' takes no field 'gamma'; "
                                         "its fields: name, noise, noise_probs")
    config = small_config()
    config.model.channels = (8,)  # a small_cnn field on the MLP
    assert message_of(config) == ("config.model.channels: model 'mlp' takes no field 'channels'; its fields: "
                                  "dropout_rate, hidden_sizes, name.")


def test_declared_ranges_and_undeclared_fields(user_module, register_for_test):
    config = small_config(**{"loss.name": "user_focal"})
    config.loss.gamma = -0.5
    assert message_of(config) == ("config.loss.gamma = -0.5 is out of range: must be a number >= 0 "
                                  "(the focusing exponent).")
    config = small_config()
    config.model = ml_collections.ConfigDict(dict(name="user_mlp", width=0))
    assert message_of(config) == ("config.model.width = 0 is out of range: must be an integer >= 1 "
                                  "(units of the hidden layer).")
    config.model.width = 48
    assembly.validate_config(config)
    assert models.get_model(config.model, 3).width == 48

    def margin_loss(logits, inputs, *, margin, scale=1.0):  # no ranges declared; margin has no default
        return scale * jnp.maximum(0.0, margin - jnp.sum(logits * inputs.targets, -1))

    register_for_test(losses.LOSSES, "margin", losses.LossSpec("margin", margin_loss, uses_noise=False))
    config = small_config(**{"loss.name": "margin"})
    assert message_of(config) == ("config.loss needs margin: loss 'margin' takes it without a default.")
    config.loss.margin = 0.3
    assembly.validate_config(config)  # any finite number
    config.loss.scale = math.inf
    assert message_of(config) == ("config.loss.scale = inf is out of range: must be a number (finite) "
                                  "(a field of loss 'margin').")


def test_a_user_dataset_declares_its_numeric_field_where_it_is_registered(user_module):
    config = small_config(**{"data.name": "user_blobs"})
    config.model = ml_collections.ConfigDict({"name": "user_linear"})
    config.data.num_points = 320
    assembly.validate_config(config)
    assert get_dataset(config.data).num_train_examples == 320 - round(0.1 * 320)
    config.data.num_points = 8
    assert message_of(config) == ("config.data.num_points = 8 is out of range: must be an integer >= 16 "
                                  "(training points drawn).")
    config.data.num_points = 320
    config.data.num_pionts = 320  # a typo: a field the dataset does not take
    assert message_of(config) == ("config.data.num_pionts: dataset 'user_blobs' takes no field 'num_pionts' (did you "
                                  "mean 'num_points'?); its fields: batch_size, eval_batch_size, name, num_points, "
                                  "validation_fraction, validation_seed.")


def test_a_dataset_field_reaches_the_factory_and_the_package_datasets_read_their_sections(user_module):
    from softnce.data import DATASETS

    assert DATASETS.fields("user_blobs") == {"num_points": 640}
    assert DATASETS.fields("user_soft_blobs") is None and DATASETS.fields("fashion_mnist_tuples") is None
    config = small_config(**{"data.name": "user_blobs"})
    del user_module.CALLS[:]
    assert get_dataset(config.data).num_train_examples == 640 - 64  # the default
    config.data.num_points = 200
    assert get_dataset(config.data).num_train_examples == 200 - 20
    assert [call["num_points"] for name, call in user_module.CALLS] == [640, 200]


MODEL_CASES = [(name, field, value) for name in models.MODELS.names()
               for field, rule in models.MODELS.ranges(name).items() for value in bad_values(rule)]


@pytest.mark.parametrize("name, field, value", MODEL_CASES, ids=[f"{n}.{f}={v}" for n, f, v in MODEL_CASES])
def test_every_declared_model_range_names_the_field_value_and_range(name, field, value):
    config = ml_collections.ConfigDict(small_config().to_dict(), type_safe=False)
    config.model = ml_collections.ConfigDict({"name": name, field: value}, type_safe=False)
    message = message_of(config)
    assert message.startswith(f"config.model.{field} = ") and " is out of range: must be " in message, message


def test_the_teacher_model_is_checked_like_the_model():
    config = small_config()
    config.distill.teacher_model = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(0,)))
    assert message_of(config).startswith("config.distill.teacher_model.hidden_sizes = 0 is out of range")


USER_CONFIG = '''
import ml_collections
from softnce.configs import digits

def get_config():
    config = digits.get_config("steps=8")
    config.loss.name = "user_focal"
    config.loss.gamma = 1.0
    config.model = ml_collections.ConfigDict(dict(name="user_mlp", width=16))
    config.data.batch_size = 64
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 8
    config.optim.warmup_steps = 2
    return config
'''


def main_command(tmp_path, *args, devices=2, model="user_mlp"):
    (tmp_path / "user_config.py").write_text(USER_CONFIG.replace('"user_mlp"', repr(model)))
    return [sys.executable, "-m", "softnce.main", "--import_modules=user_registrations",
            f"--config={tmp_path / 'user_config.py'}", *args, f"--num_cpu_devices={devices}",
            f"--workdir={tmp_path / 'run'}"]


def test_a_user_dataset_is_named_and_its_field_set_on_the_command_line(tmp_path, cli_env, user_module):
    env = dict(cli_env, PYTHONPATH=os.path.join(REPO, "tests"))
    cmd = main_command(tmp_path, "--config.data.name=user_blobs", "--config.data.num_points=320",
                       "--config.model.width=8", "--config.augment.cutmix_alpha=0", devices=2)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["data"]["name"] == "user_blobs" and saved["data"]["num_points"] == 320
    typo = main_command(tmp_path, "--config.data.name=user_blobs", "--config.data.num_pionts=320", devices=2)
    proc = subprocess.run(typo, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "softnce: error: config.data.num_pionts: dataset 'user_blobs' takes no field 'num_pionts' (did you mean "
        "'num_points'?); its fields: batch_size, eval_batch_size, name, num_points, validation_fraction, "
        "validation_seed."]


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("model", ["user_mlp", "user_nnx"])
def test_a_user_module_trains_and_exports_through_the_command_lines(model, devices, tmp_path, cli_env, user_module):
    """The user's focal loss (gamma from the command line) and BatchNorm models, Linen and NNX (width from
    the command line)."""
    env = dict(cli_env, PYTHONPATH=os.path.join(REPO, "tests"))
    cmd = main_command(tmp_path, "--config.loss.gamma=1.5", "--config.model.width", "24", devices=devices,
                       model=model)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["loss"]["gamma"] == 1.5 and saved["model"] == {"name": model, "width": 24}
    assert np.isfinite(json.load(open(tmp_path / "run" / "metrics.json"))["nll"])
    export = [sys.executable, "-m", "softnce.export", "--import_modules=user_registrations",
              f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'export'}"]
    proc = subprocess.run(export, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    from softnce import export_loader, inference

    classifier = inference.load(str(tmp_path / "run"))
    running_mean = np.asarray(classifier.variables["batch_stats"]["norm"]["mean"])
    assert running_mean.shape == (24,) and np.abs(running_mean).max() > 1e-3  # trained, not the initial zeros
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
    exported = export_loader.load(str(tmp_path / "export"))
    np.testing.assert_allclose(exported.logits(x), classifier.logits(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--config.loss.gama=1.5"], "config.loss.gama: loss 'user_focal' takes no field 'gama' (did you mean 'gamma'?)"),
    (["--config.loss.name=soft_target_infonce"], "config.loss.gamma: loss 'soft_target_infonce' takes no field"),
    (["--config.model.width=-3"], "config.model.width = -3 is out of range: must be an integer >= 1"),
    (["--config.loss.temperature=warm"], "--config.loss.temperature=warm: expected a number."),
])
def test_command_line_field_errors_are_one_line(args, message, tmp_path, cli_env):
    env = dict(cli_env, PYTHONPATH=os.path.join(REPO, "tests"))
    proc = subprocess.run(main_command(tmp_path, *args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("softnce: error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_user_nnx_model_resumes_exactly_through_the_command_line(tmp_path, cli_env, user_module):
    """SIGTERM during a run of the user's NNX model (BatchNorm, Dropout) and focal loss on 8 devices: the rerun
    resumes and ends with the variables of an uninterrupted run."""
    import signal

    from softnce import inference

    env = dict(cli_env, PYTHONPATH=os.path.join(REPO, "tests"))
    fields = ["--config.loss.gamma=1.5", "--config.model.width=24", "--config.num_train_steps=300",
              "--config.log_every_steps=5", "--config.checkpoint_every_steps=1000000", "--config.eval_every_steps=300"]

    def command(workdir):
        cmd = main_command(tmp_path, *fields, devices=8, model="user_nnx")
        return [*cmd[:-1], f"--workdir={workdir}"]

    straight = subprocess.run(command(tmp_path / "straight"), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-3000:]
    proc = subprocess.Popen(command(tmp_path / "stopped"), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopped at step" in out, out[-3000:]
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 5 <= stopped < 300
    again = subprocess.run(command(tmp_path / "stopped"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and f"resumed from the checkpoint of step {stopped}" in again.stdout, \
        (again.stdout + again.stderr)[-3000:]
    resumed, whole = inference.load(str(tmp_path / "stopped")), inference.load(str(tmp_path / "straight"))
    assert resumed.step == whole.step == 300
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), resumed.variables, whole.variables)
