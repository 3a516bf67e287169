"""Tests of the image pipelines: host crops (Pillow), device augmentation (JAX) against Pillow, tfds."""
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps
from sklearn.datasets import load_sample_images

from softnce.data import device_augment as D
from softnce.data import image_augment as A
from softnce.data import images
from softnce.data.base import Dataset

FILL = D.TIMM_FILL_COLOR
RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)
RAMP = ((np.add.outer(np.arange(13) * 9, np.arange(17) * 7)[..., None] + np.array([0, 40, 90])) % 256
        ).astype(np.uint8)
PHOTO = np.asarray(Image.fromarray(load_sample_images().images[1]).resize((64, 48), Image.BICUBIC))
IMAGES = {"noise": NOISE, "ramp": RAMP, "photo": PHOTO}


def key(i):
    return jax.random.key(i)


def _jpeg(array, quality=90):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- device ops vs Pillow
def _pil_affine(matrix):
    return lambda p: p.transform(p.size, Image.AFFINE, matrix(p), resample=Image.BICUBIC, fillcolor=FILL)


EXACT_CASES = {
    "auto_contrast": (D.auto_contrast, ImageOps.autocontrast),
    "equalize": (D.equalize, ImageOps.equalize),
    "invert": (D.invert, ImageOps.invert),
    "posterize3": (lambda x: D.posterize(x, 3), lambda p: ImageOps.posterize(p, 3)),
    "solarize100": (lambda x: D.solarize(x, 100), lambda p: ImageOps.solarize(p, 100)),
    "color0.3": (lambda x: D.color(x, 0.3), lambda p: ImageEnhance.Color(p).enhance(0.3)),
    "color1.7": (lambda x: D.color(x, 1.7), lambda p: ImageEnhance.Color(p).enhance(1.7)),
    "contrast0.4": (lambda x: D.contrast(x, 0.4), lambda p: ImageEnhance.Contrast(p).enhance(0.4)),
    "contrast1.9": (lambda x: D.contrast(x, 1.9), lambda p: ImageEnhance.Contrast(p).enhance(1.9)),
    "brightness1.6": (lambda x: D.brightness(x, 1.6), lambda p: ImageEnhance.Brightness(p).enhance(1.6)),
    "sharpness0.2": (lambda x: D.sharpness(x, 0.2), lambda p: ImageEnhance.Sharpness(p).enhance(0.2)),
    "sharpness1.8": (lambda x: D.sharpness(x, 1.8), lambda p: ImageEnhance.Sharpness(p).enhance(1.8)),
}
# PIL warps in float64, the device in float32: at most 1 grey level on 99% of pixels (README).
AFFINE_CASES = {
    "rotate13.7": (lambda x: D.rotate(x, 13.7), lambda p: p.rotate(13.7, resample=Image.BICUBIC, fillcolor=FILL)),
    "rotate-25": (lambda x: D.rotate(x, -25.0), lambda p: p.rotate(-25.0, resample=Image.BICUBIC, fillcolor=FILL)),
    "shear_x": (lambda x: D.shear_x(x, 0.27), _pil_affine(lambda p: (1, 0.27, 0, 0, 1, 0))),
    "shear_y": (lambda x: D.shear_y(x, -0.13), _pil_affine(lambda p: (1, 0, 0, -0.13, 1, 0))),
    "translate_x": (lambda x: D.translate_x_rel(x, 0.3), _pil_affine(lambda p: (1, 0, 0.3 * p.size[0], 0, 1, 0))),
    "translate_y": (lambda x: D.translate_y_rel(x, -0.41),
                    _pil_affine(lambda p: (1, 0, 0, 0, 1, -0.41 * p.size[1]))),
}


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
def test_op_matches_pil_exactly(name):
    ours, reference = EXACT_CASES[name]
    for image in IMAGES.values():
        np.testing.assert_array_equal(jax.jit(ours)(image), np.asarray(reference(Image.fromarray(image))))


@pytest.mark.parametrize("name", sorted(AFFINE_CASES))
def test_affine_op_matches_pil_within_one_grey_level(name):
    ours, reference = AFFINE_CASES[name]
    for image in IMAGES.values():
        diff = np.abs(np.asarray(jax.jit(ours)(image), int) - np.asarray(reference(Image.fromarray(image)), int))
        assert np.mean(diff <= 1) >= 0.99, np.mean(diff <= 1)
        assert np.mean(diff == 0) >= 0.98


