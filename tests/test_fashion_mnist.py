"""Fashion-MNIST: the IDX reader, the tfds preparation, the in-memory dataset, the CNN, the real CLI and
the comparison script, all on small IDX files written here (no package, no internet needed)."""

import glob
import gzip
import json
import math
import os
import re
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from softnce.data import fashion_mnist as fm
from softnce.experiments import comparison, fair_comparison
from softnce.models.cnn import SmallCNN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {"train": 120, "test": 40}


def idx_bytes(array: np.ndarray, *, images: bool) -> bytes:
    """The IDX encoding of uint8 ``array`` (``[n, 28, 28]`` images or ``[n]`` labels), written independently."""
    magic = 0x0803 if images else 0x0801
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_dir(directory, seed=0, compress=True) -> dict:
    """Writes the four Fashion-MNIST files with random contents; returns ``{split: (images, labels)}``."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in SIZES.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)  # every class present
        rng.shuffle(labels)
        for stem, array, is_images in zip(fm.IDX_FILES[split], (images, labels), (True, False)):
            raw = idx_bytes(array, images=is_images)
            if compress:
                with open(os.path.join(directory, stem + ".gz"), "wb") as f:
                    f.write(gzip.compress(raw))
            else:
                with open(os.path.join(directory, stem), "wb") as f:
                    f.write(raw)
        data[split] = (images, labels)
    return data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``(data_dir, written data)``: small IDX files prepared through the tfds builder."""
    root = tmp_path_factory.mktemp("fashion")
    data = write_idx_dir(str(root / "idx"))
    fm.prepare(str(root / "tfds"), str(root / "idx"))
    return str(root / "tfds"), data


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    data = write_idx_dir(str(tmp_path), compress=compress)
    for split in SIZES:
        images, labels = fm.read_idx_split(str(tmp_path), split)
        np.testing.assert_array_equal(images, data[split][0][..., None])
        np.testing.assert_array_equal(labels, data[split][1])
        assert images.shape == (SIZES[split], 28, 28, 1)


def test_truncated_images_file_is_a_clear_error(tmp_path):
    write_idx_dir(str(tmp_path), compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is truncated: its header announces 120 images"):
        fm.read_idx_split(str(tmp_path), "train")


def test_truncated_gzip_is_a_clear_error(tmp_path):
    write_idx_dir(str(tmp_path))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz is a damaged or truncated gzip file"):
        fm.read_idx_split(str(tmp_path), "test")


def test_mismatched_label_file_is_a_clear_error(tmp_path):
    write_idx_dir(str(tmp_path))
    labels = np.zeros(SIZES["train"] - 1, np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, images=False)))
    with pytest.raises(ValueError, match=r"holds 120 images but .* holds 119 labels: the files do not belong together"):
        fm.read_idx_split(str(tmp_path), "train")


def test_swapped_files_and_bad_labels_are_clear_errors(tmp_path):
    write_idx_dir(str(tmp_path), compress=False)
    with pytest.raises(ValueError, match=r"is not an IDX images file: expected magic number 0x00000803"):
        fm.read_idx(str(tmp_path / "train-labels-idx1-ubyte"), images=True)
    (tmp_path / "bad").write_bytes(idx_bytes(np.array([3, 10], np.uint8), images=False))
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\)"):
        fm.read_idx(str(tmp_path / "bad"), images=False)
    (tmp_path / "small").write_bytes(idx_bytes(np.zeros((2, 8, 8), np.uint8), images=True))
    with pytest.raises(ValueError, match=r"images are 8x8, Fashion-MNIST's are 28x28"):
        fm.read_idx(str(tmp_path / "small"), images=True)


# ------------------------------------------------------------------------------ tfds preparation


