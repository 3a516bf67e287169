"""Tests of the image pipelines: host crops (Pillow), device augmentation (JAX) against Pillow, and the Grain
pipelines over real tfds data (Tiny ImageNet written by ``tests/tiny_images.py``, prepared as array_record)."""
import io
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_images
from PIL import Image, ImageEnhance, ImageOps
from sklearn.datasets import load_sample_images

from softnce.data import device_augment as D
from softnce.data import image_augment as A
from softnce.data import images, records
from softnce.data.base import DataError, DataNotPreparedError, Dataset

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

    from softnce import steps

    mean, std = images.SPECS["imagenet2012"].mean, images.SPECS["imagenet2012"].std
    transform = D.TrainTransform(mean, std, D.parse_rand_augment("rand-m9-mstd0.5-inc1"), erasing_prob=0.25)
    batch = np.stack([np.roll(PHOTO[:32, :32], 3 * i, axis=i % 2) for i in range(16)])
    rng = jax.random.fold_in(jax.random.PRNGKey(0), 7)

    def per_device(rng, inputs, axis_name):
        return transform(steps.example_keys(rng, inputs.shape[0], axis_name), inputs)

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


# ----------------------------------------------------------------------------- tfds pipelines (Grain)
# Real data: tiny_images writes a 3-class Tiny ImageNet folder (6 training images, 2 per class, and 7
# validation images, image i a constant colour 10 i) and prepares it through the real builder.
NUM_TRAIN, NUM_VAL = 6, 7
WNIDS = tiny_images.WNIDS


def _config(data_dir, name="tiny_imagenet", **kw):
    config = images.default_image_config()
    config.update({"name": name, "data_dir": str(data_dir), "image_size": 16, **kw})
    return config