def test_hand_computed_ops():
    x = np.array([[[0, 100, 200], [50, 128, 255]]], np.uint8)  # [1, 2, 3]
    np.testing.assert_array_equal(D.invert(x), 255 - x)
    np.testing.assert_array_equal(D.solarize_add(x, 30), [[[30, 130, 200], [80, 128, 255]]])
    np.testing.assert_array_equal(D.posterize(x, 1), [[[0, 0, 128], [0, 128, 128]]])
    np.testing.assert_array_equal(D.posterize(x, 0), np.zeros_like(x))  # Old PIL: 0 bits -> black.
    np.testing.assert_array_equal(D.posterize(x, 8), x)
    # Translating right by exactly 1 pixel shifts columns and fills the first with the mean colour.
    image = RAMP[:4, :5]
    shifted = np.asarray(D.affine_transform(image, jnp.array([1.0, 0, -1.0, 0, 1.0, 0])))
    np.testing.assert_array_equal(shifted[:, 1:], image[:, :-1])
    np.testing.assert_array_equal(shifted[:, 0], np.broadcast_to(FILL, (4, 3)))
    np.testing.assert_array_equal(D.affine_transform(PHOTO, jnp.array([1.0, 0, 0, 0, 1.0, 0])), PHOTO)


def test_level_functions_follow_timm():
    neg, pos = jnp.bool_(True), jnp.bool_(False)
    level = lambda name, m, n=pos: float(D.LEVELS[name](jnp.float32(m), n))  # noqa: E731
    assert level("Rotate", 9.0, neg) == pytest.approx(-27.0)
    assert level("ShearX", 10.0) == pytest.approx(0.3)
    assert level("TranslateYRel", 5.0, neg) == pytest.approx(-0.225)
    assert level("PosterizeIncreasing", 9.0) == 1.0  # 4 - int(3.6)
    assert level("SolarizeIncreasing", 9.0) == 26.0  # 256 - int(230.4)
    assert level("SolarizeAdd", 9.0) == 99.0  # int(99.0)
    assert level("ColorIncreasing", 9.0, neg) == pytest.approx(0.19)
    assert level("Brightness", 5.0) == pytest.approx(1.0)
    config = D.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (config.magnitude, config.num_layers, config.magnitude_std, config.prob) == (9.0, 2, 0.5, 0.5)
    assert config.transforms == D.RAND_INCREASING_TRANSFORMS and len(config.transforms) == 15
    with pytest.raises(ValueError, match="Unknown RandAugment section"):
        D.parse_rand_augment("rand-m9-foo3")


@pytest.mark.parametrize("names", [D.RAND_INCREASING_TRANSFORMS, D.RAND_TRANSFORMS])
def test_layer_stages_are_exact_identities(names):
    """A RandAugment layer over all ops equals the chosen op alone; a skipped layer changes nothing."""
    layer = jax.jit(lambda image, index, args, apply: D._layer(image, names, index, args, apply, FILL))
    for i, name in enumerate(names):
        magnitude, negate = 7.3, i % 2 == 1
        args = jnp.stack([jnp.asarray(D.LEVELS[n](jnp.float32(magnitude), jnp.bool_(negate)), jnp.float32)
                          for n in names])
        alone = D.apply_op(name, PHOTO, magnitude, negate)
        np.testing.assert_array_equal(layer(PHOTO, i, args, True), alone, err_msg=name)
        np.testing.assert_array_equal(layer(PHOTO, i, args, False), PHOTO, err_msg=name)


def test_rand_augment_is_deterministic_and_varies():
    config = D.parse_rand_augment("rand-m9-mstd0.5-inc1")
    fn = jax.jit(lambda k, x: D.rand_augment(k, x, config))
    outs = [np.asarray(fn(key(i), RAMP)) for i in range(40)]
    np.testing.assert_array_equal(fn(key(3), RAMP), outs[3])
    assert all(o.shape == RAMP.shape and o.dtype == np.uint8 for o in outs)
    unchanged = sum(np.array_equal(o, RAMP) for o in outs)
    assert 3 <= unchanged <= 20  # P(unchanged) ~ 0.25 (each of 2 ops is skipped with p=0.5).