def test_prepare_round_trips_through_tfds(prepared):
    data_dir, data = prepared
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)  # tfds's own builder reads what we wrote
    assert builder.is_prepared()
    assert {s: builder.info.splits[s].num_examples for s in SIZES} == SIZES
    assert builder.info.features["label"].names[0] == "T-shirt/top"
    for split in SIZES:
        images, labels = fm.load_split(data_dir, split)
        assert images.shape == (SIZES[split], 28, 28, 1) and images.dtype == np.uint8
        # tfds stores the examples in its own (hashed-key) order: compare as sets of (image, label).
        written = {img.tobytes(): int(lab) for img, lab in zip(*data[split])}
        read = {img[..., 0].tobytes(): int(lab) for img, lab in zip(images, labels)}
        assert read == written


def test_prepare_checks_every_file_before_writing(tmp_path):
    write_idx_dir(str(tmp_path / "idx"))
    path = tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8), images=False)))
    with pytest.raises(ValueError, match="do not belong together"):
        fm.prepare(str(tmp_path / "tfds"), str(tmp_path / "idx"))
    assert not fm.FashionMnist(data_dir=str(tmp_path / "tfds")).is_prepared()


def test_partial_idx_dir_is_a_clear_error(tmp_path):
    write_idx_dir(str(tmp_path / "idx"))
    os.remove(tmp_path / "idx" / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"missing t10k-images-idx3-ubyte.gz") as error:
        fm.prepare(str(tmp_path / "tfds"), str(tmp_path / "idx"))
    assert "python -m softnce.data.fashion_mnist" in str(error.value) and "--download" in str(error.value)


def test_unprepared_data_gives_both_commands(tmp_path):
    config = fm_config(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError) as error:
        fm.make_fashion_mnist_dataset(config, process_index=0, process_count=1)
    message = str(error.value)
    assert "is not prepared" in message
    assert f"python -m softnce.data.fashion_mnist --data_dir {tmp_path / 'nothing'}" in message
    assert "--download" in message and "apt-get install dataset-fashion-mnist" in message


# ------------------------------------------------------------------------------ dataset and model


def fm_config(data_dir, fraction=0.1):
    import ml_collections

    return ml_collections.ConfigDict(dict(name="fashion_mnist", data_dir=data_dir, validation_fraction=fraction,
                                          validation_seed=0))


def test_dataset_splits_and_normalisation(prepared):
    data_dir, data = prepared
    ds = fm.make_fashion_mnist_dataset(fm_config(data_dir), process_index=0, process_count=1)
    assert (ds.num_train_examples, ds.num_validation_examples, ds.num_eval_examples) == (108, 12, 40)
    assert ds.example_shape == (28, 28, 1) and ds.num_classes == 10
    # Train and validation together are exactly the written training set.
    together = np.concatenate([ds.train_inputs, ds.val_inputs])
    expected = (data["train"][0][..., None].astype(np.float64) / 255 - 0.2860) / 0.3530
    order = lambda x: np.lexsort(x.reshape(len(x), -1).T[::-1])  # noqa: E731
    np.testing.assert_allclose(together[order(together)], expected[order(expected)], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.sort(np.concatenate([ds.train_labels, ds.val_labels])), np.sort(data["train"][1]))
    expected_test = (data["test"][0][..., None].astype(np.float64) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.eval_inputs[order(ds.eval_inputs)], expected_test[order(expected_test)],
                               rtol=1e-5, atol=1e-5)
    assert ds.train_label_counts().sum() == 108
    batches = list(ds.validation_batches(8))
    assert sum(b["mask"].sum() for b in batches) == 12


def test_training_subset_and_input_augmentation_options(prepared):
    from softnce.data import array_augment

    data_dir, _ = prepared
    full = fm.make_fashion_mnist_dataset(fm_config(data_dir), process_index=0, process_count=1)
    assert full.device_train_transform is None  # off by default
    config = fm_config(data_dir)
    config.update(dict(num_train_examples=50, random_crop_padding=4, random_flip=True))
    ds = fm.make_fashion_mnist_dataset(config, process_index=0, process_count=1)
    # The first 50 training images; the validation and test splits are unchanged.
    np.testing.assert_array_equal(ds.train_inputs, full.train_inputs[:50])
    assert (ds.num_train_examples, ds.num_validation_examples, ds.num_eval_examples) == (50, 12, 40)
    np.testing.assert_array_equal(ds.val_inputs, full.val_inputs)
    assert ds.train_label_counts().sum() == 50
    black = (0 - 0.2860) / 0.3530  # the padding is a black pixel, normalised
    assert ds.device_train_transform == array_augment.CropFlip(padding=4, flip=True, fill=pytest.approx(black))


