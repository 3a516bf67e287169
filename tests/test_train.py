"""The trainer end to end: the real entry point, 1 vs 8 devices, resume, SIGTERM, errors, new losses."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from softnce import losses, metric_writer, steps, train
from softnce.configs import digits as digits_config
from softnce.data import DATASETS
from softnce.data.arrays import ArrayDataset
from softnce.data.digits import load_digits_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
    config = digits_config.get_config("loss=soft_target_infonce,steps=12,augment=on")
    config.log_every_steps = 4
    config.eval_every_steps = 12
    config.checkpoint_every_steps = 4
    config.data.batch_size = 64
    config.model.hidden_sizes = (32,)
    config.optim.warmup_steps = 2
    config.optim.base_lr = 2e-2
    config.update_from_flattened_dict(overrides)
    return config


def latest_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.StandardRestore())["params"]


def run_cli(args, devices, workdir, env, **popen):
    cmd = [sys.executable, "-m", "softnce.main", *args, f"--num_cpu_devices={devices}", f"--workdir={workdir}"]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def test_entry_point_same_result_on_1_and_8_devices(tmp_path, cli_env):
    # Deterministic targets (label smoothing, no mixing) so 1 and 8 devices see the same global batch.
    args = [
        "--config=configs/digits.py:loss=soft_target_infonce,steps=6,augment=off",
        "--config.augment.label_smoothing=0.1",
        "--config.data.batch_size=64",
        "--config.log_every_steps=3",
        "--config.checkpoint_every_steps=3",
        "--config.eval_every_steps=6",
    ]
    procs = {n: run_cli(args, n, str(tmp_path / f"dev{n}"), cli_env) for n in (1, 8)}
    outputs = {n: p.communicate(timeout=240)[0] for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, outputs[n]
        assert "step 6/6" in outputs[n] and "steps/s" in outputs[n] and "ETA" in outputs[n]
    m1, m8 = (json.load(open(tmp_path / f"dev{n}" / "metrics.json")) for n in (1, 8))
    assert m1["top1"] == pytest.approx(m8["top1"], abs=1 / 540 + 1e-9)
    assert m1["nll"] == pytest.approx(m8["nll"], rel=1e-4)
    (s1, p1), (s8, p8) = latest_params(str(tmp_path / "dev1")), latest_params(str(tmp_path / "dev8"))
    assert s1 == s8 == 6
    # Float summation order differs between 1 and 8 devices; Adam's g / sqrt(v) magnifies that on
    # weights whose gradients are ~0 (always-blank pixels), so compare to a fraction of one step (lr 1e-3).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=3e-4), p1, p8)
    pairs = zip(jax.tree.leaves(p1), jax.tree.leaves(p8))
    frac_equal = np.mean([np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-6)) for a, b in pairs])
    assert frac_equal > 0.99
    for name in ("config.json", "reliability.png"):
        assert (tmp_path / "dev8" / name).exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "dev8"))
    # The event files read back through TensorBoard's own reader (what `tensorboard --logdir` shows).
    scalars = metric_writer.read_scalars(str(tmp_path / "dev8"))
    assert sorted(scalars["train/loss"]) == [3, 6], scalars.keys()  # log_every_steps = 3
    assert all(np.isfinite(v) for v in scalars["train/loss"].values())
    assert scalars["eval/top1"][6] == pytest.approx(m8["top1"], abs=1e-6)


def test_resume_equals_uninterrupted_run(tmp_path):
    config = small_config()  # MixUp/CutMix on: the per-step randomness must also resume exactly
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    stopped = train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6)
    assert stopped == {"preempted_at_step": 6}
    assert latest_params(str(tmp_path / "resumed"))[0] == 6
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    (sa, pa), (sb, pb) = latest_params(str(tmp_path / "straight")), latest_params(str(tmp_path / "resumed"))
    assert sa == sb == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), pa, pb)
    assert resumed["top1"] == straight["top1"]


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, cli_env):
    workdir = str(tmp_path / "run")
    args = ["--config=configs/digits.py:loss=infonce,steps=3000", "--config.log_every_steps=5",
            "--config.checkpoint_every_steps=1000000", "--config.eval_every_steps=1000000"]
    proc = run_cli(args, 2, workdir, cli_env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "stopped at step" in out
    stopped_step = latest_params(workdir)[0]
    assert 5 <= stopped_step < 3000
    # No partial (temporary) checkpoint is left behind as a step.
    assert all(".orbax-checkpoint-tmp" not in d for d in os.listdir(os.path.join(workdir, "checkpoints")))


def test_interrupted_save_never_becomes_latest(tmp_path):
    config = small_config()
    train.train_and_evaluate(config, str(tmp_path), stop_at_step=4)
    # What orbax leaves behind when a save dies half-way: a temporary directory, never renamed.
    os.makedirs(tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp" / "default")
    assert latest_params(str(tmp_path))[0] == 4


class _NaNAfter(ArrayDataset):
    """Digits whose training inputs turn NaN from step ``bad_step`` on."""

    bad_step = 7

    def train_batches(self, batch_size, *, seed, start_step=0):
        batches = super().train_batches(batch_size, seed=seed, start_step=start_step)
        for step, batch in enumerate(batches, start_step + 1):
            if step >= self.bad_step:
                batch = dict(batch, inputs=np.full_like(batch["inputs"], np.nan))
            yield batch


def make_nan_dataset(config, *, process_index, process_count):
    x, y, xt, yt = load_digits_split()
    return _NaNAfter(x, y, xt, yt, num_classes=10, process_index=process_index, process_count=process_count)


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, register_for_test):
    register_for_test(DATASETS, "nan_digits", make_nan_dataset)
    config = small_config(**{"data.name": "nan_digits", "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0})
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 7; .*last good checkpoint \(step 4\)"):
        train.train_and_evaluate(config, str(tmp_path))
    step, params = latest_params(str(tmp_path))
    assert step == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss.name", "softmax", r"unknown loss 'softmax'; valid losses: .*soft_target_infonce"),
        ("data.name", "mnist", r"unknown dataset 'mnist'; valid datasets: .*digits"),
        ("model.name", "resnet", r"unknown model 'resnet'; valid models: .*mlp"),
        ("loss.noise", "zipf", r"noise must be one of 'class_prior', 'uniform', 'target_mean', 'explicit'"),
        ("data.batch_size", 60, r"batch_size=60 does not divide over the 8 devices"),
        ("augment.mode", "row", r"mode must be one of"),
    ],
)
def test_bad_config_is_a_clear_error_before_work(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(small_config(**{key: value}), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_variant_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config argument 'los'; valid keys: loss, seed"):
        digits_config.get_config("los=nll")


def test_a_new_loss_trains_without_touching_the_trainer(tmp_path):
    calls = []

    @losses.register_loss("test_brier")
    def brier(logits, inputs):
        calls.append(logits.shape)  # traced once per compilation
        return jnp.sum((jax.nn.softmax(logits / inputs.temperature) - inputs.targets) ** 2, axis=-1)

    try:
        result = train.train_and_evaluate(small_config(**{"loss.name": "test_brier"}), str(tmp_path))
    finally:
        losses.LOSSES.unregister("test_brier")
    assert calls and calls[0] == (8, 10)  # per device: 64 examples over 8 devices
    assert np.isfinite(result["nll"]) and result["top1"] > 0.3


def test_device_input_transform_gets_the_same_per_example_keys_on_1_and_8_devices():
    """A dataset's device_train_transform (here: per-example Gaussian noise) sees one key per example
    that depends on the example's global index, not on the device that holds it."""
    import functools

    import optax

    from softnce import distributed, models, targets

    def noisy(keys, inputs):
        noise = jax.vmap(lambda k: jax.random.normal(k, inputs.shape[1:]))(keys)
        return inputs + 0.5 * noise

    x, y, _, _ = load_digits_split()
    batch = {"inputs": x[:64], "label": y[:64].astype(np.int32)}
    model = models.get_model(small_config().model, 10)
    params = jax.device_get(model.init(jax.random.PRNGKey(0), batch["inputs"][:1], train=False)["params"])

    def new_state():
        fresh = jax.tree.map(jnp.array, params)
        return steps.TrainState.create(apply_fn=model.apply, params=fresh, tx=optax.sgd(0.1))

    kwargs = dict(loss_fn=losses.get_loss("nll").fn, num_classes=10, mix_config=targets.MixConfig(), temperature=1.0)
    key = jax.random.PRNGKey(3)
    one = jax.jit(functools.partial(steps.train_step, axis_name=None, input_transform=noisy, **kwargs))
    state_1, metrics_1 = one(new_state(), batch, key, None)
    plain = jax.jit(functools.partial(steps.train_step, axis_name=None, **kwargs))
    _, metrics_plain = plain(new_state(), batch, key, None)
    mesh = distributed.make_mesh()
    sharded = steps.make_sharded_train_step(mesh, input_transform=noisy, **kwargs)
    state_8, metrics_8 = sharded(new_state(), distributed.global_batch(mesh, batch), key, None)

    assert abs(float(metrics_1["loss"]) - float(metrics_plain["loss"])) > 1e-3  # the transform ran
    np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state_8.params, state_1.params)


