"""Any prepared tfds classification dataset, held in memory, with an optional soft-label feature.

Registered as ``tfds_arrays``. It reads two splits of a tfds dataset prepared as ``array_record``
(:mod:`softnce.data.records`; no TensorFlow) once per process (so it is for
data that fit in memory: MNIST- or CIFAR-sized), carves the validation split off the training split
and serves them through :class:`~softnce.data.arrays.ArrayDataset` (exact, resumable shuffling).
A soft-label feature, e.g. the annotator votes of CIFAR-10H stored with each image, becomes the
training batches' ``targets``: float ``[C]`` distributions are used as they are, integer ``[C]`` vote
counts are divided by their row sums. They are checked before training (the first row that is not a
distribution is named) and smoothed and mixed as ``config.augment`` says.

``config.data``::

    name               'tfds_arrays'
    tfds_name          the dataset, e.g. 'cifar10' or the name of your own prepared tfds dataset
                       (any dataset prepared in data_dir is read, with or without its builder code)
    data_dir           the tfds data directory (None: ~/tensorflow_datasets); never downloads
    train_split, eval_split   default 'train' and 'test'
    image_key, label_key      the features of the inputs and the hard labels (default 'image', 'label')
    targets_key        the soft-label feature, or None (no soft targets)
    validation_fraction, validation_seed   as in every config

Inputs: a uint8 feature (images) becomes float32 ``(x / 255 - mean) / std`` with the per-channel mean
and standard deviation of the training split (after the validation split is carved off); other
features are used as float32 as they are.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from softnce.data import records
from softnce.data.arrays import ArrayDataset, check_targets, held_out_mask


def soft_targets(values: np.ndarray, what: str) -> np.ndarray:
    """Float ``[n, C]`` distributions from a soft-label feature (integer vote counts are normalised per row)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"{what} must be [C] per example (a distribution or vote counts), got {values.shape[1:]}.")
    if np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.bool_):
        counts = values.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = counts / counts.sum(axis=1, keepdims=True)
    targets = values.astype(np.float32)
    check_targets(targets, what)
    return targets


FEATURE_FIELDS = " (config.data.image_key / label_key / targets_key)"  # where a missing feature is named


def make_tfds_arrays_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                             process_count: int) -> ArrayDataset:
    """The registered ``tfds_arrays`` dataset of ``config`` (see the module docstring)."""
    if not config.get("tfds_name"):
        raise ValueError("config.data.tfds_name is not set: the 'tfds_arrays' dataset reads a prepared tfds dataset.")
    try:
        builder = tfds.builder(config.tfds_name, data_dir=config.get("data_dir"))
    except Exception as error:  # noqa: BLE001  (tfds raises several kinds for an unknown or absent dataset)
        raise ValueError(f"config.data.tfds_name={config.tfds_name!r}: {' '.join(str(error).split())[:400]}") from None
    records.assert_prepared(
        builder, "Prepare it first with its builder: download_and_prepare(file_format='array_record').",
        f"its builder's download_and_prepare(file_format='array_record'), after moving {builder.data_dir} aside")
    image_key, label_key = config.get("image_key") or "image", config.get("label_key") or "label"
    targets_key = config.get("targets_key")
    train_keys = [image_key, label_key] + ([targets_key] if targets_key else [])
    train = records.read_arrays(builder, config.get("train_split") or "train", train_keys, hint=FEATURE_FIELDS)
    test = records.read_arrays(builder, config.get("eval_split") or "test", [image_key, label_key], hint=FEATURE_FIELDS)

    inputs, labels = train[image_key], train[label_key].astype(np.int32)
    held_out = held_out_mask(len(labels), config.get("validation_fraction", 0.0), config.get("validation_seed", 0))
    label_feature = builder.info.features[label_key]
    num_classes = getattr(label_feature, "num_classes", None)
    targets = None
    if targets_key:
        targets = soft_targets(train[targets_key], f"tfds {config.tfds_name} feature {targets_key!r}")[~held_out]
        num_classes = num_classes or targets.shape[1]
    num_classes = num_classes or int(labels.max()) + 1

    def prepare(x: np.ndarray, mean=None, std=None):
        if x.dtype != np.uint8:
            return x.astype(np.float32), None, None
        x = x.astype(np.float32) / 255.0
        if mean is None:
            axes = tuple(range(x.ndim - 1))
            mean, std = x.mean(axis=axes), np.maximum(x.std(axis=axes), 1e-6)
        return (x - mean) / std, mean, std

    train_x, mean, std = prepare(inputs[~held_out])
    val_x, _, _ = prepare(inputs[held_out], mean, std)
    test_x, _, _ = prepare(test[image_key], mean, std)
    dataset = ArrayDataset(
        train_x, labels[~held_out], test_x, test[label_key].astype(np.int32), num_classes=num_classes,
        train_targets=targets, validation=(val_x, labels[held_out]) if held_out.any() else None,
        process_index=process_index, process_count=process_count,
    )
    names = getattr(label_feature, "names", None)
    if names and len(names) == num_classes:
        dataset.class_names = tuple(names)
    return dataset
