"""Soft targets made on device: label smoothing, then MixUp / CutMix with timm's semantics.

Pure, jittable ``jnp`` code with an explicit PRNG key, meant to run inside the jitted train step (per
device under ``jax.shard_map``: give every device its own key). The semantics are those of
``timm.data.Mixup`` as used by MAE fine-tuning (docs/method.md):

1. label smoothing of the one-hot targets: ``t_i = (1 - e) one_hot(y_i) + e / C``;
2. the batch is mixed with its reversed copy, sample ``i`` with partner ``N - 1 - i``:

   * MixUp: ``x_i <- lam_i x_i + (1 - lam_i) x_{N-1-i}``, ``lam ~ Beta(mixup_alpha, mixup_alpha)``;
   * CutMix: the pixels of ``x_i`` inside a box are replaced by the partner's. The box has side
     ``floor(H sqrt(1 - lam))`` x ``floor(W sqrt(1 - lam))`` (``lam ~ Beta(cutmix_alpha,
     cutmix_alpha)``) around a uniform centre, clipped to the image (timm's ``rand_bbox``), and
     with ``correct_lam`` (the default) ``lam`` is corrected to the area actually kept:
     ``lam_i = 1 - box_area / (H W)``. With ``cutmix_minmax = (lo, hi)`` the box sides are drawn
     instead, uniformly among the integers ``[floor(H lo), floor(H hi))`` and ``[floor(W lo),
     floor(W hi))``, the box lies inside the image at a uniform top-left corner (timm's
     ``rand_bbox_minmax``); this overrides ``cutmix_alpha`` (set to 1) and forces ``correct_lam``;

   with probability ``1 - mix_prob`` a sample is not mixed (``lam = 1``); when both alphas are
   positive CutMix is chosen with probability ``switch_prob``, else MixUp;
3. targets ``a_i = lam_i t_i + (1 - lam_i) t_{N-1-i}``.

Soft targets given with the data (``soft_targets [N, C]``, e.g. annotator vote distributions)
take the place of the one-hots: ``t_i = (1 - e) s_i + e / C``, mixed the same way (their structured
form does not exist, so ``Targets.structured`` is then ``None``).

``mode`` says how many parameter draws there are: ``'batch'`` one for the whole batch, ``'pair'``
one per pair ``(i, N-1-i)`` shared by both (same lambda, same box), ``'elem'`` one per element.

The targets also come in structured form (:class:`StructuredTargets`: two class indices and two
weights per row plus a uniform mass), which lets soft target InfoNCE avoid gathering dense
``[M, C]`` targets across devices (``softnce.losses.structured_soft_target_infonce``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from softnce import config_checks

Array = jax.Array

MODES = ("batch", "pair", "elem")


class StructuredTargets(NamedTuple):
    """Soft targets as sparse class weights plus a uniform mass, per row ``i``::

        a_i = sum_k weights[i, k] * one_hot(class_ids[i, k]) + uniform[i] / C * ones(C)

    Attributes:
      class_ids: int32 ``[N, k]`` class indices (``k = 2`` for mixed targets: own, partner).
      weights: float32 ``[N, k]`` their weights (``lam (1 - e)`` and ``(1 - lam)(1 - e)``).
      uniform: float32 ``[N]`` mass spread uniformly over the ``C`` classes (the smoothing ``e``).
    """

    class_ids: Array
    weights: Array
    uniform: Array


class Targets(NamedTuple):
    """What :func:`mix_batch` returns besides the mixed inputs.

    Attributes:
      dense: float32 ``[N, C]`` soft targets (rows sum to 1).
      labels: int32 ``[N]`` each sample's own label from before mixing.
      structured: the same targets as :class:`StructuredTargets`, or ``None`` unless
        ``MixConfig.structured`` is set.
    """

    dense: Array
    labels: Array
    structured: Optional[StructuredTargets]


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Label smoothing and MixUp/CutMix settings (timm's ``Mixup`` arguments).

    Attributes:
      label_smoothing: ``e`` in ``[0, 1)``; 0 turns smoothing off.
      mixup_alpha: Beta parameter of the MixUp lambda; 0 turns MixUp off.
      cutmix_alpha: Beta parameter of the CutMix lambda; 0 turns CutMix off (image inputs only).
      mix_prob: probability that a batch / pair / element is mixed at all.
      switch_prob: probability of CutMix instead of MixUp when both alphas are positive.
      mode: ``'batch'``, ``'pair'`` or ``'elem'`` (see the module docstring).
      structured: also return :class:`StructuredTargets`.
      cutmix_minmax: ``(lo, hi)``, ``0 <= lo < hi <= 1``: draw the CutMix box sides as fractions of
        H and W in ``[lo, hi)`` (timm's ``rand_bbox_minmax``) instead of from ``lam``; sets
        ``cutmix_alpha = 1`` and forces ``correct_lam``, as timm's ``Mixup`` does. ``None``: off.
      correct_lam: recompute the CutMix ``lam`` as ``1 - box_area / (H W)`` after clipping the box
        to the image (timm's default, True); False keeps the drawn ``lam`` for the targets.

    The reference recipe (docs/method.md) is ``MixConfig(0.1, 0.8, 1.0, 0.8, 0.5, 'batch')``; the
    default is no smoothing and no mixing, which gives ``one_hot(labels)``.
    """

    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    structured: bool = False
    cutmix_minmax: Optional[tuple[float, float]] = None
    correct_lam: bool = True

    def __post_init__(self):
        # The ranges are the config's (softnce.config_checks.RULES["augment.*"]), checked in one place.
        for name in ("label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob"):
            config_checks.check_field(f"augment.{name}", getattr(self, name))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.cutmix_minmax is not None:
            minmax = tuple(self.cutmix_minmax)
            if len(minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (lo, hi), got {self.cutmix_minmax!r}.")
            for value in minmax:
                config_checks.check_field("augment.cutmix_minmax", value)
            if not minmax[0] < minmax[1]:
                raise ValueError(f"cutmix_minmax = {minmax} must have lo < hi (box side fractions of H and W).")
            # timm's Mixup: cutmix_minmax forces cutmix_alpha = 1.0 (and correct_lam, see box_lambda's use).
            object.__setattr__(self, "cutmix_minmax", tuple(float(v) for v in minmax))
            object.__setattr__(self, "cutmix_alpha", 1.0)

    @property
    def mixing(self) -> bool:
        """Whether any sample can be mixed (some alpha > 0 and ``mix_prob > 0``)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @classmethod
    def from_config(cls, config: Any) -> "MixConfig":
        """Builds a ``MixConfig`` from a ``ConfigDict`` (or mapping) with any subset of its fields.

        Missing fields take the defaults; unknown fields are ignored so that a larger config
        section (e.g. ``config.augment``) can be passed as is.
        """
        get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
        kwargs = {}
        for field in dataclasses.fields(cls):
            value = get(field.name, None)
            if value is not None:
                kwargs[field.name] = value
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Targets.
# --------------------------------------------------------------------------------------------------


def smoothed_one_hot(labels: Array, num_classes: int, label_smoothing: float) -> Array:
    """timm's smoothed one-hot ``(1 - e) one_hot(y) + e / C``, float32 ``[N, C]``."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing)


def smooth_targets(soft_targets: Array, label_smoothing: float) -> Array:
    """Label smoothing of given soft targets ``(1 - e) s + e / C``, float32 ``[N, C]`` (``s`` itself if ``e = 0``)."""
    soft_targets = soft_targets.astype(jnp.float32)
    return soft_targets if label_smoothing == 0 else optax.smooth_labels(soft_targets, label_smoothing)


def to_dense(structured: StructuredTargets, num_classes: int) -> Array:
    """Dense ``[N, C]`` float32 targets ``sum_k w[:, k] one_hot(c[:, k]) + u / C``."""
    one_hots = jax.nn.one_hot(structured.class_ids, num_classes, dtype=jnp.float32)  # [N, k, C]
    peaks = jnp.einsum("nk,nkc->nc", structured.weights.astype(jnp.float32), one_hots)
    return peaks + structured.uniform.astype(jnp.float32)[:, None] / num_classes


def _mixed_targets(labels, lam, *, num_classes, config: MixConfig, soft_targets=None) -> Targets:
    """Targets ``lam_i t_i + (1 - lam_i) t_{N-1-i}`` for the per-element ``lam`` ``[N]``.

    ``t`` are the smoothed one-hots of ``labels``, or the smoothed ``soft_targets`` when given.
    """
    e = config.label_smoothing
    if soft_targets is None:
        smooth = smoothed_one_hot(labels, num_classes, e)
    else:
        smooth = smooth_targets(soft_targets, e)
    lam_col = lam[:, None]
    dense = lam_col * smooth + (1.0 - lam_col) * smooth[::-1]
    structured = None
    if config.structured and soft_targets is None:
        structured = StructuredTargets(
            class_ids=jnp.stack([labels, labels[::-1]], axis=1),
            weights=jnp.stack([lam * (1.0 - e), (1.0 - lam) * (1.0 - e)], axis=1),
            uniform=jnp.full(labels.shape, e, jnp.float32),
        )
    return Targets(dense=dense, labels=labels, structured=structured)


# --------------------------------------------------------------------------------------------------
# Mixing parameters and CutMix boxes.
# --------------------------------------------------------------------------------------------------


class MixParams(NamedTuple):
    """Per-element mixing parameters, all ``[N]``.

    ``lam``: drawn lambda (1 where not mixed), before the CutMix area correction; ``use_cutmix``:
    CutMix (True) or MixUp (False); ``centre_y``, ``centre_x``: CutMix box centre in pixels.
    ``cut_h``, ``cut_w``: the box sides drawn with ``cutmix_minmax`` (timm's ``rand_bbox_minmax``),
    else ``None``; the box is then ``[centre_y, centre_y + cut_h) x [centre_x, centre_x + cut_w)``
    (``centre_*`` hold its top-left corner, see :func:`minmax_box`).
    """

    lam: Array
    use_cutmix: Array
    centre_y: Array
    centre_x: Array
    cut_h: Optional[Array] = None
    cut_w: Optional[Array] = None


def cutmix_box(lam: Array, centre_y: Array, centre_x: Array, height: int, width: int):
    """timm's ``rand_bbox`` for given draws: the box ``[y_lo, y_hi) x [x_lo, x_hi)``, int32 each.

    ``cut = floor(side * sqrt(1 - lam))``; the box spans ``centre -+ cut // 2`` clipped to the image.
    """
    ratio = jnp.sqrt(jnp.clip(1.0 - lam.astype(jnp.float32), 0.0, 1.0))
    half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
    half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
    y_lo = jnp.clip(centre_y - half_h, 0, height)
    y_hi = jnp.clip(centre_y + half_h, 0, height)
    x_lo = jnp.clip(centre_x - half_w, 0, width)
    x_hi = jnp.clip(centre_x + half_w, 0, width)
    return y_lo, y_hi, x_lo, x_hi


def minmax_box(top: Array, left: Array, cut_h: Array, cut_w: Array):
    """timm's ``rand_bbox_minmax`` for given draws: ``[top, top + cut_h) x [left, left + cut_w)``, int32 each."""
    top, left = top.astype(jnp.int32), left.astype(jnp.int32)
    return top, top + cut_h.astype(jnp.int32), left, left + cut_w.astype(jnp.int32)


def minmax_sides(size: int, minmax: tuple[float, float]) -> tuple[int, int]:
    """The integer range ``[floor(size lo), floor(size hi))`` of a box side (at least one value)."""
    low, high = int(size * minmax[0]), int(size * minmax[1])
    return low, max(high, low + 1)


def box_lambda(box, height: int, width: int) -> Array:
    """Lambda corrected to the real box area: ``1 - (y_hi - y_lo)(x_hi - x_lo) / (H W)``."""
    y_lo, y_hi, x_lo, x_hi = box
    area = (y_hi - y_lo) * (x_hi - x_lo)
    return 1.0 - area.astype(jnp.float32) / float(height * width)


def _box_mask(box, height: int, width: int) -> Array:
    """Boolean ``[N, H, W, 1]`` mask of the per-element boxes (iota comparisons)."""
    y_lo, y_hi, x_lo, x_hi = (b[:, None, None, None] for b in box)
    ys = jnp.arange(height)[None, :, None, None]
    xs = jnp.arange(width)[None, None, :, None]
    return (ys >= y_lo) & (ys < y_hi) & (xs >= x_lo) & (xs < x_hi)


def _draw_params(rng: Array, num_draws: int, height: int, width: int, config: MixConfig) -> MixParams:
    """``num_draws`` independent parameter sets (timm's ``_params_per_elem``)."""
    if config.cutmix_minmax is not None:
        rng, k_h, k_w, k_top, k_left = jax.random.split(rng, 5)
    k_apply, k_switch, k_beta, k_y, k_x = jax.random.split(rng, 5)
    shape = (num_draws,)
    both = config.mixup_alpha > 0 and config.cutmix_alpha > 0
    if both:
        use_cutmix = jax.random.uniform(k_switch, shape) < config.switch_prob
    else:
        use_cutmix = jnp.full(shape, config.cutmix_alpha > 0)
    # Both Beta draws in one call (one sampler to compile); an alpha of 0 means that kind is off.
    alphas = jnp.array([config.mixup_alpha or 1.0, config.cutmix_alpha or 1.0], jnp.float32)[:, None]
    lam_mixup, lam_cutmix = jax.random.beta(k_beta, alphas, alphas, (2,) + shape)
    apply = jax.random.uniform(k_apply, shape) < config.mix_prob
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
    if config.cutmix_minmax is not None:  # rand_bbox_minmax: sides in [lo, hi) of H and W, box inside the image
        cut_h = jax.random.randint(k_h, shape, *minmax_sides(height, config.cutmix_minmax))
        cut_w = jax.random.randint(k_w, shape, *minmax_sides(width, config.cutmix_minmax))
        return MixParams(
            lam=lam, use_cutmix=use_cutmix & apply,
            centre_y=jax.random.randint(k_top, shape, 0, jnp.maximum(height - cut_h, 1)),
            centre_x=jax.random.randint(k_left, shape, 0, jnp.maximum(width - cut_w, 1)),
            cut_h=cut_h, cut_w=cut_w,
        )
    return MixParams(
        lam=lam,
        use_cutmix=use_cutmix & apply,
        centre_y=jax.random.randint(k_y, shape, 0, max(height, 1)),
        centre_x=jax.random.randint(k_x, shape, 0, max(width, 1)),
    )


def _per_element(params: MixParams, batch_size: int, mode: str) -> MixParams:
    """Expands per-batch / per-pair draws to ``[N]`` (pair ``i`` also serves element ``N-1-i``)."""
    if mode == "batch":
        return jax.tree.map(lambda p: jnp.broadcast_to(p, (batch_size,)), params)
    if mode == "pair":
        return jax.tree.map(lambda p: jnp.concatenate([p, p[::-1]]), params)
    return params


def apply_mix(inputs: Array, labels: Array, params: MixParams, *, num_classes: int, config: MixConfig,
              soft_targets: Optional[Array] = None):
    """Mixes ``inputs`` with their reversed copy under given per-element ``params``.

    Returns ``(mixed_inputs, Targets)``. :func:`mix_batch` draws the ``params``; tests pass them.
    ``params.cut_h`` given: the boxes of :func:`minmax_box` (``cutmix_minmax``), else of :func:`cutmix_box`.
    """
    partner = inputs[::-1]
    lam = params.lam
    mixup_lam = lam.astype(inputs.dtype).reshape((-1,) + (1,) * (inputs.ndim - 1))
    mixed = mixup_lam * inputs + (1 - mixup_lam) * partner
    if config.cutmix_alpha > 0:
        height, width = inputs.shape[1], inputs.shape[2]
        if params.cut_h is not None:
            box = minmax_box(params.centre_y, params.centre_x, params.cut_h, params.cut_w)
        else:
            box = cutmix_box(lam, params.centre_y, params.centre_x, height, width)
        cut = jnp.where(_box_mask(box, height, width), partner, inputs)
        mixed = jnp.where(params.use_cutmix[:, None, None, None], cut, mixed)
        if config.correct_lam or params.cut_h is not None:  # timm: cutmix_minmax always corrects
            lam = jnp.where(params.use_cutmix, box_lambda(box, height, width), lam)
    return mixed, _mixed_targets(labels, lam, num_classes=num_classes, config=config, soft_targets=soft_targets)


def _check_mix_inputs(inputs, labels, num_classes: int, config: MixConfig, soft_targets=None) -> None:
    if inputs.ndim < 2:
        raise ValueError(f"mix_batch: inputs must be [N, ...] with N examples, got shape {tuple(inputs.shape)}.")
    n = inputs.shape[0]
    if tuple(labels.shape) != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"mix_batch: labels must be integer [N] = ({n},) to match inputs {tuple(inputs.shape)}; got "
            f"shape {tuple(labels.shape)} dtype {labels.dtype}."
        )
    if num_classes < 1:
        raise ValueError(f"mix_batch: num_classes must be >= 1, got {num_classes}.")
    if soft_targets is not None and tuple(soft_targets.shape) != (n, num_classes):
        raise ValueError(
            f"mix_batch: soft_targets must be [N, C] = ({n}, {num_classes}), got shape {tuple(soft_targets.shape)}."
        )
    if not config.mixing:
        return
    if n % 2:
        raise ValueError(
            f"mix_batch: MixUp/CutMix pairs sample i with N-1-i and needs an even batch size per device "
            f"(as timm does); got N = {n}. Use an even per-device batch or turn mixing off."
        )
    if config.cutmix_alpha > 0 and inputs.ndim != 4:
        raise ValueError(
            f"mix_batch: CutMix cuts boxes out of images [N, H, W, C], but inputs have shape "
            f"{tuple(inputs.shape)}. Set cutmix_alpha = 0 for non-image inputs (MixUp works on any shape)."
        )
    if config.mixup_alpha > 0 and not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise ValueError(f"mix_batch: MixUp needs floating-point inputs, got dtype {inputs.dtype}.")


