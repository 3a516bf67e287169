"""Classification losses: soft target InfoNCE (STI) and its baselines.

Every loss is a pure function that returns the per-example loss, shape ``[N]``; the caller reduces.
Notation (docs/method.md): ``N`` examples on this device, ``M`` examples in the global batch, ``C`` classes,
logits ``z`` ``[N, C]``, soft targets ``a`` (rows on the simplex), temperature ``t``, noise
distribution ``eta`` over classes (passed as ``log_noise_probs = log(eta)``, shape ``[C]``).

Soft target InfoNCE, exactly as the reference computes it::

    s_i    = z_i / t - log(eta)
    S[i,j] = a_j . s_i                 j over all M targets of the global batch
    L_i    = logsumexp_j S[i,j] - S[i,i]

computed as ``S = s @ A^T`` (no ``[N, M, C]`` intermediate). With ``axis_name`` set (inside
``jax.shard_map`` or ``jax.pmap``) the targets are all-gathered over that axis without gradient and
the positive of local row ``i`` is global column ``i + N * axis_index``.

Masks: every loss takes ``where``, a bool ``[N]`` row mask (default ``None``: every row is valid). A row
where it is False gets loss 0 and zero gradient, and in the InfoNCE-type losses it is neither scored nor a
candidate (negative) of any row on any device: the mask is all-gathered like the targets and the sums over
``j`` run over the valid columns only, so the valid rows get exactly the losses of the batch with the
masked rows dropped (the noise distribution and the temperature act as before). Masked rows may hold anything
(padding, NaN, label ``-1``). Reduce with ``loss.sum() / jnp.maximum(where.sum(), 1)``.

Value checks: under ``jit`` a loss cannot raise on values (an out-of-range label gives NaN; a target row
that is not a distribution passes). :func:`debug_checks` (off by default) makes the losses add
``jax.experimental.checkify`` checks that name the offending row; :func:`checked` runs a function with them.

Adding a loss to the trainer is one pure function plus one :func:`register_loss` entry; the
registered function has the signature ``fn(logits, inputs: LossInputs, *, **fields) -> [N]``, its
keyword-only parameters being its config fields (``config.loss.<field>``). Every entry of the
package is a thin adapter that passes ``inputs`` to the public function of the same meaning.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from softnce.registry import Registry, keyword_fields
from softnce.targets import StructuredTargets

Array = jax.Array


# --------------------------------------------------------------------------------------------------
# Shape checks (trace time) and host-side validation.
# --------------------------------------------------------------------------------------------------


def _check_logits(fn: str, logits) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{fn}: logits must have shape [N, C], got shape {tuple(logits.shape)}.")


def _check_where(fn: str, logits, where) -> Optional[Array]:
    """Checks the row mask ``where`` (bool ``[N]`` or ``None``) and returns it as an array."""
    _check_logits(fn, logits)
    if where is None:
        return None
    where = where if isinstance(where, jax.Array) else jnp.asarray(where)
    if tuple(where.shape) != (logits.shape[0],) or where.dtype != jnp.bool_:
        raise ValueError(
            f"{fn}: where must be a boolean row mask of shape [N] = ({logits.shape[0]},) to match logits "
            f"{tuple(logits.shape)}; got shape {tuple(where.shape)}, dtype {where.dtype}."
        )
    return where


def _mask_rows(where: Optional[Array], x):
    """``x`` with the rows where ``where`` is False set to 0: no value and no gradient from them."""
    if where is None:
        return x
    return jnp.where(where.reshape(where.shape + (1,) * (jnp.ndim(x) - 1)), x, jnp.zeros((), jnp.result_type(x)))


def _mask_loss(where: Optional[Array], loss: Array) -> Array:
    return loss if where is None else jnp.where(where, loss, jnp.zeros((), loss.dtype))


def _check_targets(fn: str, logits, targets, where=None) -> None:
    _check_logits(fn, logits)
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(
            f"{fn}: targets must have the same shape as logits [N, C]; got logits "
            f"{tuple(logits.shape)} and targets {tuple(targets.shape)}."
        )


def _check_labels(fn: str, logits, labels, where=None) -> None:
    _check_logits(fn, logits)
    if tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(
            f"{fn}: labels must have shape [N] = ({logits.shape[0]},) to match logits "
            f"{tuple(logits.shape)}; got labels {tuple(labels.shape)}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{fn}: labels must be integer class indices, got dtype {labels.dtype}.")
    # Under jit an out-of-range label cannot raise (it gives NaN or wraps around; see debug_checks);
    # concrete (eager) labels are checked here, those of masked rows (where False) excepted.
    if isinstance(labels, jax.core.Tracer) or isinstance(where, jax.core.Tracer):
        return
    if where is not None:
        labels = np.asarray(labels)[np.asarray(where)]
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= logits.shape[-1]:
            raise ValueError(
                f"{fn}: labels must lie in [0, {logits.shape[-1]}) (C = logits.shape[-1]); "
                f"found min {low}, max {high}."
            )


def _check_noise(fn: str, logits, log_noise_probs) -> None:
    if log_noise_probs is not None and tuple(log_noise_probs.shape) != (logits.shape[-1],):
        raise ValueError(
            f"{fn}: log_noise_probs must have shape [C] = ({logits.shape[-1]},) to match logits "
            f"{tuple(logits.shape)}; got {tuple(log_noise_probs.shape)}."
        )


def _checked_scores(
    fn: str, logits, operand, kind: str, log_noise_probs, temperature, where, axis_name
) -> tuple[Optional[Array], Array]:
    """The argument checks of the InfoNCE-type loss ``fn``, its row mask and scores ``s = z / t - log(eta)``.

    ``kind`` (``'targets'``, ``'labels'`` or ``'structured'``) says what ``operand`` is; its shapes, the
    mask and the noise distribution are checked, then the value checks run if :func:`debug_checks` is on.
    The masked rows of the scores are those of zero logits (their gradient is exactly 0).
    """
    where = _check_where(fn, logits, where)
    _SHAPE_CHECKS[kind](fn, logits, operand, where)
    _check_noise(fn, logits, log_noise_probs)
    _value_checks(fn, logits, where, axis_name, log_noise_probs=log_noise_probs, **{kind: operand})
    return where, _scaled_scores(_mask_rows(where, logits), log_noise_probs, temperature)


# --------------------------------------------------------------------------------------------------
# Value checks under jit (off by default), with jax.experimental.checkify.
# --------------------------------------------------------------------------------------------------

_DEBUG_CHECKS: Optional[dict] = None  # None: off; else the settings of the active debug_checks


class debug_checks:  # lower case: used like a function (``with debug_checks():``)
    """Turns the losses' value checks on (or off) for the functions traced meanwhile; off by default.

    Under ``jit`` a loss cannot raise on values: an out-of-range label silently gives NaN and a target row
    that is not a distribution passes. With the checks on, every loss traced adds
    ``jax.experimental.checkify`` checks, on the rows where ``where`` is True, that

    * the logits are finite;
    * the labels lie in ``[0, C)``;
    * the targets are finite, non-negative and every row sums to 1 within ``atol`` (structured targets:
      class ids in ``[0, C)``, weights and uniform mass finite and non-negative, ``sum_k w + u = 1``);
    * ``log_noise_probs`` is finite.

    A failed check names the first offending row (under ``axis_name`` its global index
    ``i + N * axis_index``), e.g. ``soft_target_infonce: targets row 3 sums to 0.7, not 1 (atol=0.0001)``.
    The checks are ``checkify.debug_check`` calls: they run where ``checkify.checkify`` functionalises the
    traced function and are dropped otherwise (compiled away, no error). :func:`checked` turns them on and
    checkifies for you. In your own step::

        from jax.experimental import checkify
        with losses.debug_checks():
            err, out = jax.jit(checkify.checkify(step, errors=checkify.user_checks))(params, batch)
        err.throw()  # checkify.JaxRuntimeError (a ValueError) naming the loss and the row

    Use it as a context manager, or call it to set the switch (``debug_checks(False)`` turns it off).
    Off (the default), nothing is added to the traced program: values and speed are exactly those without
    it. The eager checks (shapes, concrete labels, :func:`validate_targets`) do not depend on it. The
    switch acts at trace time, and JAX reuses the trace of a function it has traced before for the same
    shapes (``jax.jit(f)``, ``checkify.checkify(jax.jit(f))`` and ``jax.make_jaxpr(f)`` share it): checkify
    the plain step function (as above) rather than a jitted one traced earlier with the checks off, or call
    ``jax.clear_caches()`` first.

    Args:
      enabled: turn the checks on (default) or off.
      atol: tolerance of the target row sums; ``None``: ``1e-4``, or 4 ulps of 1 in the targets' dtype if
        that is larger (bfloat16: 0.03).
    """

    def __init__(self, enabled: bool = True, *, atol: Optional[float] = None):
        global _DEBUG_CHECKS
        self._previous = _DEBUG_CHECKS
        _DEBUG_CHECKS = dict(atol=atol) if enabled else None

    def __enter__(self) -> "debug_checks":
        return self

    def __exit__(self, *exc) -> None:
        global _DEBUG_CHECKS
        _DEBUG_CHECKS = self._previous


def checked(fn: Callable, *, jit: bool = True, atol: Optional[float] = None) -> Callable:
    """``fn`` with the losses' value checks on (:func:`debug_checks`): bad values raise, naming the row.

    Calling the result traces ``fn`` with the checks on, functionalised by
    ``checkify.checkify(fn, errors=checkify.user_checks)`` (only these user checks: no NaN or index
    checks are added to other code), runs it (under ``jax.jit`` unless ``jit=False``), raises
    ``checkify.JaxRuntimeError`` (a ``ValueError``) if a check failed and otherwise returns ``fn``'s
    output. The arguments are traced: bind static options (``temperature``, ``axis_name``, ...) with
    ``functools.partial`` or a closure. Call it outside ``jit``; inside one, use :func:`debug_checks` and
    ``checkify.checkify`` around the outermost jitted function instead. For example::

        loss = checked(functools.partial(soft_target_infonce, temperature=0.5))
        loss(logits, targets)  # JaxRuntimeError: soft_target_infonce: targets row 3 sums to 0.7, not 1 ...

    Args:
      fn: any function that calls the losses (a loss, a train or eval step); a plain one, not a jitted
        function already traced with the checks off (JAX would reuse that trace, which has none).
      jit: compile the checked function (once per argument shapes, as ``jax.jit``).
      atol: as :func:`debug_checks`.
    """
    checkified = checkify.checkify(fn, errors=checkify.user_checks)
    if jit:
        checkified = jax.jit(checkified)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with debug_checks(True, atol=atol):
            err, out = checkified(*args, **kwargs)
        err.throw()
        return out

    return run


def _first_bad_row(fn: str, bad: Array, offset, message: str, **per_row: Array) -> None:
    """``checkify.debug_check`` that no entry of ``bad`` ``[N]`` is True; the message names the first such row.

    ``message`` formats ``{row}`` (``offset`` plus the local index) and the ``per_row`` ``[N]`` values.
    """
    i = jnp.argmax(bad)
    message = f"{fn}: {message}"
    checkify.debug_check(~jnp.any(bad), message, row=offset + i, **{k: v[i] for k, v in per_row.items()})


def _entries_check(fn: str, name: str, x: Array, valid: Array, offset) -> None:
    """Rows of ``x`` ``[N, K]`` (float) with a non-finite or a negative entry fail."""
    for bad_entry, what in ((~jnp.isfinite(x), "a non-finite"), (x < 0, "a negative")):
        col = jnp.argmax(bad_entry, axis=1)
        value = jnp.take_along_axis(x, col[:, None], axis=1)[:, 0]
        message = f"{name} row {{row}} has {what} entry {{value:.6g}} (column {{col}})"
        _first_bad_row(fn, valid & bad_entry.any(axis=1), offset, message, value=value, col=col)


def _sum_check(fn: str, name: str, total: Array, valid: Array, offset, dtype) -> None:
    """Rows whose sum ``total`` ``[N]`` is not 1 within the tolerance fail."""
    atol = _DEBUG_CHECKS["atol"]
    if atol is None:
        atol = max(1e-4, 4 * float(jnp.finfo(dtype).eps)) if jnp.issubdtype(dtype, jnp.floating) else 1e-4
    bad = valid & ~(jnp.abs(total - 1) <= atol)
    message = f"{name} row {{row}} sums to {{total:.6g}}, not 1 (atol={atol:g}); soft targets must be distributions"
    _first_bad_row(fn, bad, offset, message, total=total)


def _value_checks(
    fn: str, logits, where: Optional[Array], axis_name: Optional[str], *, labels=None, targets=None,
    structured: Optional[StructuredTargets] = None, log_noise_probs=None,
) -> None:
    """The value checks of loss ``fn`` on its valid rows, if :func:`debug_checks` is on; else nothing."""
    if _DEBUG_CHECKS is None:
        return
    n, num_classes = logits.shape
    valid = jnp.ones((n,), jnp.bool_) if where is None else where
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
    wide = jnp.promote_types(logits.dtype, jnp.float32)
    z = jnp.asarray(logits).astype(wide)
    nonfinite = ~jnp.isfinite(z)
    col = jnp.argmax(nonfinite, axis=1)
    _first_bad_row(
        fn, valid & nonfinite.any(axis=1), offset, "logits row {row} has a non-finite entry {value:.6g} (class {col})",
        value=jnp.take_along_axis(z, col[:, None], axis=1)[:, 0], col=col,
    )
    if log_noise_probs is not None:
        log_eta = jnp.asarray(log_noise_probs).astype(wide)
        c = jnp.argmax(~jnp.isfinite(log_eta))
        checkify.debug_check(
            jnp.all(jnp.isfinite(log_eta)),
            f"{fn}: log_noise_probs[{{c}}] is {{value:.6g}}, not finite (a class with eta = 0? see log_class_prior)",
            c=c, value=log_eta[c],
        )
    range_message = f"row {{row}} is {{value}}, not in [0, {num_classes})"
    if labels is not None:
        labels = jnp.asarray(labels)
        outside = (labels < 0) | (labels >= num_classes)
        _first_bad_row(fn, valid & outside, offset, "labels " + range_message, value=labels)
    if targets is not None:
        targets = jnp.asarray(targets)
        a = targets.astype(jnp.promote_types(targets.dtype, jnp.float32))
        _entries_check(fn, "targets", a, valid, offset)
        _sum_check(fn, "targets", a.sum(axis=1), valid, offset, targets.dtype)
    if structured is not None:
        ids, weights, uniform = (jnp.asarray(x) for x in structured)
        outside = (ids < 0) | (ids >= num_classes)
        col = jnp.argmax(outside, axis=1)
        _first_bad_row(
            fn, valid & outside.any(axis=1), offset, "structured targets class_ids " + range_message,
            value=jnp.take_along_axis(ids, col[:, None], axis=1)[:, 0],
        )
        mass = jnp.concatenate([weights, uniform[:, None]], axis=1)
        mass = mass.astype(jnp.promote_types(mass.dtype, jnp.float32))
        _entries_check(fn, "structured targets (weights, uniform)", mass, valid, offset)
        _sum_check(fn, "structured targets", mass.sum(axis=1), valid, offset, weights.dtype)


def validate_targets(targets, *, atol: float = 1e-4) -> None:
    """Host-side check that every row of ``targets`` ``[N, C]`` is a probability distribution.

    Raises ``ValueError`` naming the first offending row if an entry is non-finite or negative, or a
    row does not sum to 1 within ``atol``. Call it on data before training (not inside ``jit``; there,
    see :func:`debug_checks`).
    """
    t = np.asarray(targets, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"targets must have shape [N, C], got shape {t.shape}.")
    bad = ~np.isfinite(t).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"targets row {i} has non-finite entries: {t[i].tolist()}.")
    bad = (t < 0).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"targets row {i} has negative entries: {t[i].tolist()}.")
    sums = t.sum(axis=1)
    bad = np.abs(sums - 1.0) > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"targets row {i} sums to {sums[i]:.6g}, not 1 (atol={atol}): {t[i].tolist()}. "
            "Soft targets must be probability distributions; normalise the rows."
        )


def log_class_prior(labels, num_classes: int, *, smoothing: float = 0.0) -> Array:
    """Log of the training-label frequencies, the noise distribution ``eta`` of (ST-)InfoNCE.

    ``eta[c] = (count[c] + smoothing) / (num_examples + num_classes * smoothing)``.

    Args:
      labels: integer labels ``[num_examples]`` of the whole training set (host array).
      num_classes: ``C``.
      smoothing: additive (Laplace) smoothing of the counts. With the default 0 a class with no
        example makes ``log(eta)`` infinite, which is an error; set ``smoothing > 0`` to allow it.

    Returns:
      ``log(eta)``, float32 ``[C]``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}); found min {labels.min()}, max {labels.max()}."
        )
    counts = np.bincount(labels, minlength=num_classes)
    return log_prior_from_mass(counts, smoothing=smoothing)


