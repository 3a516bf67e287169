"""tfds image datasets (ImageNet-1k, CIFAR-100, Tiny ImageNet) read through Grain, behind the Dataset interface.

Each process builds one :class:`ImageDataset` with :func:`make_image_dataset`. The data are a tfds
dataset prepared as ``array_record`` files by :func:`prepare` (``python -m softnce.data.images --name
NAME --data_dir DIR``), with softnce's builders :mod:`softnce.data.imagenet2012`,
:mod:`softnce.data.cifar100` and :mod:`softnce.data.tiny_imagenet`, which need no TensorFlow (tfds's
own ImageNet and CIFAR builders call it while preparing; their registered builders read what
softnce's prepared). The records are read without TensorFlow (:mod:`softnce.data.records`), by
index through the Grain pipelines of :mod:`softnce.data.pipeline`: a global index shuffle, each
process reading its share of every global batch (1 process x 8 devices and 2 processes x 4 devices
see the same global batches, crops included), and an iterator state saved with every checkpoint, so a
resumed run reads exactly the batches an uninterrupted one would. Batches are numpy: ``inputs`` uint8
``[B, S, S, 3]``, ``label`` int32 ``[B]`` and, for evaluation, ``mask`` bool ``[B]``.

Training is timm's transform of the reference recipe, split between host and accelerator. The host
(Grain's reader threads, Pillow, :mod:`softnce.data.image_augment`) decodes and takes the random
resized crop to ``S`` (bicubic); the crop of the example at position ``q`` of the global stream is
seeded by ``(seed, q)``. The trainer then applies ``device_train_transform``
(:class:`softnce.data.device_augment.TrainTransform`: horizontal flip, RandAugment, normalisation,
random erasing) inside the jitted train step with one key per example. Evaluation: the host resizes
the shorter side to ``floor(S / 0.875)`` (bicubic) and takes the centre crop ``S``;
``device_eval_transform`` normalises.

Validation: with ``validation_fraction = f > 0`` the first ``round(f n)`` examples of the train split
(``train[:k]`` in tfds's split slicing) are the validation split and training reads the rest
(``train[k:]``); the split is fixed by tfds's record order, so ``validation_seed`` has no effect here.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from softnce import cli, config_checks, config_utils
from softnce.data import (
    cifar100,
    device_augment,
    imagenet2012,
    pipeline,
    records,
    tiny_imagenet,  # noqa: F401  (registers the 'tiny_imagenet' builder)
)
from softnce.data import image_augment as augment
from softnce.data.base import Batch, Dataset

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
        "Prepare CIFAR-100 with the command below: it downloads cifar-100-binary.tar.gz, or, without "
        "internet, takes that file from {data_dir}/downloads/manual/ (download it elsewhere from "
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz and copy it there first):\n"
        "  python -m softnce.data.images --name cifar100 --data_dir {data_dir}"),
    "tiny_imagenet": DatasetSpec(
        200, "train", "validation", (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
        "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip, put it (or the extracted "
        "tiny-imagenet-200/ folder) in {data_dir}/downloads/manual/, then run:\n"
        "  python -m softnce.data.images --name tiny_imagenet --data_dir {data_dir}"),
}

# The builders that prepare a dataset without TensorFlow where tfds's own would call it (same names,
# versions and features as tfds's, whose registered builders read the prepared data). Datasets absent
# here are prepared by their registered builder (tiny_imagenet: softnce's own).
BUILDERS: dict[str, type[tfds.core.DatasetBuilder]] = {
    "imagenet2012": imagenet2012.Imagenet2012,
    "cifar100": cifar100.Cifar100,
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
      num_train_examples, num_eval_examples: read only the first ``n`` examples of the training
        split (after the validation split) and of the evaluation split (None: all of them).
      randaugment: timm RandAugment spec (``'rand-m9-mstd0.5-inc1'``), ``''`` disables it.
      random_erasing_prob: probability of timm's pixel-mode random erasing (0.25; 0 disables it).
      cache_dir: where ``train_label_counts`` stores its ``.npy`` (None: the dataset's directory).
      host_threads: Grain reader threads that decode and crop (None: one per host core); an int
        >= 1 caps the host's input work.
      validation_fraction: in ``[0, 1)``; the first ``round(f * num_train_examples)`` training
        examples become the validation split (0: none).
      validation_seed: unused by tfds datasets (the split is the first examples in record order).

    Raises:
      FileNotFoundError: the dataset was never prepared in ``data_dir`` (the message says how).
      DataError: the dataset was prepared as TFRecord (the message gives the command that rebuilds it).
      ValueError: unknown dataset name, bad process index, or a validation fraction outside ``[0, 1)``.
    """
    full = default_image_config()
    full.update(dict(config))
    if full.name not in SPECS:
        raise ValueError(f"Unknown image dataset {full.name!r}; choose one of {sorted(SPECS)}.")
    config_checks.check_field("data.validation_fraction", full.validation_fraction)
    config_checks.check_field("data.host_threads", full.host_threads)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    builder = records.builder(full.name, full.data_dir)
    assert_prepared(builder, full.name)
    return ImageDataset(full, builder, process_index=process_index, process_count=process_count)


