"""Helpers for ``configs/*.py``: the ``name.py:key=value,key=value`` variant syntax."""

from __future__ import annotations

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


def augment_config(soft: bool) -> ml_collections.ConfigDict:
    """``config.augment``: the reference's soft-target recipe, or no smoothing and no mixing.

    ``soft=True``: label smoothing 0.1, MixUp alpha 0.8, CutMix alpha 1.0, mix probability 0.8,
    switch probability 0.5, one lambda per batch (timm's ``Mixup`` as MAE fine-tuning uses it), with
    structured targets for STI. ``soft=False``: targets are ``one_hot(labels)`` (the hard-target runs).
    """
    return ml_collections.ConfigDict(dict(
        label_smoothing=0.1 if soft else 0.0,
        mixup_alpha=0.8 if soft else 0.0,
        cutmix_alpha=1.0 if soft else 0.0,
        mix_prob=0.8,
        switch_prob=0.5,
        mode="batch",
        structured=True,
    ))


def init_config() -> ml_collections.ConfigDict:
    """``config.init``: start from an earlier run's checkpoint or from converted MAE weights (both off)."""
    return ml_collections.ConfigDict(dict(checkpoint=none(str), pretrained=none(str)))
