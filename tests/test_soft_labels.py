"""Soft targets given with the data, for any dataset: validation, the npz and tfds_arrays datasets, MixUp and
label smoothing of the given targets in the trainer, the noise prior, and a user's dataset through the CLI."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from test_train import REPO, small_config

from softnce import assembly, steps, targets, train
from softnce.config_checks import ConfigError
from softnce.configs import npz as npz_config
from softnce.data import get_dataset
from softnce.data.arrays import ArrayDataset, held_out_mask

C = 3


def soft_data(n, seed=0, dim=6):
    """Vectors, labels and vote distributions (the label gets the most votes), reproducible."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    votes = rng.integers(0, 3, (n, C)) + 4 * np.eye(C, dtype=int)[labels]
    inputs = 2.0 * np.eye(C, dim)[labels] + rng.normal(size=(n, dim))
    return inputs.astype(np.float32), labels, votes / votes.sum(1, keepdims=True)


def write_npz(directory, name="train", n=120, seed=0, **replace):
    x, y, t = soft_data(n, seed)
    arrays = dict(inputs=x, labels=y, targets=t)
    arrays.update(replace)
    path = os.path.join(directory, f"{name}.npz")
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path, arrays


def npz_run_config(train_file, test_file, arg="", **overrides):
    config = npz_config.get_config(arg)
    config.data.update(train_file=train_file, test_file=test_file, batch_size=32, eval_batch_size=64)
    config.update_from_flattened_dict(overrides)
    return config


# --------------------------------------------------------------------------------------------------
# Validation before training.
# --------------------------------------------------------------------------------------------------


def test_given_targets_are_validated_and_the_first_bad_row_is_named(tmp_path):
    x, y, t = soft_data(10)
    bad = t.copy()
    bad[3] *= 0.5
    with pytest.raises(ValueError, match=r"train_targets: targets row 3 sums to 0.5, not 1"):
        ArrayDataset(x, y, x, y, num_classes=C, train_targets=bad)
    bad = t.copy()
    bad[7] = [1.2, -0.2, 0.0]
    path, _ = write_npz(str(tmp_path), targets=np.vstack([bad] * 12))  # 120 rows, the first bad one is row 7
    with pytest.raises(ValueError, match=r"train.npz: targets: targets row 7 has negative entries"):
        get_dataset(npz_run_config(path, path).data)
    path, _ = write_npz(str(tmp_path), name="nolabels", labels=None)
    with pytest.raises(ValueError, match=r"nolabels.npz has no labels array"):
        get_dataset(npz_run_config(path, path).data)


# --------------------------------------------------------------------------------------------------
# The npz dataset and the noise prior.
# --------------------------------------------------------------------------------------------------


def test_npz_dataset_splits_targets_with_their_examples(tmp_path):
    train_file, arrays = write_npz(str(tmp_path))
    test_file, test_arrays = write_npz(str(tmp_path), "test", n=40, seed=1)
    config = npz_run_config(train_file, test_file)
    dataset = get_dataset(config.data)
    held_out = held_out_mask(120, 0.1, 0)
    assert (dataset.num_classes, dataset.num_train_examples, dataset.num_validation_examples) == (C, 108, 12)
    np.testing.assert_array_equal(dataset.train_inputs, arrays["inputs"][~held_out])
    np.testing.assert_allclose(dataset.train_targets, arrays["targets"][~held_out], rtol=1e-6)
    np.testing.assert_array_equal(dataset.val_labels, arrays["labels"][held_out])
    np.testing.assert_array_equal(dataset.eval_labels, test_arrays["labels"])
    batch = next(dataset.train_batches(16, seed=0))
    rows = [int(np.flatnonzero((dataset.train_inputs == b).all(1))[0]) for b in batch["inputs"]]
    np.testing.assert_array_equal(batch["targets"], dataset.train_targets[rows])  # each example with its targets
    np.testing.assert_allclose(dataset.train_target_sums(), arrays["targets"][~held_out].sum(0), rtol=1e-6)


