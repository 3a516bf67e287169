"""Standard input augmentation of small in-memory images, in JAX inside the train step: random crop, flip.

:class:`CropFlip` is a dataset's ``device_train_transform`` (:class:`softnce.data.base.Dataset`):
``f(keys [N], images float32 [N, H, W, C]) -> float32 [N, H, W, C]`` with one PRNG key per example,
so an example's draw does not depend on how the batch is split over devices. Per image: pad by
``padding`` pixels of ``fill`` on every side and take a uniformly placed ``H x W`` crop (torchvision's
``RandomCrop(H, padding)``), then mirror horizontally with probability 1/2 (``RandomHorizontalFlip``).
The images are already normalised, so ``fill`` is the normalised value of a black pixel.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from softnce.data.device_augment import random_flip


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """Random ``H x W`` crop of the image padded by ``padding`` (0: no crop), then a random horizontal flip."""

    padding: int = 4
    flip: bool = True
    fill: float = 0.0

    def one(self, key: jax.Array, image: jax.Array) -> jax.Array:
        """The transform of one ``[H, W, C]`` image."""
        crop_key, flip_key = jax.random.split(key)
        if self.padding:
            p = self.padding
            padded = jnp.pad(image, ((p, p), (p, p), (0, 0)), constant_values=jnp.asarray(self.fill, image.dtype))
            top, left = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
            image = jax.lax.dynamic_slice(padded, (top, left, 0), image.shape)
        return random_flip(flip_key, image) if self.flip else image

    def __call__(self, keys: jax.Array, images: jax.Array) -> jax.Array:
        return jax.vmap(self.one)(keys, images)


def from_config(config: ml_collections.ConfigDict, *, fill: float) -> Optional[CropFlip]:
    """The transform of ``config.data.random_crop_padding`` / ``random_flip`` (``None`` when both are off)."""
    padding, flip = int(config.get("random_crop_padding", 0) or 0), bool(config.get("random_flip", False))
    return CropFlip(padding=padding, flip=flip, fill=fill) if padding or flip else None
