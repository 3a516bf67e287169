"""Tests of the tfds image pipelines, the timm augmentation ops and the Tiny ImageNet builder."""
import math
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps

from softnce.data import image_augment as A
from softnce.data import images
from softnce.data.base import Dataset

FILL = A.TIMM_FILL_COLOR
RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)
RAMP = ((np.add.outer(np.arange(13) * 9, np.arange(17) * 7)[..., None] + np.array([0, 40, 90])) % 256
        ).astype(np.uint8)


def seed(i):
    return tf.constant([i, 7], tf.int64)


# ----------------------------------------------------------------------------- ops vs PIL
def _pil_affine(image, matrix):
    pil = Image.fromarray(image)
    return np.asarray(pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL))


PIL_CASES = {
    "auto_contrast": (lambda x: A.auto_contrast(x), lambda p: ImageOps.autocontrast(p)),
    "equalize": (lambda x: A.equalize(x), lambda p: ImageOps.equalize(p)),
    "posterize3": (lambda x: A.posterize(x, 3), lambda p: ImageOps.posterize(p, 3)),
    "solarize100": (lambda x: A.solarize(x, 100), lambda p: ImageOps.solarize(p, 100)),
    "color0.3": (lambda x: A.color(x, 0.3), lambda p: ImageEnhance.Color(p).enhance(0.3)),
    "color1.7": (lambda x: A.color(x, 1.7), lambda p: ImageEnhance.Color(p).enhance(1.7)),
    "contrast0.4": (lambda x: A.contrast(x, 0.4), lambda p: ImageEnhance.Contrast(p).enhance(0.4)),
    "contrast1.9": (lambda x: A.contrast(x, 1.9), lambda p: ImageEnhance.Contrast(p).enhance(1.9)),
    "brightness1.6": (lambda x: A.brightness(x, 1.6), lambda p: ImageEnhance.Brightness(p).enhance(1.6)),
    "sharpness0.2": (lambda x: A.sharpness(x, 0.2), lambda p: ImageEnhance.Sharpness(p).enhance(0.2)),
    "sharpness1.8": (lambda x: A.sharpness(x, 1.8), lambda p: ImageEnhance.Sharpness(p).enhance(1.8)),
    "rotate13.7": (lambda x: A.rotate(x, 13.7),
                   lambda p: p.rotate(13.7, resample=Image.BICUBIC, fillcolor=FILL)),
    "rotate-25": (lambda x: A.rotate(x, -25.0),
                  lambda p: p.rotate(-25.0, resample=Image.BICUBIC, fillcolor=FILL)),
}
AFFINE_CASES = {
    "shear_x": (lambda x: A.shear_x(x, 0.27), (1, 0.27, 0, 0, 1, 0)),
    "shear_y": (lambda x: A.shear_y(x, -0.13), (1, 0, 0, -0.13, 1, 0)),
    "translate_x": (lambda x: A.translate_x_rel(x, 0.3), (1, 0, 0.3 * 17, 0, 1, 0)),
    "translate_y": (lambda x: A.translate_y_rel(x, -0.41), (1, 0, 0, 0, 1, -0.41 * 13)),
}


@pytest.mark.parametrize("name", sorted(PIL_CASES))
def test_op_matches_pil_exactly(name):
    ours, reference = PIL_CASES[name]
    for image in (NOISE, RAMP):
        np.testing.assert_array_equal(ours(image).numpy(), np.asarray(reference(Image.fromarray(image))))


@pytest.mark.parametrize("name", sorted(AFFINE_CASES))
def test_affine_op_matches_pil_exactly(name):
    ours, matrix = AFFINE_CASES[name]
    for image in (NOISE, RAMP):
        np.testing.assert_array_equal(ours(image).numpy(), _pil_affine(image, matrix))


def test_hand_computed_ops():
    x = np.array([[[0, 100, 200], [50, 128, 255]]], np.uint8)  # [1, 2, 3]
    np.testing.assert_array_equal(A.invert(x), 255 - x)
    np.testing.assert_array_equal(A.solarize_add(x, 30), [[[30, 130, 200], [80, 128, 255]]])
    np.testing.assert_array_equal(A.posterize(x, 1), [[[0, 0, 128], [0, 128, 128]]])
    np.testing.assert_array_equal(A.posterize(x, 0), np.zeros_like(x))  # Old PIL: 0 bits -> black.
    np.testing.assert_array_equal(A.posterize(x, 8), x)
    # Translating right by exactly 1 pixel shifts columns and fills the first with the mean colour.
    image = RAMP[:4, :5]
    shifted = A.affine_transform(image, tf.constant([1.0, 0, -1.0, 0, 1.0, 0])).numpy()
    np.testing.assert_array_equal(shifted[:, 1:], image[:, :-1])
    np.testing.assert_array_equal(shifted[:, 0], np.broadcast_to(FILL, (4, 3)))


