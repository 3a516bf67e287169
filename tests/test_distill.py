"""Knowledge distillation (softnce.distill): the targets against an independent computation, 1 vs 8
devices, exact resume, a frozen teacher that is never saved, every registered loss, the real CLI, and
the errors before training."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_train import REPO, latest_params, small_config

from softnce import assembly, distill, distributed, losses, models, steps, targets, train
from softnce.config_checks import ConfigError
from softnce.data import DATASETS, get_dataset
from softnce.data.arrays import ArrayDataset
from softnce.data.digits import load_digits_split

TEACHER_MODEL = dict(name="mlp", hidden_sizes=(24,), dropout_rate=0.0)


def student_config(teacher_workdir=None, **overrides):
    """The digits student (MixUp/CutMix + smoothing on) distilled from ``teacher_workdir``."""
    config = small_config(**overrides)
    if teacher_workdir is not None:
        config.distill.teacher_workdir = str(teacher_workdir)
    return config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A digits teacher trained with NLL (a wider MLP than the student), its workdir."""
    workdir = tmp_path_factory.mktemp("teacher")
    config = small_config(**{"loss.name": "nll", "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0,
                             "augment.label_smoothing": 0.0, "checkpoint_every_steps": 12})
    config.model = ml_collections.ConfigDict(TEACHER_MODEL)
    train.train_and_evaluate(config, str(workdir))
    return workdir


def numpy_mlp(params, x):
    """The teacher MLP (Dense, tanh-GELU, Dense) in float64 numpy, written independently of Flax."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    layer = params["hidden_0"]
    h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    return h @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"], np.float64)


def softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


def digits_batch(n=16):
    x, y, _, _ = load_digits_split()
    return {"inputs": x[:n], "label": y[:n].astype(np.int32)}


# --------------------------------------------------------------------------------------------------
# The targets.
# --------------------------------------------------------------------------------------------------


def test_targets_equal_the_formula_on_the_same_mixed_batch(teacher_dir):
    """a = (1 - beta) a_recipe + beta softmax(z_teacher / tau), the teacher on the mixed inputs, against
    numpy: the teacher's checkpoint read with orbax and its MLP evaluated in float64."""
    config = student_config(teacher_dir, **{"distill.beta": 0.3, "distill.tau": 2.0})
    loaded = assembly.load_teacher(config, get_dataset(config.data))
    _, teacher_params = latest_params(str(teacher_dir))
    batch = digits_batch()
    mix_config = targets.MixConfig.from_config(config.augment)
    rng = jax.random.PRNGKey(5)
    make = jax.jit(functools.partial(steps.make_targets, num_classes=10, mix_config=mix_config,
                                     teacher=loaded.teacher))
    inputs, made = make(rng, batch, teacher_variables=loaded.variables)
    mixed, recipe = targets.mix_batch(rng, batch["inputs"], batch["label"], num_classes=10, config=mix_config)
    np.testing.assert_array_equal(inputs, mixed)
    assert not np.allclose(np.asarray(mixed), batch["inputs"])  # the batch was really mixed (key 5: MixUp)
    teacher_probs = softmax(numpy_mlp(teacher_params, mixed) / 2.0)
    expected = 0.7 * np.asarray(recipe.dense, np.float64) + 0.3 * teacher_probs
    np.testing.assert_allclose(made.dense, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(made.labels, batch["label"])
    assert made.structured is None  # the dense targets (STI then uses its dense form)
    # beta = 1: the teacher's distribution alone.
    alone = distill.Teacher(loaded.teacher.model, tau=1.0, beta=1.0)
    _, only = steps.make_targets(rng, batch, num_classes=10, mix_config=mix_config, teacher=alone,
                                 teacher_variables=loaded.variables)
    np.testing.assert_allclose(only.dense, softmax(numpy_mlp(teacher_params, mixed)), rtol=1e-5, atol=1e-6)


def _expected_class_loss(logits, inputs):
    """A test loss whose value is the mean over the batch of sum_c a_ic c, so the step reports its targets."""
    del logits
    return inputs.targets @ jnp.arange(inputs.targets.shape[1], dtype=jnp.float32)


def test_train_step_uses_the_teacher_targets_and_1_and_8_devices_agree(teacher_dir):
    """The sharded step on 8 devices and the one-device step, with a teacher: the same loss and
    update (STI gathers the dense targets over devices); the step's targets are the formula's."""
    config = student_config(teacher_dir, **{"distill.beta": 0.6, "distill.tau": 1.5, "augment.mixup_alpha": 0.0,
                                            "augment.cutmix_alpha": 0.0})  # smoothing 0.1: deterministic targets
    loaded = assembly.load_teacher(config, get_dataset(config.data))
    batch = digits_batch(64)
    model = models.get_model(config.model, 10)
    params = jax.device_get(model.init(jax.random.PRNGKey(0), batch["inputs"][:1], train=False)["params"])

    def new_state():
        return steps.TrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.array, params),
                                             tx=optax.sgd(0.1))

    mix_config = targets.MixConfig.from_config(config.augment)
    key, log_eta = jax.random.PRNGKey(3), assembly.log_noise_probs(config, get_dataset(config.data))
    mesh = distributed.make_mesh()
    for loss_fn in (losses.get_loss("soft_target_infonce").fn, _expected_class_loss):
        kwargs = dict(loss_fn=loss_fn, num_classes=10, mix_config=mix_config, temperature=1.0, teacher=loaded.teacher)
        one = jax.jit(functools.partial(steps.train_step, axis_name=None, **kwargs))
        state_1, metrics_1 = one(new_state(), batch, key, log_eta, loaded.variables)
        sharded = steps.make_sharded_train_step(mesh, teacher_variables=loaded.variables, **kwargs)
        state_8, metrics_8 = sharded(new_state(), distributed.global_batch(mesh, batch), key, log_eta)
        np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state_8.params,
                     state_1.params)
    recipe = 0.9 * np.eye(10)[batch["label"]] + 0.01
    expected = 0.4 * recipe + 0.6 * softmax(numpy_mlp(latest_params(str(teacher_dir))[1], batch["inputs"]) / 1.5)
    np.testing.assert_allclose(metrics_8["loss"], np.mean(expected @ np.arange(10)), rtol=1e-5)


