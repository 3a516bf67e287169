"""Optimiser and learning-rate schedule of the reference recipe, built from optax.

* ``lr = base_lr * global_batch / 256`` (the MAE/BEiT scaling rule);
* linear warm-up per step from 0, then half-cosine down to ``min_lr``;
* AdamW with no weight decay on biases, norms, position embeddings and the class token (every
  parameter with fewer than 2 dimensions, plus names listed in ``no_decay_names``);
* optional gradient clipping by global norm;
* optional layer-wise learning-rate decay: the update of a parameter in layer ``l`` of a model of
  ``L`` layers is scaled by ``layer_decay ** (L + 1 - l)`` (layer ids from the model's
  ``layer_id(path, depth)``; the head is layer ``L + 1`` and keeps the full rate).
"""

from __future__ import annotations

from typing import Callable, Optional

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


def layer_decay_scales(params, layer_decay: float, depth: int, layer_id: Callable) -> object:
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
    layer_id: Optional[Callable] = None,
    depth: Optional[int] = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax optimiser of ``config`` (``config.optim``) for ``params``.

    Fields: ``base_lr``, ``min_lr``, ``warmup_steps``, ``b1``, ``b2``, ``weight_decay``,
    ``grad_clip_norm`` (None/0: off), ``layer_decay`` (None/1: off; needs the model's ``layer_id``).
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
        if layer_id is None or depth is None:
            raise ValueError(
                "config.optim.layer_decay is set but the model has no layer structure; "
                "use a ViT model or set config.optim.layer_decay = None."
            )
        parts.append(scale_by_tree(layer_decay_scales(params, layer_decay, depth, layer_id)))
    return optax.chain(*parts), schedule