# ----------------------------------------------------------------------------- flip, erase, batch transform
def test_flip():
    flip = jax.jit(D.random_flip)
    flips = [np.array_equal(flip(key(i), RAMP), RAMP[:, ::-1]) for i in range(200)]
    others = [np.array_equal(flip(key(i), RAMP), RAMP) for i in range(200)]
    assert all(f != o for f, o in zip(flips, others))
    assert 70 <= sum(flips) <= 130


def test_random_erasing_region_and_probability():
    image = jnp.full([40, 50, 3], 10.0)
    erase = jax.jit(jax.vmap(lambda k: D.random_erasing(k, image, prob=0.25)))
    outs = np.asarray(erase(jax.random.split(key(0), 400)))
    erased = 0
    for out in outs:
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
    np.testing.assert_array_equal(D.random_erasing(key(1), image, prob=0.0), image)


def test_train_transform_is_per_example_and_normalises():
    mean, std = images.SPECS["imagenet2012"].mean, images.SPECS["imagenet2012"].std
    transform = D.TrainTransform(mean, std, D.parse_rand_augment("rand-m9-mstd0.5-inc1"), erasing_prob=0.25)
    batch = np.stack([PHOTO, PHOTO[::-1], np.roll(PHOTO, 5, axis=1), 255 - PHOTO])
    keys = jax.random.split(key(4), 4)
    out = np.asarray(jax.jit(transform)(keys, batch))
    assert out.shape == (4, 48, 64, 3) and out.dtype == np.float32
    # Each example depends on its own key only: any split of the batch (1 or 8 devices) agrees.
    for i in range(4):
        np.testing.assert_array_equal(jax.jit(transform)(keys[i:i + 1], batch[i:i + 1])[0], out[i])
    # Without augmentation it is (x / 255 - mean) / std, flipped or not.
    plain = np.asarray(D.TrainTransform(mean, std)(keys, batch))
    expected = (batch / 255.0 - np.array(mean)) / np.array(std)
    for i in range(4):
        assert (np.allclose(plain[i], expected[i], atol=1e-5)
                or np.allclose(plain[i], expected[i][:, ::-1], atol=1e-5))
    np.testing.assert_allclose(D.EvalTransform(mean, std)(batch), expected, atol=1e-5)
    with pytest.raises(ValueError, match="expects uint8"):
        transform(keys, batch.astype(np.float32))


