"""Fashion-MNIST through tfds (70,000 28x28 greyscale photos of clothing, 10 classes), held in memory.

The dataset is tfds's ``fashion_mnist`` (version 3.0.1, the official 60,000 / 10,000 train/test
split, features ``image`` uint8 ``[28, 28, 1]`` and ``label``), so data prepared here and data
prepared by tfds's own builder are interchangeable. :class:`FashionMnist` prepares it either from
the four official IDX files on disk or, when they are absent, by tfds's own download:

- **Local files** (no internet): the Debian/Ubuntu package ``dataset-fashion-mnist`` installs
  ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``
  and ``t10k-labels-idx1-ubyte.gz`` in ``/usr/share/datasets/fashion-mnist/``
  (:data:`DEFAULT_IDX_DIR`, the default of ``--idx_dir``); files from
  https://github.com/zalandoresearch/fashion-mnist work too, gzipped or not::

      sudo apt-get install dataset-fashion-mnist
      python -m softnce.data.fashion_mnist --data_dir DATA

- **Download** (internet): when ``--idx_dir`` holds none of the files, or with ``--download``,
  tfds fetches them::

      python -m softnce.data.fashion_mnist --data_dir DATA --download

``DATA`` is a tfds data directory (``~/tensorflow_datasets`` when omitted; ``config.data.data_dir``
when training). Every IDX file is checked before anything is written: the magic number, the
image size (28x28), the byte length against the header (a truncated file is an error that names it)
and the number of labels against the number of images.

The prepared data are ``array_record`` files (tfds's ``file_format='array_record'``; images stored
as PNG, as tfds's own builder stores them), written and read without TensorFlow.

Training reads both splits into memory once per process (:func:`load_split`, cached), scales the
pixels to ``(x / 255 - MEAN) / STD`` (float32 ``[n, 28, 28, 1]``), carves the validation split off
the training split (``config.data.validation_fraction``) and serves them through
:class:`~softnce.data.arrays.ArrayDataset` (the Grain pipeline: exact, resumable shuffling), no input augmentation
besides the MixUp/CutMix and label smoothing of ``config.augment``.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from softnce import cli
from softnce.data import array_augment, records
from softnce.data.arrays import ArrayDataset, carve_validation

NAME = "fashion_mnist"
DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
# tfds's label names (``builder.info.features['label'].names``), saved with every checkpoint.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
IMAGE_SIZE = 28
# Mean and standard deviation of the 60,000 training pixels scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
# split -> (images file, labels file), as the official release names them.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions


def prepare_commands(data_dir: str | None) -> str:
    """The two ways to prepare the data, as shell commands (used in error messages and the README)."""
    dir_flag = f" --data_dir {data_dir}" if data_dir else ""
    return (
        "Prepare it from the official IDX files on disk (Debian/Ubuntu: `sudo apt-get install "
        f"dataset-fashion-mnist` puts them in {DEFAULT_IDX_DIR}; pass --idx_dir for another folder):\n"
        f"  python -m softnce.data.fashion_mnist{dir_flag}\n"
        "or let tfds download it (needs internet):\n"
        f"  python -m softnce.data.fashion_mnist{dir_flag} --download"
    )


# --------------------------------------------------------------------------------------------------
# IDX files.
# --------------------------------------------------------------------------------------------------


def find_idx_file(directory: str, stem: str) -> str | None:
    """``directory/stem.gz`` or ``directory/stem`` (the first that exists), else ``None``."""
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if epath.Path(path).exists():
            return path
    return None


def _read_bytes(path: str) -> bytes:
    """The decompressed contents of ``path`` (gzip detected by its magic bytes, not the name)."""
    raw = epath.Path(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as error:
        raise ValueError(
            f"{path} is a damaged or truncated gzip file ({error}); download or reinstall it "
            f"(e.g. `sudo apt-get install --reinstall dataset-fashion-mnist`)."
        ) from None


def read_idx(path: str, *, images: bool) -> np.ndarray:
    """Reads one IDX file: images uint8 ``[n, 28, 28]`` or labels uint8 ``[n]``.

    The IDX format is a big-endian header (magic ``0x0803`` + ``n, rows, cols`` for images,
    ``0x0801`` + ``n`` for labels) followed by ``n * rows * cols`` (or ``n``) unsigned bytes.

    Raises:
      ValueError: wrong magic number (not an IDX file of that kind), images that are not 28x28,
        labels outside ``[0, 10)``, or a byte length that does not match the header (truncated or
        padded file). The message names the file.
    """
    data = _read_bytes(path)
    magic, dims = (IMAGES_MAGIC, 3) if images else (LABELS_MAGIC, 1)
    kind = "images" if images else "labels"
    header_size = 4 + 4 * dims
    if len(data) < header_size or struct.unpack(">I", data[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', data[:4])[0]:08x}" if len(data) >= 4 else f"only {len(data)} bytes"
        raise ValueError(
            f"{path} is not an IDX {kind} file: expected magic number 0x{magic:08x} and a {header_size}-byte "
            f"header, found {found}. Check that the file is one of {sorted(s for p in IDX_FILES.values() for s in p)}."
        )
    shape = struct.unpack(f">{dims}I", data[4:header_size])
    if images and shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{path}: images are {shape[1]}x{shape[2]}, Fashion-MNIST's are {IMAGE_SIZE}x{IMAGE_SIZE}.")
    expected = header_size + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"{path} is {'truncated' if len(data) < expected else 'longer than its header says'}: its header "
            f"announces {shape[0]} {kind} ({expected} bytes decompressed) but it holds {len(data)} bytes. "
            "Download or reinstall the file."
        )
    array = np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)
    if not images and array.size and array.max() >= NUM_CLASSES:
        raise ValueError(f"{path}: label {int(array.max())} is outside [0, {NUM_CLASSES}).")
    return array


def read_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 28, 28, 1], labels uint8 [n])`` of ``split`` (``'train'``/``'test'``).

    Raises:
      FileNotFoundError: a file of the split is missing from ``directory``.
      ValueError: a file is damaged (see :func:`read_idx`) or the image and label counts differ.
    """
    paths = []
    for stem in IDX_FILES[split]:
        path = find_idx_file(directory, stem)
        if path is None:
            raise FileNotFoundError(f"{directory} has no {stem}.gz (or {stem}). " + prepare_commands(None))
        paths.append(path)
    images, labels = read_idx(paths[0], images=True), read_idx(paths[1], images=False)
    if len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels: the files do not "
            "belong together (mixed-up or partial downloads). Replace both with the official files."
        )
    return images[..., None], labels