def log_prior_from_mass(mass, *, smoothing: float = 0.0, what: str = "training examples") -> Array:
    """``log(eta)`` from per-class mass: label counts, or the per-class sums of soft targets.

    ``eta[c] = (mass[c] + smoothing) / (sum(mass) + C * smoothing)``.

    Args:
      mass: non-negative ``[C]`` (host array).
      smoothing: additive (Laplace) smoothing. With the default 0 a class without mass makes
        ``log(eta)`` infinite, which is an error; set ``smoothing > 0`` to allow it.
      what: what ``mass`` counts, for the error message.

    Returns:
      ``log(eta)``, float32 ``[C]``.
    """
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}.")
    mass = np.asarray(mass, np.float64)
    empty = np.flatnonzero(mass <= 0)
    if smoothing == 0 and empty.size:
        raise ValueError(
            f"class prior: {empty.size} class(es) have zero {what} (classes "
            f"{empty[:20].tolist()}{'...' if empty.size > 20 else ''}), so log(eta) would be -inf. "
            "Check num_classes and the data, or pass smoothing > 0 (e.g. 1.0) to smooth the counts."
        )
    probs = (mass + smoothing) / (mass.sum() + mass.size * smoothing)
    return jnp.asarray(np.log(probs), dtype=jnp.float32)