def test_a_parameters_file_teacher_equals_the_workdir_teacher(teacher_dir, tmp_path):
    config = student_config(teacher_dir)
    dataset = get_dataset(config.data)
    from_run = assembly.load_teacher(config, dataset)
    batch = digits_batch()
    for suffix in (".npz", ".msgpack"):
        path = str(tmp_path / f"teacher{suffix}")
        distill.save_params(path, from_run.variables["params"])
        config = student_config(**{"distill.teacher_params": path})
        config.distill.teacher_model = ml_collections.ConfigDict(TEACHER_MODEL)
        assembly.validate_config(config)
        from_file = assembly.load_teacher(config, dataset)
        jax.tree.map(np.testing.assert_array_equal, from_file.variables, from_run.variables)
        np.testing.assert_array_equal(from_file.teacher.probs(from_file.variables, batch["inputs"]),
                                      from_run.teacher.probs(from_run.variables, batch["inputs"]))
    config.distill.teacher_model.hidden_sizes = (8,)  # a model the file does not fit
    with pytest.raises(ConfigError, match=r"parameter head/kernel has shape \(24, 10\) in the file, the teacher "
                                          r"model expects \(8, 10\)"):
        assembly.load_teacher(config, dataset)


def test_teacher_model_runs_in_the_students_compute_dtype():
    teacher = ml_collections.ConfigDict(dict(name="vit_tiny", dtype="float32"))
    student = ml_collections.ConfigDict(dict(model=dict(name="vit_tiny", dtype="bfloat16")))
    assert distill.teacher_model_config(teacher, student).dtype == "bfloat16"
    assert teacher.dtype == "float32"  # not modified
    plain = ml_collections.ConfigDict(dict(model=dict(name="mlp")))
    assert distill.teacher_model_config(teacher, plain).dtype == "float32"
    assert "dtype" not in distill.teacher_model_config(ml_collections.ConfigDict(TEACHER_MODEL), student)


# --------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------


