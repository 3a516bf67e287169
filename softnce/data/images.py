"""tfds + tf.data image pipelines (ImageNet-1k, CIFAR-100, Tiny ImageNet) behind the Dataset interface.

Each process builds one :class:`ImageDataset` with :func:`make_image_dataset`. Training reads
``num_shards`` shards of the training examples (``tfds.even_splits(split, n=num_shards)``); process ``p`` of
``P`` owns shards ``[p S/P, (p+1) S/P)`` and concatenates one batch of each, in shard order, so the
global batch depends on ``num_shards`` but not on the number of processes (1 process x 8 devices and
2 processes x 4 devices see the same global batches). Evaluation reads
``tfds.even_splits(split, n=process_count)[process_index]``. Batches are numpy: ``inputs`` uint8
``[B, S, S, 3]``, ``label`` int32 ``[B]`` and, for evaluation, ``mask`` bool ``[B]``.

Training is timm's transform of the reference recipe, split between host and accelerator. The host
(tf.data, Pillow through ``tf.numpy_function``, :mod:`softnce.data.image_augment`) decodes and takes
the random resized crop to ``S`` (bicubic); the trainer then applies ``device_train_transform``
(:class:`softnce.data.device_augment.TrainTransform`: horizontal flip, RandAugment, normalisation,
random erasing) inside the jitted train step with one key per example. Evaluation: the host resizes
the shorter side to ``floor(S / 0.875)`` (bicubic) and takes the centre crop ``S``;
``device_eval_transform`` normalises.

Validation: with ``validation_fraction = f > 0`` the first ``round(f n)`` examples of the train split
(``train[:k]`` in tfds's split slicing) are the validation split and training reads the rest
(``train[k:]``); the split is fixed by tfds's record order, so ``validation_seed`` has no effect here.

TensorFlow is kept off the accelerators when this module is imported.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from softnce import config_checks, config_utils
from softnce.data import (
    device_augment,
    tiny_imagenet,  # noqa: F401  (registers the 'tiny_imagenet' builder)
)
from softnce.data import image_augment as augment
from softnce.data.base import Batch, Dataset

try:  # TensorFlow must never take the GPU/TPU memory that JAX needs.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices were already initialised (visible devices can then not change).
    pass

EVAL_CROP_FRACTION = augment.EVAL_CROP_FRACTION


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one supported tfds dataset."""

    num_classes: int
    train_split: str
    eval_split: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prepare: str  # How to prepare the data; '{data_dir}' is filled in.


SPECS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec(
        1000, "train", "validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        "ImageNet-1k cannot be downloaded automatically. Download ILSVRC2012_img_train.tar and "
        "ILSVRC2012_img_val.tar from https://image-net.org, put both files (unextracted) in "
        "{data_dir}/downloads/manual/, then run:\n"
        "  python -m softnce.data.images --name imagenet2012 --data_dir {data_dir}"),
    "cifar100": DatasetSpec(
        100, "train", "test", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
        "Download and prepare CIFAR-100 with:\n"
        "  python -m softnce.data.images --name cifar100 --data_dir {data_dir}"),
    "tiny_imagenet": DatasetSpec(
        200, "train", "validation", (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
        "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip, put it (or the extracted "
        "tiny-imagenet-200/ folder) in {data_dir}/downloads/manual/, then run:\n"
        "  python -m softnce.data.images --name tiny_imagenet --data_dir {data_dir}"),
}


def default_image_config() -> ml_collections.ConfigDict:
    """The data config with the reference recipe's defaults (:func:`softnce.config_utils.image_data_config`)
    and no validation split (see :func:`make_image_dataset`)."""
    return ml_collections.ConfigDict(dict(
        name="imagenet2012", **config_utils.image_data_config().to_dict(), validation_fraction=0.0, validation_seed=0))