# --------------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------------


def _scaled_scores(logits, log_noise_probs, temperature) -> Array:
    """``s = z / t - log(eta)`` in at least float32, ``[N, C]``."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    s = logits.astype(dtype) / temperature
    if log_noise_probs is not None:
        s = s - log_noise_probs.astype(dtype)
    return s


def _gather_over_devices(x: Array, axis_name: Optional[str]) -> tuple[Array, Array]:
    """All-gathers ``x`` ``[N, ...]`` to ``[M, ...]``; returns it and the global row offset."""
    if axis_name is None:
        return x, jnp.zeros((), jnp.int32)
    gathered = jax.lax.all_gather(x, axis_name, tiled=True)
    return gathered, jax.lax.axis_index(axis_name) * x.shape[0]


def _gather_mask(where: Optional[Array], axis_name: Optional[str]) -> Optional[Array]:
    """The row mask of the global batch ``[M]`` (gathered as the targets are), or ``None``."""
    return None if where is None else _gather_over_devices(where, axis_name)[0]


def _contrastive_loss(
    scores: Array, offset: Array, where: Optional[Array] = None, all_where: Optional[Array] = None
) -> Array:
    """``logsumexp_j S[i, j] - S[i, i + offset]`` for scores ``[N, M]``.

    With the row masks ``where`` ``[N]`` (this device) and ``all_where`` ``[M]`` (gathered), the masked
    columns score ``-inf`` in the valid rows (no row's candidate; a valid row keeps its own column, so the
    logsumexp stays finite), the masked rows keep their finite scores and get loss 0 (zero gradient).
    """
    if where is not None:
        scores = jnp.where(all_where[None, :] | ~where[:, None], scores, -jnp.inf)
    n = scores.shape[0]
    positive_col = jnp.arange(n) + offset
    positive = jnp.take_along_axis(scores, positive_col[:, None], axis=1)[:, 0]
    return _mask_loss(where, jax.nn.logsumexp(scores, axis=1) - positive)


def soft_target_infonce(
    logits: Array, targets: Array, *, log_noise_probs: Optional[Array] = None, temperature: float = 1.0,
    axis_name: Optional[str] = None, where: Optional[Array] = None,
) -> Array:
    """Soft target InfoNCE (STI), per example.

    ``s = z / t - log(eta)``; ``S = s @ A^T`` with ``A`` the ``[M, C]`` targets of the global batch;
    ``L_i = logsumexp_j S[i, j] - S[i, i + N * device]``, the ``j`` running over the valid columns
    (``where`` gathered over devices) and ``L_i = 0`` for a masked row ``i``. Cost ``O(N M C)`` flops,
    ``O(N M)`` memory.

    Args:
      logits: ``[N, C]`` classifier outputs on this device.
      targets: ``[N, C]`` soft targets (rows on the simplex; see :func:`validate_targets`). They are
        treated as constants (no gradient flows into them).
      log_noise_probs: ``log(eta)``, ``[C]``; ``None`` means uniform ``eta`` (which cancels).
      temperature: ``t``, divides the logits before ``log(eta)`` is subtracted.
      axis_name: mapped axis to gather the targets over (inside ``shard_map``/``pmap``); ``None`` uses
        this batch only.
      where: bool ``[N]`` row mask, ``None`` = all rows valid. A row where it is False (padding, say;
        it may hold any values) gets loss 0 and zero gradient and is no candidate of any row on any
        device: the valid rows get the losses of the batch with the masked rows dropped.

    Returns:
      ``[N]`` float32 losses.

    >>> z = jnp.array([[2.0, 0.0], [0.0, 1.0]]); a = jnp.array([[0.9, 0.1], [0.2, 0.8]])
    >>> np.round(np.asarray(soft_target_infonce(z, a)), 4)
    array([0.2204, 0.4032], dtype=float32)
    >>> np.asarray(soft_target_infonce(z, a, where=jnp.array([True, False])))  # one candidate left
    array([0., 0.], dtype=float32)
    """
    fn = "soft_target_infonce"
    where, s = _checked_scores(fn, logits, targets, "targets", log_noise_probs, temperature, where, axis_name)
    own_targets = _mask_rows(where, jax.lax.stop_gradient(targets).astype(s.dtype))
    all_targets, offset = _gather_over_devices(own_targets, axis_name)
    scores = s @ all_targets.T
    return _contrastive_loss(scores, offset, where, _gather_mask(where, axis_name))


def infonce(
    logits: Array, labels: Array, *, log_noise_probs: Optional[Array] = None, temperature: float = 1.0,
    axis_name: Optional[str] = None, where: Optional[Array] = None,
) -> Array:
    """Hard InfoNCE: :func:`soft_target_infonce` with ``a = one_hot(y)``, per example.

    ``S[i, j] = s_i[y_j]`` is a gather (``O(N M)``, no matmul); duplicate classes in the batch stay
    separate candidates. Args as :func:`soft_target_infonce`, with integer ``labels`` ``[N]``; with
    ``where``, ``j`` runs over the valid columns only and masked rows (whose labels may be anything,
    e.g. ``-1``) get loss 0.
    """
    where, s = _checked_scores("infonce", logits, labels, "labels", log_noise_probs, temperature, where, axis_name)
    all_labels, offset = _gather_over_devices(_mask_rows(where, labels), axis_name)
    scores = jnp.take(s, all_labels, axis=1)
    return _contrastive_loss(scores, offset, where, _gather_mask(where, axis_name))


def soft_target_cross_entropy(
    logits: Array, targets: Array, *, temperature: float = 1.0, where: Optional[Array] = None
) -> Array:
    """Soft-target cross-entropy ``L_i = -sum_c a_i[c] log_softmax(z_i / t)[c]``, ``[N]``.

    ``where``: bool ``[N]`` row mask (``None``: all valid); masked rows get loss 0 and zero gradient.
    (It masks rows, unlike the class mask ``where`` of ``optax.losses.softmax_cross_entropy``.)
    """
    fn = "soft_target_cross_entropy"
    where = _check_where(fn, logits, where)
    _check_targets(fn, logits, targets)
    _value_checks(fn, logits, where, None, targets=targets)
    s = _scaled_scores(_mask_rows(where, logits), None, temperature)
    loss = optax.losses.softmax_cross_entropy(s, _mask_rows(where, targets.astype(s.dtype)))
    return _mask_loss(where, loss)


def nll(logits: Array, labels: Array, *, temperature: float = 1.0, where: Optional[Array] = None) -> Array:
    """Hard cross-entropy (negative log-likelihood) ``L_i = -log_softmax(z_i / t)[y_i]``, ``[N]``.

    ``where``: bool ``[N]`` row mask (``None``: all valid); masked rows (whose labels may be anything,
    e.g. ``-1``) get loss 0 and zero gradient.
    """
    where = _check_where("nll", logits, where)
    _check_labels("nll", logits, labels, where)
    _value_checks("nll", logits, where, None, labels=labels)
    s = _scaled_scores(_mask_rows(where, logits), None, temperature)
    return _mask_loss(where, optax.losses.softmax_cross_entropy_with_integer_labels(s, _mask_rows(where, labels)))


def sample_hard_labels(rng: Array, targets: Array) -> Array:
    """Draws ``y_i ~ Categorical(a_i)`` for targets ``[N, C]``; returns int32 ``[N]``.

    Inside ``shard_map`` a key that is the same on every device (not varying over the mesh axes the
    targets vary over) is cast to varying first, as newer jax requires: every device then draws with
    that same key, as it does with older jax.
    """
    log_a = jnp.log(jnp.clip(targets.astype(jnp.float32), 0.0, None))
    return jax.random.categorical(_varying_like(rng, log_a), log_a, axis=-1).astype(jnp.int32)


def _varying_axes(x: Array) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside; ``.vma`` in older jax)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _varying_like(value: Array, like: Array) -> Array:
    """``value`` cast to vary over the mesh axes that ``like`` varies over inside ``shard_map`` (else unchanged)."""
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(value)))
    if not missing or not hasattr(jax.lax, "pcast"):  # jax without pcast does not ask for the cast either
        return value
    return jax.lax.pcast(value, missing, to="varying")


def soft_distribution_infonce(
    logits: Array, targets: Array, rng: Array, *, log_noise_probs: Optional[Array] = None,
    temperature: float = 1.0, axis_name: Optional[str] = None, rng_per_device: bool = False,
    where: Optional[Array] = None,
) -> Array:
    """Soft distribution InfoNCE (sampled): hard :func:`infonce` on ``y_i ~ Categorical(a_i)``.

    The principled form of the paper's baseline that trains hard InfoNCE on soft-target data. With
    ``axis_name`` set, ``rng`` is folded with the device index, so every device may pass the same key
    and still draws independent labels; ``rng_per_device=True`` says that ``rng`` already differs
    per device (as the trainer's ``LossInputs.rng`` does) and leaves it as it is. (The reference's
    own variant keeps each sample's pre-mix label; it is registered as
    ``soft_distribution_infonce_premix``.) ``where`` as :func:`infonce`: masked rows are neither scored
    nor candidates, and the valid rows draw the labels they would draw without it.
    """
    fn = "soft_distribution_infonce"
    where = _check_where(fn, logits, where)
    _check_targets(fn, logits, targets)
    _value_checks(fn, logits, where, axis_name, targets=targets)
    if axis_name is not None and not rng_per_device:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    labels = sample_hard_labels(rng, _mask_rows(where, targets))
    return infonce(
        logits, labels, log_noise_probs=log_noise_probs, temperature=temperature, axis_name=axis_name, where=where
    )


def soft_distribution_cross_entropy(
    logits: Array, targets: Array, rng: Array, *, temperature: float = 1.0, where: Optional[Array] = None
) -> Array:
    """Cross-entropy on sampled hard labels: :func:`nll` on ``y_i ~ Categorical(a_i)``, ``[N]``.

    In expectation over the draw it is :func:`soft_target_cross_entropy` (``E_y[-log p_y] = -sum_c a_c log
    p_c``), so on mixed inputs it separates the effect of input mixing (the inputs are mixed either way)
    from that of training on soft targets (here each example sees one hard label a step). ``rng``: the
    draw's key (the trainer's ``LossInputs.rng`` differs per device and per step). ``where`` as :func:`nll`.
    """
    fn = "soft_distribution_cross_entropy"
    where = _check_where(fn, logits, where)
    _check_targets(fn, logits, targets)
    _value_checks(fn, logits, where, None, targets=targets)
    return nll(logits, sample_hard_labels(rng, _mask_rows(where, targets)), temperature=temperature, where=where)


def _check_structured(fn: str, logits, targets: StructuredTargets, where=None) -> None:
    _check_logits(fn, logits)
    n = logits.shape[0]
    ids, weights, uniform = targets
    if ids.ndim != 2 or ids.shape[0] != n or weights.shape != ids.shape or uniform.shape != (n,):
        raise ValueError(
            f"{fn}: structured targets must have class_ids [N, k], weights [N, k] and uniform [N] with "
            f"N = {n} (logits {tuple(logits.shape)}); got class_ids {tuple(ids.shape)}, weights "
            f"{tuple(weights.shape)}, uniform {tuple(uniform.shape)}."
        )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{fn}: class_ids must be integer class indices, got dtype {ids.dtype}.")


_SHAPE_CHECKS = {"targets": _check_targets, "labels": _check_labels, "structured": _check_structured}


def structured_soft_target_infonce(
    logits: Array, targets: StructuredTargets, *, log_noise_probs: Optional[Array] = None, temperature: float = 1.0,
    axis_name: Optional[str] = None, where: Optional[Array] = None,
) -> Array:
    """Soft target InfoNCE on structured targets (sparse classes plus a uniform mass), per example.

    Same value as :func:`soft_target_infonce` on ``a = softnce.targets.to_dense(targets, C)``, with
    ``a_j = sum_k w[j, k] one_hot(c[j, k]) + u_j / C``, computed by gathers::

        S[i, j] = sum_k w[j, k] s_i[c[j, k]] + u_j * mean_c s_i[c]

    Cost ``O(N M k + N C)`` flops and ``O(N M)`` memory; across devices only ``class_ids``,
    ``weights`` and ``uniform`` are all-gathered (``O(M k)`` communication instead of ``O(M C)``),
    without gradient. The positive of local row ``i`` is global column ``i + N * axis_index``; with
    ``where`` (gathered too) ``j`` runs over the valid columns only.

    Args:
      logits: ``[N, C]`` classifier outputs on this device.
      targets: :class:`softnce.targets.StructuredTargets` with ``[N, k]`` class ids and weights and
        ``[N]`` uniform mass (made by ``softnce.targets.mix_batch`` with ``structured=True``).
      log_noise_probs, temperature, axis_name, where: as :func:`soft_target_infonce`.

    Returns:
      ``[N]`` float32 losses.
    """
    fn = "structured_soft_target_infonce"
    where, s = _checked_scores(fn, logits, targets, "structured", log_noise_probs, temperature, where, axis_name)

    def constant(x):
        return _mask_rows(where, jax.lax.stop_gradient(x).astype(s.dtype))

    class_ids, offset = _gather_over_devices(_mask_rows(where, targets.class_ids), axis_name)
    weights, _ = _gather_over_devices(constant(targets.weights), axis_name)
    uniform, _ = _gather_over_devices(constant(targets.uniform), axis_name)
    m, k = class_ids.shape
    picked = _gather_columns(s, class_ids.reshape(-1)).reshape(s.shape[0], m, k)  # s_i[c[j, k]]
    scores = jnp.sum(picked * weights[None], axis=2) + jnp.mean(s, axis=1, keepdims=True) * uniform[None, :]
    # Materialise S before the logsumexp: fusing the gather into its reductions re-reads s at random.
    return _contrastive_loss(jax.lax.optimization_barrier(scores), offset, where, _gather_mask(where, axis_name))


@jax.custom_vjp
def _gather_columns(s: Array, columns: Array) -> Array:
    """``s[:, columns]`` ``[N, K]``, materialised; its gradient is a row scatter on the transpose.

    Autodiff of a column gather scatters ``N K`` single elements into ``[N, C]`` with strided
    access, which is several times slower on CPU than adding ``K`` contiguous rows of length ``N``
    into ``[C, N]`` and transposing once.
    """
    return jax.lax.optimization_barrier(jnp.take(s, columns, axis=1))


def _gather_columns_fwd(s, columns):
    return _gather_columns(s, columns), (columns, s.shape[1])


def _gather_columns_bwd(residual, grad):
    columns, num_columns = residual
    grad_t = jnp.zeros((num_columns, grad.shape[0]), grad.dtype).at[columns].add(grad.T)
    return jax.lax.optimization_barrier(grad_t).T, None


_gather_columns.defvjp(_gather_columns_fwd, _gather_columns_bwd)


BLOCKWISE_BLOCK_SIZE = 1024
"""Candidate block size of the registered ``soft_target_infonce_blockwise`` loss."""


def _streaming_logsumexp(
    s: Array, candidates: Array, block_size: int, where: Optional[Array] = None, all_where: Optional[Array] = None
) -> Array:
    """``logsumexp_j (s @ candidates^T)[:, j]`` ``[N]`` over blocks of candidates ``[M, C]``.

    A scan over ``ceil(M / block)`` blocks keeps a running max and a running sum of
    ``exp(score - max)``; padded columns score ``-inf``. The step is rematerialised in the
    backward pass, so forward and backward hold ``O(N * block)`` scores, never ``[N, M]``.
    With row masks (as :func:`_contrastive_loss`) masked columns also score ``-inf`` in the valid
    rows, and the masked rows keep all their (finite) scores.
    """
    m, c = candidates.shape
    block = min(block_size, m)
    num_blocks = -(-m // block)
    padded = jnp.pad(candidates, ((0, num_blocks * block - m), (0, 0))).reshape(num_blocks, block, c)
    columns = jnp.arange(num_blocks * block) < m
    if all_where is not None:
        columns = columns & jnp.pad(all_where, (0, num_blocks * block - m))
    valid = columns.reshape(num_blocks, block)

    @jax.checkpoint
    def step(carry, xs):
        running_max, running_sum = carry
        block_candidates, block_valid = xs
        keep = block_valid[None, :] if where is None else block_valid[None, :] | ~where[:, None]
        scores = jnp.where(keep, s @ block_candidates.T, -jnp.inf)
        # The max only stabilises exp; logsumexp does not depend on it, so no gradient through it.
        new_max = jnp.maximum(running_max, jax.lax.stop_gradient(scores.max(axis=1)))
        shift = new_max
        if where is not None:  # a valid row may see only masked columns so far: max -inf, sum 0
            shift = jnp.where(new_max == -jnp.inf, jnp.zeros((), new_max.dtype), new_max)
        new_sum = running_sum * jnp.exp(running_max - shift) + jnp.exp(scores - shift[:, None]).sum(axis=1)
        return (new_max, new_sum), None

    # *_like keeps the device-varying type of s inside shard_map (scan needs matching carry types).
    init = (jnp.full_like(s[:, 0], -jnp.inf), jnp.zeros_like(s[:, 0]))
    (final_max, final_sum), _ = jax.lax.scan(step, init, (padded, valid))
    return final_max + jnp.log(final_sum)


def blockwise_soft_target_infonce(
    logits: Array, targets: Array, *, log_noise_probs: Optional[Array] = None, temperature: float = 1.0,
    axis_name: Optional[str] = None, block_size: int = BLOCKWISE_BLOCK_SIZE, where: Optional[Array] = None,
) -> Array:
    """:func:`soft_target_infonce` with memory bounded by ``O(N * block_size)``, per example.

    ``L_i = logsumexp_j S[i, j] - S[i, i + N * device]`` with the logsumexp streamed over blocks of
    ``block_size`` gathered targets (online max and sum, rematerialised in the backward pass) and
    the positive ``S[i, i + N * device] = s_i . a_i`` taken from the row's own (local) target. Same
    values and gradients as the dense form; ``M`` need not be a multiple of ``block_size``. With
    ``where`` the masked columns are left out of every block (``j`` over the valid columns only).

    Args:
      logits, targets, log_noise_probs, temperature, axis_name, where: as :func:`soft_target_infonce`.
      block_size: candidates scored at once (``min(block_size, M)`` is used).

    Returns:
      ``[N]`` float32 losses.
    """
    fn = "blockwise_soft_target_infonce"
    where, s = _checked_scores(fn, logits, targets, "targets", log_noise_probs, temperature, where, axis_name)
    if int(block_size) < 1:
        raise ValueError(f"{fn}: block_size must be a positive integer, got {block_size}.")
    own_targets = _mask_rows(where, jax.lax.stop_gradient(targets).astype(s.dtype))
    all_targets, _ = _gather_over_devices(own_targets, axis_name)
    positive = jnp.sum(s * own_targets, axis=1)
    lse = _streaming_logsumexp(s, all_targets, int(block_size), where, _gather_mask(where, axis_name))
    return _mask_loss(where, lse - positive)


# --------------------------------------------------------------------------------------------------
# Registry: config name -> loss.
# --------------------------------------------------------------------------------------------------


class LossInputs(NamedTuple):
    """Everything a registered loss may use besides the logits (per device).

    Attributes:
      targets: ``[N, C]`` soft targets after label smoothing and MixUp/CutMix (``one_hot(labels)``
        when augmentation is off).
      labels: ``[N]`` int hard labels (for mixed batches: each sample's own pre-mix label).
      rng: PRNG key for losses that sample (already distinct per device).
      log_noise_probs: ``log(eta)`` ``[C]`` or ``None`` (uniform).
      temperature: ``t``.
      axis_name: the data-parallel axis name, or ``None`` on a single device.
      structured_targets: the same targets as ``targets`` in structured form (per-row class indices
        and weights plus a uniform mass), when the augmentation produced them; losses that can use
        them (STI) then avoid the dense ``[M, C]`` gather. ``None`` otherwise.
      where: bool ``[N]`` row mask or ``None`` (all rows valid). Masked rows must get loss 0 and, in the
        contrastive losses, be no candidates (the package's entries pass it to their functions; a user
        loss that ignores it does not mask).
    """

    targets: Array
    labels: Array
    rng: Array
    log_noise_probs: Optional[Array] = None
    temperature: float = 1.0
    axis_name: Optional[str] = None
    structured_targets: Optional[object] = None
    where: Optional[Array] = None

    @property
    def contrastive_options(self) -> dict:
        """The keyword arguments of the InfoNCE-type losses: prior, temperature, mesh axis and row mask."""
        return dict(
            log_noise_probs=self.log_noise_probs, temperature=self.temperature, axis_name=self.axis_name,
            where=self.where,
        )


LossFn = Callable[[Array, LossInputs], Array]

SHARED_FIELDS = ("name", "temperature", "noise", "prior_smoothing", "noise_probs")
"""The fields of ``config.loss`` that every loss has (read by the trainer: the temperature and the noise
distribution reach a loss through :class:`LossInputs`)."""


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A registry entry: the loss, whether it uses the noise distribution ``eta`` and whether it reads only the hard
    labels (``inputs.labels``; then soft targets, from a recipe or a teacher, do not enter it)."""

    name: str
    fn: LossFn
    uses_noise: bool
    reads_labels_only: bool = False

    @property
    def fields(self) -> dict:
        """``{field: default}`` of the loss's keyword-only parameters: its fields ``config.loss.<field>``."""
        return keyword_fields(self.fn, positional=2, keyword_only=True)

    def bind(self, loss_config) -> LossFn:
        """``fn(logits, inputs)`` with the loss's fields set from ``loss_config`` (``config.loss``; a field
        it does not set keeps the parameter's default)."""
        values = {field: loss_config[field] for field in self.fields if field in loss_config}
        return functools.partial(self.fn, **values) if values else self.fn


LOSSES: Registry[LossSpec] = Registry("loss", "losses", fields_of=lambda spec: spec.fields)


def register_loss(name: str, fn: Optional[LossFn] = None, *, uses_noise: bool = False,
                  reads_labels_only: bool = False, ranges: Optional[dict] = None, overwrite: bool = False):
    """Registers ``fn(logits, inputs: LossInputs, *, **fields) -> [N]`` as ``config.loss.name = name``.

    Returns ``fn``; without it, a decorator. ``uses_noise``: the trainer computes ``log(eta)``
    for it (``inputs.log_noise_probs``). ``reads_labels_only``: the loss reads the hard labels and not
    the soft targets (the trainer says so when a teacher is given). The keyword-only parameters of
    ``fn`` are the loss's config fields (``def focal(logits, inputs, *, gamma=2.0)``:
    ``config.loss.gamma``, or ``--config.loss.gamma=1.5`` once the loss is named); ``ranges``
    ``{field: softnce.config_checks.Range}`` declares their valid values (without, any finite number).
    A taken name is an error unless ``overwrite``.
    """

    def register(fn: LossFn) -> LossFn:
        spec = LossSpec(name=name, fn=fn, uses_noise=uses_noise, reads_labels_only=reads_labels_only)
        LOSSES.register(name, spec, overwrite=overwrite, ranges=ranges)
        return fn

    return register if fn is None else register(fn)


def get_loss(name: str) -> LossSpec:
    """Returns the registered loss ``name``; an unknown name lists the valid ones."""
    return LOSSES.get(name)


@register_loss("nll", reads_labels_only=True)
def _nll(logits, inputs: LossInputs):
    return nll(logits, inputs.labels, temperature=inputs.temperature, where=inputs.where)


@register_loss("soft_target_cross_entropy")
def _soft_ce(logits, inputs: LossInputs):
    return soft_target_cross_entropy(logits, inputs.targets, temperature=inputs.temperature, where=inputs.where)


@register_loss("infonce", uses_noise=True, reads_labels_only=True)
def _infonce(logits, inputs: LossInputs):
    return infonce(logits, inputs.labels, **inputs.contrastive_options)


@register_loss("soft_target_infonce", uses_noise=True)
def _sti(logits, inputs: LossInputs):
    # Structured targets (from MixUp/CutMix) give the same values with O(M k) communication.
    if inputs.structured_targets is not None:
        return structured_soft_target_infonce(logits, inputs.structured_targets, **inputs.contrastive_options)
    return soft_target_infonce(logits, inputs.targets, **inputs.contrastive_options)


@register_loss("soft_target_infonce_blockwise", uses_noise=True)
def _sti_blockwise(logits, inputs: LossInputs):
    # Dense STI with O(N * BLOCKWISE_BLOCK_SIZE) memory (set the module constant to change the block).
    return blockwise_soft_target_infonce(
        logits, inputs.targets, block_size=BLOCKWISE_BLOCK_SIZE, **inputs.contrastive_options
    )


@register_loss("soft_distribution_infonce", uses_noise=True)
def _sampled_infonce(logits, inputs: LossInputs):
    # inputs.rng is already distinct per device, so no further fold-in.
    return soft_distribution_infonce(
        logits, inputs.targets, inputs.rng, rng_per_device=True, **inputs.contrastive_options
    )


@register_loss("soft_distribution_cross_entropy")
def _sampled_cross_entropy(logits, inputs: LossInputs):
    return soft_distribution_cross_entropy(logits, inputs.targets, inputs.rng, temperature=inputs.temperature,
                                           where=inputs.where)


@register_loss("soft_distribution_infonce_premix", uses_noise=True, reads_labels_only=True)
def _premix_infonce(logits, inputs: LossInputs):
    # The reference's variant: hard InfoNCE on each sample's own label from before MixUp/CutMix.
    return _infonce(logits, inputs)