def has_idx_files(directory: str | None) -> bool:
    """Whether ``directory`` holds all four IDX files (gzipped or not)."""
    return bool(directory) and all(
        find_idx_file(directory, stem) is not None for pair in IDX_FILES.values() for stem in pair
    )


# --------------------------------------------------------------------------------------------------
# The tfds builder.
# --------------------------------------------------------------------------------------------------


class FashionMnist(tfds_mnist.FashionMNIST, skip_registration=True):
    """tfds's ``fashion_mnist`` (same name, version and features) that can also read local IDX files.

    ``download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=IDX_DIR))`` reads
    the four IDX files from ``IDX_DIR`` when it holds them (every file checked, see :func:`read_idx`);
    without a manual directory that holds them it downloads them as tfds's own builder does.
    """

    name = NAME
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put the four official IDX files ({', '.join(s + '.gz' for p in IDX_FILES.values() for s in p)}) in the "
        f"manual directory, e.g. with `sudo apt-get install dataset-fashion-mnist` ({DEFAULT_IDX_DIR}); without "
        "them tfds downloads the files."
    )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError:  # no manual directory, or an empty one: download
            manual_dir = None
        if not has_idx_files(manual_dir):
            return super()._split_generators(dl_manager)  # tfds's download (num_examples, data_path, label_path)
        return {
            split: self._generate_examples(
                data_path=find_idx_file(manual_dir, images), label_path=find_idx_file(manual_dir, labels)
            )
            for split, (images, labels) in IDX_FILES.items()
        }

    def _generate_examples(self, data_path: str, label_path: str, num_examples: int | None = None):
        """``(index, {'image': uint8 [28, 28, 1], 'label': int})`` for every example of one split."""
        images = read_idx(data_path, images=True)
        labels = read_idx(label_path, images=False)
        if len(images) != len(labels):
            raise ValueError(
                f"{data_path} holds {len(images)} images but {label_path} holds {len(labels)} labels: the files "
                "do not belong together. Replace both with the official files."
            )
        if num_examples is not None and len(images) != num_examples:
            raise ValueError(f"{data_path} holds {len(images)} images; the official split has {num_examples}.")
        for index in range(len(images)):
            yield index, {"image": records.encode_png(images[index]), "label": int(labels[index])}



