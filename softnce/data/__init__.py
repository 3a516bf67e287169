"""Dataset registry: ``config.data.name`` -> a :class:`~softnce.data.base.Dataset` for this process.

A dataset is registered as a factory ``factory(config.data, *, process_index, process_count) ->
Dataset``; a user's module adds one with ``register_dataset(name, factory, *, overwrite=False)`` or
``@register_dataset(name)`` (:meth:`softnce.registry.Registry.register` of :data:`DATASETS`) and is
imported with ``python -m softnce.main --import_modules=...``. Soft targets given with the data
(annotator votes, another model's labels) come as ``targets [B, C]`` in the training batches: build
the dataset as an :class:`~softnce.data.arrays.ArrayDataset` with ``train_targets``, or use the ``npz``
(``.npz`` files, :mod:`softnce.data.npz`) or ``tfds_arrays`` (a tfds soft-label feature,
:mod:`softnce.data.tfds_arrays`) datasets. The package's own entries are
:func:`softnce.registry.lazy`, so a dataset's module (tensorflow-datasets for the tfds datasets) is
imported only when that dataset is built.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

from typing import Callable

import ml_collections

from softnce.data.base import Dataset
from softnce.registry import Registry, lazy

DatasetFactory = Callable[..., Dataset]
"""``factory(config: ConfigDict, *, process_index: int, process_count: int) -> Dataset``."""

DATASETS: Registry[DatasetFactory] = Registry("dataset")
register_dataset = DATASETS.register

register_dataset("digits", lazy("softnce.data.digits:make_digits_dataset"))
register_dataset("fashion_mnist", lazy("softnce.data.fashion_mnist:make_fashion_mnist_dataset"))
register_dataset("fashion_mnist_tuples", lazy("softnce.data.fashion_tuples:make_fashion_tuples_dataset"))  # C = 10^k
register_dataset("npz", lazy("softnce.data.npz:make_npz_dataset"))  # .npz files with optional soft targets
register_dataset("tfds_arrays", lazy("softnce.data.tfds_arrays:make_tfds_arrays_dataset"))  # tfds, soft labels too
register_dataset("toy", lazy("softnce.data.toy:make_toy_dataset"))
for _name in ("imagenet2012", "cifar100", "tiny_imagenet"):
    register_dataset(_name, lazy("softnce.data.images:make_image_dataset"))
del _name


def get_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Builds the dataset named ``config.name``; an unknown name lists the valid ones."""
    return DATASETS.get(config.name)(config, process_index=process_index, process_count=process_count)
