"""timm's per-image training augmentation in JAX, run on the accelerator inside the jitted train step.

The host only decodes and crops (:mod:`softnce.data.image_augment`) and ships uint8 images; this
module does the rest of timm's training transform (``timm.data.create_transform(is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25, re_mode='pixel')``) on a
batch ``uint8 [N, H, W, 3]`` with one PRNG key per example:

1. horizontal flip with probability 1/2;
2. :func:`rand_augment` -- timm's ``RandAugment``: ``n`` ops drawn uniformly with replacement from
   the op set, each applied with probability ``p`` at magnitude ``clip(N(m, mstd^2), 0, mmax)``
   (``U(0, m)`` for ``mstd = inf``), signed levels negated with probability 1/2; the ops and their
   level functions are PIL's (``ImageOps``, ``ImageEnhance``, bicubic ``Image.transform`` with the
   fill colour ``img_mean``);
3. normalisation ``(x / 255 - mean) / std`` to float32;
4. :func:`random_erasing` -- timm's ``RandomErasing(mode='pixel', max_count=1)``: with probability
   ``p`` a box of area fraction ``U(0.02, 1/3)`` and log aspect ``U(log 0.3, log 1/0.3)`` (the first
   of 10 attempts that fits, none if none fits) is filled with ``N(0, 1)`` noise.

Every op is written for one image; the batch is a ``jax.vmap``. Under ``vmap`` a ``lax.switch`` over
15 ops would evaluate all 15, so a RandAugment layer instead runs three stages whose non-chosen
forms are exact identities: one bicubic affine warp (the identity matrix unless the op is
geometric), one per-channel 256-entry lookup table (AutoContrast, Equalize, Invert, Posterize,
Solarize, SolarizeAdd; the identity table otherwise) and one blend ``d + f (x - d)`` with a
degenerate image ``d`` (Color, Contrast, Brightness, Sharpness; ``f = 1`` otherwise).

Precision: PIL evaluates the affine warp and AutoContrast in float64; accelerators compute in
float32, so those ops may differ from Pillow by one grey level on a few pixels (and a pixel at the
image border may fall on the other side of the fill boundary); the tests assert at most 1 grey level
on 99% of pixels against Pillow. The other ops match Pillow exactly.

dm-pix (the JAX image library) was checked first: its ``affine_transform`` interpolates with order
0 or 1 only (no bicubic), its ``adjust_contrast`` uses per-channel means (tf.image's definition, not
PIL's grey-level mean), and it has no equalize, posterize or autocontrast; so the ops are here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# timm's hparams['img_mean'] for the ImageNet mean: round(255 * (0.485, 0.456, 0.406)).
TIMM_FILL_COLOR = (124, 116, 104)
_LEVEL_DENOM = 10.0


# ----------------------------------------------------------------------------- RandAugment config
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


# ----------------------------------------------------------------------------- lookup-table ops
# A table ``lut`` int32 [3, 256] maps channel c's value v to lut[c, v].
_IDENTITY_LUT = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (3, 256))


def apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
    """``out[h, w, c] = lut[c, image[h, w, c]]`` for uint8 ``[H, W, 3]`` and int ``[3, 256]``."""
    flat = (jnp.arange(3, dtype=jnp.int32) * 256 + image.astype(jnp.int32)).reshape(-1)
    return jnp.take(lut.reshape(-1), flat, mode="clip").reshape(image.shape).astype(jnp.uint8)


def invert_lut() -> jax.Array:
    """PIL ``ImageOps.invert``: ``255 - v``."""
    return 255 - _IDENTITY_LUT


def posterize_lut(bits) -> jax.Array:
    """PIL ``ImageOps.posterize``: keep the ``bits`` high bits (0 -> black as in PIL < 10; 8 -> identity)."""
    bits = jnp.clip(jnp.asarray(bits).astype(jnp.int32), 0, 8)
    mask = 256 - jnp.left_shift(1, 8 - bits)
    return jnp.bitwise_and(_IDENTITY_LUT, mask)


def solarize_lut(threshold) -> jax.Array:
    """PIL ``ImageOps.solarize``: ``v if v < threshold else 255 - v``."""
    return jnp.where(_IDENTITY_LUT < jnp.asarray(threshold).astype(jnp.int32), _IDENTITY_LUT, 255 - _IDENTITY_LUT)


def solarize_add_lut(add, threshold: int = 128) -> jax.Array:
    """timm ``solarize_add``: ``min(255, v + add) if v < threshold else v``."""
    added = jnp.minimum(255, _IDENTITY_LUT + jnp.asarray(add).astype(jnp.int32))
    return jnp.where(_IDENTITY_LUT < threshold, added, _IDENTITY_LUT)


def _histograms(image: jax.Array) -> jax.Array:
    """Per-channel histograms int32 ``[3, 256]`` of uint8 ``[H, W, 3]``."""
    index = (jnp.arange(3, dtype=jnp.int32) * 256 + image.astype(jnp.int32)).reshape(-1)
    return jnp.zeros(3 * 256, jnp.int32).at[index].add(1).reshape(3, 256)


def auto_contrast_lut(image: jax.Array) -> jax.Array:
    """PIL ``ImageOps.autocontrast``: per channel ``int(v * 255 / (hi - lo) - lo * 255 / (hi - lo))``.

    ``lo``/``hi`` are the channel's min/max; ``hi <= lo`` leaves the channel unchanged.
    """
    lo = jnp.min(image, axis=(0, 1)).astype(jnp.float32)[:, None]
    hi = jnp.max(image, axis=(0, 1)).astype(jnp.float32)[:, None]
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    stretched = jnp.clip(jnp.floor(_IDENTITY_LUT * scale + (-lo * scale)), 0, 255).astype(jnp.int32)
    return jnp.where(hi > lo, stretched, _IDENTITY_LUT)


def equalize_lut(image: jax.Array) -> jax.Array:
    """PIL ``ImageOps.equalize``: per channel ``lut[v] = (step // 2 + #{pixels < v}) // step``.

    ``step = (#pixels - count of the largest value present) // 255``; a channel with one value or
    ``step = 0`` is unchanged.
    """
    hist = _histograms(image)
    present = hist > 0
    last = 255 - jnp.argmax(present[:, ::-1], axis=1)  # the largest value present
    last_count = jnp.take_along_axis(hist, last[:, None], axis=1)[:, 0]
    step = (jnp.sum(hist, axis=1) - last_count) // 255
    below = jnp.cumsum(hist, axis=1) - hist
    lut = jnp.clip((step[:, None] // 2 + below) // jnp.maximum(step, 1)[:, None], 0, 255)
    identity = (jnp.sum(present, axis=1) <= 1) | (step == 0)
    return jnp.where(identity[:, None], _IDENTITY_LUT, lut)


def auto_contrast(image):
    return apply_lut(image, auto_contrast_lut(image))


def equalize(image):
    return apply_lut(image, equalize_lut(image))


def invert(image):
    return apply_lut(image, invert_lut())


def posterize(image, bits):
    return apply_lut(image, posterize_lut(bits))


def solarize(image, threshold):
    return apply_lut(image, solarize_lut(threshold))


def solarize_add(image, add):
    return apply_lut(image, solarize_add_lut(add))


# ----------------------------------------------------------------------------- blend ops
def blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
    """PIL ``Image.blend(degenerate, image, factor)``: ``uint8(clip(d + f (x - d), 0, 255))`` (truncated)."""
    d = degenerate.astype(jnp.float32)
    scaled = jnp.asarray(factor, jnp.float32) * (image.astype(jnp.float32) - d)
    # Pillow's C code rounds the product to float32 before the sum; a fused multiply-add (what XLA's
    # CPU backend emits for ``d + f * (x - d)``) rounds once and differs by 1 on ~1% of pixels. The
    # select between the product and the sum keeps the compiler from fusing them.
    out = d + jnp.where(jnp.isfinite(scaled), scaled, 0.0)
    return jnp.floor(jnp.clip(out, 0.0, 255.0)).astype(jnp.uint8)


def grayscale(image: jax.Array) -> jax.Array:
    """PIL ``convert('L')``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``, int32 ``[H, W]``."""
    rgb = image.astype(jnp.int32)
    return jnp.right_shift(rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000, 16)


def _grey_mean(image: jax.Array) -> jax.Array:
    """PIL ``ImageEnhance.Contrast``'s degenerate level ``int(mean(grey) + 0.5)`` (float32 scalar)."""
    grey = grayscale(image)
    return jnp.floor(jnp.sum(grey).astype(jnp.float32) / grey.size + 0.5)


def smooth(image: jax.Array) -> jax.Array:
    """PIL ``ImageFilter.SMOOTH`` (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded); the border is kept.

    Written as nine shifted float32 sums (no convolution, whose precision on TPUs is bfloat16).
    """
    x = image.astype(jnp.float32)
    h, w = image.shape[0], image.shape[1]
    total = 4.0 * x[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[dy:dy + h - 2, dx:dx + w - 2]
    inner = jnp.clip(jnp.round(total / 13.0), 0.0, 255.0).astype(jnp.uint8)
    return jnp.asarray(image).at[1:-1, 1:-1].set(inner)


def color(image, factor):
    """PIL ``ImageEnhance.Color``: blend with the grey-scale image."""
    return blend(jnp.repeat(grayscale(image)[..., None], 3, axis=-1), image, factor)


def contrast(image, factor):
    """PIL ``ImageEnhance.Contrast``: blend with the constant ``int(mean(grey) + 0.5)``."""
    return blend(jnp.full(image.shape, _grey_mean(image)), image, factor)


def brightness(image, factor):
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return blend(jnp.zeros_like(image), image, factor)


def sharpness(image, factor):
    """PIL ``ImageEnhance.Sharpness``: blend with the ``SMOOTH``-filtered image."""
    return blend(smooth(image), image, factor)


# ----------------------------------------------------------------------------- affine ops
def affine_transform(image: jax.Array, matrix, fill: Sequence[int] = TIMM_FILL_COLOR) -> jax.Array:
    """PIL ``Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill)`` of uint8 ``[H, W, 3]``.

    Output pixel ``(x, y)`` samples the input at ``(a u + b v + c, d u + e v + f)`` with
    ``u = x + 0.5, v = y + 0.5`` (PIL's pixel-centre convention). Samples outside ``[0, W) x [0, H)``
    take ``fill``; inside, PIL's bicubic (``a = -1``, edge pixels replicated) through the 4 x 4
    neighbours, in float32, truncated to uint8. The identity matrix returns ``image`` exactly.
    """
    height, width = image.shape[0], image.shape[1]
    a, b, c, d, e, f = (jnp.asarray(matrix, jnp.float32)[i] for i in range(6))
    v, u = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                        jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
    x_in = a * u + b * v + c
    y_in = d * u + e * v + f
    outside = (x_in < 0) | (x_in >= width) | (y_in < 0) | (y_in >= height)
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = jnp.floor(x_in), jnp.floor(y_in)
    dx, dy = x_in - x0, y_in - y0
    offsets = jnp.arange(-1, 3, dtype=jnp.int32)
    cols = jnp.clip(x0.astype(jnp.int32)[..., None] + offsets, 0, width - 1)  # [H, W, 4]
    rows = jnp.clip(y0.astype(jnp.int32)[..., None] + offsets, 0, height - 1)
    flat = image.reshape(height * width, 3).astype(jnp.float32)
    across = []  # one neighbour row at a time: [H, W, 4, 3] gathers, never a [H, W, 4, 4, 3] tensor
    for r in range(4):
        neighbours = jnp.take(flat, rows[..., r, None] * width + cols, axis=0, mode="clip")  # [H, W, 4, 3]
        across.append(_pil_cubic([neighbours[:, :, k] for k in range(4)], dx[..., None]))  # [H, W, 3]
    value = _pil_cubic(across, dy[..., None])  # [H, W, 3]
    value = jnp.floor(jnp.clip(value, 0.0, 255.0)).astype(jnp.uint8)
    return jnp.where(outside[..., None], jnp.asarray(fill, jnp.uint8), value)


def _pil_cubic(values, t):
    """PIL Geometry.c ``BICUBIC`` (a = -1) through the four samples at offsets -1, 0, 1, 2."""
    v1, v2, v3, v4 = values
    return v2 + t * ((v3 - v1) + t * ((2 * (v1 - v2) + v3 - v4) + t * (v2 - v1 - v3 + v4)))


def rotate_matrix(degrees, height: int, width: int) -> jax.Array:
    """PIL ``Image.rotate(degrees)``'s inverse matrix: counter-clockwise about the image centre."""
    angle = -jnp.asarray(degrees, jnp.float32) * (math.pi / 180.0)
    cx, cy = width / 2.0, height / 2.0
    a, b = jnp.cos(angle), jnp.sin(angle)
    d, e = -jnp.sin(angle), jnp.cos(angle)
    return jnp.stack([a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy])


def _matrix(a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> jax.Array:
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in (a, b, c, d, e, f)])


def rotate(image, degrees, fill=TIMM_FILL_COLOR):
    """PIL ``Image.rotate(degrees, BICUBIC, fillcolor=fill)``."""
    return affine_transform(image, rotate_matrix(degrees, image.shape[0], image.shape[1]), fill)


def shear_x(image, factor, fill=TIMM_FILL_COLOR):
    """timm ``shear_x``: affine ``(1, factor, 0, 0, 1, 0)``."""
    return affine_transform(image, _matrix(b=factor), fill)


def shear_y(image, factor, fill=TIMM_FILL_COLOR):
    """timm ``shear_y``: affine ``(1, 0, 0, factor, 1, 0)``."""
    return affine_transform(image, _matrix(d=factor), fill)


def translate_x_rel(image, pct, fill=TIMM_FILL_COLOR):
    """timm ``translate_x_rel``: affine ``(1, 0, pct * W, 0, 1, 0)`` (content moves left for pct > 0)."""
    return affine_transform(image, _matrix(c=pct * image.shape[1]), fill)


def translate_y_rel(image, pct, fill=TIMM_FILL_COLOR):
    """timm ``translate_y_rel``: affine ``(1, 0, 0, 0, 1, pct * H)``."""
    return affine_transform(image, _matrix(f=pct * image.shape[0]), fill)


# ----------------------------------------------------------------------------- RandAugment
def _negate(value, negate):
    return jnp.where(negate, -value, value)


_ENHANCE = lambda m, neg: m / _LEVEL_DENOM * 1.8 + 0.1  # noqa: E731
_ENHANCE_INCREASING = lambda m, neg: 1.0 + _negate(m / _LEVEL_DENOM * 0.9, neg)  # noqa: E731
_NO_ARG = lambda m, neg: jnp.float32(0.0)  # noqa: E731

# timm auto_augment.py LEVEL_TO_ARG: name -> level(magnitude, negate) -> op argument.
LEVELS: dict[str, Callable] = {
    "AutoContrast": _NO_ARG,
    "Equalize": _NO_ARG,
    "Invert": _NO_ARG,
    "Rotate": lambda m, neg: _negate(m / _LEVEL_DENOM * 30.0, neg),
    "Posterize": lambda m, neg: jnp.floor(m / _LEVEL_DENOM * 4),
    "PosterizeIncreasing": lambda m, neg: 4 - jnp.floor(m / _LEVEL_DENOM * 4),
    "Solarize": lambda m, neg: jnp.minimum(256.0, jnp.floor(m / _LEVEL_DENOM * 256)),
    "SolarizeIncreasing": lambda m, neg: 256 - jnp.minimum(256.0, jnp.floor(m / _LEVEL_DENOM * 256)),
    "SolarizeAdd": lambda m, neg: jnp.minimum(128.0, jnp.floor(m / _LEVEL_DENOM * 110)),
    "Color": _ENHANCE,
    "ColorIncreasing": _ENHANCE_INCREASING,
    "Contrast": _ENHANCE,
    "ContrastIncreasing": _ENHANCE_INCREASING,
    "Brightness": _ENHANCE,
    "BrightnessIncreasing": _ENHANCE_INCREASING,
    "Sharpness": _ENHANCE,
    "SharpnessIncreasing": _ENHANCE_INCREASING,
    "ShearX": lambda m, neg: _negate(m / _LEVEL_DENOM * 0.3, neg),
    "ShearY": lambda m, neg: _negate(m / _LEVEL_DENOM * 0.3, neg),
    "TranslateXRel": lambda m, neg: _negate(m / _LEVEL_DENOM * 0.45, neg),
    "TranslateYRel": lambda m, neg: _negate(m / _LEVEL_DENOM * 0.45, neg),
}

# Which stage of a layer runs each op (see the module docstring).
_AFFINE = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_LUT = {"AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
        "SolarizeIncreasing", "SolarizeAdd"}
_BLEND = {"Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing",
          "Sharpness", "SharpnessIncreasing"}


def op_matrix(name: str, arg, height: int, width: int) -> jax.Array:
    """The affine matrix ``[6]`` of a geometric op (the identity for every other op)."""
    if name == "Rotate":
        return rotate_matrix(arg, height, width)
    return {"ShearX": lambda: _matrix(b=arg), "ShearY": lambda: _matrix(d=arg),
            "TranslateXRel": lambda: _matrix(c=arg * width), "TranslateYRel": lambda: _matrix(f=arg * height),
            }.get(name, _matrix)()


def op_lut(name: str, arg, image: jax.Array) -> jax.Array:
    """The lookup table ``[3, 256]`` of a table op on ``image`` (the identity for every other op)."""
    base = name.replace("Increasing", "")
    if base == "AutoContrast":
        return auto_contrast_lut(image)
    if base == "Equalize":
        return equalize_lut(image)
    if base == "Invert":
        return invert_lut()
    if base == "Posterize":
        return posterize_lut(arg)
    if base == "Solarize":
        return solarize_lut(arg)
    if base == "SolarizeAdd":
        return solarize_add_lut(arg)
    return _IDENTITY_LUT


def apply_op(name: str, image: jax.Array, magnitude, negate, fill: Sequence[int] = TIMM_FILL_COLOR) -> jax.Array:
    """Applies the RandAugment op ``name`` at ``magnitude`` (0..10) to one uint8 image (reference form)."""
    arg = jnp.asarray(LEVELS[name](jnp.asarray(magnitude, jnp.float32), jnp.asarray(negate)), jnp.float32)
    return _layer(jnp.asarray(image), (name,), jnp.int32(0), arg[None], jnp.bool_(True), fill)


def _layer(image, names, index, args, apply, fill):
    """One RandAugment layer: op ``names[index]`` with argument ``args[index]`` if ``apply``.

    The warp, table and blend stages each reduce to an exact identity unless the op is theirs.
    """
    height, width = image.shape[0], image.shape[1]
    arg = args[index]
    chosen = lambda group: apply & jnp.asarray([n in group for n in names])[index]  # noqa: E731
    if any(n in _AFFINE for n in names):
        matrices = jnp.stack([op_matrix(n, args[i], height, width) for i, n in enumerate(names)])
        matrix = jnp.where(chosen(_AFFINE), matrices[index], _matrix())
        image = affine_transform(image, matrix, fill)
    if any(n in _LUT for n in names):
        tables = [op_lut(n, args[i], image) if n in _LUT else _IDENTITY_LUT for i, n in enumerate(names)]
        lut = jnp.where(chosen(_LUT), jnp.stack(tables)[index], _IDENTITY_LUT)
        image = apply_lut(image, lut)
    if any(n in _BLEND for n in names):
        kind = jnp.asarray([("Color", "Contrast", "Brightness", "Sharpness").index(n.replace("Increasing", ""))
                            if n in _BLEND else 2 for n in names])[index]
        degenerate = jnp.where(
            kind == 0, grayscale(image)[..., None].astype(jnp.float32),
            jnp.where(kind == 1, _grey_mean(image),
                      jnp.where(kind == 3, smooth(image).astype(jnp.float32), 0.0)))
        factor = jnp.where(chosen(_BLEND), arg, 1.0)
        image = blend(jnp.broadcast_to(degenerate, image.shape), image, factor)
    return image


def rand_augment(key: jax.Array, image: jax.Array, config: RandAugmentConfig,
                 fill: Sequence[int] = TIMM_FILL_COLOR) -> jax.Array:
    """timm ``RandAugment.__call__`` on one uint8 ``[H, W, 3]`` image.

    For each of ``num_layers`` layers: an op uniform over ``config.transforms`` (with replacement);
    with probability ``prob`` it runs at magnitude ``clip(m + mstd * N(0, 1), 0, mmax)`` (or
    ``U(0, m)`` for ``mstd = inf``), signed levels negated with probability 1/2.
    """
    names = tuple(config.transforms)
    for layer_key in jax.random.split(key, config.num_layers):
        op_key, gate_key, mag_key, sign_key = jax.random.split(layer_key, 4)
        index = jax.random.randint(op_key, (), 0, len(names))
        if math.isinf(config.magnitude_std):
            magnitude = jax.random.uniform(mag_key, (), jnp.float32, 0.0, config.magnitude)
        else:
            magnitude = config.magnitude + config.magnitude_std * jax.random.normal(mag_key, (), jnp.float32)
        magnitude = jnp.clip(magnitude, 0.0, config.magnitude_max)
        negate = jax.random.uniform(sign_key) > 0.5
        apply = jax.random.uniform(gate_key) <= config.prob
        args = jnp.stack([jnp.asarray(LEVELS[n](magnitude, negate), jnp.float32) for n in names])
        image = _layer(image, names, index, args, apply, fill)
    return image


# ----------------------------------------------------------------------------- flip, normalise, erase
def random_flip(key: jax.Array, image: jax.Array, prob: float = 0.5) -> jax.Array:
    """Mirrors ``[H, W, C]`` horizontally with probability ``prob``."""
    return jnp.where(jax.random.uniform(key) < prob, image[:, ::-1], image)


def normalize(image: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(image / 255 - mean) / std`` as float32 (``ToTensor`` + ``Normalize``)."""
    x = image.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_erasing(key: jax.Array, image: jax.Array, *, prob: float = 0.25, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3, attempts: int = 10) -> jax.Array:
    """timm ``RandomErasing(probability=prob, mode='pixel', max_count=1)`` of float ``[H, W, C]``.

    With probability ``prob``: target area ``U(min_area, max_area) * H * W``, aspect ``r`` with
    ``log r ~ U(log min_aspect, -log min_aspect)``, ``h = round(sqrt(area r))``,
    ``w = round(sqrt(area / r))``; the first attempt with ``h < H`` and ``w < W`` is filled at a
    uniform position (``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``) with per-pixel ``N(0, 1)`` noise;
    if no attempt fits nothing is erased.
    """
    height, width = image.shape[0], image.shape[1]
    gate_key, area_key, aspect_key, pos_key, noise_key = jax.random.split(key, 5)
    target = height * width * jax.random.uniform(area_key, (attempts,), jnp.float32, min_area, max_area)
    log_aspect = jax.random.uniform(aspect_key, (attempts,), jnp.float32, math.log(min_aspect),
                                    -math.log(min_aspect))
    h = jnp.round(jnp.sqrt(target * jnp.exp(log_aspect)))
    w = jnp.round(jnp.sqrt(target / jnp.exp(log_aspect)))
    fits = (w < width) & (h < height)
    first = jnp.argmax(fits)
    h, w = h[first], w[first]
    u_top, u_left = jax.random.uniform(pos_key, (2,), jnp.float32)
    top = jnp.floor(u_top * (height - h + 1))
    left = jnp.floor(u_left * (width - w + 1))
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = (jax.random.uniform(gate_key) < prob) & jnp.any(fits)
    noise = jax.random.normal(noise_key, image.shape, image.dtype)
    return jnp.where(erase & inside[:, :, None], noise, image)


# ----------------------------------------------------------------------------- the batch transforms
@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """``f(keys [N], images uint8 [N, H, W, 3]) -> float32 [N, H, W, 3]``: flip, RandAugment, normalise, erase.

    ``rand_augment`` None skips RandAugment; ``erasing_prob`` 0 skips erasing. Each example's key
    alone decides its draws, so the result does not depend on how the batch is split over devices.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rand_augment: RandAugmentConfig | None = None
    erasing_prob: float = 0.0
    fill: tuple[int, ...] = TIMM_FILL_COLOR

    def one(self, key: jax.Array, image: jax.Array) -> jax.Array:
        """The transform of one uint8 ``[H, W, 3]`` image."""
        flip_key, ra_key, erase_key = jax.random.split(key, 3)
        image = random_flip(flip_key, image)
        if self.rand_augment is not None:
            image = rand_augment(ra_key, image, self.rand_augment, self.fill)
        image = normalize(image, self.mean, self.std)
        if self.erasing_prob > 0:
            image = random_erasing(erase_key, image, prob=self.erasing_prob)
        return image

    def __call__(self, keys: jax.Array, images: jax.Array) -> jax.Array:
        if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"TrainTransform expects uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}.")
        return jax.vmap(self.one)(keys, images)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """``f(images uint8 [N, H, W, 3]) -> float32``: normalisation only."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: jax.Array) -> jax.Array:
        return normalize(images, self.mean, self.std)