def make_image_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                       process_count: int) -> "ImageDataset":
    """Builds this process's view of a prepared tfds image dataset.

    Missing config fields take :func:`default_image_config`'s values.

    Config fields:
      name: ``'imagenet2012'`` | ``'cifar100'`` | ``'tiny_imagenet'``.
      data_dir: the tfds data directory (None: tfds's default, ``~/tensorflow_datasets``).
      image_size: side ``S`` of the square training/evaluation images (224 in the recipe).
      train_split, eval_split: tfds split names (None: ``'train'`` and ``'validation'``,
        ``'test'`` for CIFAR-100).
      num_train_examples, num_eval_examples: split sizes (None: from ``builder.info.splits``;
        must be given under ``tfds.testing.mock_data``, which has no split metadata).
      randaugment: timm RandAugment spec (``'rand-m9-mstd0.5-inc1'``), ``''`` disables it.
      random_erasing_prob: probability of timm's pixel-mode random erasing (0.25; 0 disables it).
      shuffle_buffer: examples in the training shuffle buffer of each shard.
      num_shards: training shards ``S`` (None: ``process_count``); must be a multiple of
        ``process_count``. Fix it (e.g. to the largest process count you will use) to get the same
        global batches whatever the number of processes.
      cache: keep the encoded examples of this process's shares in memory after the first pass.
      cache_dir: where ``train_label_counts`` stores its ``.npy`` (None: the dataset's directory).
      host_threads: threads of each tf.data pipeline's private pool that decode and crop (None:
        tf.data's shared pool, one thread per host core); an int >= 1 caps the host's input work.
      validation_fraction: in ``[0, 1)``; the first ``round(f * num_train_examples)`` training
        examples become the validation split (0: none).
      validation_seed: unused by tfds datasets (the split is the first examples in record order).

    Raises:
      FileNotFoundError: the dataset was never prepared in ``data_dir`` (the message says how).
      ValueError: unknown dataset name, bad process index, split sizes that are unknown, or a
        validation fraction outside ``[0, 1)``.
    """
    full = default_image_config()
    full.update(dict(config))
    if full.name not in SPECS:
        raise ValueError(f"Unknown image dataset {full.name!r}; choose one of {sorted(SPECS)}.")
    config_checks.check_field("data.validation_fraction", full.validation_fraction)
    config_checks.check_field("data.host_threads", full.host_threads)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    train_shards(full.num_shards, process_index=process_index, process_count=process_count)
    builder = tfds.builder(full.name, data_dir=full.data_dir)
    assert_prepared(builder, full.name)
    return ImageDataset(full, builder, process_index=process_index, process_count=process_count)


def train_shards(num_shards: int | None, *, process_index: int, process_count: int) -> tuple[int, range]:
    """``(S, shards of this process)``: shards ``[p S/P, (p+1) S/P)`` of ``S`` (None: ``P``).

    Raises:
      ValueError: ``S`` is not a positive multiple of ``P``.
    """
    num_shards = process_count if num_shards is None else int(num_shards)
    if num_shards <= 0 or num_shards % process_count:
        raise ValueError(
            f"config.data.num_shards={num_shards} must be a positive multiple of the number of processes "
            f"({process_count}), so that every process owns the same number of training shards; e.g. "
            f"num_shards={process_count * max(1, num_shards // process_count)}.")
    per_process = num_shards // process_count
    return num_shards, range(process_index * per_process, (process_index + 1) * per_process)


def assert_prepared(builder: tfds.core.DatasetBuilder, name: str) -> None:
    """Raises FileNotFoundError naming what is missing and how to prepare it, unless prepared."""
    if builder.is_prepared():
        return
    data_dir = os.fspath(builder.data_dir_root)
    missing = ""
    if name == "imagenet2012":
        manual = os.path.join(data_dir, "downloads", "manual")
        absent = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
                  if not tf.io.gfile.exists(os.path.join(manual, f))]
        missing = f" Missing manual downloads in {manual}: {', '.join(absent)}." if absent else ""
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared: no {builder.data_dir}.{missing}\n"
        + SPECS[name].prepare.format(data_dir=data_dir))


