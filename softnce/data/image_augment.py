"""Image augmentation ops in TensorFlow with timm's semantics, driven by stateless seeds.

Every random op takes a ``seed``: an int32/int64 tensor of shape ``[2]`` for
``tf.random.stateless_*``, so a pipeline is a pure function of its seeds. Images are
``uint8 [H, W, 3]`` until normalisation and ``float32 [H, W, 3]`` after it.

The ops reproduce timm's training transform (``timm.data.create_transform`` with
``auto_augment='rand-m9-mstd0.5-inc1'``, ``interpolation='bicubic'``, ``re_mode='pixel'``):

* :func:`sample_crop_box` / :func:`decode_and_random_resized_crop` -- timm's
  ``RandomResizedCropAndInterpolation``: area fraction ``s ~ U(0.08, 1)``, log aspect ratio
  ``~ U(log 3/4, log 4/3)``, ``w = round(sqrt(s A r))``, ``h = round(sqrt(s A / r))``; the first of
  10 attempts that fits is taken at a uniform position, else the central crop clamped to the ratio
  range.
* :func:`rand_augment` -- timm's ``RandAugment``: ``n`` ops drawn uniformly with replacement, each
  applied with probability ``p = 0.5`` at magnitude ``clip(N(m, mstd^2), 0, 10)``; the ops and their
  level functions are PIL's (``ImageOps``, ``ImageEnhance``, bicubic ``Image.transform`` with the
  fill colour ``img_mean``), re-implemented here pixel for pixel.
* :func:`random_erasing` -- timm's ``RandomErasing(mode='pixel', max_count=1)`` on the normalised
  image: with probability ``p`` a box of area fraction ``U(0.02, 1/3)`` and log aspect
  ``U(log 0.3, log 1/0.3)`` (10 attempts, none taken if none fits) is filled with ``N(0, 1)`` noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Sequence

import tensorflow as tf

# timm's hparams['img_mean'] for the ImageNet mean: round(255 * (0.485, 0.456, 0.406)).
TIMM_FILL_COLOR = (124, 116, 104)
_LEVEL_DENOM = 10.0


# ----------------------------------------------------------------------------- random resized crop
def sample_crop_box(image_hw: tf.Tensor, seed: tf.Tensor, *, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> tf.Tensor:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` for an image of size ``image_hw``.

    Args:
      image_hw: int ``[2]``, the image height and width.
      seed: ``[2]`` stateless seed.
    Returns:
      int32 ``[4]`` box ``(top, left, height, width)`` inside the image.
    """
    height = tf.cast(image_hw[0], tf.float64)
    width = tf.cast(image_hw[1], tf.float64)
    area = height * width
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    target_area = area * tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1], tf.float64)
    log_ratio = tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1]),
                                            tf.float64)
    aspect = tf.exp(log_ratio)
    w = tf.round(tf.sqrt(target_area * aspect))  # tf.round is half-to-even, as Python's round.
    h = tf.round(tf.sqrt(target_area / aspect))
    fits = (w <= width) & (h <= height) & (w >= 1) & (h >= 1)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    w, h = w[first], h[first]
    top = tf.floor(tf.random.stateless_uniform([], top_seed, dtype=tf.float64) * (height - h + 1))
    left = tf.floor(tf.random.stateless_uniform([], left_seed, dtype=tf.float64) * (width - w + 1))
    random_box = tf.cast(tf.stack([top, left, h, w]), tf.int32)
    return tf.cond(tf.reduce_any(fits), lambda: random_box,
                   lambda: _central_crop_box(height, width, ratio))


def _central_crop_box(height: tf.Tensor, width: tf.Tensor, ratio: Sequence[float]) -> tf.Tensor:
    """timm's fallback: the whole image, clamped to the aspect-ratio range, centred."""
    in_ratio = width / height
    w = tf.where(in_ratio < min(ratio), width,
                 tf.where(in_ratio > max(ratio), tf.round(height * max(ratio)), width))
    h = tf.where(in_ratio < min(ratio), tf.round(width / min(ratio)), height)
    top = tf.math.floordiv(height - h, 2.0)
    left = tf.math.floordiv(width - w, 2.0)
    return tf.cast(tf.stack([top, left, h, w]), tf.int32)


