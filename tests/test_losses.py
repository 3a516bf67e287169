"""Tests of softnce.losses against an independent float64 numpy reference and the properties of docs/method.md.

The numpy reference builds the reference code's ``[N, M, C]`` broadcast tensor (docs/method.md property 1:
the library's matrix form must give the same numbers). JAX runs in float32; tolerances are set for
float32 arithmetic on O(1)-O(10) scores.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softnce import losses
from softnce.losses import (
    LossInputs,
    infonce,
    log_class_prior,
    nll,
    sample_hard_labels,
    soft_distribution_infonce,
    soft_target_cross_entropy,
    soft_target_infonce,
    validate_targets,
)

N, C = 6, 5
TEMPERATURE = 0.7
TOL = dict(rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# Independent float64 numpy references.
# --------------------------------------------------------------------------------------------------


def _np_logsumexp(x):
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def _np_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_sti(z, all_targets, log_eta, t, offset=0):
    """Reference STI by the ``[N, M, C]`` broadcast; returns (losses [N], dL_i/dz_i [N, C])."""
    z, a = np.asarray(z, np.float64), np.asarray(all_targets, np.float64)
    s = z / t - (0.0 if log_eta is None else np.asarray(log_eta, np.float64))
    broadcast = s[:, None, :] * a[None, :, :]  # [N, M, C]
    scores = broadcast.sum(axis=-1)  # S[i, j] = a_j . s_i
    n = z.shape[0]
    own = offset + np.arange(n)
    loss = _np_logsumexp(scores) - scores[np.arange(n), own]
    p = _np_softmax(scores)
    dloss_ds = (p[:, :, None] * a[None, :, :]).sum(axis=1) - a[own]  # sum_j p_ij a_j - a_i
    return loss, dloss_ds / t  # s = z / t - log(eta)


def np_soft_ce(z, a, t):
    """Reference soft CE and its gradient: -sum_c a_c log_softmax(z/t)_c, (softmax(z/t) - a) / t."""
    s = np.asarray(z, np.float64) / t
    log_softmax = s - _np_logsumexp(s)[:, None]
    return -(a * log_softmax).sum(axis=1), (_np_softmax(s) - a) / t


def one_hot(labels, num_classes):
    return np.eye(num_classes)[labels]


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(N, C)).astype(np.float32)
    targets = rng.dirichlet(0.5 * np.ones(C), size=N).astype(np.float32)
    eta = rng.dirichlet(np.ones(C))
    labels = rng.integers(0, C, size=N).astype(np.int32)
    return logits, targets, np.log(eta).astype(np.float32), labels


def value_and_grad(loss_fn, logits, jit=False):
    """(per-example losses, gradient of their sum w.r.t. logits) of ``loss_fn(logits)``."""
    grad = jax.grad(lambda z: loss_fn(z).sum())
    if jit:
        loss_fn, grad = jax.jit(loss_fn), jax.jit(grad)
    return np.asarray(loss_fn(logits)), np.asarray(grad(logits))


# --------------------------------------------------------------------------------------------------
# Values and gradients against numpy (property 1: matrix form == broadcast; property 7: gradient).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_sti_matches_numpy_broadcast_reference(batch, jit):
    logits, targets, log_eta, _ = batch
    def fn(z):
        return soft_target_infonce(z, targets, log_noise_probs=log_eta, temperature=TEMPERATURE)

    loss, grad = value_and_grad(fn, logits, jit=jit)
    ref_loss, ref_grad = np_sti(logits, targets, log_eta, TEMPERATURE)
    assert loss.shape == (N,) and loss.dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)


def test_sti_gradient_formula_property_7(batch):
    """dL_i/ds_i = sum_j p_ij a_j - a_i: rows of the gradient sum to 0 (targets on the simplex)."""
    logits, targets, log_eta, _ = batch
    grad = jax.grad(lambda z: soft_target_infonce(z, targets, log_noise_probs=log_eta).sum())(logits)
    scores = (logits - log_eta) @ targets.T
    p = _np_softmax(scores.astype(np.float64))
    np.testing.assert_allclose(grad, p @ targets - targets, **TOL)
    np.testing.assert_allclose(np.asarray(grad).sum(axis=1), 0.0, atol=1e-5)


def test_infonce_equals_one_hot_sti_and_reference(batch):
    logits, _, log_eta, labels = batch
    def fn(z):
        return infonce(z, labels, log_noise_probs=log_eta, temperature=TEMPERATURE)

    loss, grad = value_and_grad(fn, logits)
    ref_loss, ref_grad = np_sti(logits, one_hot(labels, C), log_eta, TEMPERATURE)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)
    sti = soft_target_infonce(
        logits, one_hot(labels, C).astype(np.float32), log_noise_probs=log_eta, temperature=TEMPERATURE
    )
    np.testing.assert_allclose(loss, sti, **TOL)


def test_soft_cross_entropy_and_nll_match_reference(batch):
    logits, targets, _, labels = batch
    loss, grad = value_and_grad(
        lambda z: soft_target_cross_entropy(z, targets, temperature=TEMPERATURE), logits
    )
    ref_loss, ref_grad = np_soft_ce(logits, targets, TEMPERATURE)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)

    loss, grad = value_and_grad(lambda z: nll(z, labels), logits)
    ref_loss, ref_grad = np_soft_ce(logits, one_hot(labels, C), 1.0)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)

    loss, grad = value_and_grad(lambda z: nll(z, labels, temperature=TEMPERATURE), logits)
    ref_loss, ref_grad = np_soft_ce(logits, one_hot(labels, C), TEMPERATURE)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)


def test_docstring_examples():
    assert doctest.testmod(losses).failed == 0


# --------------------------------------------------------------------------------------------------
# Derived properties 2-6 of docs/method.md.
# --------------------------------------------------------------------------------------------------


def test_uniform_eta_cancels_property_2(batch):
    logits, targets, _, _ = batch
    uniform = jnp.full((C,), -np.log(C) + 3.0)  # any constant log(eta), normalised or not
    np.testing.assert_allclose(
        soft_target_infonce(logits, targets, log_noise_probs=uniform, temperature=TEMPERATURE),
        soft_target_infonce(logits, targets, temperature=TEMPERATURE),
        **TOL,
    )


def test_per_row_logit_shift_cancels_property_3(batch):
    logits, targets, log_eta, _ = batch
    shift = np.random.default_rng(1).normal(scale=5.0, size=(N, 1)).astype(np.float32)
    kwargs = dict(log_noise_probs=log_eta, temperature=TEMPERATURE)
    np.testing.assert_allclose(
        soft_target_infonce(logits + shift, targets, **kwargs),
        soft_target_infonce(logits, targets, **kwargs),
        rtol=1e-4,
        atol=1e-4,
    )


def test_per_class_bias_equals_noise_reweighting_property_4(batch):
    """At t = 1 a bias b on the logits equals eta -> eta * exp(-b) (in general exp(-b / t))."""
    logits, targets, log_eta, _ = batch
    bias = np.random.default_rng(2).normal(size=C).astype(np.float32)
    for t in (1.0, TEMPERATURE):
        np.testing.assert_allclose(
            soft_target_infonce(logits + bias, targets, log_noise_probs=log_eta, temperature=t),
            soft_target_infonce(logits, targets, log_noise_probs=log_eta - bias / t, temperature=t),
            **TOL,
        )


def test_label_smoothing_acts_as_temperature_property_5(batch):
    """a = (1-e) one_hot(y) + e/C: STI at temperature t == hard InfoNCE at t / (1-e), uniform eta."""
    logits, _, _, labels = batch
    e = 0.1
    smoothed = optax.smooth_labels(jnp.asarray(one_hot(labels, C), jnp.float32), e)
    np.testing.assert_allclose(smoothed, (1 - e) * one_hot(labels, C) + e / C, atol=1e-7)
    np.testing.assert_allclose(
        soft_target_infonce(logits, smoothed, temperature=TEMPERATURE),
        infonce(logits, labels, temperature=TEMPERATURE / (1 - e)),
        **TOL,
    )


def test_one_hot_limit_infonce_gradient_equals_ce_property_6():
    """Batch class counts proportional to eta: InfoNCE = CE + log M + log eta_y, same gradients."""
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3], np.int32)  # counts 3, 2, 1, 2
    num_classes, m = 4, labels.size
    eta = np.bincount(labels, minlength=num_classes) / m
    logits = np.random.default_rng(3).normal(scale=2.0, size=(m, num_classes)).astype(np.float32)
    log_eta = np.log(eta).astype(np.float32)
    nce, nce_grad = value_and_grad(lambda z: infonce(z, labels, log_noise_probs=log_eta), logits)
    ce, ce_grad = value_and_grad(lambda z: nll(z, labels), logits)
    np.testing.assert_allclose(nce_grad, ce_grad, **TOL)
    np.testing.assert_allclose(nce, ce + np.log(m) + log_eta[labels], **TOL)


# --------------------------------------------------------------------------------------------------
# Numerics: extreme logits and bfloat16.
# --------------------------------------------------------------------------------------------------


def _all_losses(targets, labels, log_eta):
    return {
        "sti": lambda z: soft_target_infonce(z, targets, log_noise_probs=log_eta, temperature=TEMPERATURE),
        "infonce": lambda z: infonce(z, labels, log_noise_probs=log_eta, temperature=TEMPERATURE),
        "soft_ce": lambda z: soft_target_cross_entropy(z, targets, temperature=TEMPERATURE),
        "nll": lambda z: nll(z, labels),
    }


def test_finite_at_extreme_logits_and_in_bfloat16(batch):
    _, targets, log_eta, labels = batch
    signs = np.random.default_rng(4).choice([-1.0, 1.0], size=(N, C))
    extreme = (1e4 * signs).astype(np.float32)
    for name, fn in _all_losses(targets, labels, log_eta).items():
        for logits in (extreme, extreme.astype(jnp.bfloat16)):
            loss, grad = value_and_grad(fn, logits)
            assert loss.dtype == np.float32, name
            assert np.isfinite(loss).all() and np.isfinite(grad.astype(np.float32)).all(), name


def test_bfloat16_logits_match_float32(batch):
    logits, targets, log_eta, labels = batch
    low = jnp.asarray(logits, jnp.bfloat16)
    for name, fn in _all_losses(targets, labels, log_eta).items():
        np.testing.assert_allclose(fn(low), fn(low.astype(jnp.float32)), rtol=1e-5, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------------------------------
# Data parallel over 8 devices: shard_map and pmap equal the single-device loss on the whole batch.
# --------------------------------------------------------------------------------------------------

DEVICES = 8
PER_DEVICE = 2


@pytest.fixture
def global_batch():
    rng = np.random.default_rng(5)
    m = DEVICES * PER_DEVICE
    logits = rng.normal(scale=3.0, size=(m, C)).astype(np.float32)
    targets = rng.dirichlet(0.5 * np.ones(C), size=m).astype(np.float32)
    labels = rng.integers(0, C, size=m).astype(np.int32)
    log_eta = np.log(rng.dirichlet(np.ones(C))).astype(np.float32)
    return logits, targets, labels, log_eta


def _distributed_loss(name, log_eta, axis_name):
    if name == "sti":
        return lambda z, a, y: soft_target_infonce(
            z, a, log_noise_probs=log_eta, temperature=TEMPERATURE, axis_name=axis_name
        )
    return lambda z, a, y: infonce(
        z, y, log_noise_probs=log_eta, temperature=TEMPERATURE, axis_name=axis_name
    )


@pytest.mark.parametrize("name", ["sti", "infonce"])
@pytest.mark.parametrize("mapping", ["shard_map", "pmap"])
def test_data_parallel_equals_single_device(global_batch, name, mapping):
    assert jax.device_count() == DEVICES, "tests/conftest.py should provide 8 CPU devices"
    logits, targets, labels, log_eta = global_batch
    single = _distributed_loss(name, log_eta, None)
    ref_loss, ref_grad = jax.value_and_grad(lambda z: single(z, targets, labels).sum())(logits)
    ref_per_example = single(logits, targets, labels)
    # Independent check that the single-device loss is the reference one (all M targets as candidates).
    a = targets if name == "sti" else one_hot(labels, C)
    np.testing.assert_allclose(ref_per_example, np_sti(logits, a, log_eta, TEMPERATURE)[0], **TOL)

    per_device = _distributed_loss(name, log_eta, "data")
    if mapping == "shard_map":
        mesh = Mesh(np.array(jax.devices()), ("data",))
        mapped = jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        per_example = jax.jit(mapped)(logits, targets, labels)
        loss, grad = jax.jit(jax.value_and_grad(lambda z: mapped(z, targets, labels).sum()))(logits)
    else:
        def split(x):
            return x.reshape(DEVICES, PER_DEVICE, *x.shape[1:])

        mapped = jax.pmap(
            lambda z, a, y: jax.value_and_grad(lambda zz: per_device(zz, a, y).sum())(z)
            + (per_device(z, a, y),),
            axis_name="data",
        )
        local_sums, local_grads, local_losses = mapped(split(logits), split(targets), split(labels))
        loss, grad = local_sums.sum(), np.asarray(local_grads).reshape(logits.shape)
        per_example = np.asarray(local_losses).reshape(-1)
    np.testing.assert_allclose(per_example, ref_per_example, **TOL)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, **TOL)


def test_sampled_infonce_draws_independent_labels_per_device():
    """Same key on every device: the fold-in with the device index makes the draws differ."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    m = DEVICES * PER_DEVICE
    logits = jnp.tile(jnp.arange(C, dtype=jnp.float32), (m, 1))  # identical rows on every device
    targets = jnp.full((m, C), 1.0 / C)
    fn = jax.shard_map(
        lambda z, a: soft_distribution_infonce(z, a, jax.random.key(0), axis_name="data"),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    per_device = np.asarray(jax.jit(fn)(logits, targets)).reshape(DEVICES, PER_DEVICE)
    # Without the fold-in every device would draw the same labels and get the same losses.
    assert len({tuple(row) for row in per_device.round(5)}) > 1


# --------------------------------------------------------------------------------------------------
# Sampled labels: soft distribution InfoNCE.
# --------------------------------------------------------------------------------------------------


def test_soft_distribution_infonce_with_one_hot_targets_is_infonce(batch):
    logits, _, log_eta, labels = batch
    targets = one_hot(labels, C).astype(np.float32)
    np.testing.assert_allclose(
        soft_distribution_infonce(
            logits, targets, jax.random.key(1), log_noise_probs=log_eta, temperature=TEMPERATURE
        ),
        infonce(logits, labels, log_noise_probs=log_eta, temperature=TEMPERATURE),
        **TOL,
    )


def test_soft_distribution_cross_entropy_is_nll_on_the_drawn_labels_and_soft_ce_on_average():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, 5)) * 2
    targets = rng.dirichlet(np.ones(5), size=6)
    key = jax.random.key(3)
    drawn = np.asarray(sample_hard_labels(key, jnp.asarray(targets, jnp.float32)))
    z = logits / 2.0  # float64 reference at t = 2
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    got = losses.soft_distribution_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32),
                                                 key, temperature=2.0)
    np.testing.assert_allclose(got, -log_p[np.arange(6), drawn], rtol=1e-5)
    # Averaged over many draws it is the soft-target cross-entropy -sum_c a_c log p_c.
    keys = jax.random.split(jax.random.key(4), 4000)
    mean = jax.vmap(lambda k: losses.soft_distribution_cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32), k, temperature=2.0))(keys).mean(0)
    np.testing.assert_allclose(mean, -(targets * log_p).sum(1), rtol=0.05)
    where = jnp.array([True, True, False, True, True, True])
    masked = losses.soft_distribution_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32),
                                                    key, temperature=2.0, where=where)
    assert float(masked[2]) == 0.0 and np.all(np.isfinite(np.asarray(masked)))
    assert losses.get_loss("soft_distribution_cross_entropy").uses_noise is False