def test_temperature_is_fitted_on_validation_only_and_test_metrics_reported_at_it(tmp_path):
    """metrics.json's temperature, nll_calibrated and ece_calibrated against an independent float64
    computation from the final parameters: t* minimises the validation NLL; the test NLL is at t*."""
    from scipy.special import log_softmax

    from softnce import metrics, models
    from softnce.data import get_dataset

    config = small_config()
    result = train.train_and_evaluate(config, str(tmp_path))
    reported = json.load(open(tmp_path / "metrics.json"))
    assert {"t_star", "nll_calibrated", "ece_calibrated"} <= set(reported)
    assert reported["t_star"] == result["t_star"]
    calibrated_sums = json.load(open(tmp_path / "eval_sums_calibrated.json"))
    assert metrics.summarize(calibrated_sums)["nll"] == pytest.approx(reported["nll_calibrated"], rel=1e-9)

    dataset = get_dataset(config.data)
    assert dataset.num_validation_examples == round(0.1 * 1257)
    params = latest_params(str(tmp_path))[1]
    apply = jax.jit(lambda x: models.get_model(config.model, 10).apply({"params": params}, x, train=False))
    val_z = np.asarray(apply(dataset.val_inputs), np.float64)
    test_z = np.asarray(apply(dataset.eval_inputs), np.float64)

    def nll(z, labels, t):
        return -np.mean(log_softmax(z / t, axis=1)[np.arange(len(labels)), labels])

    t_star = reported["t_star"]
    val_nll = lambda t: nll(val_z, dataset.val_labels, t)  # noqa: E731
    assert val_nll(t_star) <= min(val_nll(t_star * 0.97), val_nll(t_star * 1.03)) + 1e-9  # a minimum
    assert reported["nll_calibrated"] == pytest.approx(nll(test_z, dataset.eval_labels, t_star), rel=1e-4)
    assert reported["nll"] == pytest.approx(nll(test_z, dataset.eval_labels, 1.0), rel=1e-4)
    # Fitting on the test split instead would give a different temperature.
    assert abs(metrics.fit_temperature(test_z, dataset.eval_labels) - t_star) > 1e-4