def mix_batch(rng: Array, inputs: Array, labels: Array, *, num_classes: int, config: MixConfig,
              soft_targets: Optional[Array] = None):
    """Label smoothing then MixUp/CutMix of a batch with its reversed copy (timm semantics).

    Args:
      rng: PRNG key (use a different one per device and step).
      inputs: ``[N, H, W, C]`` images (``[N, ...]`` any shape when ``cutmix_alpha == 0``).
      labels: int ``[N]`` class indices.
      num_classes: ``C``.
      config: :class:`MixConfig` (``MixConfig.from_config(cfg)`` for a ``ConfigDict``).
      soft_targets: optional ``[N, C]`` targets given with the data, smoothed and mixed in place of
        ``one_hot(labels)`` (``Targets.structured`` is then ``None``).

    Returns:
      ``(mixed_inputs, Targets)``: mixed inputs of the input shape and dtype, targets
      ``a_i = lam_i t_i + (1 - lam_i) t_{N-1-i}`` with ``t`` the smoothed one-hots (or smoothed
      ``soft_targets``). With mixing off and ``label_smoothing = 0``, ``Targets.dense == one_hot(labels)``
      (or ``soft_targets``).
    """
    if not isinstance(config, MixConfig):
        config = MixConfig.from_config(config)
    _check_mix_inputs(inputs, labels, num_classes, config, soft_targets)
    labels = labels.astype(jnp.int32)
    n = inputs.shape[0]
    if not config.mixing:
        ones = jnp.ones((n,), jnp.float32)
        return inputs, _mixed_targets(labels, ones, num_classes=num_classes, config=config, soft_targets=soft_targets)
    num_draws = {"batch": 1, "pair": n // 2, "elem": n}[config.mode]
    spatial = inputs.shape[1:3] if inputs.ndim == 4 else (1, 1)
    params = _per_element(_draw_params(rng, num_draws, *spatial, config), n, config.mode)
    return apply_mix(inputs, labels, params, num_classes=num_classes, config=config, soft_targets=soft_targets)
