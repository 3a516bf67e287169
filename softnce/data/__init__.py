"""Dataset registry: ``config.data.name`` -> a :class:`~softnce.data.base.Dataset` for this process."""

from __future__ import annotations

import importlib

import ml_collections

from softnce.data.base import Dataset

# name -> "module:factory"; factories take (config.data, *, process_index, process_count).
DATASETS = {
    "digits": "softnce.data.digits:make_digits_dataset",
    "fashion_mnist": "softnce.data.fashion_mnist:make_fashion_mnist_dataset",
    "toy": "softnce.data.toy:make_toy_dataset",
    "imagenet2012": "softnce.data.images:make_image_dataset",
    "cifar100": "softnce.data.images:make_image_dataset",
    "tiny_imagenet": "softnce.data.images:make_image_dataset",
}


def get_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Builds the dataset named ``config.name``; an unknown name lists the valid ones."""
    if config.name not in DATASETS:
        raise ValueError(f"unknown dataset {config.name!r}; valid datasets: {', '.join(sorted(DATASETS))}.")
    module, factory = DATASETS[config.name].split(":")
    return getattr(importlib.import_module(module), factory)(
        config, process_index=process_index, process_count=process_count
    )