class ImageDataset(Dataset):
    """One process's view of a tfds image classification dataset (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, *,
                 process_index: int, process_count: int):
        spec = SPECS[config.name]
        self.config = config
        self.builder = builder
        self.spec = spec
        self.process_index = process_index
        self.process_count = process_count
        self.eval_split = config.eval_split or spec.eval_split
        self.num_classes = spec.num_classes
        self.example_shape = (config.image_size, config.image_size, 3)
        full_train_split = config.train_split or spec.train_split
        num_train = self._split_size(full_train_split, config.num_train_examples)
        self.num_validation_examples = int(round(float(config.validation_fraction) * num_train))
        if self.num_validation_examples >= num_train:
            raise ValueError(f"config.data.validation_fraction={config.validation_fraction} leaves no training "
                             f"examples out of {num_train}.")
        # tfds split slicing: the validation split is the first k examples, training the rest.
        k = self.num_validation_examples
        self.train_split = f"{full_train_split}[{k}:]" if k else full_train_split
        self.validation_split = f"{full_train_split}[:{k}]" if k else None
        self.num_train_examples = num_train - k
        self.num_eval_examples = self._split_size(self.eval_split, config.num_eval_examples)
        rand_augment = device_augment.parse_rand_augment(config.randaugment) if config.randaugment else None
        self.device_train_transform = device_augment.TrainTransform(
            mean=spec.mean, std=spec.std, rand_augment=rand_augment,
            erasing_prob=float(config.random_erasing_prob))
        self.device_eval_transform = device_augment.EvalTransform(mean=spec.mean, std=spec.std)
        self.input_dtype = "uint8"  # eval batches are uint8 centre crops, normalised on the device
        self.class_names = _class_names(builder)
        self.num_shards, self.shards = train_shards(config.num_shards, process_index=process_index,
                                                    process_count=process_count)

    def _split_size(self, split: str, configured: int | None) -> int:
        if configured is not None:
            return int(configured)
        try:
            return int(self.builder.info.splits[split].num_examples)
        except KeyError:
            raise ValueError(
                f"The size of split {split!r} of {self.builder.name!r} is unknown (no split metadata, e.g. "
                "under tfds.testing.mock_data): set config.num_train_examples / num_eval_examples.") from None

    def _process_split(self, split: str) -> str:
        return tfds.even_splits(split, n=self.process_count)[self.process_index]

    # ------------------------------------------------------------------ label counts
    def train_label_counts(self) -> np.ndarray:
        """Per-class counts ``[C]`` over the whole training split (label-only pass, cached as .npy).

        Every process counts (or reads the cache); only process 0 writes the cache file.
        """
        path = self._label_counts_path()
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path, "rb") as f:
                counts = np.load(f)
            if counts.shape == (self.num_classes,):
                return counts
        labels = self.builder.as_dataset(split=self.train_split,
                                         decoders={"image": tfds.decode.SkipDecoding()})
        labels = labels.map(lambda ex: ex["label"], num_parallel_calls=tf.data.AUTOTUNE).batch(65_536)
        counts = np.zeros(self.num_classes, np.int64)
        for chunk in labels.as_numpy_iterator():
            counts += np.bincount(chunk, minlength=self.num_classes)[:self.num_classes]
        if self.process_index == 0:
            _atomic_save(path, counts, suffix=".tmp")
        return counts

    def _label_counts_path(self) -> str:
        directory = self.config.cache_dir or self.builder.data_dir
        split = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.train_split)
        return os.path.join(directory, f"{self.builder.name}_{split}_label_counts.npy")

    # ------------------------------------------------------------------ training
    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Endless shuffled batches of uint8 random resized crops, ``batch_size`` of them (this process's share).

        The rest of the augmentation is ``device_train_transform``'s, in the train step. A batch is
        the concatenation, in shard order, of ``batch_size / k`` examples from each of this
        process's ``k`` shards. Each shard's stream is deterministic in ``(seed, shard, start_step)``
        (file order, shuffle and every crop box), never in the process index.
        Resuming at ``start_step`` does not replay the exact stream an uninterrupted run would have
        seen; it reshuffles with a step-dependent seed (skipping ``start_step`` batches of ImageNet
        would cost as much as reading them).
        """
        ds = self.train_dataset(batch_size, seed=seed, start_step=start_step)
        return ds.as_numpy_iterator()

    def train_dataset(self, batch_size: int, *, seed: int, start_step: int = 0) -> tf.data.Dataset:
        """The ``tf.data`` pipeline behind :meth:`train_batches`."""
        per_shard = self._per_shard_batch(batch_size)
        streams = tuple(self.shard_dataset(shard, per_shard, seed=seed, start_step=start_step)
                        for shard in self.shards)
        if len(streams) == 1:
            ds = streams[0]
        else:
            ds = tf.data.Dataset.zip(streams).map(
                lambda *batches: {key: tf.concat([b[key] for b in batches], axis=0) for key in batches[0]})
        return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options())

    def _per_shard_batch(self, batch_size: int) -> int:
        shards = len(self.shards)
        if batch_size <= 0 or batch_size % shards:
            raise ValueError(
                f"the per-process training batch ({batch_size}) must divide over this process's {shards} "
                f"training shards (config.data.num_shards={self.num_shards} over {self.process_count} "
                f"processes): make config.data.batch_size a multiple of num_shards={self.num_shards}.")
        return batch_size // shards

    def shard_dataset(self, shard: int, batch_size: int, *, seed: int, start_step: int = 0) -> tf.data.Dataset:
        """Endless batches of ``batch_size`` from training shard ``shard`` of ``num_shards``."""
        entropy = np.random.SeedSequence([seed, shard, start_step]).generate_state(3)
        file_seed, shuffle_seed, crop_key = int(entropy[0]), int(entropy[1]), int(entropy[2])
        read_config = tfds.ReadConfig(shuffle_seed=file_seed, options=self._options())
        split = tfds.even_splits(self.train_split, n=self.num_shards)[shard]
        ds = self.builder.as_dataset(split=split, shuffle_files=True,
                                     decoders={"image": tfds.decode.SkipDecoding()}, read_config=read_config)
        ds = ds.map(lambda ex: (ex["image"], ex["label"]))
        if self.config.cache:
            ds = ds.cache()
        ds = ds.repeat().shuffle(self.config.shuffle_buffer, seed=shuffle_seed).enumerate()
        ds = ds.batch(batch_size, drop_remainder=True)  # crops are made a batch per call (less overhead)

        def preprocess(index, example):
            image_bytes, label = example
            seeds = tf.stack([tf.fill(tf.shape(index), tf.constant(crop_key, tf.int64)), index], axis=1)
            return {"inputs": self.train_preprocess(image_bytes, seeds), "label": tf.cast(label, tf.int32)}

        return ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train_preprocess(self, image_bytes: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
        """Encoded images ``[B]`` -> uint8 ``[B, S, S, 3]``: random resized crops (the host half).

        ``seeds`` int64 ``[B, 2]``: example ``i``'s crop box is a function of ``seeds[i]`` alone.
        """
        size = self.config.image_size

        def crops(data, seed_rows):
            out = np.empty((len(data), size, size, 3), np.uint8)
            for i, (encoded, example_seed) in enumerate(zip(data, seed_rows)):
                out[i] = augment.random_resized_crop(encoded, example_seed, size)
            return out

        images = tf.numpy_function(crops, [image_bytes, seeds], tf.uint8, stateful=False)
        images.set_shape([image_bytes.shape[0], *self.example_shape])
        return images

    # ------------------------------------------------------------------ evaluation
    def num_eval_batches(self, batch_size: int) -> int:
        """``ceil(num_eval_examples / (batch_size * process_count))``, the same on every process."""
        return math.ceil(self.num_eval_examples / (batch_size * self.process_count))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """One pass over this process's share of the eval split; padding has ``mask`` False."""
        return self.eval_dataset(batch_size).as_numpy_iterator()

    def num_validation_batches(self, batch_size: int) -> int:
        """``ceil(num_validation_examples / (batch_size * process_count))``, the same on every process."""
        return math.ceil(self.num_validation_examples / (batch_size * self.process_count))

    def validation_batches(self, batch_size: int) -> Iterator[Batch]:
        """One pass over this process's share of the validation split, padded like :meth:`eval_batches`."""
        if not self.num_validation_examples:
            return super().validation_batches(batch_size)
        return self._unaugmented_dataset(self.validation_split, self.num_validation_batches(batch_size),
                                         batch_size).as_numpy_iterator()

    def eval_dataset(self, batch_size: int) -> tf.data.Dataset:
        """The ``tf.data`` pipeline behind :meth:`eval_batches`."""
        return self._unaugmented_dataset(self.eval_split, self.num_eval_batches(batch_size), batch_size)

    def _unaugmented_dataset(self, split: str, num_batches: int, batch_size: int) -> tf.data.Dataset:
        """This process's share of ``split``: resized, centre-cropped, padded to ``num_batches`` batches."""
        ds = self.builder.as_dataset(split=self._process_split(split), shuffle_files=False,
                                     decoders={"image": tfds.decode.SkipDecoding()},
                                     read_config=tfds.ReadConfig(options=self._options()))
        if self.config.cache:
            ds = ds.cache()
        ds = ds.map(lambda ex: {"inputs": ex["image"], "label": tf.cast(ex["label"], tf.int32),
                                "mask": tf.constant(True)})
        padding = tf.data.Dataset.from_tensors({
            "inputs": tf.constant(b""), "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}).repeat()
        ds = ds.concatenate(padding).take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
        ds = ds.map(lambda b: dict(b, inputs=self.eval_preprocess(b["inputs"])),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options())

    def eval_preprocess(self, image_bytes: tf.Tensor) -> tf.Tensor:
        """Encoded images ``[B]`` -> uint8 ``[B, S, S, 3]``: bicubic resize of the shorter side, centre
        crop; an empty string (padding) gives zeros."""
        size = self.config.image_size

        def crops(data):
            out = np.zeros((len(data), size, size, 3), np.uint8)
            for i, encoded in enumerate(data):
                if encoded:
                    out[i] = augment.resize_and_center_crop(encoded, size)
            return out

        images = tf.numpy_function(crops, [image_bytes], tf.uint8, stateful=False)
        images.set_shape([image_bytes.shape[0], *self.example_shape])
        return images

    def _options(self) -> tf.data.Options:
        """Deterministic tf.data options, with a private pool of ``host_threads`` threads if set."""
        options = _deterministic_options()
        if self.config.host_threads is not None:
            options.threading.private_threadpool_size = int(self.config.host_threads)
        return options


def _class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...] | None:
    """The label names of the builder's ``label`` feature (e.g. ImageNet's synset ids), if it has them."""
    try:
        names = builder.info.features["label"].names
    except (KeyError, AttributeError, TypeError):
        return None
    return tuple(str(name) for name in names) if names else None


def _deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _atomic_save(path: str, array: np.ndarray, suffix: str) -> None:
    """Writes ``array`` as .npy to ``path`` via a temporary file and a rename."""
    tf.io.gfile.makedirs(os.path.dirname(path))
    tmp = path + suffix
    with tf.io.gfile.GFile(tmp, "wb") as f:
        np.save(f, array)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None) -> None:
    """Downloads (where allowed) and prepares ``name`` in ``data_dir`` (``tfds build`` equivalent)."""
    if name not in SPECS:
        raise ValueError(f"Unknown image dataset {name!r}; choose one of {sorted(SPECS)}.")
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Prepare an image dataset for softnce (tfds).")
    parser.add_argument("--name", required=True, choices=sorted(SPECS))
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="manual downloads (default <data_dir>/downloads/manual)")
    args = parser.parse_args(argv)
    prepare(args.name, args.data_dir, args.manual_dir)


if __name__ == "__main__":
    main()