def _dataset(data_dir, process_index=0, process_count=1, **kw):
    return images.make_image_dataset(_config(data_dir, **kw), process_index=process_index,
                                     process_count=process_count)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared tiny_imagenet shared by the tests that only read it (preparing takes seconds)."""
    return tiny_images.prepare_tiny_imagenet(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def own_copy(prepared, tmp_path):
    """A copy of :func:`prepared` that a test may damage."""
    return shutil.copytree(prepared, tmp_path / "data")


def _records(data_dir, split="train", skip_decoding=("image",)):
    """Every record of ``split`` in record order (images as JPEG bytes, or decoded with skip_decoding=())."""
    source = records.RecordSource(records.builder("tiny_imagenet", str(data_dir)), split, skip_decoding=skip_decoding)
    return source.read(range(len(source)))


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for field in a:
        np.testing.assert_array_equal(a[field], b[field], err_msg=field)


def test_tiny_imagenet_builder_and_two_process_eval(prepared):
    builder = records.builder("tiny_imagenet", prepared)
    assert builder.info.splits["train"].num_examples == NUM_TRAIN
    assert builder.info.splits["validation"].num_examples == NUM_VAL
    assert builder.info.file_format.value == "array_record"
    val = {ex["file_name"].decode(): ex for ex in _records(prepared, "validation", skip_decoding=())}
    assert [val[f"val_{i}.JPEG"]["label"] for i in range(3)] == [1, 0, 2]  # n02, n01, n03
    assert val["val_3.JPEG"]["image"].shape == (20, 20, 3)

    shares = [_dataset(prepared, p, 2) for p in (0, 1)]
    assert shares[0].num_eval_examples == NUM_VAL and shares[0].num_train_examples == NUM_TRAIN
    assert shares[0].num_classes == 200 and len(shares[0].class_names) == 200
    batches = [list(ds.eval_batches(2)) for ds in shares]
    assert len(batches[0]) == len(batches[1]) == math.ceil(NUM_VAL / (2 * 2)) == shares[0].num_eval_batches(2)
    seen = []
    for process_batches in batches:
        for b in process_batches:
            for x, m in zip(b["inputs"], b["mask"]):
                if m:  # The constant colour 10 * i (JPEG: +-3).
                    seen.append(int(np.round(x[..., 0].mean() / 10)))
    assert sorted(seen) == list(range(NUM_VAL))  # Disjoint shares that cover the split exactly once.
    assert sum(int(b["mask"].sum()) for pb in batches for b in pb) == NUM_VAL
    np.testing.assert_array_equal(shares[0].train_label_counts(), [2, 2, 2] + [0] * 197)
    train = next(shares[1].train_batches(3, seed=0))
    assert train["inputs"].shape == (3, 16, 16, 3)


def test_tiny_imagenet_from_zip(tmp_path):
    tiny_images.write_tiny_imagenet(tmp_path / "src" / "tiny-imagenet-200", train_per_class=1, num_val=2)
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.make_archive(str(manual / "tiny-imagenet-200"), "zip", tmp_path / "src")
    images.prepare("tiny_imagenet", str(tmp_path / "data"), manual_dir=str(manual))
    builder = records.builder("tiny_imagenet", str(tmp_path / "data"))
    assert builder.info.splits["validation"].num_examples == 2
    assert sorted(r["file_name"].decode() for r in _records(tmp_path / "data")) == [f"{w}_0.JPEG" for w in
                                                                                   sorted(WNIDS)]


def test_train_batches_are_deterministic_in_the_seed(prepared):
    ds = _dataset(prepared, randaugment="")  # RandAugment off: compiling its 15 ops takes seconds
    assert isinstance(ds, Dataset) and ds.example_shape == (16, 16, 3) and ds.input_dtype == "uint8"
    batches = [next(ds.train_batches(4, seed=s)) for s in (0, 0, 1)]
    b = batches[0]
    assert b["inputs"].shape == (4, 16, 16, 3) and b["inputs"].dtype == np.uint8  # host ships uint8 crops
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert np.all((b["label"] >= 0) & (b["label"] < 3))
    _assert_batches_equal(batches[0], batches[1])
    assert not np.array_equal(batches[0]["inputs"], batches[2]["inputs"])
    # The device half (flip, random erasing): normalised, (0 - mean)/std <= x <= (1 - mean)/std except
    # erased N(0,1) pixels.
    inputs = np.asarray(jax.jit(ds.device_train_transform)(jax.random.split(key(0), 4), b["inputs"]))
    assert inputs.shape == (4, 16, 16, 3) and inputs.dtype == np.float32
    spec = images.SPECS["tiny_imagenet"]
    lo, hi = (-np.array(spec.mean) / spec.std).min(), ((1 - np.array(spec.mean)) / spec.std).max()
    assert np.mean((inputs >= lo - 1e-5) & (inputs <= hi + 1e-5)) > 0.9
    assert ds.device_train_transform.rand_augment is None
    recipe = _dataset(prepared).device_train_transform  # the recipe's RandAugment, on the device too
    assert recipe.rand_augment == D.parse_rand_augment("rand-m9-mstd0.5-inc1") and recipe.erasing_prob == 0.25
    _assert_batches_equal(next(_dataset(prepared).train_batches(4, seed=0)), b)  # the host half is the same


def test_start_step_and_restored_state_continue_the_stream(prepared):
    ds = _dataset(prepared, randaugment="")
    iterator = ds.train_batches(2, seed=4)  # 3 steps an epoch: 6 steps cross an epoch boundary
    stream = [next(iterator) for _ in range(6)]
    assert len({b["inputs"].tobytes() for b in stream}) == 6  # every step differs (crops are seeded per position)
    epoch = np.concatenate([b["label"] for b in stream[:3]])
    assert sorted(epoch) == [0, 0, 1, 1, 2, 2]  # an epoch reads every example once
    for k in (1, 4):
        _assert_batches_equal(next(ds.train_batches(2, seed=4, start_step=k)), stream[k])
    # Exact resume: an iterator set to another's state continues where that one stopped.
    iterator = ds.train_batches(2, seed=4)
    for _ in range(2):
        next(iterator)
    state = iterator.get_state()
    assert state == {"next_index": 2}
    restored = ds.train_batches(2, seed=4)
    restored.set_state(json.loads(json.dumps(state)))  # the state survives JSON (the checkpoint's format)
    for k in range(2, 6):
        _assert_batches_equal(next(restored), stream[k])
        _assert_batches_equal(next(iterator), stream[k])


def test_global_batches_do_not_depend_on_the_number_of_processes(prepared):
    single = _dataset(prepared, randaugment="")
    shares = [_dataset(prepared, p, 2, randaugment="") for p in (0, 1)]
    whole = single.train_batches(NUM_TRAIN, seed=3, start_step=2)
    parts = [s.train_batches(NUM_TRAIN // 2, seed=3, start_step=2) for s in shares]
    for _ in range(3):  # one step an epoch: every step is a new permutation
        batch, halves = next(whole), [next(p) for p in parts]
        assert sorted(batch["label"]) == [0, 0, 1, 1, 2, 2]
        for field in ("inputs", "label"):
            np.testing.assert_array_equal(batch[field], np.concatenate([h[field] for h in halves]), err_msg=field)
    assert not np.array_equal(halves[0]["inputs"], halves[1]["inputs"])  # the shares differ
    with pytest.raises(ValueError, match=r"global batch \(8\) is larger than the training set \(6 examples\)"):
        single.train_batches(8, seed=0)
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
        _dataset(prepared, 2, 2)


def test_eval_batches_are_padded_masked_and_normalised_on_the_device(prepared):
    ds = _dataset(prepared)
    batches = list(ds.eval_batches(4))
    assert len(batches) == ds.num_eval_batches(4) == 2
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True] * 3 + [False]]
    assert batches[0]["mask"].dtype == bool and batches[0]["inputs"].shape == (4, 16, 16, 3)
    assert batches[0]["inputs"].dtype == np.uint8 and batches[0]["label"].dtype == np.int32
    np.testing.assert_array_equal(batches[-1]["inputs"][3:], 0)  # padding is zeros
    np.testing.assert_array_equal(batches[-1]["label"][3:], 0)
    # Eval reads the split in record order, unaugmented: resize + centre crop of each record.
    val = _records(prepared, "validation")
    expected = np.stack([A.resize_and_center_crop(r["image"], 16) for r in val])
    np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[:NUM_VAL], expected)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:NUM_VAL], [r["label"] for r in val])
    spec = images.SPECS["tiny_imagenet"]
    np.testing.assert_allclose(ds.device_eval_transform(batches[0]["inputs"]),
                               (batches[0]["inputs"] / 255.0 - np.array(spec.mean)) / np.array(spec.std), atol=1e-5)
    _assert_batches_equal(next(ds.eval_batches(4)), batches[0])  # deterministic
    # The first n examples only.
    first = _dataset(prepared, num_train_examples=4, num_eval_examples=5)
    assert (first.num_train_examples, first.num_eval_examples) == (4, 5)
    assert [int(b["mask"].sum()) for b in first.eval_batches(2)] == [2, 2, 1]
    labels = next(first.train_batches(4, seed=0))["label"]  # one epoch of the first 4 records
    assert sorted(labels) == sorted(r["label"] for r in _records(prepared)[:4])
    with pytest.raises(ValueError, match="num_eval_examples = 8 is more than the 7 examples"):
        _dataset(prepared, num_eval_examples=8)


def test_label_counts_are_cached(prepared, tmp_path):
    ds = _dataset(prepared, cache_dir=str(tmp_path))
    counts = ds.train_label_counts()
    assert counts.shape == (200,) and counts.sum() == NUM_TRAIN
    np.testing.assert_array_equal(counts, [2, 2, 2] + [0] * 197)
    path = ds._label_counts_path()
    assert os.path.exists(path) and os.path.dirname(path) == str(tmp_path)
    np.save(path, np.arange(200))  # The cache is used when present.
    np.testing.assert_array_equal(ds.train_label_counts(), np.arange(200))
    # Counting the first 4 examples only has its own cache file.
    first = _dataset(prepared, cache_dir=str(tmp_path), num_train_examples=4)
    assert first._label_counts_path() != path and first.train_label_counts().sum() == 4


def test_config_errors(prepared):
    plain = _dataset(prepared)
    assert plain.num_validation_examples == 0 and plain.num_train_examples == NUM_TRAIN  # none by default
    with pytest.raises(ValueError, match="no validation split"):
        plain.validation_batches(2)
    with pytest.raises(ValueError, match=r"validation_fraction = 1.0 is out of range: must be a number in \[0, 1\)"):
        _dataset(prepared, validation_fraction=1.0)
    with pytest.raises(ValueError, match="validation_fraction=0.95 leaves no training examples out of 6"):
        _dataset(prepared, validation_fraction=0.95)  # round(0.95 * 6) = 6
    with pytest.raises(ValueError, match="host_threads = 0 is out of range: must be an integer >= 1 or None"):
        _dataset(prepared, host_threads=0)
    # The tf.data fields are gone: the configs no longer have them, so a command line that sets one
    # (--config.data.num_shards=2) is rejected by the locked config.
    from softnce.configs import vit_finetune

    config = vit_finetune.get_config("dataset=tiny_imagenet,model=vit_tiny")
    for removed in ("shuffle_buffer", "num_shards", "cache"):
        assert removed not in config.data and removed not in images.default_image_config()
    config.lock()
    with pytest.raises(AttributeError, match="num_shards"):
        config.data.num_shards = 2


def test_host_threads_sets_the_grain_reader_threads(prepared):
    ds = _dataset(prepared, host_threads=3)
    assert ds.read_options.num_threads == 3
    assert next(ds.train_batches(2, seed=0))["inputs"].shape == (2, 16, 16, 3)
    assert _dataset(prepared).read_options.num_threads == (os.cpu_count() or 1)  # default: one per core


def test_not_prepared_error(tmp_path):
    with pytest.raises(DataNotPreparedError) as error:
        _dataset(tmp_path, name="imagenet2012")
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert f"python -m softnce.data.images --name imagenet2012 --data_dir {tmp_path}" in message
    with pytest.raises(DataNotPreparedError, match="tiny-imagenet-200.zip"):
        _dataset(tmp_path)
    with pytest.raises(ValueError, match="Unknown image dataset"):
        _dataset(tmp_path, name="mnist")


def test_validation_split_is_carved_from_training(prepared):
    config = _config(prepared, randaugment="", validation_fraction=0.34, validation_seed=5)
    ds = images.make_image_dataset(config, process_index=0, process_count=1)
    assert (ds.num_validation_examples, ds.num_train_examples) == (2, 4)  # round(0.34 * 6) = 2
    assert (ds.validation_split, ds.train_split) == ("train[:2]", "train[2:]")
    recs = _records(prepared)
    counts = np.bincount([r["label"] for r in recs[2:]], minlength=200)
    np.testing.assert_array_equal(ds.train_label_counts(), counts)
    # The validation examples are the first 2 training records, unaugmented like the eval split.
    batches = list(ds.validation_batches(3))
    assert len(batches) == ds.num_validation_batches(3) == 1 and batches[0]["mask"].tolist() == [True, True, False]
    expected = np.stack([A.resize_and_center_crop(r["image"], 16) for r in recs[:2]])
    np.testing.assert_array_equal(batches[0]["inputs"][:2], expected)
    np.testing.assert_array_equal(batches[0]["label"][:2], [r["label"] for r in recs[:2]])
    # Training never sees them: an epoch of training crops comes from the other 4 records only.
    train_labels = next(ds.train_batches(4, seed=0))["label"]
    assert sorted(train_labels) == sorted(r["label"] for r in recs[2:])
    # Two processes: disjoint shares of the 2 validation examples, the same number of batches.
    shares = [images.make_image_dataset(config, process_index=p, process_count=2) for p in (0, 1)]
    share_batches = [list(s.validation_batches(1)) for s in shares]
    assert len(share_batches[0]) == len(share_batches[1]) == 1
    assert sum(int(b["mask"].sum()) for sb in share_batches for b in sb) == 2
    np.testing.assert_array_equal(np.concatenate([sb[0]["inputs"] for sb in share_batches]), expected)


# ----------------------------------------------------------------------------- damaged and outdated data
def test_a_damaged_record_file_names_the_file_and_record(own_copy):
    path = tiny_images.record_file(own_copy, "train")
    assert os.path.basename(path) == "tiny_imagenet-train.array_record-00000-of-00001"
    data = bytearray(open(path, "rb").read())
    # The records lie in the first block, before its zero padding; flip 16 bytes in the middle of them.
    used = len(bytes(data[:65536]).rstrip(b"\0"))
    middle = used // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    open(path, "wb").write(bytes(data))
    # Which record that hit (array_record checks every chunk's hash): exactly one of the six.
    source = records.RecordSource(records.builder("tiny_imagenet", str(own_copy)), "train")
    damaged = []
    for row in range(NUM_TRAIN):
        try:
            source.read([row])
        except DataError:
            damaged.append(row)
    assert len(damaged) == 1, damaged
    ds = _dataset(own_copy, randaugment="", cache_dir=str(own_copy / "cache"))  # opening it reads no record
    with pytest.raises(DataError) as error:
        next(ds.train_batches(NUM_TRAIN, seed=0))  # the first batch reads every record
    message = str(error.value)
    assert f"{path}, record {damaged[0]} (" in message and "Prepare the dataset again" in message, message
    with pytest.raises(DataError, match=f"record {damaged[0]} "):
        ds.train_label_counts()
    assert len(list(ds.eval_batches(4))) == 2  # the validation file is intact


def test_an_image_that_is_not_an_image_names_the_file_and_record(tmp_path):
    data_dir = tiny_images.prepare_tiny_imagenet(tmp_path / "data", broken_train=("n01_1.JPEG",))
    (row,) = [i for i, r in enumerate(_records(data_dir)) if r["file_name"] == b"n01_1.JPEG"]
    ds = _dataset(data_dir, randaugment="")
    np.testing.assert_array_equal(ds.train_label_counts()[:3], [2, 2, 2])  # labels read fine
    iterator = ds.train_batches(NUM_TRAIN, seed=0)
    with pytest.raises(DataError) as error:
        next(iterator)
    message = str(error.value)
    assert f"{tiny_images.record_file(data_dir, 'train')}, record {row} (" in message, message
    assert "UnidentifiedImageError" in message


def test_data_prepared_as_tfrecord_is_one_error_and_prepare_rebuilds_it(own_copy):
    info_path = os.path.join(own_copy, "tiny_imagenet", "1.0.0", "dataset_info.json")
    info = json.load(open(info_path))
    assert info["fileFormat"] == "array_record"
    info["fileFormat"] = "tfrecord"  # as tfds prepared it before softnce read array_record
    json.dump(info, open(info_path, "w"))
    with pytest.raises(DataError) as error:
        _dataset(own_copy)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert f"python -m softnce.data.images --name tiny_imagenet --data_dir {own_copy}" in message
    assert "TFRecord" in message
    images.prepare("tiny_imagenet", str(own_copy))  # what that command runs
    assert json.load(open(info_path))["fileFormat"] == "array_record"
    ds = _dataset(own_copy, randaugment="")
    assert (ds.num_train_examples, ds.num_eval_examples) == (NUM_TRAIN, NUM_VAL)
    assert sorted(next(ds.train_batches(NUM_TRAIN, seed=0))["label"]) == [0, 0, 1, 1, 2, 2]