def test_sampled_labels_follow_target_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    draws = 20_000
    labels = np.asarray(sample_hard_labels(jax.random.key(2), jnp.tile(probs, (draws, 1))))
    assert labels.shape == (draws,) and labels.dtype == np.int32
    freq = np.bincount(labels, minlength=probs.size) / draws
    # A class frequency has standard error sqrt(p (1 - p) / n) <= 0.0035; allow 5 standard errors
    # (a false failure has probability < 1e-6 per class), and a zero-probability class never appears.
    tolerance = 5 * np.sqrt(probs * (1 - probs) / draws)
    assert (np.abs(freq - probs) <= tolerance).all(), (freq, probs)
    assert freq[-1] == 0.0


# --------------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------------


def test_every_registered_loss_returns_per_example_losses(batch):
    logits, targets, log_eta, labels = batch
    inputs = LossInputs(
        targets=targets,
        labels=labels,
        rng=jax.random.key(3),
        log_noise_probs=log_eta,
        temperature=TEMPERATURE,
    )
    assert {"nll", "soft_target_cross_entropy", "infonce", "soft_target_infonce"} <= set(losses.LOSSES)
    for name in sorted(losses.LOSSES):
        out = losses.get_loss(name).fn(jnp.asarray(logits), inputs)
        assert out.shape == (N,), name
        assert np.isfinite(out).all(), name
    # The registered entries compute the library functions with the inputs' options.
    np.testing.assert_allclose(
        losses.get_loss("soft_target_infonce").fn(logits, inputs),
        np_sti(logits, targets, log_eta, TEMPERATURE)[0],
        **TOL,
    )
    np.testing.assert_allclose(
        losses.get_loss("nll").fn(logits, inputs), np_soft_ce(logits, one_hot(labels, C), TEMPERATURE)[0], **TOL
    )
    assert losses.get_loss("soft_target_infonce").uses_noise and not losses.get_loss("nll").uses_noise


