"""Model registry: ``config.model.name`` -> a Flax module built from the other ``config.model`` fields.

Every model maps ``inputs [B, ...] -> logits [B, num_classes]`` and takes ``train: bool``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections


def _mlp(num_classes: int, **kwargs) -> nn.Module:
    from softnce.models.mlp import MLP

    return MLP(num_classes=num_classes, **kwargs)


def _small_cnn(num_classes: int, **kwargs) -> nn.Module:
    from softnce.models.cnn import SmallCNN

    return SmallCNN(num_classes=num_classes, **kwargs)


def _vit(variant: str):
    def build(num_classes: int, **kwargs) -> nn.Module:
        from softnce.models import vit

        return getattr(vit, variant)(num_classes, **kwargs)

    return build


MODELS = {"mlp": _mlp, "small_cnn": _small_cnn, "vit_b16": _vit("vit_b16"), "vit_tiny": _vit("vit_tiny")}


def get_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Builds ``config.name`` with the remaining fields of ``config`` as keyword arguments.

    A ``dtype`` given as a string (``'bfloat16'``) is turned into a dtype.
    """
    kwargs = dict(config)
    name = kwargs.pop("name")
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}.")
    return MODELS[name](num_classes, **kwargs)
