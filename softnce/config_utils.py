"""Helpers for ``configs/*.py``: the ``name.py:key=value,key=value`` variant syntax, typed ``None``
placeholders, and the image data defaults (shared with :mod:`softnce.data.images`).

The shared default config itself is ``configs/base.py``.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import ast
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses ``'a=1,b=foo'`` into ``{'a': 1, 'b': 'foo'}`` over ``defaults``.

    Values are read as Python literals where possible (``1``, ``0.5``, ``True``), else kept as
    strings; a key that is not in ``defaults`` is an error that lists the valid keys.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"config argument {item!r} must look like key=value (valid keys: {', '.join(defaults)}).")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid keys: {', '.join(defaults)}.")
        try:
            values[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            values[key] = raw.strip()
    return values


def none(field_type: type) -> ml_collections.FieldReference:
    """A ``None`` default that ``--config.<field>=value`` can still override (a typed placeholder)."""
    return ml_collections.FieldReference(None, field_type=field_type)


def image_data_config() -> ml_collections.ConfigDict:
    """The fields of ``config.data`` for the tfds image datasets, with the reference recipe's defaults.

    The one place of these defaults: ``configs/vit_finetune.py`` builds its ``config.data`` from
    them and :func:`softnce.data.images.default_image_config` fills missing fields with them (see
    :func:`softnce.data.images.make_image_dataset` for what each field means).
    """
    return ml_collections.ConfigDict(dict(
        data_dir=none(str),  # the tfds data directory (None: ~/tensorflow_datasets)
        image_size=224,
        train_split=none(str), eval_split=none(str),  # None: the dataset's own train / eval split names
        num_train_examples=none(int), num_eval_examples=none(int),  # read only the first n (None: all)
        randaugment="rand-m9-mstd0.5-inc1",  # timm's RandAugment spec; '' turns it off
        random_erasing_prob=0.25,
        cache_dir=none(str),  # where the training label counts are cached (None: the dataset's directory)
        host_threads=none(int),  # Grain threads decoding and cropping (None: one per core)
    ))