def decode_image_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decodes a JPEG/PNG string to uint8 ``[H, W, 3]``."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_and_random_resized_crop(image_bytes: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Random resized crop of an encoded image to uint8 ``[size, size, 3]`` (bicubic).

    JPEGs are cropped while decoding (``tf.io.decode_and_crop_jpeg``, same pixels as decoding first).
    """
    def jpeg():
        box = sample_crop_box(tf.image.extract_jpeg_shape(image_bytes)[:2], seed)
        return tf.io.decode_and_crop_jpeg(image_bytes, box, channels=3)

    def other():
        image = decode_image_rgb(image_bytes)
        box = sample_crop_box(tf.shape(image)[:2], seed)
        return image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

    crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    crop.set_shape([None, None, 3])
    return resize_bicubic(crop, (size, size))


def resize_bicubic(image: tf.Tensor, size_hw: Sequence[int] | tf.Tensor) -> tf.Tensor:
    """PIL-like bicubic resize (Keys a=-0.5, antialiased when shrinking) of uint8 ``[H, W, 3]``."""
    resized = tf.image.resize(tf.cast(image, tf.float32), size_hw, method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def resize_shorter_side(image: tf.Tensor, shorter: int) -> tf.Tensor:
    """torchvision ``Resize(shorter)``: shorter side to ``shorter``, longer ``int(shorter * long / short)``."""
    hw = tf.shape(image)[:2]
    short = tf.reduce_min(hw)
    long = tf.reduce_max(hw)
    new_long = tf.cast(shorter * tf.cast(long, tf.float64) / tf.cast(short, tf.float64), tf.int32)
    new_hw = tf.where(hw[0] <= hw[1], tf.stack([shorter, new_long]), tf.stack([new_long, shorter]))
    return resize_bicubic(image, new_hw)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision ``CenterCrop(size)`` (offsets ``round((H - size) / 2)``) of an image at least ``size``."""
    hw = tf.cast(tf.shape(image)[:2], tf.float64)
    top = tf.cast(tf.round((hw[0] - size) / 2.0), tf.int32)
    left = tf.cast(tf.round((hw[1] - size) / 2.0), tf.int32)
    crop = image[top:top + size, left:left + size]
    crop.set_shape([size, size, image.shape[-1]])
    return crop