def test_noise_distribution_from_counts_target_mean_or_explicit_against_hand_computation(tmp_path):
    train_file, arrays = write_npz(str(tmp_path))
    config = npz_run_config(train_file, train_file)
    dataset = get_dataset(config.data)
    held_out = held_out_mask(120, 0.1, 0)
    labels, soft = arrays["labels"][~held_out], arrays["targets"][~held_out].astype(np.float32)
    for smoothing in (0.0, 2.0):
        config.loss.prior_smoothing = smoothing
        config.loss.noise = "class_prior"
        counts = np.bincount(labels, minlength=C)
        np.testing.assert_allclose(assembly.log_noise_probs(config, dataset),
                                   np.log((counts + smoothing) / (108 + C * smoothing)), rtol=1e-6)
        config.loss.noise = "target_mean"
        mass = soft.astype(np.float64).sum(0)
        np.testing.assert_allclose(assembly.log_noise_probs(config, dataset),
                                   np.log((mass + smoothing) / (108 + C * smoothing)), rtol=1e-5)
    np.testing.assert_allclose(np.exp(assembly.log_noise_probs(config, dataset)).sum(), 1.0, rtol=1e-6)
    config.loss.prior_smoothing = 0.0
    np.testing.assert_allclose(np.exp(assembly.log_noise_probs(config, dataset)), soft.mean(0), rtol=1e-5)  # the mean
    config.loss.noise, config.loss.noise_probs = "explicit", (0.5, 0.3, 0.2)
    assembly.validate_config(config)
    np.testing.assert_allclose(assembly.log_noise_probs(config, dataset), np.log([0.5, 0.3, 0.2]), rtol=1e-6)
    config.loss.noise_probs = (0.5, 0.5)
    with pytest.raises(ConfigError, match=r"noise_probs has 2 entries; the dataset has 3 classes"):
        assembly.log_noise_probs(config, dataset)
    config.loss.noise_probs = (0.5, 0.3, 0.3)
    with pytest.raises(ConfigError, match=r"must be positive and sum to 1 .* it sums to 1.1"):
        assembly.log_noise_probs(config, dataset)
    config.loss.noise_probs = None
    with pytest.raises(ConfigError, match=r"noise='explicit' and config.loss.noise_probs .* go together"):
        assembly.validate_config(config)
    config.loss.noise = "uniform"
    assert assembly.log_noise_probs(config, dataset) is None
    # target_mean needs targets given with the data.
    digits = small_config(**{"loss.noise": "target_mean"})
    with pytest.raises(ConfigError, match=r"'target_mean' is the mean of the soft targets .* 'digits' gives none"):
        assembly.log_noise_probs(digits, get_dataset(digits.data))


# --------------------------------------------------------------------------------------------------
# Smoothing and mixing of the given targets in the trainer.
# --------------------------------------------------------------------------------------------------


def test_trainer_smooths_and_mixes_given_targets_and_keeps_them_as_they_are_otherwise():
    x, y, t = soft_data(8)
    batch = {"inputs": x, "label": y.astype(np.int32), "targets": t.astype(np.float32)}
    rng = jax.random.PRNGKey(0)
    # Neither smoothing nor mixing: the given array itself (the toy's path, bit for bit).
    inputs, made = steps.make_targets(rng, batch, num_classes=C, mix_config=targets.MixConfig())
    assert inputs is batch["inputs"] and made.dense is batch["targets"] and made.structured is None
    # Smoothing alone applies to the given targets (never silently skipped).
    _, made = steps.make_targets(rng, batch, num_classes=C, mix_config=targets.MixConfig(label_smoothing=0.1))
    np.testing.assert_allclose(made.dense, 0.9 * t + 0.1 / C, rtol=1e-6)
    # MixUp mixes the smoothed given targets with the partner's (batch mode: one lambda).
    mix = targets.MixConfig(label_smoothing=0.1, mixup_alpha=0.8, structured=True)
    inputs, made = steps.make_targets(rng, batch, num_classes=C, mix_config=mix)
    lam = float((inputs[0, 0] - x[-1, 0]) / (x[0, 0] - x[-1, 0]))
    smooth = 0.9 * t + 0.1 / C
    np.testing.assert_allclose(made.dense, lam * smooth + (1 - lam) * smooth[::-1], rtol=1e-4, atol=1e-6)
    assert 0 < lam < 1 and made.structured is None  # STI uses the dense targets


