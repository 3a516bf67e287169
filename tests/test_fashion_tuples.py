"""Fashion-MNIST k-tuples: classes, split sizes, labels and splits recomputed from the component images,
seeds, the batch statistics at many classes, and the real CLI, on the small fake Fashion-MNIST of
test_fashion_mnist.py (120 training and 40 test images)."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from test_fashion_mnist import REPO, SIZES, prepared  # noqa: F401  (prepared: the fake IDX fixture)

from softnce import assembly, config_checks
from softnce.data import fashion_mnist as fm
from softnce.data import fashion_tuples as ft
from softnce.data import get_dataset
from softnce.data.arrays import carve_validation

NUM = {"train": 50, "validation": 20, "test": 30}


def tuples_config(data_dir, k=2, **fields):
    config = ml_collections.ConfigDict(dict(
        name="fashion_mnist_tuples", data_dir=data_dir, tuple_size=k, pool_size=2, seed=0,
        num_train=NUM["train"], num_val=NUM["validation"], num_test=NUM["test"],
        validation_fraction=0.1, validation_seed=0,
    ))
    config.update(fields)
    return config


def build(config):
    return get_dataset(config)  # through the registry, as the trainer builds it


def split_arrays(ds):
    return {"train": (ds.train_inputs, ds.train_labels), "validation": (ds.val_inputs, ds.val_labels),
            "test": (ds.eval_inputs, ds.eval_labels)}


def expected_sources(data_dir, pool_size=2):
    """``{split: (images float64 [n, 28/p, 28/p], labels)}``, normalised and pooled here, independently."""
    x_train, y_train = fm.load_split(data_dir, "train")
    x_test, y_test = fm.load_split(data_dir, "test")
    x_train, y_train, x_val, y_val = carve_validation(x_train, y_train, 0.1, 0)  # the split fashion_mnist uses
    out = {}
    for split, (x, y) in {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}.items():
        x = (x[..., 0].astype(np.float64) / 255 - 0.2860) / 0.3530
        side = 28 // pool_size
        pooled = np.zeros((len(x), side, side))
        for a in range(pool_size):
            for b in range(pool_size):
                pooled += x[:, a::pool_size, b::pool_size]
        out[split] = (pooled / pool_size**2, y)
    return out


def match_components(inputs, k, sources):
    """For each of the ``k`` slices of every tuple: ``(split, index)`` of the one source image it equals."""
    names = [s for s in sources for _ in range(len(sources[s][1]))]
    indices = np.concatenate([np.arange(len(sources[s][1])) for s in sources])
    pool = np.concatenate([sources[s][0] for s in sources]).reshape(len(names), -1)
    width = inputs.shape[2] // k
    splits, found = np.empty((len(inputs), k), object), np.empty((len(inputs), k), int)
    for i in range(k):
        pieces = inputs[:, :, i * width : (i + 1) * width, 0].reshape(len(inputs), -1).astype(np.float64)
        distances = np.sqrt(((pieces[:, None, :] - pool[None]) ** 2).mean(-1))  # RMS per pixel
        nearest = np.sort(distances, axis=1)
        assert nearest[:, 0].max() < 1e-5, "a tuple slice equals no source image"
        assert nearest[:, 1].min() > 0.1, "a tuple slice equals two source images"
        best = distances.argmin(axis=1)
        splits[:, i] = np.asarray(names, object)[best]
        found[:, i] = indices[best]
    return splits, found


# ---------------------------------------------------------------------------------------- the dataset


@pytest.mark.parametrize("k", [1, 2, 3])
def test_class_count_names_and_shapes(prepared, k):  # noqa: F811
    ds = build(tuples_config(prepared[0], k))
    assert ds.num_classes == 10**k == len(ds.class_names) and ds.tuple_size == k
    assert ds.class_names[0] == "0" * k and ds.class_names[-1] == "9" * k
    assert ds.class_names[7] == f"{7:0{k}d}" and all(len(name) == k for name in ds.class_names)
    assert ds.example_shape == (14, 14 * k, 1)
    counts = ds.train_label_counts()
    assert counts.shape == (10**k,) and counts.sum() == NUM["train"]
    np.testing.assert_array_equal(counts, np.bincount(ds.train_labels, minlength=10**k))


def test_every_split_has_its_configured_size(prepared):  # noqa: F811
    ds = build(tuples_config(prepared[0], 2))
    assert (ds.num_train_examples, ds.num_validation_examples, ds.num_eval_examples) == (50, 20, 30)
    for split, (inputs, labels) in split_arrays(ds).items():
        assert inputs.shape == (NUM[split], 14, 28, 1) and labels.shape == (NUM[split],) and inputs.dtype == np.float32
        assert ds.components[split].shape == (NUM[split], 2)
    assert sum(b["mask"].sum() for b in ds.eval_batches(16)) == 30
    assert sum(b["mask"].sum() for b in ds.validation_batches(16)) == 20
    assert next(iter(ds.train_batches(8, seed=0)))["inputs"].shape == (8, 14, 28, 1)
    full = build(tuples_config(prepared[0], 3, pool_size=1, num_train=7, num_val=5, num_test=3))
    assert full.example_shape == (28, 84, 1)
    assert (full.num_train_examples, full.num_validation_examples, full.num_eval_examples) == (7, 5, 3)
    none = build(tuples_config(prepared[0], 2, validation_fraction=0.0))
    assert none.num_validation_examples == 0 and "validation" not in none.components
    with pytest.raises(ValueError, match="has no validation split"):
        none.validation_batches(16)


@pytest.mark.parametrize("k, pool_size", [(2, 2), (3, 1)])
def test_labels_and_splits_recomputed_from_the_component_images(prepared, k, pool_size):  # noqa: F811
    data_dir, _ = prepared
    ds = build(tuples_config(data_dir, k, pool_size=pool_size))
    sources = expected_sources(data_dir, pool_size)
    assert {s: len(sources[s][1]) for s in sources} == {"train": 108, "validation": 12, "test": SIZES["test"]}
    for split, (inputs, labels) in split_arrays(ds).items():
        splits, found = match_components(inputs, k, sources)
        # Each tuple's images come from its own split only: training tuples never show a validation or
        # test image, and so on (matched by content against all 160 images).
        assert set(splits.ravel()) == {split}, (split, set(splits.ravel()))
        np.testing.assert_array_equal(found, ds.components[split])
        digits = sources[split][1][found]  # [n, k] labels of the component images, left to right
        expected = sum(digits[:, i].astype(np.int64) * 10 ** (k - 1 - i) for i in range(k))
        np.testing.assert_array_equal(labels, expected)
        assert [ds.class_names[y] for y in labels] == ["".join(str(d) for d in row) for row in digits]


def test_reproducible_from_the_seed_and_different_across_seeds(prepared):  # noqa: F811
    data_dir, _ = prepared
    first, again = build(tuples_config(data_dir, 3, seed=5)), build(tuples_config(data_dir, 3, seed=5))
    other = build(tuples_config(data_dir, 3, seed=6))
    for split in NUM:
        for a, b in zip(split_arrays(first)[split], split_arrays(again)[split]):
            np.testing.assert_array_equal(a, b)
        assert np.mean(first.components[split] != other.components[split]) > 0.5, split
    # Each split has its own stream: more test tuples leave the training and validation tuples as they were.
    more = build(tuples_config(data_dir, 3, seed=5, num_test=40))
    np.testing.assert_array_equal(more.components["train"], first.components["train"])
    np.testing.assert_array_equal(more.components["validation"], first.components["validation"])
    np.testing.assert_array_equal(more.components["test"][:30], first.components["test"])


def test_tuple_and_pool_sizes_out_of_range_are_config_errors(prepared):  # noqa: F811
    tuple_size = r"data.tuple_size = 4 is out of range: must be an integer in \[1, 3\]"
    with pytest.raises(config_checks.ConfigError, match=tuple_size):
        build(tuples_config(prepared[0], 4))
    pool_size = r"data.pool_size = 3 is out of range: must divide 28 \(one of 1, 2, 4, 7, 14, 28\)"
    with pytest.raises(config_checks.ConfigError, match=pool_size):
        build(tuples_config(prepared[0], 2, pool_size=3))


def test_config_variants_pass_the_checks():
    from softnce.configs import fashion_tuples

    config = fashion_tuples.get_config()
    assert (config.data.name, config.data.tuple_size, config.data.pool_size) == ("fashion_mnist_tuples", 3, 2)
    assert config.model.name == "small_cnn" and config.augment.mixup_alpha == 0.8
    assembly.validate_config(config)
    config = fashion_tuples.get_config("k=1,loss=nll,seed=4,pool=1,steps=10")
    assert (config.data.tuple_size, config.data.pool_size, config.data.seed, config.seed) == (1, 1, 4, 4)
    assert config.augment.mixup_alpha == 0.0 and config.num_train_steps == 10 and config.optim.warmup_steps == 9
    assembly.validate_config(config)


# ------------------------------------------------------------------------------ batch statistics


@pytest.mark.parametrize("m, c", [(128, 10), (128, 100), (128, 1000), (1024, 1000), (2, 3)])
def test_batch_class_statistics_uniform_closed_form(m, c):
    for distribution in (np.ones(c), np.full(c, 7)):  # probabilities or counts
        stats = ft.batch_class_statistics(m, distribution)
        assert stats.same_class_share == pytest.approx(1 / c, rel=1e-12)
        assert stats.same_class_negatives == pytest.approx((m - 1) / c, rel=1e-12)
        assert stats.absent_share == pytest.approx((1 - 1 / c) ** m, rel=1e-12)
        assert stats.absent_classes == pytest.approx(c * (1 - 1 / c) ** m, rel=1e-12)
    # Without replacement from a large uniform split the draws are nearly independent.
    exact = ft.batch_class_statistics(m, np.full(c, 10**6), without_replacement=True)
    assert exact.same_class_share == pytest.approx(1 / c, rel=1e-3)
    assert exact.absent_share == pytest.approx((1 - 1 / c) ** m, rel=1e-3, abs=1e-12)


def simulate(labels, num_classes, m, rng, *, batches=20000, replace=False):
    """Monte Carlo ``(same-class share, absent share)`` of batches of ``m`` drawn from ``labels``."""
    if replace:
        batch = labels[rng.integers(0, len(labels), size=(batches, m))]
    else:
        batch = labels[np.argsort(rng.random((batches, len(labels))), axis=1)[:, :m]]
    counts = np.stack([np.bincount(b, minlength=num_classes) for b in batch])
    same = (counts * (counts - 1)).sum(1) / (m * (m - 1))  # per batch: mean over positives of the share
    return same.mean(), (counts == 0).mean()


@pytest.mark.parametrize("replace", [False, True])
def test_batch_class_statistics_against_simulation(replace):
    counts = np.array([50, 30, 10, 5, 5, 0])
    labels = np.repeat(np.arange(len(counts)), counts)
    stats = ft.batch_class_statistics(16, counts, without_replacement=not replace)
    same, absent = simulate(labels, len(counts), 16, np.random.default_rng(0), replace=replace)
    assert stats.same_class_share == pytest.approx(same, abs=3e-3)
    assert stats.absent_share == pytest.approx(absent, abs=3e-3)
    assert stats.absent_share >= 1 / 6  # the class without examples is always absent


def test_batch_class_statistics_of_the_actual_training_labels(prepared):  # noqa: F811
    ds = build(tuples_config(prepared[0], 2, num_train=500))
    stats = ft.batch_class_statistics(32, ds.train_label_counts(), without_replacement=True)
    same, absent = simulate(ds.train_labels, 100, 32, np.random.default_rng(1), batches=4000)
    assert stats.same_class_share == pytest.approx(same, abs=1e-3)
    assert stats.absent_share == pytest.approx(absent, abs=5e-3)
    assert 0.65 < stats.absent_share < 0.8  # about (1 - 1/100)^32 = 0.72


def test_batch_class_statistics_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"):
        ft.batch_class_statistics(1, np.ones(10))
    with pytest.raises(ValueError, match="needs integer label counts"):
        ft.batch_class_statistics(4, np.full(10, 0.1), without_replacement=True)
    with pytest.raises(ValueError, match="needs at least 20 examples"):
        ft.batch_class_statistics(20, np.ones(10), without_replacement=True)
    with pytest.raises(ValueError, match="non-negative numbers"):
        ft.batch_class_statistics(4, np.array([1.0, -1.0]))


# ------------------------------------------------------------------------------ end to end


def test_cli_trains_k2_end_to_end(prepared, tmp_path, cli_env):  # noqa: F811
    from softnce import inference

    data_dir, _ = prepared
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "softnce.main",
           "--config=configs/fashion_tuples.py:k=2,loss=soft_target_infonce,steps=4",
           f"--config.data.data_dir={data_dir}", "--config.data.num_train=2000", "--config.data.num_val=20",
           "--config.data.num_test=30", "--config.data.batch_size=32", "--config.data.eval_batch_size=16",
           "--config.model.channels=(4, 8)", "--config.model.hidden=16", "--config.log_every_steps=2",
           f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "step 4/4" in out
    metrics = json.load(open(workdir / "metrics.json"))
    assert metrics["num_examples"] == 30 and metrics["step"] == 4
    assert 0.0 <= metrics["top1"] <= 1.0 and np.isfinite(metrics["nll"]) and metrics["t_star"] > 0
    config = json.load(open(workdir / "config.json"))
    assert config["data"]["name"] == "fashion_mnist_tuples" and config["data"]["tuple_size"] == 2
    # The checkpoint carries the 100 class names and the training-label prior of the same tuples.
    clf = inference.load(str(workdir))
    assert clf.class_names == [f"{c:02d}" for c in range(100)]
    counts = build(ml_collections.ConfigDict(config["data"])).train_label_counts()
    np.testing.assert_allclose(clf.noise_probs, counts / counts.sum(), rtol=1e-5)
    assert clf.predict(np.zeros((2, 14, 28, 1), np.float32)).shape == (2,)