def test_resume_is_exact_and_the_teacher_is_frozen_and_never_saved(teacher_dir, tmp_path):
    _, teacher_before = latest_params(str(teacher_dir))
    config = student_config(teacher_dir, **{"distill.beta": 0.5})
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6) == {"preempted_at_step": 6}
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    (sa, pa), (sb, pb) = latest_params(str(tmp_path / "straight")), latest_params(str(tmp_path / "resumed"))
    assert sa == sb == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), pa, pb)
    assert resumed["top1"] == straight["top1"]
    # The teacher's parameters are unchanged, and the student's checkpoint holds the student only.
    step, teacher_after = latest_params(str(teacher_dir))
    assert step == 12
    jax.tree.map(np.testing.assert_array_equal, teacher_after, teacher_before)
    student = models.get_model(config.model, 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    assert jax.tree.structure(pa) == jax.tree.structure(student["params"])
    assert sum(x.size for x in jax.tree.leaves(pa)) == sum(x.size for x in jax.tree.leaves(student["params"]))
    # Training with the teacher differs from training without it.
    plain = train.train_and_evaluate(small_config(), str(tmp_path / "plain"))
    assert not np.allclose(jax.tree.leaves(latest_params(str(tmp_path / "plain"))[1])[0], jax.tree.leaves(pa)[0])
    assert np.isfinite(plain["nll"])


def test_every_registered_loss_trains_with_a_teacher(teacher_dir, tmp_path, capsys):
    for loss in losses.LOSSES.names():
        config = student_config(teacher_dir, **{"loss.name": loss, "num_train_steps": 2, "eval_every_steps": 2,
                                                "checkpoint_every_steps": 2, "log_every_steps": 2,
                                                "optim.warmup_steps": 1, "data.validation_fraction": 0.0})
        result = train.train_and_evaluate(config, str(tmp_path / loss))
        assert result["step"] == 2 and np.isfinite(result["nll"]), loss
    out = capsys.readouterr().out
    assert out.count("distilling from the run") == len(losses.LOSSES)
    assert "config.loss.name='nll' reads only the hard labels" in out


def test_distillation_trains_through_the_cli_on_8_devices(teacher_dir, tmp_path, cli_env):
    workdir = tmp_path / "student"
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/digits.py:loss=soft_target_infonce,steps=4",
           f"--config.distill.teacher_workdir={teacher_dir}", "--config.distill.tau=2.0", "--config.distill.beta=0.5",
           "--config.data.batch_size=64", "--config.log_every_steps=2", "--config.optim.warmup_steps=1",
           "--num_cpu_devices=8", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "distilling from the run" in out and "0.5 softmax(z_teacher / 2)" in out and "step 4/4" in out
    config = json.load(open(workdir / "config.json"))
    assert config["distill"]["teacher_workdir"] == str(teacher_dir) and config["distill"]["tau"] == 2.0
    assert np.isfinite(json.load(open(workdir / "metrics.json"))["nll"])


# --------------------------------------------------------------------------------------------------
# Errors before training.
# --------------------------------------------------------------------------------------------------


def _digits_variant(transform_inputs, transform_labels, num_classes):
    def make(config, *, process_index, process_count):
        x, y, xt, yt = load_digits_split()
        return ArrayDataset(transform_inputs(x), transform_labels(y), transform_inputs(xt), transform_labels(yt),
                            num_classes=num_classes, process_index=process_index, process_count=process_count)

    return make


def test_teacher_errors_come_before_training(teacher_dir, tmp_path, register_for_test):
    register_for_test(DATASETS, "digits_five", _digits_variant(lambda x: x, lambda y: y % 5, 5))
    register_for_test(DATASETS, "digits_flat", _digits_variant(lambda x: x.reshape(len(x), -1), lambda y: y, 10))
    no_mixing = {"augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0}
    cases = [
        (student_config(tmp_path / "nothing"), r"teacher_workdir=.*nothing.*does not exist"),
        (student_config(teacher_dir, **{"distill.teacher_step": 5}), r"no checkpoint of step 5 .*saved steps are 12"),
        (student_config(teacher_dir, **{"data.name": "digits_five", **no_mixing}),
         r"the teacher has 10 classes, the student's dataset 'digits_five' has 5"),
        (student_config(teacher_dir, **{"data.name": "digits_flat", **no_mixing}),
         r"the teacher was trained on inputs \[8, 8, 1\] float32, the student's dataset gives inputs \[64\]"),
        (student_config(teacher_dir, **{"distill.teacher_params": str(tmp_path / "p.npz")}), r"give one teacher"),
        (student_config(**{"distill.teacher_params": str(tmp_path / "p.npz")}), r"needs its model"),
        (student_config(**{"distill.tau": 0.0}), r"config.distill.tau = 0.0 is out of range: must be a number > 0"),
        (student_config(**{"distill.beta": 1.5}), r"config.distill.beta = 1.5 is out of range"),
    ]
    for i, (config, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            train.train_and_evaluate(config, str(tmp_path / f"run{i}"))
        assert not os.path.exists(tmp_path / f"run{i}" / "config.json")  # nothing written: before any work


def test_a_missing_teacher_is_one_line_from_the_cli(tmp_path, cli_env):
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/digits.py",
           f"--config.distill.teacher_workdir={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "softnce: error" in line]
    assert len(errors) == 1 and "config.distill.teacher_workdir=" in errors[0] and "does not exist" in errors[0]
    assert not (tmp_path / "run").exists()