def prepare_command(name: str, data_dir: str) -> str:
    """How to prepare ``name`` in ``data_dir`` as array_record (the last line is the command)."""
    return SPECS[name].prepare.format(data_dir=data_dir)


def assert_prepared(builder: tfds.core.DatasetBuilder, name: str) -> None:
    """Raises FileNotFoundError naming what is missing and how to prepare it, unless prepared as array_record."""
    data_dir = records.data_dir_root(builder)
    missing = ""
    if name == "imagenet2012" and not builder.is_prepared():
        manual = epath.Path(data_dir) / "downloads" / "manual"
        absent = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar") if not (manual / f).exists()]
        missing = f" Missing manual downloads in {manual}: {', '.join(absent)}." if absent else ""
    how = prepare_command(name, data_dir)
    records.assert_prepared(builder, missing.strip() + ("\n" if missing else "") + how, how.splitlines()[-1].strip())


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
        self.num_classes = spec.num_classes
        self.example_shape = (config.image_size, config.image_size, 3)
        full_train_split = config.train_split or spec.train_split
        num_train = builder.info.splits[full_train_split].num_examples
        self.num_validation_examples = int(round(float(config.validation_fraction) * num_train))
        if self.num_validation_examples >= num_train:
            raise ValueError(f"config.data.validation_fraction={config.validation_fraction} leaves no training "
                             f"examples out of {num_train}.")
        # tfds split slicing: the validation split is the first k examples, training the rest.
        k = self.num_validation_examples
        self.train_split = f"{full_train_split}[{k}:]" if k else full_train_split
        self.validation_split = f"{full_train_split}[:{k}]" if k else None
        self.eval_split = config.eval_split or spec.eval_split
        self.train_source = records.RecordSource(builder, self.train_split)
        self.eval_source = records.RecordSource(builder, self.eval_split)
        self.validation_source = records.RecordSource(builder, self.validation_split) if k else None
        self.num_train_examples = _first(len(self.train_source), config.num_train_examples)
        self.num_eval_examples = _first(len(self.eval_source), config.num_eval_examples)
        rand_augment = device_augment.parse_rand_augment(config.randaugment) if config.randaugment else None
        self.device_train_transform = device_augment.TrainTransform(
            mean=spec.mean, std=spec.std, rand_augment=rand_augment,
            erasing_prob=float(config.random_erasing_prob))
        self.device_eval_transform = device_augment.EvalTransform(mean=spec.mean, std=spec.std)
        self.input_dtype = "uint8"  # eval batches are uint8 centre crops, normalised on the device
        self.class_names = _class_names(builder)
        self.read_options = pipeline.read_options(config.host_threads or os.cpu_count() or 1)

    # ------------------------------------------------------------------ label counts
    def train_label_counts(self) -> np.ndarray:
        """Per-class counts ``[C]`` over the whole training split (label-only pass, cached as .npy).

        Every process counts (or reads the cache); only process 0 writes the cache file.
        """
        path = self._label_counts_path()
        if path.exists():
            counts = np.load(io.BytesIO(path.read_bytes()))
            if counts.shape == (self.num_classes,):
                return counts
        counts = np.zeros(self.num_classes, np.int64)
        for start in range(0, self.num_train_examples, 65_536):
            rows = range(start, min(start + 65_536, self.num_train_examples))
            labels = [record["label"] for record in self.train_source.read(rows)]
            counts += np.bincount(labels, minlength=self.num_classes)[:self.num_classes]
        if self.process_index == 0:
            _atomic_save(path, counts)
        return counts

    def _label_counts_path(self) -> epath.Path:
        directory = self.config.cache_dir or self.builder.data_dir
        split = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.train_split)
        suffix = f"_first{self.num_train_examples}" if self.num_train_examples < len(self.train_source) else ""
        return epath.Path(directory) / f"{self.builder.name}_{split}{suffix}_label_counts.npy"

    # ------------------------------------------------------------------ training
    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> grain.DatasetIterator:
        """Endless shuffled batches of uint8 random resized crops, ``batch_size`` of them (this process's share).

        The rest of the augmentation is ``device_train_transform``'s, in the train step. Deterministic
        in ``seed``: the rows of each global batch and every crop box (seeded by the example's position
        in the global stream), never in the process index. The returned Grain iterator's state is
        checkpointed by the trainer (exact resume).
        """
        size = self.config.image_size
        crop_key = int(np.random.SeedSequence([seed, 0x1C80]).generate_state(1)[0])

        def read(rows: np.ndarray, positions: np.ndarray) -> Batch:
            inputs = np.empty((len(rows), *self.example_shape), np.uint8)
            labels = np.empty(len(rows), np.int32)

            def crop(i: int, record: dict) -> np.ndarray:
                labels[i] = record["label"]
                return augment.random_resized_crop(record["image"], (crop_key, positions[i]), size)

            self.train_source.map_records(rows, crop, inputs)
            return {"inputs": inputs, "label": labels}

        return pipeline.train_iterator(
            read, num_examples=self.num_train_examples, batch_size=batch_size, seed=seed,
            process_index=self.process_index, process_count=self.process_count, start_step=start_step,
            options=self.read_options)

    # ------------------------------------------------------------------ evaluation
    def num_eval_batches(self, batch_size: int) -> int:
        """``ceil(num_eval_examples / (batch_size * process_count))``, the same on every process."""
        return pipeline.num_eval_batches(self.num_eval_examples, batch_size, self.process_count)

    def eval_batches(self, batch_size: int) -> grain.DatasetIterator:
        """One pass over this process's share of the eval split; padding has ``mask`` False."""
        return self._unaugmented_batches(self.eval_source, self.num_eval_examples, batch_size)

    def num_validation_batches(self, batch_size: int) -> int:
        """``ceil(num_validation_examples / (batch_size * process_count))``, the same on every process."""
        return pipeline.num_eval_batches(self.num_validation_examples, batch_size, self.process_count)

    def validation_batches(self, batch_size: int) -> grain.DatasetIterator:
        """One pass over this process's share of the validation split, padded like :meth:`eval_batches`."""
        if not self.num_validation_examples:
            return super().validation_batches(batch_size)
        return self._unaugmented_batches(self.validation_source, self.num_validation_examples, batch_size)

    def _unaugmented_batches(self, source: records.RecordSource, num_examples: int,
                             batch_size: int) -> grain.DatasetIterator:
        """Resized, centre-cropped examples of ``source`` in order; padding (``mask`` False) is zeros."""
        size = self.config.image_size

        def read(rows: np.ndarray, valid: np.ndarray) -> Batch:
            inputs = np.zeros((len(rows), *self.example_shape), np.uint8)
            labels = np.zeros(len(rows), np.int32)

            kept = np.flatnonzero(valid)

            def resize(i: int, record: dict) -> np.ndarray:
                labels[kept[i]] = record["label"]
                return augment.resize_and_center_crop(record["image"], size)

            crops = np.empty((len(kept), *self.example_shape), np.uint8)
            source.map_records(rows[kept], resize, crops)
            inputs[kept] = crops
            return {"inputs": inputs, "label": labels}

        return pipeline.eval_iterator(
            read, num_examples=num_examples, batch_size=batch_size, process_index=self.process_index,
            process_count=self.process_count, options=self.read_options)