def test_small_cnn_shapes_and_parameter_count():
    model = SmallCNN(num_classes=10, channels=(32, 64), convs_per_stage=2, hidden=128)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)["params"]
    # 3x3 convolutions with bias: 1->32, 32->32, 32->64, 64->64; then 7*7*64 -> 128 -> 10.
    expected = (9 * 1 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64)
    expected += (7 * 7 * 64 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.size for p in jax.tree.leaves(params)) == expected
    logits = model.apply({"params": params}, jnp.ones((3, 28, 28, 1)), train=False)
    assert logits.shape == (3, 10)
    with pytest.raises(ValueError, match=r"expects images \[B, H, W, c\]"):
        model.apply({"params": params}, jnp.ones((3, 784)), train=False)


# ------------------------------------------------------------------------------ end to end


def tiny_args(data_dir):
    return [
        f"--config.data.data_dir={data_dir}",
        "--config.data.batch_size=32",
        "--config.data.eval_batch_size=16",
        "--config.model.channels=(4, 8)",
        "--config.model.hidden=16",
        "--config.optim.warmup_steps=1",
        "--config.log_every_steps=2",
    ]


def test_cli_trains_fashion_mnist_end_to_end(prepared, tmp_path, cli_env):
    data_dir, _ = prepared
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/fashion_mnist.py:loss=soft_target_infonce,steps=4",
           *tiny_args(data_dir), f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "step 4/4" in out and "steps/s" in out and "ETA" in out
    metrics = json.load(open(workdir / "metrics.json"))
    assert metrics["num_examples"] == SIZES["test"] and metrics["step"] == 4
    assert 0.0 <= metrics["top1"] <= 1.0 and np.isfinite(metrics["nll"])
    assert metrics["t_star"] > 0 and np.isfinite(metrics["nll_calibrated"])
    assert metrics["nll_calibrated"] <= metrics["nll"] + 0.05  # fitted on validation, reported on test
    assert (workdir / "reliability.png").exists()
    config = json.load(open(workdir / "config.json"))
    assert config["data"]["name"] == "fashion_mnist" and config["model"]["name"] == "small_cnn"
    assert config["augment"]["mixup_alpha"] == 0.8 and config["augment"]["label_smoothing"] == 0.1


def _copy_prepared(data_dir, destination):
    import shutil

    shutil.copytree(data_dir, destination)
    (train_file,) = glob.glob(os.path.join(destination, "fashion_mnist", "*", "fashion_mnist-train.array_record-*"))
    return train_file