def prepare(data_dir: str | None, idx_dir: str | None = DEFAULT_IDX_DIR, *, download: bool = False) -> FashionMnist:
    """Prepares ``fashion_mnist`` in ``data_dir``: from the IDX files in ``idx_dir``, else by download.

    With all four files in ``idx_dir`` (and ``download`` False) they are checked, then written as
    tfds array_record files; with none of them, or ``download``, tfds downloads the official files.
    Data prepared earlier as TFRecord are written anew as array_record (:func:`softnce.data.records.prepare`).

    Raises:
      FileNotFoundError: ``idx_dir`` holds some of the four files but not all (a partial copy).
      ValueError: a damaged IDX file (nothing is written).
      RuntimeError: the download failed (e.g. no internet); the message gives both ways to prepare.
    """
    builder = FashionMnist(data_dir=data_dir)  # records.prepare sets array_record
    stems = [s for pair in IDX_FILES.values() for s in pair]
    present = [s for s in stems if idx_dir and find_idx_file(idx_dir, s)]
    if present and not download:
        if len(present) < len(stems):
            missing = sorted(set(stems) - set(present))
            raise FileNotFoundError(
                f"{idx_dir} holds only part of Fashion-MNIST: missing {', '.join(m + '.gz' for m in missing)}.\n"
                + prepare_commands(data_dir)
            )
        for split in IDX_FILES:  # check every file before tfds writes anything
            read_idx_split(idx_dir, split)
        records.prepare(builder, tfds.download.DownloadConfig(manual_dir=idx_dir))
        return builder
    if not download:
        print(f"no Fashion-MNIST IDX files in {idx_dir}; downloading them with tfds", flush=True)
    try:
        records.prepare(builder)
    except Exception as error:  # network errors come in many types; the cause is kept
        raise RuntimeError(f"Downloading Fashion-MNIST failed ({error}).\n" + prepare_commands(data_dir)) from error
    return builder


def assert_prepared(builder: tfds.core.DatasetBuilder) -> None:
    """Raises unless ``builder`` is prepared as array_record: FileNotFoundError with both preparation
    commands, or :class:`~softnce.data.base.DataError` for data prepared as TFRecord."""
    data_dir = records.data_dir_root(builder)
    records.assert_prepared(builder, prepare_commands(data_dir),
                            f"python -m softnce.data.fashion_mnist --data_dir {data_dir}")


# --------------------------------------------------------------------------------------------------
# The in-memory dataset the trainer reads.
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_split(data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 28, 28, 1], labels int32 [n])`` of a prepared split (cached per process).

    Raises:
      FileNotFoundError: the data was never prepared in ``data_dir`` (the message says how).
    """
    builder = FashionMnist(data_dir=data_dir)
    assert_prepared(builder)
    arrays = records.read_arrays(builder, split, ["image", "label"])
    return arrays["image"], arrays["label"].astype(np.int32)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 28, 28, 1]`` -> float32 ``(x / 255 - MEAN) / STD``."""
    return ((images.astype(np.float32) / 255.0) - MEAN) / STD


def make_fashion_mnist_dataset(config: ml_collections.ConfigDict, *, process_index: int, process_count: int):
    """The in-memory Fashion-MNIST for the trainer (``config`` is ``config.data``).

    Fields: ``data_dir`` (the tfds data directory; None: ``~/tensorflow_datasets``),
    ``validation_fraction`` (of the 60,000 training images held out for the temperature fit; 0: none)
    and ``validation_seed``. Evaluation is on the official 10,000 test images. Optional:
    ``num_train_examples`` (train on the first ``n`` of the images left after the validation split;
    None: all), ``random_crop_padding`` / ``random_flip`` (input augmentation of the training images,
    :class:`softnce.data.array_augment.CropFlip`; 0 / False: none).

    Raises:
      FileNotFoundError: the data was never prepared (the message gives both preparation commands).
    """
    data_dir = config.get("data_dir")
    x_train, y_train = load_split(data_dir, "train")
    x_test, y_test = load_split(data_dir, "test")
    x_train, y_train, x_val, y_val = carve_validation(
        x_train, y_train, config.get("validation_fraction", 0.0), config.get("validation_seed", 0)
    )
    if config.get("num_train_examples"):
        x_train, y_train = x_train[: config.num_train_examples], y_train[: config.num_train_examples]
    dataset = ArrayDataset(
        normalize(x_train), y_train, normalize(x_test), y_test, num_classes=NUM_CLASSES,
        validation=(normalize(x_val), y_val) if len(y_val) else None,
        process_index=process_index, process_count=process_count,
    )
    dataset.class_names = CLASS_NAMES
    dataset.device_train_transform = array_augment.from_config(config, fill=float(normalize(np.zeros(1, np.uint8))[0]))
    return dataset


def main(argv: list[str] | None = None) -> None:

    parser = cli.ArgumentParser(
        description="Prepare tfds's fashion_mnist for softnce: from the official IDX files on disk, or by download.")
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default ~/tensorflow_datasets)")
    parser.add_argument("--idx_dir", default=DEFAULT_IDX_DIR,
                        help=f"folder with the four IDX files, gzipped or not (default {DEFAULT_IDX_DIR})")
    parser.add_argument("--download", action="store_true",
                        help="download with tfds even if --idx_dir holds the files (without them it downloads anyway)")
    args = parser.parse_args(argv)
    builder = prepare(args.data_dir, args.idx_dir, download=args.download)
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"prepared {NAME} in {builder.data_dir}: {sizes}")


if __name__ == "__main__":
    main()
