"""Named variants of one Flax module class: ``resnet18``, ``vit_b16``... as model factories.

A variant fixes some of the class's attributes (the architecture) as defaults and leaves every
attribute a config field: ``factory(num_classes, **fields)``. Its signature lists the fields with their
defaults, so the model registry knows what ``config.model`` may hold (:func:`softnce.registry.keyword_fields`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, TypeVar

M = TypeVar("M")


def variant(module: type[M], name: str, doc: str, **architecture) -> Callable[..., M]:
    """``factory(num_classes, **fields) -> module(num_classes=num_classes, **{**architecture, **fields})``."""

    def factory(num_classes: int, **fields) -> M:
        return module(num_classes=num_classes, **{**architecture, **fields})

    parameters = [inspect.Parameter("num_classes", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    for field in dataclasses.fields(module):
        if field.init and field.name not in ("num_classes", "parent", "name"):
            default = architecture.get(field.name, field.default)
            parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    factory.__signature__ = inspect.Signature(parameters, return_annotation=module)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    return factory
