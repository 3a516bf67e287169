"""Dataset registry: ``config.data.name`` -> a :class:`~softnce.data.base.Dataset` for this process.

A dataset is registered as a factory ``factory(config.data, *, process_index, process_count, **fields)
-> Dataset``; its other keyword-only parameters are its config fields, as a model factory's are: ``def
make(config, *, process_index, process_count, noise_level=0.1)`` receives ``config.data.noise_level``
(default 0.1), ``--config.data.noise_level=0.3`` sets it once the dataset is named, a field of
``config.data`` it does not take (besides :data:`SHARED_FIELDS`) is one line that lists those it takes,
and ``register_dataset(..., ranges={'noise_level': ...})`` declares their valid values. A factory
without such parameters reads what it needs from ``config.data`` itself (the package's own,
:func:`softnce.registry.lazy` entries, whose fields' rules are in :data:`softnce.config_checks.RULES`).
A user's module adds one with ``register_dataset(name, factory, *, overwrite=False)`` or
``@register_dataset(name)`` (:meth:`softnce.registry.Registry.register` of :data:`DATASETS`) and is
imported with ``python -m softnce.main --import_modules=...``. Soft targets given with the data
(annotator votes, another model's labels) come as ``targets [B, C]`` in the training batches: build the
dataset as an :class:`~softnce.data.arrays.ArrayDataset` with ``train_targets``, or use the ``npz``
(``.npz`` files, :mod:`softnce.data.npz`) or ``tfds_arrays`` (a tfds soft-label feature,
:mod:`softnce.data.tfds_arrays`) datasets. The package's own entries are :func:`softnce.registry.lazy`,
so a dataset's module (tensorflow-datasets for the tfds datasets) is imported only when that dataset is
built.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

from typing import Any, Callable, Optional

import ml_collections

from softnce.data.base import Dataset
from softnce.registry import Registry, keyword_fields, lazy

DatasetFactory = Callable[..., Dataset]
"""``factory(config: ConfigDict, *, process_index: int, process_count: int, **fields) -> Dataset``."""

SHARED_FIELDS = ("name", "batch_size", "eval_batch_size", "validation_fraction", "validation_seed")
"""The fields of ``config.data`` that every dataset's section has (``configs/base.py``): the trainer's, not
the dataset's own."""
_PROCESS_ARGUMENTS = ("process_index", "process_count")


def dataset_fields(factory: DatasetFactory) -> Optional[dict[str, Any]]:
    """``{field: default}`` of a dataset factory's keyword-only parameters besides the process arguments: its
    config fields. ``None`` (not known: it reads its section) for a :func:`~softnce.registry.lazy` entry, which
    is not imported to find out, and for a factory that takes none or takes ``**kwargs``."""
    if hasattr(factory, "resolve"):
        return None
    fields = keyword_fields(factory, positional=1, keyword_only=True)
    fields = {k: v for k, v in (fields or {}).items() if k not in _PROCESS_ARGUMENTS}
    return fields or None


DATASETS: Registry[DatasetFactory] = Registry("dataset", fields_of=dataset_fields)
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
    """Builds the dataset named ``config.name`` (``config`` is ``config.data``), passing the fields it takes
    (:func:`dataset_fields`) that ``config`` sets; an unknown name lists the valid ones."""
    factory = DATASETS.get(config.name)
    fields = {k: config[k] for k in DATASETS.fields(config.name) or () if k in config}
    return factory(config, process_index=process_index, process_count=process_count, **fields)