def test_level_functions_follow_timm():
    neg, pos = tf.constant(True), tf.constant(False)
    level = lambda name, m, n=pos: float(A.RAND_AUGMENT_OPS[name][1](tf.constant(m, tf.float32), n))  # noqa: E731
    assert level("Rotate", 9.0, neg) == pytest.approx(-27.0)
    assert level("ShearX", 10.0) == pytest.approx(0.3)
    assert level("TranslateYRel", 5.0, neg) == pytest.approx(-0.225)
    assert level("PosterizeIncreasing", 9.0) == 1.0  # 4 - int(3.6)
    assert level("SolarizeIncreasing", 9.0) == 26.0  # 256 - int(230.4)
    assert level("SolarizeAdd", 9.0) == 99.0  # int(99.0)
    assert level("ColorIncreasing", 9.0, neg) == pytest.approx(0.19)
    assert level("Brightness", 5.0) == pytest.approx(1.0)
    config = A.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (config.magnitude, config.num_layers, config.magnitude_std, config.prob) == (9.0, 2, 0.5, 0.5)
    assert config.transforms == A.RAND_INCREASING_TRANSFORMS and len(config.transforms) == 15
    with pytest.raises(ValueError, match="Unknown RandAugment section"):
        A.parse_rand_augment("rand-m9-foo3")


def test_rand_augment_is_deterministic_and_varies():
    config = A.parse_rand_augment("rand-m9-mstd0.5-inc1")
    fn = tf.function(lambda x, s: A.rand_augment(x, s, config))
    ramp = tf.constant(RAMP)
    outs = [fn(ramp, seed(i)).numpy() for i in range(12)]
    np.testing.assert_array_equal(fn(ramp, seed(3)).numpy(), outs[3])
    assert fn.experimental_get_tracing_count() == 1
    assert all(o.shape == RAMP.shape and o.dtype == np.uint8 for o in outs)
    changed = sum(not np.array_equal(o, RAMP) for o in outs)
    assert 5 <= changed <= 12  # P(unchanged) = 0.25 (each of 2 ops is skipped with p=0.5).