# --------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------


def test_npz_dataset_trains_with_mixup_of_its_soft_targets(tmp_path):
    train_file, _ = write_npz(str(tmp_path), n=400)
    test_file, _ = write_npz(str(tmp_path), "test", n=64, seed=1)
    config = npz_run_config(train_file, test_file, "augment=mixup,steps=8,noise=target_mean",
                            **{"optim.base_lr": 0.02})
    assert config.augment.mixup_alpha == 0.8 and config.augment.cutmix_alpha == 0.0
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 8 and np.isfinite(result["nll"]) and result["top1"] > 0.5  # chance is 1/3
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["data"]["name"] == "npz" and saved["loss"]["noise"] == "target_mean"


def test_a_users_soft_target_dataset_trains_with_mixup_through_the_cli(tmp_path, cli_env):
    """tests/user_registrations.py registers 'user_soft_blobs' outside the package; --import_modules loads it."""
    env = dict(cli_env, PYTHONPATH=os.path.join(REPO, "tests"))
    cmd = [sys.executable, "-m", "softnce.main", "--import_modules=user_registrations",
           "--config=configs/npz.py:augment=mixup,steps=6,model=mlp", "--config.data.name=user_soft_blobs",
           "--config.data.batch_size=64", "--config.optim.base_lr=0.02", "--num_cpu_devices=2",
           f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "step 6/6" in out
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert np.isfinite(metrics["nll"]) and metrics["num_examples"] == 160


# --------------------------------------------------------------------------------------------------
# tfds with a soft-label feature.
# --------------------------------------------------------------------------------------------------


def _store_tfds(name: str, data_dir, splits: dict) -> None:
    """Prepares ``splits`` (``{split: {feature: [n, ...]}}``) as the array_record tfds dataset ``name``."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, "PNG")
        return buffer.getvalue()

    class Votes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 1)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                "votes": tfds.features.Tensor(shape=(C,), dtype=np.int64)}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(arrays) for split, arrays in splits.items()}

        def _generate_examples(self, arrays):
            for i in range(len(arrays["label"])):
                yield i, {"image": png(arrays["image"][i]), "label": int(arrays["label"][i]),
                          "votes": arrays["votes"][i]}

    Votes.name = name
    Votes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_dataset_with_a_vote_count_feature(tmp_path):
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 40), ("test", 10)):
        labels = rng.integers(0, C, n)
        votes = rng.integers(0, 3, (n, C)) + 2 * np.eye(C, dtype=np.int64)[labels]
        images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
        splits[split] = dict(image=images, label=labels, votes=votes.astype(np.int64))
    _store_tfds("soft_votes_test", tmp_path, splits)
    config = ml_collections.ConfigDict(dict(name="tfds_arrays", tfds_name="soft_votes_test", data_dir=str(tmp_path),
                                            targets_key="votes", validation_fraction=0.25, validation_seed=0))
    dataset = get_dataset(config)
    held_out = held_out_mask(40, 0.25, 0)
    train_split = splits["train"]
    assert (dataset.num_classes, dataset.num_train_examples, dataset.num_validation_examples) == (C, 30, 10)
    assert dataset.class_names == ("a", "b", "c")
    votes = train_split["votes"][~held_out].astype(np.float64)
    np.testing.assert_allclose(dataset.train_targets, votes / votes.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(dataset.train_labels, train_split["label"][~held_out])
    pixels = train_split["image"][~held_out].astype(np.float64) / 255
    expected = (pixels - pixels.mean()) / pixels.std()  # one channel: the training split's mean and std
    np.testing.assert_allclose(dataset.train_inputs, expected, rtol=1e-4, atol=1e-4)
    # A row without votes is named before training.
    bad = dict(splits["train"], votes=np.vstack([splits["train"]["votes"][:5], np.zeros((1, C), np.int64),
                                                 splits["train"]["votes"][6:]]))
    _store_tfds("soft_votes_bad", tmp_path, {"train": bad, "test": splits["test"]})
    with pytest.raises(ValueError, match=r"feature 'votes': targets row 5 has non-finite entries"):
        get_dataset(ml_collections.ConfigDict(dict(config, tfds_name="soft_votes_bad")))
