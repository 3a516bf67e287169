"""Optimiser and learning-rate schedule of the reference recipe, built from optax.

* ``lr = base_lr * global_batch / 256`` (the MAE/BEiT scaling rule);
* linear warm-up per step from 0, then half-cosine down to ``min_lr``;
* AdamW with no weight decay on biases, norms, position embeddings and the class token (every
  parameter with fewer than 2 dimensions, plus names listed in ``no_decay_names``);
* optional gradient clipping by global norm;
* optional layer-wise learning-rate decay: the update of a parameter in layer ``l`` of a model of
  ``L`` layers is scaled by ``layer_decay ** (L + 1 - l)`` (layer ids from the model's
  :class:`LayerStructure`; the head is layer ``L + 1`` and keeps the full rate).

A model tells its layers by a ``layer_structure() -> LayerStructure`` method (the ViTs have one,
:class:`HasLayerStructure`); :func:`layer_structure` reads it, and a model without it gets no
layer-wise decay.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections
import optax

NO_DECAY_NAMES = ("pos_embedding", "cls")


def learning_rate_schedule(config: ml_collections.ConfigDict, global_batch: int, total_steps: int) -> optax.Schedule:
    """Warm-up then cosine schedule with the peak ``base_lr * global_batch / 256``."""
    peak = config.base_lr * global_batch / 256
    warmup = min(int(config.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.min_lr,
    )


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params) -> object:
    """True where weight decay applies: parameters of rank >= 2 not named in ``NO_DECAY_NAMES``."""

    def decays(path, x):
        names = _path_names(path)
        return x.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by the matching constant of the pytree ``scales``."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)


LayerIdFn = Callable[[Sequence[str], int], int]
"""``layer_id(path, depth) -> l``: ``0`` for the embeddings, ``1..depth`` the blocks, ``depth + 1`` the head."""


class LayerStructure(NamedTuple):
    """A model's layers for layer-wise lr decay: ``depth`` blocks and the layer of each parameter."""

    layer_id: LayerIdFn
    depth: int


@runtime_checkable
class HasLayerStructure(Protocol):
    """A model that supports layer-wise lr decay."""

    def layer_structure(self) -> LayerStructure: ...


def layer_structure(model: Any) -> Optional[LayerStructure]:
    """``model.layer_structure()`` if the model has the method (:class:`HasLayerStructure`), else ``None``."""
    return model.layer_structure() if isinstance(model, HasLayerStructure) else None


def layer_decay_scales(params, layer_decay: float, depth: int, layer_id: LayerIdFn) -> object:
    """``layer_decay ** (depth + 1 - layer_id(path, depth))`` for every parameter."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: layer_decay ** (depth + 1 - layer_id(_path_names(path), depth)), params
    )


def make_optimizer(
    config: ml_collections.ConfigDict,
    params,
    *,
    global_batch: int,
    total_steps: int,
    layers: Optional[LayerStructure] = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax optimiser of ``config`` (``config.optim``) for ``params``.

    Fields: ``base_lr``, ``min_lr``, ``warmup_steps``, ``b1``, ``b2``, ``weight_decay``,
    ``grad_clip_norm`` (None/0: off), ``layer_decay`` (None/1: off; needs ``layers``, the model's
    :func:`layer_structure`).
    """
    schedule = learning_rate_schedule(config, global_batch, total_steps)
    parts = []
    if config.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask(params),
        )
    )
    layer_decay = config.get("layer_decay")
    if layer_decay and layer_decay != 1.0:
        if layers is None:
            raise ValueError(
                "config.optim.layer_decay is set but the model has no layer structure (no layer_structure() "
                "method, softnce.optim.HasLayerStructure); use a ViT model or set config.optim.layer_decay = None."
            )
        parts.append(scale_by_tree(layer_decay_scales(params, layer_decay, layers.depth, layers.layer_id)))
    return optax.chain(*parts), schedule
