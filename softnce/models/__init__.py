"""Model registry: ``config.model.name`` -> a Flax module built from the other ``config.model`` fields.

Every model maps ``inputs [B, ...] -> logits [B, num_classes]`` and takes ``train: bool``. A model is
registered as a factory ``factory(num_classes, **fields) -> nn.Module``; a user's module adds one
with ``register_model(name, factory, *, overwrite=False)`` or ``@register_model(name)``
(:meth:`softnce.registry.Registry.register` of :data:`MODELS`) and is imported with
``python -m softnce.main --import_modules=...``. A model
that supports layer-wise learning-rate decay says so with a ``layer_structure()`` method
(:class:`softnce.optim.LayerStructure`).
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from softnce.registry import Registry, lazy

ModelFactory = Callable[..., nn.Module]
"""``factory(num_classes: int, **config_fields) -> nn.Module``."""

MODELS: Registry[ModelFactory] = Registry("model")
register_model = MODELS.register

register_model("mlp", lazy("softnce.models.mlp:MLP"))
register_model("small_cnn", lazy("softnce.models.cnn:SmallCNN"))
register_model("vit_b16", lazy("softnce.models.vit:vit_b16"))
register_model("vit_tiny", lazy("softnce.models.vit:vit_tiny"))


def get_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Builds ``config.name`` with the remaining fields of ``config`` as keyword arguments.

    A ``dtype`` given as a string (``'bfloat16'``) is turned into a dtype; an unknown name lists the
    valid ones.
    """
    kwargs = dict(config)
    factory = MODELS.get(kwargs.pop("name"))
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return factory(num_classes, **kwargs)
