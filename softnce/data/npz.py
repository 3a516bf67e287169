"""A dataset from ``.npz`` files, with optional soft targets given with the data (registered as ``npz``).

Each file holds ``inputs`` ``[n, ...]`` (any numeric dtype, used as float32 exactly as stored: the
model sees them as they are, so normalise them beforehand), ``labels`` int ``[n]`` in ``[0, C)``
and optionally ``targets`` float ``[n, C]``, one distribution per example (annotator vote
distributions as in CIFAR-10H, or another model's predictions). Write one with::

    np.savez("train.npz", inputs=x, labels=y, targets=votes / votes.sum(1, keepdims=True))

``config.data`` (``configs/npz.py`` is a launchable config)::

    name              'npz'
    train_file        the training .npz (local or gs://)
    test_file         the evaluation .npz (its targets, if any, are not used: evaluation is on labels)
    validation_file   optional .npz for the post-hoc temperature fit; None: hold out
                      validation_fraction of the training file (validation_seed), targets split alike
    validation_fraction, validation_seed   as in every config
    num_classes       None: targets.shape[1] if the training file has targets, else 1 + the largest label
    class_names       optional, one name per class

Soft targets are checked before training (:func:`softnce.data.arrays.check_targets`: the first row
that is not a distribution is named, with its file). Training batches then carry them and the
trainer smooths and mixes them as ``config.augment`` says (:mod:`softnce.targets`); the noise distribution
of the InfoNCE losses may be their mean (``config.loss.noise = 'target_mean'``).
"""

from __future__ import annotations

import io
from typing import Optional

import ml_collections
import numpy as np
from etils import epath

from softnce.data.arrays import ArrayDataset, check_targets, held_out_mask

KEYS = ("inputs", "labels", "targets")


def load_npz(path: str, *, num_classes: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """``(inputs float32, labels int32, targets float32 or None)`` of one file, checked.

    ``num_classes`` given: labels must lie in ``[0, C)`` and targets have ``C`` columns.
    """
    try:
        raw = epath.Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (config.data of the 'npz' dataset).") from None
    with np.load(io.BytesIO(raw)) as arrays:
        missing = [k for k in ("inputs", "labels") if k not in arrays.files]
        if missing:
            raise ValueError(f"{path} has no {' and no '.join(missing)} array (it holds {', '.join(arrays.files)}); "
                             "an npz dataset file holds inputs [n, ...], labels [n] and optionally targets [n, C].")
        inputs, labels = np.asarray(arrays["inputs"]), np.asarray(arrays["labels"])
        targets = np.asarray(arrays["targets"], np.float32) if "targets" in arrays.files else None
    if inputs.ndim < 2 or labels.shape != (len(inputs),):
        raise ValueError(f"{path}: inputs must be [n, ...] and labels [n]; got {inputs.shape} and {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer) and not np.all(labels == np.round(labels)):
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}.")
    labels = labels.astype(np.int32)
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {labels.min()}.")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise ValueError(f"{path}: label {labels.max()} is outside [0, {num_classes}) (config.data.num_classes).")
    if targets is not None:
        columns = num_classes if num_classes is not None else targets.shape[-1]
        if targets.shape != (len(labels), columns):
            raise ValueError(f"{path}: targets must be [n, C] = {(len(labels), columns)}, got {targets.shape}.")
        check_targets(targets, f"{path}: targets")
    return inputs.astype(np.float32), labels, targets


def make_npz_dataset(config: ml_collections.ConfigDict, *, process_index: int, process_count: int) -> ArrayDataset:
    """The registered ``npz`` dataset of ``config`` (see the module docstring)."""
    for field in ("train_file", "test_file"):
        if not config.get(field):
            raise ValueError(f"config.data.{field} is not set: the 'npz' dataset reads inputs, labels (and "
                             "targets) from .npz files (see softnce/data/npz.py).")
    num_classes = config.get("num_classes")
    inputs, labels, targets = load_npz(config.train_file, num_classes=num_classes)
    if num_classes is None:
        num_classes = int(targets.shape[1]) if targets is not None else int(labels.max()) + 1
        if labels.max() >= num_classes:
            raise ValueError(f"{config.train_file}: label {labels.max()} is outside [0, {num_classes}) (the targets' "
                             "columns).")
    test_inputs, test_labels, _ = load_npz(config.test_file, num_classes=num_classes)
    if config.get("validation_file"):
        val_inputs, val_labels, _ = load_npz(config.validation_file, num_classes=num_classes)
    else:
        held_out = held_out_mask(len(labels), config.get("validation_fraction", 0.0), config.get("validation_seed", 0))
        val_inputs, val_labels = inputs[held_out], labels[held_out]
        inputs, labels = inputs[~held_out], labels[~held_out]
        targets = None if targets is None else targets[~held_out]
    if test_inputs.shape[1:] != inputs.shape[1:]:
        raise ValueError(f"{config.test_file}: examples of shape {test_inputs.shape[1:]}, the training file's are "
                         f"{inputs.shape[1:]}.")
    dataset = ArrayDataset(
        inputs, labels, test_inputs, test_labels, num_classes=num_classes, train_targets=targets,
        validation=(val_inputs, val_labels) if len(val_labels) else None,
        process_index=process_index, process_count=process_count,
    )
    names = config.get("class_names")
    if names:
        if len(names) != num_classes:
            raise ValueError(f"config.data.class_names names {len(names)} classes; the data have {num_classes}.")
        dataset.class_names = tuple(str(n) for n in names)
    return dataset
