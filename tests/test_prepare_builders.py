"""softnce's TensorFlow-free builders for tfds's imagenet2012 and cifar100, on tiny fake archives (no network).

Each test prepares through :func:`softnce.data.images.prepare`, reads the result back with tfds's
registered builder (:func:`softnce.data.records.builder`), checks sizes, labels and pixels, and
ends with TensorFlow never imported.
"""

import functools
import http.server
import io
import sys
import tarfile
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from softnce.data import cifar100, imagenet2012, images, records

SYNSETS = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
VALIDATION_SYNSETS = open(imagenet2012.validation_labels_path()).read().split()

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _jpeg(colour, size=(24, 20)) -> bytes:
    return _image_bytes(Image.new("RGB", size, colour), "JPEG")


def _tar(files: dict[str, bytes], mode: str = "w") -> bytes:
    """A tar of ``files`` (name -> contents), in the given order (``mode`` ``'w:gz'``: gzipped)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _no_tensorflow():
    assert "tensorflow" not in sys.modules


def _config(name, data_dir):
    config = images.default_image_config()
    config.update(dict(name=name, data_dir=str(data_dir), image_size=16, randaugment=""))
    return config


def _check_batches(config, num_classes):
    ds = images.make_image_dataset(config, process_index=0, process_count=1)
    train = next(ds.train_batches(4, seed=0))
    assert train["inputs"].shape == (4, 16, 16, 3) and train["inputs"].dtype == np.uint8
    assert train["label"].shape == (4,) and np.all((train["label"] >= 0) & (train["label"] < num_classes))
    evaluation = next(ds.eval_batches(4))
    assert evaluation["inputs"].shape == (4, 16, 16, 3) and evaluation["inputs"].dtype == np.uint8
    assert evaluation["label"].shape == (4,) and evaluation["mask"].shape == (4,)
    return ds, evaluation


# --------------------------------------------------------------------------------------------------
# ImageNet-1k
# --------------------------------------------------------------------------------------------------

CMYK_NAME = "n01739381_1309.JPEG"  # in tfds's CMYK_IMAGES
PNG_NAME = "n02105855_2933.JPEG"  # in tfds's PNG_IMAGES (a PNG under a .JPEG name)
TRAIN = {  # synset -> {file name: image bytes}
    "n01440764": {"n01440764_1.JPEG": _jpeg((10, 20, 30)), "n01440764_2.JPEG": _jpeg((200, 100, 50))},
    "n01739381": {CMYK_NAME: _image_bytes(Image.new("CMYK", (24, 20), (0, 255, 255, 0)), "JPEG"),  # red
                  "n01739381_7.JPEG": _jpeg((0, 0, 255))},
    "n02105855": {PNG_NAME: _image_bytes(Image.new("RGB", (24, 20), GREEN), "PNG"),
                  "n02105855_5.JPEG": _jpeg((128, 128, 128))},
}
VAL_NAMES = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (3, 1, 4, 2)]  # not in sorted order in the tar


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    assert CMYK_NAME in imagenet2012.CMYK_IMAGES and PNG_NAME in imagenet2012.PNG_IMAGES
    data_dir = tmp_path_factory.mktemp("imagenet")
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "ILSVRC2012_img_train.tar").write_bytes(
        _tar({f"{synset}.tar": _tar(files) for synset, files in TRAIN.items()}))
    (manual / "ILSVRC2012_img_val.tar").write_bytes(
        _tar({name: _jpeg((40 * i, 0, 0)) for i, name in enumerate(VAL_NAMES)}))
    images.prepare("imagenet2012", str(data_dir))
    return data_dir


def test_imagenet_prepared_without_tensorflow(imagenet_dir):
    builder = records.builder("imagenet2012", str(imagenet_dir))  # tfds's registered builder reads it
    assert type(builder) is not imagenet2012.Imagenet2012 and builder.is_prepared()
    assert str(builder.version) == "5.1.0" and str(builder.info.file_format.value) == "array_record"
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {"train": 6, "validation": 4}
    assert builder.info.features["label"].names == SYNSETS

    train = records.RecordSource(builder, "train").read(range(6))
    by_name = {r["file_name"].decode(): r for r in train}
    assert sorted(by_name) == sorted(name for files in TRAIN.values() for name in files)
    for name, record in by_name.items():
        assert record["label"] == SYNSETS.index(name.split("_")[0])
        with Image.open(io.BytesIO(record["image"])) as image:
            assert image.format == "JPEG" and image.mode == "RGB", name
    for name, colour in ((CMYK_NAME, RED), (PNG_NAME, GREEN)):  # fixed: RGB JPEG, same colour
        pixels = np.asarray(Image.open(io.BytesIO(by_name[name]["image"])))
        assert pixels.shape == (20, 24, 3)
        np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), colour, atol=4)
    assert by_name["n01440764_1.JPEG"]["image"] == TRAIN["n01440764"]["n01440764_1.JPEG"]  # others as they were

    validation = records.RecordSource(builder, "validation").read(range(4))
    labels = {r["file_name"].decode(): r["label"] for r in validation}
    # tfds's validation_labels.txt, in sorted file-name order.
    assert labels == {name: SYNSETS.index(VALIDATION_SYNSETS[i]) for i, name in enumerate(sorted(VAL_NAMES))}
    _no_tensorflow()


def test_imagenet_batches(imagenet_dir):
    ds, evaluation = _check_batches(_config("imagenet2012", imagenet_dir), 1000)
    assert ds.num_train_examples == 6 and ds.num_eval_examples == 4 and ds.class_names == tuple(SYNSETS)
    expected = sorted(SYNSETS.index(s) for s in VALIDATION_SYNSETS[:4])
    assert evaluation["mask"].all() and sorted(evaluation["label"].tolist()) == expected
    _no_tensorflow()


def test_imagenet_without_archives_names_them(tmp_path):
    (tmp_path / "downloads" / "manual").mkdir(parents=True)
    (tmp_path / "downloads" / "manual" / "README").write_text("nothing here")
    with pytest.raises(AssertionError, match="ILSVRC2012_img_train.tar"):
        images.prepare("imagenet2012", str(tmp_path))
    _no_tensorflow()


# --------------------------------------------------------------------------------------------------
# CIFAR-100
# --------------------------------------------------------------------------------------------------

FINE_NAMES = [f"fine_{i}" for i in range(100)]
COARSE_NAMES = [f"coarse_{i}" for i in range(20)]


def _cifar_split(seed, n):
    """``(fine labels, coarse labels, images uint8 [n, 32, 32, 3] HWC)`` and the binary file (CHW records)."""
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 100, n).astype(np.uint8)
    fine[:2] = 0, 99
    coarse = rng.integers(0, 20, n).astype(np.uint8)
    coarse[:2] = 19, 0
    hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    data = b"".join(bytes([c, f]) + hwc[i].transpose(2, 0, 1).tobytes() for i, (c, f) in enumerate(zip(coarse, fine)))
    return (fine, coarse, hwc), data


CIFAR_TRAIN, CIFAR_TRAIN_BIN = _cifar_split(0, 6)
CIFAR_TEST, CIFAR_TEST_BIN = _cifar_split(1, 4)


def _cifar_archive() -> bytes:
    return _tar({
        "cifar-100-binary/coarse_label_names.txt": "\n".join(COARSE_NAMES).encode() + b"\n",
        "cifar-100-binary/fine_label_names.txt": "\n".join(FINE_NAMES).encode() + b"\n",
        "cifar-100-binary/train.bin": CIFAR_TRAIN_BIN,
        "cifar-100-binary/test.bin": CIFAR_TEST_BIN,
    }, mode="w:gz")


def _check_cifar(data_dir):
    builder = records.builder("cifar100", str(data_dir))
    assert type(builder) is not cifar100.Cifar100 and builder.is_prepared()
    assert str(builder.version) == "3.0.2" and str(builder.info.file_format.value) == "array_record"
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {"train": 6, "test": 4}
    assert builder.info.features["label"].names == FINE_NAMES
    assert builder.info.features["coarse_label"].names == COARSE_NAMES
    for split, (fine, coarse, hwc) in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        source = records.RecordSource(builder, split)
        found = source.read(range(len(source)))
        assert sorted(r["id"].decode() for r in found) == [f"{split}_{i:05d}" for i in range(len(fine))]
        for record in found:
            i = int(record["id"].decode().rsplit("_", 1)[1])
            assert (record["label"], record["coarse_label"]) == (fine[i], coarse[i])
            with Image.open(io.BytesIO(record["image"])) as image:
                assert image.format == "PNG"
                np.testing.assert_array_equal(np.asarray(image), hwc[i])


def test_cifar100_from_the_manual_dir(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / cifar100.ARCHIVE).write_bytes(_cifar_archive())
    images.prepare("cifar100", str(tmp_path))
    _check_cifar(tmp_path)
    ds, evaluation = _check_batches(_config("cifar100", tmp_path), 100)
    assert ds.num_train_examples == 6 and ds.num_eval_examples == 4 and ds.class_names == tuple(FINE_NAMES)
    assert sorted(evaluation["label"].tolist()) == sorted(CIFAR_TEST[0].tolist())
    _no_tensorflow()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A local HTTP server for ``tmp_path/served`` (404 for anything else); yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cifar100_downloads_through_tfds_without_tensorflow(http_server, tmp_path, monkeypatch):
    served, url = http_server
    (served / cifar100.ARCHIVE).write_bytes(_cifar_archive())
    monkeypatch.setattr(cifar100.Cifar100, "URL", f"{url}/{cifar100.ARCHIVE}")
    images.prepare("cifar100", str(tmp_path / "data"))  # no manual dir: tfds's download manager fetches it
    _check_cifar(tmp_path / "data")
    assert list((tmp_path / "data" / "downloads").rglob("*cifar-100-binary*.tar.gz"))  # tfds's download cache
    _no_tensorflow()


def test_cifar100_failed_download_names_the_manual_dir(http_server, tmp_path, monkeypatch):
    _, url = http_server
    monkeypatch.setattr(cifar100.Cifar100, "URL", f"{url}/missing/{cifar100.ARCHIVE}")  # 404
    with pytest.raises(RuntimeError) as error:
        images.prepare("cifar100", str(tmp_path))
    message = str(error.value)
    assert "Downloading CIFAR-100" in message and str(tmp_path / "downloads" / "manual" / cifar100.ARCHIVE) in message
    _no_tensorflow()


def test_cifar100_truncated_record_file_is_named(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    archive = manual / cifar100.ARCHIVE
    archive.write_bytes(_cifar_archive())
    with pytest.raises(ValueError, match="train.bin is .* not a whole number"):
        list(cifar100.read_records(cifar100.read_members(str(archive), ["cifar-100-binary/train.bin"])[
            "cifar-100-binary/train.bin"][:-5], "train.bin"))
    with pytest.raises(FileNotFoundError, match="no cifar-100-binary/nothing.bin"):
        cifar100.read_members(str(archive), ["cifar-100-binary/nothing.bin"])
    _no_tensorflow()