def _first(available: int, configured: int | None) -> int:
    """``configured`` examples (None: all ``available``); more than there are is an error."""
    if configured is None:
        return available
    if int(configured) > available:
        raise ValueError(f"config.data.num_train_examples / num_eval_examples = {configured} is more than the "
                         f"{available} examples of the split; lower it or set it to None.")
    return int(configured)


def _class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...] | None:
    """The label names of the builder's ``label`` feature (e.g. ImageNet's synset ids), if it has them."""
    try:
        names = builder.info.features["label"].names
    except (KeyError, AttributeError, TypeError):
        return None
    return tuple(str(name) for name in names) if names else None


def _atomic_save(path: epath.Path, array: np.ndarray) -> None:
    """Writes ``array`` as .npy to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None) -> None:
    """Downloads (where allowed) and prepares ``name`` in ``data_dir`` as array_record (``tfds build`` equivalent).

    ImageNet-1k and CIFAR-100 are prepared by softnce's builders (:data:`BUILDERS`), which need no
    TensorFlow; the others by their registered builder. Data prepared earlier as TFRecord are written
    again as array_record (downloads are reused).
    """
    if name not in SPECS:
        raise ValueError(f"Unknown image dataset {name!r}; choose one of {sorted(SPECS)}.")
    dataset_builder = BUILDERS[name](data_dir=data_dir) if name in BUILDERS else records.builder(name, data_dir)
    records.prepare(dataset_builder, tfds.download.DownloadConfig(manual_dir=manual_dir))


def main(argv: list[str] | None = None) -> None:

    parser = cli.ArgumentParser(description="Prepare an image dataset for softnce (tfds, as array_record).")
    parser.add_argument("--name", required=True, choices=sorted(SPECS))
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="manual downloads (default <data_dir>/downloads/manual)")
    args = parser.parse_args(argv)
    prepare(args.name, args.data_dir, args.manual_dir)


if __name__ == "__main__":
    main()