def _cli_error_lines(data_dir, workdir, cli_env):
    cmd = [sys.executable, "-m", "softnce.main", "--config=configs/fashion_mnist.py:loss=nll,steps=4",
           *tiny_args(str(data_dir)), f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def test_damaged_record_stops_the_cli_with_one_line_naming_file_and_record(prepared, tmp_path, cli_env):
    train_file = _copy_prepared(prepared[0], tmp_path / "data")
    damaged = bytearray(open(train_file, "rb").read())
    middle = len(damaged) // 2
    damaged[middle : middle + 512] = bytes(b ^ 0x5A for b in damaged[middle : middle + 512])
    open(train_file, "wb").write(bytes(damaged))
    code, lines = _cli_error_lines(tmp_path / "data", tmp_path / "run", cli_env)
    assert code == 2 and len(lines) == 1, lines
    expected = (rf"softnce: error: damaged record in fashion_mnist train: {re.escape(train_file)}, "
                r"record \d+ \(RuntimeError: .*Corrupted.*\)\. Prepare the dataset again .*")
    assert re.fullmatch(expected, lines[0]), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training step


def test_tfrecord_data_gets_one_line_with_the_rebuild_command(prepared, tmp_path, cli_env):
    _copy_prepared(prepared[0], tmp_path / "data")
    (info_path,) = glob.glob(str(tmp_path / "data" / "fashion_mnist" / "*" / "dataset_info.json"))
    info = json.load(open(info_path))
    info["fileFormat"] = "tfrecord"
    json.dump(info, open(info_path, "w"))
    code, lines = _cli_error_lines(tmp_path / "data", tmp_path / "run", cli_env)
    assert code == 2 and len(lines) == 1, lines
    assert "was prepared as TFRecord" in lines[0]
    assert lines[0].endswith(f"rebuild it as array_record with: python -m softnce.data.fashion_mnist "
                             f"--data_dir {tmp_path / 'data'}"), lines[0]


def test_config_uses_hard_labels_for_nll_and_infonce():
    from softnce.configs import fashion_mnist as fashion_config

    for loss in ("nll", "infonce"):
        a = fashion_config.get_config(f"loss={loss}").augment
        assert (a.label_smoothing, a.mixup_alpha, a.cutmix_alpha) == (0.0, 0.0, 0.0)
    for loss in ("soft_target_infonce", "soft_target_cross_entropy", "soft_distribution_infonce"):
        a = fashion_config.get_config(f"loss={loss}").augment
        assert (a.label_smoothing, a.mixup_alpha, a.cutmix_alpha) == (0.1, 0.8, 1.0)


def test_comparison_script_end_to_end(prepared, tmp_path):
    data_dir, _ = prepared
    out = tmp_path / "grid"
    sets = ["data.batch_size=32", "data.eval_batch_size=16", "model.channels=(4, 8)", "model.hidden=16",
            "optim.warmup_steps=1"]
    result = comparison.main("fashion_mnist", [
        "--seeds", "1", "--steps", "2", "--losses", "nll,soft_target_infonce", "--data_dir", data_dir,
        "--out", str(out), *[f"--config.{s}" for s in sets],
    ])
    runs = result["results"]
    assert [r["seed"] for r in runs["nll"]["metrics"]] == [0]
    assert "t_star" in runs["nll"]["metrics"][0] and "ece_calibrated" in runs["nll"]["metrics"][0]
    assert runs["nll"]["targets"] == "hard labels"
    assert runs["soft_target_infonce"]["targets"] == "smoothing 0.1 + MixUp/CutMix"
    table = (out / "table.md").read_text()
    assert "| soft_target_infonce minus |" in table and "NLL at t*" in table
    assert table.count("(1/1)") + table.count("(0/1)") == 5  # one paired seed: 5 metric columns against nll
    assert (out / "reliability.png").exists()
    saved = json.load(open(out / "results.json"))
    assert saved["complete"] and len(saved["results"]["soft_target_infonce"]["metrics"]) == 1
    # Running again with more seeds keeps the finished run and trains only the new seed.
    again = comparison.main("fashion_mnist", [
        "--seeds", "2", "--steps", "2", "--losses", "nll", "--data_dir", data_dir, "--out", str(out),
        *[f"--config.{s}" for s in sets],
    ])["results"]["nll"]["metrics"]
    assert [r["seed"] for r in again] == [0, 1]
    assert again[0] == runs["nll"]["metrics"][0]
    assert "1 runs trained" in (out / "table.md").read_text()


def test_fair_comparison_quick_end_to_end(prepared, tmp_path):
    from softnce.experiments import fair_comparison

    data_dir, _ = prepared
    out = tmp_path / "fair"
    sets = ["data.batch_size=32", "data.eval_batch_size=16", "model.channels=(4, 8)", "model.hidden=16"]
    losses = ["nll", "soft_target_cross_entropy", "soft_target_infonce"]
    summary = fair_comparison.main(["--quick", "--losses", ",".join(losses), "--data_dir", data_dir, "--out", str(out),
                                    *[f"--config.{s}" for s in sets]])
    # Selection: 2 learning rates per loss, times 2 temperatures for STI, on validation only.
    selection = json.load(open(out / "selection" / "results.json"))["results"]
    assert [len(selection[loss]["metrics"]) for loss in losses] == [2, 2, 4]
    for runs in selection.values():
        for r in runs["metrics"]:
            assert "top1" not in r and "top1" in r["validation"] and r["seed"] == 0
            assert not (out / "selection" / r["workdir"] / "metrics.json").exists()  # the test split never read
    chosen = summary["selection"]["chosen"]
    assert set(chosen["soft_target_infonce"]["params"]) == {"optim.base_lr", "loss.temperature"}
    # The final runs: each loss at its chosen values on seed 1, with test metrics raw and at t*.
    final = json.load(open(out / "final" / "results.json"))["results"]
    for loss in losses:
        (record,) = final[loss]["metrics"]
        assert record["seed"] == 1 and {"top1", "nll_calibrated", "ece_calibrated"} <= set(record)
        assert record["params"] == chosen[loss]["params"]
    assert set(summary["paired"]) == {"nll", "soft_target_cross_entropy"}
    points = summary["selection"]["points"]  # every selection run's validation metrics, for the committed summary
    assert [len(points[loss]) for loss in losses] == [2, 2, 4]
    assert points["nll"][0]["validation"]["top1"] == selection["nll"]["metrics"][0]["validation"]["top1"]
    assert summary["test"]["nll"]["top1"]["seeds"] == [1] and summary["run_seconds"]["total"] > 0
    assert summary["paired"]["nll"]["nll_calibrated"]["seeds"] == 1
    assert set(summary["regime"]["settings"]["today's protocol"]) >= {"nll", "soft_target_cross_entropy"}
    for name in ("report.md", "summary.json", "regime.png", "selection/sweep.png", "final/table.md",
                 "final/reliability.png"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "| soft_target_infonce minus |" in report and "NLL at t*" in report and "**yes**" in report
    grid_table = fair_comparison.selection_grid_table({"results": selection, "selected": chosen})
    assert grid_table in report and grid_table.count("**") == 2 * len(losses)  # one chosen cell per loss
    assert "| soft_target_infonce | 2 |" in grid_table and "| lr 0.002 | lr 0.008 |" in grid_table


def test_paired_table_against_hand_computed_values():
    results = {
        "soft_target_infonce": {"targets": "soft", "metrics": [
            {"seed": 0, "top1": 0.90, "nll": 0.30}, {"seed": 1, "top1": 0.92, "nll": 0.28}]},
        "nll": {"targets": "hard", "metrics": [
            {"seed": 1, "top1": 0.91, "nll": 0.25}, {"seed": 0, "top1": 0.91, "nll": 0.35}]},
    }
    table = comparison.paired_table(results)
    # top-1 differences (pp): seed 0: -1, seed 1: +1 -> mean 0, std sqrt(2); STI wins 1 of 2.
    # NLL differences: seed 0: -0.05, seed 1: +0.03 -> mean -0.01, std 0.0566; STI lower on 1 of 2.
    assert "| nll | +0.00 ± 1.41 (1/2) | -0.010 ± 0.057 (1/2) |" in table
    summary = comparison.metrics_table(results)
    assert "| soft_target_infonce | soft | 2 | 91.00 ± 1.41 | 0.290 ± 0.014 |" in summary


def test_distillation_experiment_end_to_end(prepared, tmp_path):
    """The teacher through the real trainer, then the students on its targets (tiny models, 2 steps each)."""
    from softnce.experiments import distillation

    data_dir, _ = prepared
    out = tmp_path / "distill"
    sets = ["data.batch_size=32", "data.eval_batch_size=16", "model.channels=(4, 8)", "model.hidden=16",
            "optim.warmup_steps=1"]
    teacher = ["model.channels=(8, 8)", "model.hidden=16"]
    argv = ["--seeds", "1", "--steps", "2", "--teacher_steps", "2", "--tau", "2.0", "--data_dir", data_dir,
            "--out", str(out),
            *[f"--config.{s}" for s in sets], *[f"--teacher_config.{s}" for s in teacher]]
    result = distillation.main(argv)
    teacher_config = json.load(open(out / "teacher" / "config.json"))
    assert teacher_config["loss"]["name"] == "nll" and teacher_config["model"]["convs_per_stage"] == 2
    assert teacher_config["model"]["channels"] == [8, 8] and teacher_config["augment"]["mixup_alpha"] == 0.0
    assert 0 <= result["teacher"]["metrics"]["top1"] <= 1 and result["teacher"]["wall_seconds"] > 0
    runs = result["results"]
    assert list(runs) == ["nll", "soft_target_cross_entropy", "soft_target_infonce", "soft_distribution_infonce"]
    assert runs["nll"]["targets"] == "hard labels" and runs["soft_target_infonce"]["targets"] == "teacher at tau 2"
    student = json.load(open(out / "soft_target_infonce_seed0" / "config.json"))
    assert student["distill"]["teacher_workdir"] == str(out / "teacher") and student["distill"]["tau"] == 2.0
    assert student["model"]["channels"] == [4, 8] and student["augment"]["mixup_alpha"] == 0.0
    assert json.load(open(out / "nll_seed0" / "config.json"))["distill"]["teacher_workdir"] is None
    summary = (out / "distillation.md").read_text()
    assert "| student minus nll (hard labels) |" in summary and "| soft_target_infonce | " in summary
    assert summary.count("(1/1)") + summary.count("(0/1)") == 3 * 5  # 3 distilled students x 5 metrics, 1 seed
    assert "Run time: teacher" in summary and "NLL at t*" in summary
    for name in ("reliability.png", "reliability_with_teacher.png", "table.md", "distillation.json"):
        assert (out / name).exists(), name
    # Running again keeps the finished teacher and students.
    again = distillation.main(argv)
    assert again["teacher"] == result["teacher"] and again["results"] == runs


def test_equivalence_is_the_90_percent_interval_inside_the_declared_margin():
    sti, soft = "soft_target_infonce", "soft_target_cross_entropy"
    d = [0.001, -0.001, 0.002, 0.0, 0.0015]
    results = {sti: {"metrics": [{"seed": s, "top1": 0.9 + x} for s, x in zip(range(1, 6), d)]},
               soft: {"metrics": [{"seed": s, "top1": 0.9} for s in range(1, 6)]}}
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.131846786326649 * sd / math.sqrt(5)  # Student t, 95% quantile, 4 degrees of freedom (tables: 2.132)
    found = fair_comparison.equivalence(results, 0.003)
    assert found["interval"]["mean"] == pytest.approx(mean, abs=1e-12)
    assert found["interval"]["half_width"] == pytest.approx(half, rel=1e-6)
    assert found["equivalent"] and found["pair"] == f"{sti} - {soft}" and "equivalent" in found["verdict"]
    assert mean + half > 0.001  # so a margin of 0.1 points is not met
    assert not fair_comparison.equivalence(results, 0.001)["equivalent"]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        fair_comparison.equivalence({sti: results[sti], soft: {"metrics": [{"seed": 1, "top1": 0.9}]}}, 0.003)


def test_the_long_setting_declares_its_margin_and_losses():
    long = fair_comparison.SETTINGS["long"]
    assert long.equivalence_margin == 0.003 and long.steps == 10000 and long.num_train_examples is None
    assert set(long.losses) == {"nll", "soft_target_cross_entropy", "soft_target_infonce"} and len(long.base_lrs) >= 4
    assert len(long.seeds) == 5
