"""Model registry: ``config.model.name`` -> a Flax module built from the other ``config.model`` fields.

Every model maps ``inputs [B, ...] -> logits [B, num_classes]`` and takes ``train: bool``. A model is
registered as a factory ``factory(num_classes, **fields) -> nn.Module`` (a Linen module), or
``factory(num_classes, *, rngs, **fields) -> nnx.Module`` (a Flax NNX module, called as ``model(x)`` and
switched with ``.train()`` / ``.eval()``: :mod:`softnce.models.nnx_models`); a user's module adds one
with ``register_model(name, factory, *, ranges=None, overwrite=False)`` or ``@register_model(name)``
(:meth:`softnce.registry.Registry.register` of :data:`MODELS`) and is imported with
``python -m softnce.main --import_modules=...``. The factory's keyword arguments are the model's
config fields (``config.model.<field>``; a Linen module class: its attributes), ``ranges`` their valid
values (:mod:`softnce.config_checks`). A model
that supports layer-wise learning-rate decay says so with a ``layer_structure()`` method
(:class:`softnce.optim.LayerStructure`).
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

from typing import Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from softnce.config_checks import count, fraction_below_one
from softnce.registry import Registry, keyword_fields, lazy, parameters_of

ModelFactory = Callable[..., nn.Module]
"""``factory(num_classes: int, **config_fields) -> nn.Module``."""

def _model_fields(factory: ModelFactory) -> Optional[dict]:
    """The factory's keyword arguments but an NNX model's ``rngs`` (:mod:`softnce.models.nnx_models`)."""
    fields = keyword_fields(factory, positional=1)
    return None if fields is None else {k: v for k, v in fields.items() if k != "rngs"}


def is_nnx(factory: ModelFactory) -> bool:
    """Whether ``factory`` builds a Flax NNX model: it takes ``rngs`` (:mod:`softnce.models.nnx_models`)."""
    factory = factory.resolve() if hasattr(factory, "resolve") else factory
    return "rngs" in parameters_of(factory)


MODELS: Registry[ModelFactory] = Registry("model", fields_of=_model_fields)
register_model = MODELS.register

_DROPOUT = {"dropout_rate": fraction_below_one("dropout probability")}
_VIT = {"drop_path_rate": fraction_below_one("stochastic depth rate of the last block"),
        **{field: count(1, meaning) for field, meaning in (
            ("patch_size", "side of a square patch in pixels"), ("hidden_size", "width D of the tokens"),
            ("depth", "transformer blocks"), ("num_heads", "attention heads"),
            ("mlp_dim", "hidden units of the MLPs"))}}
register_model("mlp", lazy("softnce.models.mlp:MLP"), ranges={"hidden_sizes": count(1, "units per hidden layer"),
                                                              **_DROPOUT})
register_model("small_cnn", lazy("softnce.models.cnn:SmallCNN"), ranges={
    "channels": count(1, "channels of each convolutional stage"), "hidden": count(1, "width of the hidden dense layer"),
    "convs_per_stage": count(1, "3x3 convolutions per stage, the first strided"), **_DROPOUT})
_RESNET = {"stage_sizes": count(1, "blocks per stage"), "width": count(1, "channels of the first stage"),
           "momentum": fraction_below_one("BatchNorm's running-average momentum")}
register_model("resnet18", lazy("softnce.models.resnet:resnet18"), ranges=_RESNET)  # BatchNorm: batch_stats
register_model("resnet50", lazy("softnce.models.resnet:resnet50"), ranges=_RESNET)
register_model("vit_b16", lazy("softnce.models.vit:vit_b16"), ranges=_VIT)
register_model("vit_tiny", lazy("softnce.models.vit:vit_tiny"), ranges=_VIT)


def get_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Builds ``config.name`` with the remaining fields of ``config`` as keyword arguments.

    A ``dtype`` given as a string (``'bfloat16'``) is turned into a dtype; an unknown name lists the
    valid ones. An NNX model's factory (one that takes ``rngs``) comes wrapped in
    :class:`softnce.models.nnx_models.NNXModel`, which has the Linen model's ``init`` and ``apply``.
    """
    kwargs = dict(config)
    factory = MODELS.get(kwargs.pop("name"))
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    if is_nnx(factory):
        from softnce.models.nnx_models import NNXModel

        return NNXModel(factory, num_classes, kwargs)
    return factory(num_classes, **kwargs)
