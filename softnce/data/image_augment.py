"""The host half of timm's image transforms: decode, crop and resize with Pillow, to uint8.

The host does only what needs the encoded image: decoding and resampling to the fixed size ``S``.
Everything per-pixel after that (flip, RandAugment, normalisation, random erasing) runs on the
accelerator, :mod:`softnce.data.device_augment`, so the host ships uint8 ``[S, S, 3]`` (4x fewer
bytes than float32).

Decoding and resizing are Pillow's, as in timm (``torchvision`` calls the same Pillow functions), so
a training crop box gives exactly the pixels timm would give:

* :func:`sample_crop_box` -- timm's ``RandomResizedCropAndInterpolation.get_params``: area fraction
  ``s ~ U(0.08, 1)``, log aspect ratio ``~ U(log 3/4, log 4/3)``, ``w = round(sqrt(s A r))``,
  ``h = round(sqrt(s A / r))``; the first of 10 attempts with ``1 <= w <= W`` and ``1 <= h <= H`` is
  placed at ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``, else the central crop clamped to the ratio
  range (the ``>= 1`` bound, absent in timm, only matters for images of a few pixels).
* :func:`random_resized_crop` -- that box cropped, then resized to ``S x S`` with Pillow's
  antialiased bicubic (``resize(..., box=...)`` would be faster but reads pixels outside the box).
* :func:`resize_and_center_crop` -- torchvision ``Resize(floor(S / 0.875))`` (shorter side, longer
  ``int(short' * long / short)``) then ``CenterCrop(S)`` (offsets ``round((H' - S) / 2)``), resampling
  only the kept pixels (within 2 grey levels of resize-then-crop, on under 1% of pixels).

The randomness is stateless: :func:`random_resized_crop` takes a 2-word seed (the run's
crop key and the example's position in the global stream, :mod:`softnce.data.images`) and draws from
``numpy.random.Philox(key=seed)``, so a pipeline is a pure function of its seeds.

Pillow releases the GIL while it decodes and resamples, so these functions run in parallel in
Grain's reader threads.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

EVAL_CROP_FRACTION = 0.875


def decode_rgb(image_bytes: bytes) -> Image.Image:
    """Decodes a JPEG/PNG/... to an RGB ``PIL.Image`` (loaded)."""
    image = Image.open(io.BytesIO(image_bytes))
    if image.mode != "RGB":
        return image.convert("RGB")
    image.load()
    return image


def seeded_rng(seed: Sequence[int] | np.ndarray) -> np.random.Generator:
    """A numpy Generator that is a pure function of a 2-word ``seed`` (``Philox(key=seed)``)."""
    key = np.asarray(seed).astype(np.int64).view(np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def sample_crop_box(height: int, width: int, rng: np.random.Generator, *, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """timm's ``RandomResizedCropAndInterpolation.get_params``: ``(top, left, h, w)`` inside ``H x W``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))  # round() is half-to-even, as in timm.
        h = int(round(math.sqrt(target_area / aspect)))
        if 1 <= w <= width and 1 <= h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image_bytes: bytes, seed: Sequence[int] | np.ndarray, size: int) -> np.ndarray:
    """Encoded image -> uint8 ``[size, size, 3]``: timm's random resized crop (bicubic)."""
    image = decode_rgb(image_bytes)
    top, left, h, w = sample_crop_box(image.height, image.width, seeded_rng(seed))
    crop = image.crop((left, top, left + w, top + h))
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def resize_and_center_crop(image_bytes: bytes, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
    """Encoded image -> uint8 ``[size, size, 3]``: timm's evaluation resize and centre crop.

    torchvision ``Resize(floor(size / crop_fraction))`` (shorter side ``s'``, longer
    ``int(s' * long / short)``, bicubic) then ``CenterCrop(size)`` (offsets ``round((H' - size) / 2)``),
    computed as one Pillow resize of the crop's preimage box (``resize(..., box=...)``), which
    resamples only the kept pixels: the filter taps are those of the full resize, and the result
    differs from resizing the whole image then cropping only by floating-point rounding of the tap
    positions (at most 2 grey levels, on under 1% of pixels; see the tests).
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    image = decode_rgb(image_bytes)
    shorter = int(math.floor(size / crop_fraction))
    width, height = image.size
    if width <= height:
        new_w, new_h = shorter, int(shorter * height / width)
    else:
        new_w, new_h = int(shorter * width / height), shorter
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=box))