def test_train_transform_in_the_sharded_step_agrees_on_1_and_8_devices():
    """The trainer's per-example keys (run key, step, global index) + the transform under shard_map."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from softnce import train

    mean, std = images.SPECS["imagenet2012"].mean, images.SPECS["imagenet2012"].std
    transform = D.TrainTransform(mean, std, D.parse_rand_augment("rand-m9-mstd0.5-inc1"), erasing_prob=0.25)
    batch = np.stack([np.roll(PHOTO[:32, :32], 3 * i, axis=i % 2) for i in range(16)])
    rng = jax.random.fold_in(jax.random.PRNGKey(0), 7)

    def per_device(rng, inputs, axis_name):
        return transform(train.example_keys(rng, inputs.shape[0], axis_name), inputs)

    outs = []
    for n in (1, 8):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        fn = jax.shard_map(lambda r, x: per_device(r, x, "data"), mesh=mesh, in_specs=(P(), P("data")),
                           out_specs=P("data"))
        outs.append(np.asarray(jax.jit(fn)(rng, batch)))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(jax.jit(lambda r, x: per_device(r, x, None))(rng, batch), outs[0])
    assert len({o.tobytes() for o in outs[0]}) == 16


# ----------------------------------------------------------------------------- host crops (Pillow)
def test_random_resized_crop_box_constraints():
    boxes = np.array([A.sample_crop_box(60, 80, A.seeded_rng([i, 7])) for i in range(300)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 80).all()
    area = h * w / (60 * 80)
    ratio = w / h
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 - 0.05 and ratio.max() <= 4 / 3 + 0.05
    assert len({tuple(b) for b in boxes}) > 250
    assert A.sample_crop_box(60, 80, A.seeded_rng([3, 7])) == A.sample_crop_box(60, 80, A.seeded_rng([3, 7]))


def test_random_resized_crop_fallback_is_timm_central_crop():
    # A 10x200 strip never fits a crop with ratio in [3/4, 4/3] of area >= 8%: timm's fallback.
    # in_ratio 20 > 4/3: h = 10, w = round(10 * 4/3) = 13, centred.
    assert A.sample_crop_box(10, 200, A.seeded_rng([0, 0])) == (0, (200 - 13) // 2, 10, 13)
    assert A.sample_crop_box(200, 10, A.seeded_rng([0, 0])) == ((200 - 13) // 2, 0, 13, 10)


def test_random_resized_crop_is_pillow_crop_then_resize():
    photo = load_sample_images().images[0][::3, ::3]  # 143 x 214
    jpeg = _jpeg(photo)
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    for i in range(5):
        ours = A.random_resized_crop(jpeg, [i, 1], 32)
        top, left, h, w = A.sample_crop_box(143, 214, A.seeded_rng([i, 1]))
        decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
        reference = decoded.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
        assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, np.asarray(reference))
        np.testing.assert_array_equal(A.random_resized_crop(png.getvalue(), [i, 1], 32), ours)


def test_resize_and_center_crop_is_torchvision_resize_then_center_crop():
    image = np.asarray(Image.fromarray(PHOTO).resize((60, 40), Image.BICUBIC))  # W 60, H 40
    ours = A.resize_and_center_crop(_jpeg(image, 95), 32)
    # floor(32 / 0.875) = 36: 40 x 60 -> 36 x int(36 * 60 / 40) = 36 x 54; offsets round(2), round(11).
    decoded = Image.open(io.BytesIO(_jpeg(image, 95))).convert("RGB")
    reference = np.asarray(decoded.resize((54, 36), Image.BICUBIC))[2:34, 11:43]
    assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - reference)
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.99
    # Real photos at several sizes: only the tap positions' rounding differs (documented tolerance).
    for photo in load_sample_images().images:
        data = _jpeg(photo)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")  # 640 x 427
        for size in (224, 100):
            short = math.floor(size / 0.875)
            long = int(short * 640 / 427)
            top, left = round((short - size) / 2), round((long - size) / 2)
            reference = np.asarray(decoded.resize((long, short), Image.BICUBIC))[top:top + size, left:left + size]
            diff = np.abs(A.resize_and_center_crop(data, size).astype(int) - reference)
            assert diff.max() <= 2 and np.mean(diff <= 1) >= 0.99 and np.mean(diff == 0) >= 0.99
    with pytest.raises(ValueError, match="crop_fraction"):
        A.resize_and_center_crop(_jpeg(image), 32, crop_fraction=1.5)


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
    assert b["inputs"].shape == (4, 32, 32, 3) and b["inputs"].dtype == np.uint8  # host ships uint8 crops
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert np.all((b["label"] >= 0) & (b["label"] < ds.num_classes))
    # The device half: normalised, (0 - mean)/std <= x <= (1 - mean)/std except erased N(0,1) pixels.
    inputs = np.asarray(jax.jit(ds.device_train_transform)(jax.random.split(key(0), 4), b["inputs"]))
    assert inputs.shape == (4, 32, 32, 3) and inputs.dtype == np.float32
    spec = images.SPECS[name]
    lo, hi = (-np.array(spec.mean) / spec.std).min(), ((1 - np.array(spec.mean)) / spec.std).max()
    assert np.mean((inputs >= lo - 1e-5) & (inputs <= hi + 1e-5)) > 0.9
    assert (ds.device_train_transform.rand_augment is None) == (not randaugment)
    for field in b:
        np.testing.assert_array_equal(batches[0][field], batches[1][field])
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
    np.testing.assert_array_equal(batches[-1]["inputs"][2:], 0)
    assert batches[0]["inputs"].dtype == np.uint8
    np.testing.assert_allclose(ds.device_eval_transform(batches[0]["inputs"]),
                               (batches[0]["inputs"] / 255.0 - np.array(images.SPECS["imagenet2012"].mean))
                               / np.array(images.SPECS["imagenet2012"].std), atol=1e-5)
    # Eval is deterministic and unaugmented.
    np.testing.assert_array_equal(next(ds.eval_batches(4))["inputs"], batches[0]["inputs"])
    counts = ds.train_label_counts()
    assert counts.shape == (1000,) and counts.sum() == 10
    path = ds._label_counts_path()
    assert os.path.exists(path)
    np.save(path, np.arange(1000))  # The cache is used when present.
    np.testing.assert_array_equal(ds.train_label_counts(), np.arange(1000))


def test_validation_config_errors(mocked):
    plain = images.make_image_dataset(_config("imagenet2012", mocked, num_train_examples=10, num_eval_examples=10),
                                      process_index=0, process_count=1)
    assert plain.num_validation_examples == 0 and plain.num_train_examples == 10  # none by default
    with pytest.raises(ValueError, match="no validation split"):
        plain.validation_batches(2)
    with pytest.raises(ValueError, match=r"validation_fraction = 1.0 is out of range: must be a number in \[0, 1\)"):
        images.make_image_dataset(_config("imagenet2012", mocked, validation_fraction=1.0),
                                  process_index=0, process_count=1)
    with pytest.raises(ValueError, match="host_threads = 0 is out of range: must be an integer >= 1 or None"):
        images.make_image_dataset(_config("imagenet2012", mocked, host_threads=0), process_index=0, process_count=1)


def test_host_threads_sets_the_private_pool(mocked):
    config = _config("imagenet2012", mocked, num_train_examples=10, num_eval_examples=10, host_threads=3)
    ds = images.make_image_dataset(config, process_index=0, process_count=1)
    assert ds.train_dataset(4, seed=0).options().threading.private_threadpool_size == 3
    assert ds.eval_dataset(4).options().threading.private_threadpool_size == 3
    default = images.make_image_dataset(_config("imagenet2012", mocked, num_train_examples=10,
                                                num_eval_examples=10), process_index=0, process_count=1)
    assert not default.train_dataset(4, seed=0).options().threading.private_threadpool_size


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
    seen = []
    for process_batches in batches:
        for b in process_batches:
            for x, m in zip(b["inputs"], b["mask"]):
                if m:  # The constant colour 10 * i (JPEG: +-3).
                    seen.append(int(np.round(x[..., 0].mean() / 10)))
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


def test_validation_split_is_carved_from_training(tmp_path):
    _write_tiny_imagenet(tmp_path / "data" / "downloads" / "manual" / "tiny-imagenet-200")
    images.prepare("tiny_imagenet", str(tmp_path / "data"))
    config = _config("tiny_imagenet", tmp_path / "data", image_size=16, randaugment="", validation_fraction=0.34,
                     validation_seed=5, shuffle_buffer=4)
    ds = images.make_image_dataset(config, process_index=0, process_count=1)
    assert (ds.num_validation_examples, ds.num_train_examples) == (2, 4)  # round(0.34 * 6) = 2
    assert (ds.validation_split, ds.train_split) == ("train[:2]", "train[2:]")
    records = list(tfds.as_numpy(ds.builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})))
    counts = np.bincount([r["label"] for r in records[2:]], minlength=200)
    np.testing.assert_array_equal(ds.train_label_counts(), counts)
    # The validation examples are the first 2 training records, unaugmented like the eval split.
    batches = list(ds.validation_batches(3))
    assert len(batches) == 1 and batches[0]["mask"].tolist() == [True, True, False]
    expected = np.stack([A.resize_and_center_crop(r["image"], 16) for r in records[:2]])
    np.testing.assert_array_equal(batches[0]["inputs"][:2], expected)
    np.testing.assert_array_equal(batches[0]["label"][:2], [r["label"] for r in records[:2]])
    # Training never sees them: an epoch of training crops comes from the other 4 records only.
    train_labels = np.concatenate([next(ds.train_batches(4, seed=0))["label"] for _ in range(1)])
    assert sorted(train_labels) == sorted(r["label"] for r in records[2:])
    # Two processes: disjoint shares of the 2 validation examples, the same number of batches.
    shares = [images.make_image_dataset(config, process_index=p, process_count=2) for p in (0, 1)]
    share_batches = [list(s.validation_batches(1)) for s in shares]
    assert len(share_batches[0]) == len(share_batches[1]) == 1
    assert sum(int(b["mask"].sum()) for sb in share_batches for b in sb) == 2