def _noisy_inputs(keys, inputs):
    """A device_train_transform: per-example Gaussian noise drawn from the trainer's example keys."""
    return inputs + 0.3 * jax.vmap(lambda k: jax.random.normal(k, inputs.shape[1:]))(keys)


def make_noisy_digits_dataset(config, *, process_index, process_count):
    from softnce.data import digits

    dataset = digits.make_digits_dataset(config, process_index=process_index, process_count=process_count)
    dataset.device_train_transform = _noisy_inputs
    return dataset


def test_resume_is_exact_with_a_device_input_transform(tmp_path, register_for_test):
    """The per-example keys of a device_train_transform follow the restored step: stop + resume
    ends with the parameters of an uninterrupted run."""
    register_for_test(DATASETS, "noisy_digits", make_noisy_digits_dataset)
    config = small_config(**{"data.name": "noisy_digits"})
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6) == {"preempted_at_step": 6}
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    (sa, pa), (sb, pb) = latest_params(str(tmp_path / "straight")), latest_params(str(tmp_path / "resumed"))
    assert sa == sb == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), pa, pb)
    plain = train.train_and_evaluate(small_config(), str(tmp_path / "plain"))  # the transform matters
    assert not np.allclose(jax.tree.leaves(latest_params(str(tmp_path / "plain"))[1])[0], jax.tree.leaves(pa)[0])
    assert np.isfinite(plain["nll"])