def test_registered_losses_call_their_public_functions(batch):
    """Each registry entry is an adapter: bit for bit the public function with the inputs' options."""
    logits, targets, log_eta, labels = batch
    logits, targets, labels = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(labels)
    rng = jax.random.key(3)
    inputs = LossInputs(targets=targets, labels=labels, rng=rng, log_noise_probs=log_eta, temperature=TEMPERATURE)
    options = dict(log_noise_probs=log_eta, temperature=TEMPERATURE)
    public = {
        "nll": nll(logits, labels, temperature=TEMPERATURE),
        "soft_target_cross_entropy": soft_target_cross_entropy(logits, targets, temperature=TEMPERATURE),
        "infonce": infonce(logits, labels, **options),
        "soft_target_infonce": soft_target_infonce(logits, targets, **options),
        "soft_target_infonce_blockwise": losses.blockwise_soft_target_infonce(logits, targets, **options),
        "soft_distribution_infonce": soft_distribution_infonce(logits, targets, rng, **options),
        "soft_distribution_infonce_premix": infonce(logits, labels, **options),
    }
    for name, expected in public.items():
        np.testing.assert_array_equal(losses.get_loss(name).fn(logits, inputs), expected, err_msg=name)


def test_registered_soft_distribution_infonce_keeps_the_per_device_key():
    """Inside the trainer ``inputs.rng`` already differs per device: the registered loss samples with
    it as it is (``rng_per_device=True``), not folded once more with the device index."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    m = DEVICES * PER_DEVICE
    logits = jax.random.normal(jax.random.key(5), (m, C))
    targets = jax.nn.softmax(jax.random.normal(jax.random.key(6), (m, C)))
    rng = jax.random.key(7)

    def per_device(z, a):
        inputs = LossInputs(targets=a, labels=jnp.zeros(a.shape[0], jnp.int32), rng=rng, axis_name="data")
        registered = losses.get_loss("soft_distribution_infonce").fn(z, inputs)
        by_hand = infonce(z, sample_hard_labels(rng, a), axis_name="data")
        folded = soft_distribution_infonce(z, a, rng, axis_name="data")
        return registered, by_hand, folded

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    registered, by_hand, folded = jax.jit(mapped)(logits, targets)
    np.testing.assert_array_equal(registered, by_hand)
    assert not np.allclose(registered, folded)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'no_such_loss'") as err:
        losses.get_loss("no_such_loss")
    for name in losses.LOSSES:
        assert name in str(err.value)


def test_user_defined_loss_registers_and_runs(batch):
    logits, targets, _, labels = batch
    name = "test_only_squared_error"
    try:

        @losses.register_loss(name)
        def squared_error(z, inputs: LossInputs):
            return ((jax.nn.softmax(z) - inputs.targets) ** 2).sum(axis=-1)

        spec = losses.get_loss(name)
        assert spec.fn is squared_error and not spec.uses_noise
        out = spec.fn(logits, LossInputs(targets=targets, labels=labels, rng=jax.random.key(0)))
        expected = ((_np_softmax(logits.astype(np.float64)) - targets) ** 2).sum(axis=1)
        np.testing.assert_allclose(out, expected, **TOL)
        with pytest.raises(ValueError, match="already registered"):
            losses.register_loss(name)(squared_error)
        losses.register_loss(name, squared_error, overwrite=True)
        assert losses.get_loss(name).fn is squared_error
    finally:
        if name in losses.LOSSES:
            losses.LOSSES.unregister(name)
    assert name not in losses.LOSSES


# --------------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------------


def test_shape_and_dtype_errors(batch):
    logits, targets, log_eta, labels = batch
    with pytest.raises(ValueError, match=r"targets must have the same shape as logits"):
        soft_target_infonce(logits, targets[:, :-1])
    with pytest.raises(ValueError, match=r"targets must have the same shape as logits"):
        soft_target_cross_entropy(logits, targets[:-1])
    with pytest.raises(ValueError, match=r"targets must have the same shape as logits"):
        soft_distribution_infonce(logits, targets[:, :-1], jax.random.key(0))
    with pytest.raises(ValueError, match=r"logits must have shape \[N, C\]"):
        soft_target_infonce(logits[0], targets[0])
    with pytest.raises(ValueError, match=r"labels must have shape \[N\]"):
        infonce(logits, labels[:-1])
    with pytest.raises(ValueError, match=r"labels must have shape \[N\]"):
        nll(logits, labels[:, None])
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        infonce(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        nll(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"log_noise_probs must have shape \[C\]"):
        soft_target_infonce(logits, targets, log_noise_probs=log_eta[:-1])
    with pytest.raises(ValueError, match=r"log_noise_probs must have shape \[C\]"):
        infonce(logits, labels, log_noise_probs=log_eta[None])


def test_labels_out_of_range(batch):
    logits, _, _, labels = batch
    for bad in (C, -1):
        wrong = labels.copy()
        wrong[2] = bad
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {C}\)"):
            infonce(logits, wrong)
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {C}\)"):
            nll(logits, wrong)


def test_validate_targets_names_the_bad_row(batch):
    _, targets, _, _ = batch
    validate_targets(targets)  # valid rows pass
    corruptions = [  # (row, column, new value, expected message)
        (2, 0, -0.1, "targets row 2 has negative entries"),
        (3, 1, np.nan, "targets row 3 has non-finite entries"),
        (4, 1, targets[4, 1] + 0.01, "targets row 4 sums to 1.01, not 1"),
    ]
    for row, column, value, message in corruptions:
        bad = targets.copy()
        bad[row, column] = value
        with pytest.raises(ValueError, match=message):
            validate_targets(bad)
    bad = targets.copy()
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="targets row 1 has non-finite"):
        validate_targets(bad)
    with pytest.raises(ValueError, match=r"targets must have shape \[N, C\]"):
        validate_targets(targets[None])


def test_log_class_prior():
    labels = np.array([0, 0, 1, 2, 2, 2])
    np.testing.assert_allclose(log_class_prior(labels, 3), np.log([2 / 6, 1 / 6, 3 / 6]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"zero training examples \(classes \[3\]\).*smoothing > 0"):
        log_class_prior(labels, 4)
    smoothed = np.asarray(log_class_prior(labels, 4, smoothing=0.5))
    assert smoothed.dtype == np.float32 and np.isfinite(smoothed).all()
    np.testing.assert_allclose(smoothed, np.log((np.array([2, 1, 3, 0]) + 0.5) / (6 + 4 * 0.5)), rtol=1e-6)
    np.testing.assert_allclose(np.exp(smoothed.astype(np.float64)).sum(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        log_class_prior(labels, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        log_class_prior(np.array([0, -1, 2]), 3)
    with pytest.raises(ValueError, match="smoothing must be >= 0"):
        log_class_prior(labels, 3, smoothing=-1.0)
    with pytest.raises(ValueError, match="labels must be integers"):
        log_class_prior(labels.astype(np.float32), 3)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        log_class_prior(np.zeros((0,), np.int32), 3)


def test_every_loss_declares_what_it_reads_where_it_is_registered():
    reads_labels = sorted(name for name in losses.LOSSES if losses.get_loss(name).reads_labels_only)
    assert reads_labels == ["infonce", "nll", "soft_distribution_infonce_premix"]
    uses_prior = sorted(name for name in losses.LOSSES if losses.get_loss(name).uses_noise)
    assert uses_prior == ["infonce", "soft_distribution_infonce", "soft_distribution_infonce_premix",
                          "soft_target_infonce", "soft_target_infonce_blockwise"]