def random_flip_left_right(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
    """Mirrors ``image`` horizontally with probability ``prob``."""
    image = tf.convert_to_tensor(image)
    flip = tf.random.stateless_uniform([], seed) < prob
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """``(image / 255 - mean) / std`` as float32 (``ToTensor`` + ``Normalize``)."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# ----------------------------------------------------------------------------- random erasing
def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, prob: float = 0.25, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3, attempts: int = 10) -> tf.Tensor:
    """timm ``RandomErasing(probability=prob, mode='pixel', max_count=1)`` of float ``[H, W, C]``.

    With probability ``prob``: target area ``U(min_area, max_area) * H * W``, aspect ``r`` with
    ``log r ~ U(log min_aspect, -log min_aspect)``, ``h = round(sqrt(area r))``,
    ``w = round(sqrt(area / r))``; the first attempt with ``h < H`` and ``w < W`` is filled at a
    uniform position with per-pixel ``N(0, 1)`` noise; if no attempt fits nothing is erased.
    """
    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float64)
    width = tf.cast(shape[1], tf.float64)
    gate_seed, area_seed, aspect_seed, pos_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5))
    target_area = height * width * tf.random.stateless_uniform([attempts], area_seed, min_area, max_area,
                                                               tf.float64)
    log_aspect = tf.random.stateless_uniform([attempts], aspect_seed, math.log(min_aspect),
                                             -math.log(min_aspect), tf.float64)
    h = tf.round(tf.sqrt(target_area * tf.exp(log_aspect)))
    w = tf.round(tf.sqrt(target_area / tf.exp(log_aspect)))
    fits = (w < width) & (h < height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = h[first], w[first]
    u_top, u_left = tf.unstack(tf.random.stateless_uniform([2], pos_seed, dtype=tf.float64))
    top = tf.floor(u_top * (height - h + 1))
    left = tf.floor(u_left * (width - w + 1))
    rows = tf.cast(tf.range(shape[0]), tf.float64)[:, None]
    cols = tf.cast(tf.range(shape[1]), tf.float64)[None, :]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = (tf.random.stateless_uniform([], gate_seed) < prob) & tf.reduce_any(fits)
    noise = tf.random.stateless_normal(shape, noise_seed, dtype=image.dtype)
    return tf.where(erase & inside[:, :, None], noise, image)


# ----------------------------------------------------------------------------- PIL ops on uint8
def _to_uint8_trunc(values: tf.Tensor) -> tf.Tensor:
    """C ``(UINT8)`` cast after clipping to [0, 255] (truncation)."""
    return tf.cast(tf.floor(tf.clip_by_value(values, 0.0, 255.0)), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``Image.blend(degenerate, image, factor)``: ``trunc(d + f (x - d))`` in float32, clipped."""
    d = tf.cast(degenerate, tf.float32)
    return _to_uint8_trunc(d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """PIL ``convert('L')``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` as int32 ``[H, W]``."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return tf.bitwise.right_shift(weighted, 16)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.autocontrast``: per channel ``int(x * 255 / (hi - lo) - lo * 255 / (hi - lo))``."""
    x = tf.cast(image, tf.float64)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = tf.clip_by_value(tf.floor(x * scale + (-lo * scale)), 0.0, 255.0)
    return tf.cast(tf.where(hi > lo, stretched, x), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.equalize`` of one uint8 channel ``[H, W]``."""
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(values, minlength=256, maxlength=256, dtype=tf.int32)
    nonzero = tf.where(hist > 0)[:, 0]
    last_count = tf.gather(hist, nonzero[-1])
    step = (tf.reduce_sum(hist) - last_count) // 255
    lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    identity = (tf.size(nonzero) <= 1) | (step == 0)
    return tf.cast(tf.where(identity, values, tf.gather(lut, values)), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.equalize`` (per channel histogram equalisation)."""
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.invert``: ``255 - x``."""
    return 255 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.posterize``: keep the ``bits`` high bits (0..8; 8 and above is the identity)."""
    bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
    mask = 256 - tf.bitwise.left_shift(1, 8 - bits)
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageOps.solarize``: ``x if x < threshold else 255 - x``."""
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: int = 128) -> tf.Tensor:
    """timm ``solarize_add``: ``min(255, x + add) if x < threshold else x``."""
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < threshold, tf.minimum(255, x + tf.cast(add, tf.int32)), x), tf.uint8)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageEnhance.Color``: blend with the grey-scale image."""
    return _blend(tf.repeat(_grayscale(image)[..., None], 3, axis=-1), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the constant ``int(mean(grey) + 0.5)``."""
    mean = tf.floor(tf.reduce_mean(tf.cast(_grayscale(image), tf.float64)) + 0.5)
    return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return _blend(tf.zeros_like(image), image, factor)


def _smooth(image: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageFilter.SMOOTH`` (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13); the border is kept."""
    x = tf.cast(image, tf.float32)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    inner = tf.nn.depthwise_conv2d(x[None], kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    inner = tf.cast(tf.clip_by_value(tf.round(inner), 0.0, 255.0), tf.uint8)
    padded = tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.zeros_like(inner, tf.bool), [[1, 1], [1, 1], [0, 0]], constant_values=True)
    return tf.where(border, image, padded)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the ``SMOOTH``-filtered image."""
    return _blend(_smooth(image), image, factor)


def affine_transform(image: tf.Tensor, matrix: tf.Tensor, fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """PIL ``Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill)`` of uint8 ``[H, W, 3]``.

    Output pixel ``(x, y)`` samples the input at ``(a u + b v + c, d u + e v + f)`` with
    ``u = x + 0.5, v = y + 0.5`` (PIL's pixel-centre convention). Samples outside ``[0, W) x [0, H)``
    take ``fill``; inside, PIL's bicubic (``a = -1``, edge pixels replicated) is evaluated in float64
    and truncated to uint8.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float64))
    v, u = tf.meshgrid(tf.range(tf.cast(height, tf.float64)) + 0.5,
                       tf.range(tf.cast(width, tf.float64)) + 0.5, indexing="ij")
    x_in = a * u + b * v + c
    y_in = d * u + e * v + f
    outside = ((x_in < 0) | (x_in >= tf.cast(width, tf.float64))
               | (y_in < 0) | (y_in >= tf.cast(height, tf.float64)))
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = tf.floor(x_in), tf.floor(y_in)
    dx, dy = x_in - x0, y_in - y0
    offsets = tf.constant([-1, 0, 1, 2], tf.int32)
    cols = tf.clip_by_value(tf.cast(x0, tf.int32)[..., None] + offsets, 0, width - 1)  # [H, W, 4]
    rows = tf.clip_by_value(tf.cast(y0, tf.int32)[..., None] + offsets, 0, height - 1)
    index = tf.stack([tf.broadcast_to(rows[..., :, None], tf.concat([shape[:2], [4, 4]], 0)),
                      tf.broadcast_to(cols[..., None, :], tf.concat([shape[:2], [4, 4]], 0))], axis=-1)
    neighbours = tf.gather_nd(tf.cast(image, tf.float64), index)  # [H, W, 4 rows, 4 cols, 3]
    across = _pil_cubic(tf.unstack(neighbours, axis=3), dx[..., None, None])  # [H, W, 4, 3]
    value = _pil_cubic(tf.unstack(across, axis=2), dy[..., None])  # [H, W, 3]
    value = tf.cast(tf.floor(tf.clip_by_value(value, 0.0, 255.0)), tf.uint8)
    fill_image = tf.broadcast_to(tf.constant(fill, tf.uint8), shape)
    return tf.where(outside[..., None], fill_image, value)


def _pil_cubic(values: list[tf.Tensor], t: tf.Tensor) -> tf.Tensor:
    """PIL Geometry.c ``BICUBIC`` (a = -1) through the four samples at offsets -1, 0, 1, 2."""
    v1, v2, v3, v4 = values
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + t * (p2 + t * (p3 + t * p4))


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """PIL ``Image.rotate(degrees, BICUBIC, fillcolor=fill)``: counter-clockwise about the centre."""
    shape = tf.cast(tf.shape(image), tf.float64)
    cx, cy = shape[1] / 2.0, shape[0] / 2.0
    angle = -tf.cast(degrees, tf.float64) * math.pi / 180.0
    a, b = tf.cos(angle), tf.sin(angle)
    d, e = -tf.sin(angle), tf.cos(angle)
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return affine_transform(image, tf.stack([a, b, c, d, e, f]), fill)


def shear_x(image: tf.Tensor, factor: tf.Tensor, fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """timm ``shear_x``: affine ``(1, factor, 0, 0, 1, 0)``."""
    f = tf.cast(factor, tf.float64)
    return affine_transform(image, tf.stack([1.0, f, 0.0, 0.0, 1.0, 0.0]), fill)


def shear_y(image: tf.Tensor, factor: tf.Tensor, fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """timm ``shear_y``: affine ``(1, 0, 0, factor, 1, 0)``."""
    f = tf.cast(factor, tf.float64)
    return affine_transform(image, tf.stack([1.0, 0.0, 0.0, f, 1.0, 0.0]), fill)


def translate_x_rel(image: tf.Tensor, pct: tf.Tensor, fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """timm ``translate_x_rel``: affine ``(1, 0, pct * W, 0, 1, 0)`` (content moves left for pct > 0)."""
    pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(image)[1], tf.float64)
    return affine_transform(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]), fill)


def translate_y_rel(image: tf.Tensor, pct: tf.Tensor, fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """timm ``translate_y_rel``: affine ``(1, 0, 0, 0, 1, pct * H)``."""
    pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(image)[0], tf.float64)
    return affine_transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]), fill)