# ----------------------------------------------------------------------------- crop, flip, erase
def test_random_resized_crop_box_constraints():
    sample = tf.function(lambda s: A.sample_crop_box(tf.constant([60, 80]), s))
    boxes = np.stack([sample(seed(i)).numpy() for i in range(200)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 80).all()
    area = h * w / (60 * 80)
    ratio = w / h
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 - 0.05 and ratio.max() <= 4 / 3 + 0.05
    assert len({tuple(b) for b in boxes}) > 150


def test_random_resized_crop_fallback_is_timm_central_crop():
    # A 1x200 strip never fits a crop with ratio in [3/4, 4/3] of area >= 8%: timm's fallback.
    box = A.sample_crop_box(tf.constant([10, 200]), seed(0)).numpy()
    # in_ratio 20 > 4/3: h = 10, w = round(10 * 4/3) = 13, centred.
    np.testing.assert_array_equal(box, [0, (200 - 13) // 2, 10, 13])
    box = A.sample_crop_box(tf.constant([200, 10]), seed(0)).numpy()
    np.testing.assert_array_equal(box, [(200 - 13) // 2, 0, 13, 10])


def test_decode_and_crop_jpeg_equals_crop_of_decoded():
    image = np.repeat(np.repeat(RAMP, 4, 0), 4, 1)  # 52 x 68
    jpeg = tf.io.encode_jpeg(image, quality=95)
    png = tf.io.encode_png(tf.io.decode_jpeg(jpeg))
    a = A.decode_and_random_resized_crop(jpeg, 16, seed(5)).numpy()
    b = A.decode_and_random_resized_crop(png, 16, seed(5)).numpy()
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_resize_close_to_pil_bicubic():
    smooth = np.asarray(Image.fromarray(RAMP).resize((68, 52), Image.BILINEAR))
    ours = A.resize_bicubic(smooth, (20, 26)).numpy().astype(int)
    ref = np.asarray(Image.fromarray(smooth).resize((26, 20), Image.BICUBIC)).astype(int)
    assert np.abs(ours - ref).mean() < 1.5


def test_flip():
    flips = [np.array_equal(A.random_flip_left_right(RAMP, seed(i)).numpy(), RAMP[:, ::-1]) for i in range(200)]
    others = [np.array_equal(A.random_flip_left_right(RAMP, seed(i)).numpy(), RAMP) for i in range(200)]
    assert all(f != o for f, o in zip(flips, others))
    assert 70 <= sum(flips) <= 130


def test_random_erasing_region_and_probability():
    image = tf.fill([40, 50, 3], 10.0)
    erase = tf.function(lambda s: A.random_erasing(image, s, prob=0.25))
    erased = 0
    for i in range(400):
        out = erase(seed(i)).numpy()
        changed = np.any(out != 10.0, axis=-1)
        if not changed.any():
            continue
        erased += 1
        rows, cols = np.where(changed)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert changed.sum() == h * w  # One solid rectangle ...
        assert 0.02 * 2000 - 60 <= h * w <= 2000 / 3 + 60 and h < 40 and w < 50  # ... of the right size,
        assert abs(out[changed].std() - 1.0) < 0.3  # ... filled with N(0, 1) noise.
    assert abs(erased / 400 - 0.25) < 0.07
    assert np.array_equal(A.random_erasing(image, seed(1), prob=0.0).numpy(), image.numpy())


# ----------------------------------------------------------------------------- tfds pipelines
def _config(name, data_dir, **kw):
    config = images.default_image_config()
    config.update({"name": name, "data_dir": str(data_dir), "image_size": 32, "shuffle_buffer": 16, **kw})
    return config


@pytest.fixture
def mocked(tmp_path):
    """A 'prepared' imagenet2012/cifar100 (real metadata files) whose records tfds mocks."""
    for name in ("imagenet2012", "cifar100"):
        builder = tfds.builder(name, data_dir=str(tmp_path))
        os.makedirs(builder.data_dir)
        builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=10, data_dir=str(tmp_path)):
        yield tmp_path


# Each pipeline with RandAugment costs seconds to instantiate (tf.data optimises all 15 op branches):
# the full recipe runs on imagenet2012, CIFAR-100 runs without RandAugment.
@pytest.mark.parametrize("name,randaugment", [("imagenet2012", "rand-m9-mstd0.5-inc1"), ("cifar100", "")])
def test_mock_train_batches(mocked, name, randaugment):
    config = _config(name, mocked, num_train_examples=10, num_eval_examples=10, randaugment=randaugment)
    ds = images.make_image_dataset(config, process_index=0, process_count=1)
    assert isinstance(ds, Dataset) and ds.example_shape == (32, 32, 3)
    batches = [next(iter(ds.train_batches(4, seed=s))) for s in (0, 0, 1)]
    b = batches[0]
    assert b["inputs"].shape == (4, 32, 32, 3) and b["inputs"].dtype == np.float32
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert np.all((b["label"] >= 0) & (b["label"] < ds.num_classes))
    # Normalised: (0 - mean)/std <= x <= (1 - mean)/std except erased N(0,1) pixels.
    spec = images.SPECS[name]
    lo, hi = (-np.array(spec.mean) / spec.std).min(), ((1 - np.array(spec.mean)) / spec.std).max()
    assert np.mean((b["inputs"] >= lo - 1e-5) & (b["inputs"] <= hi + 1e-5)) > 0.9
    for key in b:
        np.testing.assert_array_equal(batches[0][key], batches[1][key])
    assert not np.array_equal(batches[0]["inputs"], batches[2]["inputs"])
    if not randaugment:
        later = next(iter(ds.train_batches(4, seed=0, start_step=5)))
        assert not np.array_equal(later["inputs"], b["inputs"])


def test_global_batches_do_not_depend_on_the_number_of_processes(mocked):
    # Two shards: one process reading both equals the concatenation of two processes' batches.
    config = _config("imagenet2012", mocked, num_train_examples=10, num_eval_examples=10, randaugment="",
                     num_shards=2)
    single = images.make_image_dataset(config, process_index=0, process_count=1)
    shares = [images.make_image_dataset(config, process_index=p, process_count=2) for p in (0, 1)]
    assert list(single.shards) == [0, 1] and [list(s.shards) for s in shares] == [[0], [1]]
    whole = single.train_batches(6, seed=3, start_step=2)
    parts = [s.train_batches(3, seed=3, start_step=2) for s in shares]
    for _ in range(3):  # 18 draws > 5 examples per shard: crosses the shards' epoch boundaries
        batch, halves = next(whole), [next(p) for p in parts]
        for key in ("inputs", "label"):
            np.testing.assert_array_equal(batch[key], np.concatenate([h[key] for h in halves]))
    assert not np.array_equal(halves[0]["inputs"], halves[1]["inputs"])  # shards differ
    with pytest.raises(ValueError, match=r"per-process training batch \(5\) must divide over .* 2 training"):
        single.train_batches(5, seed=0)
    with pytest.raises(ValueError, match=r"num_shards=3 must be a positive multiple of the number of processes \(2\)"):
        images.make_image_dataset(_config("imagenet2012", mocked, num_shards=3), process_index=0, process_count=2)


def test_mock_eval_and_label_counts(mocked):
    config = _config("imagenet2012", mocked, num_train_examples=10, num_eval_examples=10)
    ds = images.make_image_dataset(config, process_index=0, process_count=1)
    batches = list(ds.eval_batches(4))
    assert len(batches) == 3
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
    assert batches[0]["mask"].dtype == bool and batches[0]["inputs"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(batches[-1]["inputs"][2:], 0.0)
    # Eval is deterministic and unaugmented.
    np.testing.assert_array_equal(next(ds.eval_batches(4))["inputs"], batches[0]["inputs"])
    counts = ds.train_label_counts()
    assert counts.shape == (1000,) and counts.sum() == 10
    path = ds._label_counts_path()
    assert os.path.exists(path)
    np.save(path, np.arange(1000))  # The cache is used when present.
    np.testing.assert_array_equal(ds.train_label_counts(), np.arange(1000))


def test_not_prepared_error(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        images.make_image_dataset(_config("imagenet2012", tmp_path), process_index=0, process_count=1)
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert f"--name imagenet2012 --data_dir {tmp_path}" in message
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip"):
        images.make_image_dataset(_config("tiny_imagenet", tmp_path), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="Unknown image dataset"):
        images.make_image_dataset(_config("mnist", tmp_path), process_index=0, process_count=1)


# ----------------------------------------------------------------------------- Tiny ImageNet
WNIDS = ["n02", "n01", "n03"]  # sorted -> labels n01:0, n02:1, n03:2


def _write_tiny_imagenet(root, train_per_class=2, num_val=7):
    rng = np.random.default_rng(1)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        (root / "train" / wnid / "images").mkdir(parents=True)
        for i in range(train_per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    lines = []
    for i in range(num_val):
        # Each validation image is a constant colour 10 * i, so it can be recognised after preprocessing.
        Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % 3]}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_builder_and_two_process_eval(tmp_path):
    manual = tmp_path / "data" / "downloads" / "manual"
    _write_tiny_imagenet(manual / "tiny-imagenet-200")
    images.prepare("tiny_imagenet", str(tmp_path / "data"))
    builder = tfds.builder("tiny_imagenet", data_dir=str(tmp_path / "data"))
    assert builder.info.splits["train"].num_examples == 6
    assert builder.info.splits["validation"].num_examples == 7
    val = {ex["file_name"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="validation"))}
    assert [val[f"val_{i}.JPEG"]["label"] for i in range(3)] == [1, 0, 2]  # n02, n01, n03
    assert val["val_3.JPEG"]["image"].shape == (20, 20, 3)

    config = _config("tiny_imagenet", tmp_path / "data", image_size=16)
    shares = [images.make_image_dataset(config, process_index=p, process_count=2) for p in (0, 1)]
    assert shares[0].num_eval_examples == 7 and shares[0].num_train_examples == 6
    batches = [list(ds.eval_batches(2)) for ds in shares]
    assert len(batches[0]) == len(batches[1]) == math.ceil(7 / (2 * 2))
    spec = images.SPECS["tiny_imagenet"]
    seen = []
    for process_batches in batches:
        for b in process_batches:
            for x, m in zip(b["inputs"], b["mask"]):
                if m:  # Undo the normalisation to recover the constant colour 10 * i (JPEG: +-3).
                    seen.append(int(np.round((x[..., 0] * spec.std[0] + spec.mean[0]) * 255 / 10).mean()))
    assert sorted(seen) == list(range(7))  # Disjoint shares that cover the split.
    assert sum(int(b["mask"].sum()) for pb in batches for b in pb) == 7
    np.testing.assert_array_equal(shares[0].train_label_counts(), [2, 2, 2] + [0] * 197)
    train = next(shares[1].train_batches(3, seed=0))
    assert train["inputs"].shape == (3, 16, 16, 3)


def test_tiny_imagenet_from_zip(tmp_path):
    import shutil
    _write_tiny_imagenet(tmp_path / "src" / "tiny-imagenet-200", train_per_class=1, num_val=2)
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.make_archive(str(manual / "tiny-imagenet-200"), "zip", tmp_path / "src")
    images.prepare("tiny_imagenet", str(tmp_path / "data"), manual_dir=str(manual))
    builder = tfds.builder("tiny_imagenet", data_dir=str(tmp_path / "data"))
    assert builder.info.splits["validation"].num_examples == 2