# ----------------------------------------------------------------------------- RandAugment
def _negate(value: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.where(negate, -value, value)


def _trunc(value: tf.Tensor) -> tf.Tensor:
    """Python ``int()`` of a non-negative float."""
    return tf.floor(value)


# name -> (op(image, arg, fill), level(magnitude, negate) -> arg); timm auto_augment.py LEVEL_TO_ARG.
_OpFn = Callable[[tf.Tensor, tf.Tensor, Sequence[int]], tf.Tensor]
_LevelFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
_ENHANCE_INCREASING: _LevelFn = lambda m, neg: 1.0 + _negate(m / _LEVEL_DENOM * 0.9, neg)  # noqa: E731
_ENHANCE: _LevelFn = lambda m, neg: m / _LEVEL_DENOM * 1.8 + 0.1  # noqa: E731
_NO_ARG: _LevelFn = lambda m, neg: tf.constant(0.0, tf.float32)  # noqa: E731
RAND_AUGMENT_OPS: dict[str, tuple[_OpFn, _LevelFn]] = {
    "AutoContrast": (lambda x, _, fill: auto_contrast(x), _NO_ARG),
    "Equalize": (lambda x, _, fill: equalize(x), _NO_ARG),
    "Invert": (lambda x, _, fill: invert(x), _NO_ARG),
    "Rotate": (rotate, lambda m, neg: _negate(m / _LEVEL_DENOM * 30.0, neg)),
    "Posterize": (lambda x, a, fill: posterize(x, a), lambda m, neg: _trunc(m / _LEVEL_DENOM * 4)),
    "PosterizeIncreasing": (lambda x, a, fill: posterize(x, a),
                            lambda m, neg: 4 - _trunc(m / _LEVEL_DENOM * 4)),
    "Solarize": (lambda x, a, fill: solarize(x, a),
                 lambda m, neg: tf.minimum(256.0, _trunc(m / _LEVEL_DENOM * 256))),
    "SolarizeIncreasing": (lambda x, a, fill: solarize(x, a),
                           lambda m, neg: 256 - tf.minimum(256.0, _trunc(m / _LEVEL_DENOM * 256))),
    "SolarizeAdd": (lambda x, a, fill: solarize_add(x, a),
                    lambda m, neg: tf.minimum(128.0, _trunc(m / _LEVEL_DENOM * 110))),
    "Color": (lambda x, a, fill: color(x, a), _ENHANCE),
    "ColorIncreasing": (lambda x, a, fill: color(x, a), _ENHANCE_INCREASING),
    "Contrast": (lambda x, a, fill: contrast(x, a), _ENHANCE),
    "ContrastIncreasing": (lambda x, a, fill: contrast(x, a), _ENHANCE_INCREASING),
    "Brightness": (lambda x, a, fill: brightness(x, a), _ENHANCE),
    "BrightnessIncreasing": (lambda x, a, fill: brightness(x, a), _ENHANCE_INCREASING),
    "Sharpness": (lambda x, a, fill: sharpness(x, a), _ENHANCE),
    "SharpnessIncreasing": (lambda x, a, fill: sharpness(x, a), _ENHANCE_INCREASING),
    "ShearX": (shear_x, lambda m, neg: _negate(m / _LEVEL_DENOM * 0.3, neg)),
    "ShearY": (shear_y, lambda m, neg: _negate(m / _LEVEL_DENOM * 0.3, neg)),
    "TranslateXRel": (translate_x_rel, lambda m, neg: _negate(m / _LEVEL_DENOM * 0.45, neg)),
    "TranslateYRel": (translate_y_rel, lambda m, neg: _negate(m / _LEVEL_DENOM * 0.45, neg)),
}
# timm auto_augment.py _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ('inc1').
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                              "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """timm RandAugment settings: ``num_layers`` ops per image, each applied with ``prob``."""

    magnitude: float = 10.0
    num_layers: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = _LEVEL_DENOM
    prob: float = 0.5
    transforms: tuple[str, ...] = RAND_TRANSFORMS


def parse_rand_augment(spec: str) -> RandAugmentConfig:
    """Parses a timm RandAugment string such as ``'rand-m9-mstd0.5-inc1'``.

    Sections: ``m`` magnitude (0..10), ``n`` ops per image, ``mstd`` gaussian std of the magnitude
    (``inf`` = uniform in [0, m]), ``mmax`` magnitude clip, ``p`` probability of each op, ``inc1`` the
    increasing-severity op set.
    """
    sections = spec.split("-")
    if sections[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand' (e.g. 'rand-m9-mstd0.5-inc1').")
    fields = {}
    for section in sections[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*|inf)", section)
        if match is None or match.group(1) not in ("m", "n", "mstd", "mmax", "p", "inc"):
            raise ValueError(f"Unknown RandAugment section {section!r} in {spec!r}; "
                             "known: m<float>, n<int>, mstd<float>, mmax<float>, p<float>, inc<0|1>.")
        fields[match.group(1)] = match.group(2)
    return RandAugmentConfig(
        magnitude=float(fields.get("m", 10)),
        num_layers=int(fields.get("n", 2)),
        magnitude_std=float(fields.get("mstd", 0)),
        magnitude_max=float(fields.get("mmax", _LEVEL_DENOM)),
        prob=float(fields.get("p", 0.5)),
        transforms=RAND_INCREASING_TRANSFORMS if int(fields.get("inc", 0)) else RAND_TRANSFORMS,
    )


def apply_op(name: str, image: tf.Tensor, magnitude: tf.Tensor, negate: tf.Tensor,
             fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """Applies the RandAugment op ``name`` at ``magnitude`` (0..10); ``negate`` flips signed levels."""
    op, level = RAND_AUGMENT_OPS[name]
    return op(image, level(tf.cast(magnitude, tf.float32), negate), fill)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, config: RandAugmentConfig,
                 fill: Sequence[int] = TIMM_FILL_COLOR) -> tf.Tensor:
    """timm ``RandAugment.__call__`` on uint8 ``[H, W, 3]``.

    For each of ``num_layers`` layers: an op uniform over ``config.transforms`` (with replacement);
    with probability ``prob`` it runs at magnitude ``clip(m + mstd * N(0, 1), 0, mmax)`` (or
    ``U(0, m)`` for ``mstd = inf``), signed levels negated with probability 1/2.
    """
    image = tf.convert_to_tensor(image)
    layer = _rand_augment_layer(tuple(config.transforms), tuple(int(c) for c in fill))
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, config.num_layers)):
        op_seed, gate_seed, mag_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 4))
        index = tf.random.stateless_uniform([], op_seed, 0, len(config.transforms), tf.int32)
        if math.isinf(config.magnitude_std):
            magnitude = tf.random.stateless_uniform([], mag_seed, 0.0, config.magnitude)
        else:
            magnitude = config.magnitude + config.magnitude_std * tf.random.stateless_normal([], mag_seed)
        magnitude = tf.clip_by_value(magnitude, 0.0, config.magnitude_max)
        negate = tf.random.stateless_uniform([], sign_seed) > 0.5
        apply = tf.random.stateless_uniform([], gate_seed) <= config.prob
        image = layer(image, index, magnitude, negate, apply)
    return image


@functools.lru_cache(maxsize=None)
def _rand_augment_layer(transforms: tuple[str, ...], fill: tuple[int, ...]) -> Callable[..., tf.Tensor]:
    """One RandAugment layer as a tf.function, traced once per process (tracing all ops is slow)."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32),
                                  tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.bool),
                                  tf.TensorSpec([], tf.bool)])
    def layer(image, index, magnitude, negate, apply):
        branches = [functools.partial(apply_op, name, image, magnitude, negate, fill) for name in transforms]
        out = tf.cond(apply, lambda: tf.switch_case(index, branches), lambda: image)
        out.set_shape([None, None, 3])
        return out

    return layer
