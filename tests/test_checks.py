"""Value checks under jit (softnce.losses.debug_checks / checked, on jax.experimental.checkify).

Bad labels, target rows that are not distributions and non-finite logits are reported with the row
index (the global one under shard_map); masked rows are not checked; with the checks off (the default)
the traced program and the values are those of the loss without checks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softnce import losses as L
from softnce import targets as T

N, C = 8, 5


@functools.lru_cache(maxsize=None)
def _batch():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(N, C)).astype(np.float32)
    targets = rng.dirichlet(np.ones(C), size=N).astype(np.float32)
    labels = rng.integers(0, C, size=N).astype(np.int32)
    log_eta = np.log(rng.dirichlet(np.ones(C))).astype(np.float32)
    return logits, targets, labels, log_eta


def _with(array, row, column, value):
    out = np.array(array, copy=True)
    if column is None:
        out[row] = value
    else:
        out[row, column] = value
    return out


DENSE_LOSSES = {
    "soft_target_infonce": L.soft_target_infonce,
    "blockwise_soft_target_infonce": functools.partial(L.blockwise_soft_target_infonce, block_size=3),
    "soft_target_cross_entropy": L.soft_target_cross_entropy,
    "soft_distribution_infonce": lambda z, a, **kw: L.soft_distribution_infonce(z, a, jax.random.key(0), **kw),
}
LABEL_LOSSES = {"infonce": L.infonce, "nll": L.nll}


@pytest.mark.parametrize("name", list(DENSE_LOSSES))
def test_bad_target_rows_are_named(name):
    logits, targets, _, _ = _batch()
    loss = L.checked(DENSE_LOSSES[name])
    np.testing.assert_allclose(loss(logits, targets), jax.jit(DENSE_LOSSES[name])(logits, targets), rtol=1e-6)
    short = _with(targets, 3, None, targets[3] * 0.7)
    with pytest.raises(ValueError, match=rf"{name}: targets row 3 sums to 0\.7, not 1 \(atol=0\.0001\)"):
        loss(logits, short)
    with pytest.raises(ValueError, match=rf"{name}: targets row 5 has a negative entry -0\.25 \(column 2\)"):
        loss(logits, _with(targets, 5, 2, -0.25))
    with pytest.raises(ValueError, match=rf"{name}: targets row 6 has a non-finite entry nan \(column 4\)"):
        loss(logits, _with(targets, 6, 4, np.nan))
    with pytest.raises(ValueError, match=rf"{name}: logits row 1 has a non-finite entry inf \(class 0\)"):
        loss(_with(logits, 1, 0, np.inf), targets)
    # Masked rows are not checked: the same bad row passes when it is masked.
    where = np.arange(N) != 3
    out = loss(logits, short, where=jnp.asarray(where))
    assert np.isfinite(np.asarray(out)).all() and out[3] == 0


@pytest.mark.parametrize("name", list(LABEL_LOSSES))
def test_bad_labels_are_named(name):
    logits, _, labels, log_eta = _batch()
    loss = L.checked(LABEL_LOSSES[name])
    np.testing.assert_allclose(loss(logits, labels), jax.jit(LABEL_LOSSES[name])(logits, labels), rtol=1e-6)
    for bad in (C, -1):
        with pytest.raises(ValueError, match=rf"{name}: labels row 4 is {bad}, not in \[0, {C}\)"):
            loss(logits, _with(labels, 4, None, bad))
    # Unchecked, the jitted loss silently gives NaN (what the checks are for).
    assert not np.isfinite(np.asarray(jax.jit(LABEL_LOSSES[name])(logits, _with(labels, 4, None, C)))).all()
    loss(logits, _with(labels, 4, None, C), where=jnp.arange(N) != 4)


def test_noise_distribution_and_structured_targets():
    logits, _, labels, log_eta = _batch()
    with pytest.raises(ValueError, match=r"infonce: log_noise_probs\[2\] is -inf, not finite"):
        L.checked(L.infonce)(logits, labels, log_noise_probs=_with(log_eta, 2, None, -np.inf))
    lam = np.linspace(0.1, 0.9, N).astype(np.float32)
    structured = T.StructuredTargets(
        class_ids=jnp.asarray(np.stack([labels, labels[::-1]], 1)),
        weights=jnp.asarray(np.stack([lam * 0.9, (1 - lam) * 0.9], 1)),
        uniform=jnp.full((N,), 0.1),
    )
    loss = L.checked(L.structured_soft_target_infonce)
    np.testing.assert_allclose(
        loss(logits, structured), L.soft_target_infonce(logits, T.to_dense(structured, C)), rtol=1e-5, atol=1e-5
    )
    name = "structured_soft_target_infonce"
    with pytest.raises(ValueError, match=rf"{name}: structured targets class_ids row 2 is 7, not in \[0, {C}\)"):
        loss(logits, structured._replace(class_ids=structured.class_ids.at[2, 1].set(7)))
    with pytest.raises(ValueError, match=rf"{name}: structured targets row 6 sums to 0\.8, not 1"):
        loss(logits, structured._replace(weights=structured.weights.at[6].multiply(0.7 / 0.9)))
    with pytest.raises(ValueError, match=rf"{name}: structured targets \(weights, uniform\) row 0 has a negative"):
        loss(logits, structured._replace(uniform=structured.uniform.at[0].set(-0.1)))


def test_sharded_checks_name_the_global_row():
    """Under shard_map each device checks its rows; the error names the row of the global batch."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    m = 16
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(m, C)).astype(np.float32)
    targets = rng.dirichlet(np.ones(C), size=m).astype(np.float32)
    sharded = jax.shard_map(
        functools.partial(L.soft_target_infonce, axis_name="data"), mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
    bad = _with(targets, 11, None, targets[11] * 0.5)
    jax.jit(sharded)(logits, bad)  # traced unchecked first: checked() still traces the checks afresh
    loss = L.checked(sharded)
    np.testing.assert_allclose(loss(logits, targets), L.soft_target_infonce(logits, targets), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"soft_target_infonce: targets row 11 sums to 0\.5, not 1"):
        loss(logits, bad)


def _fresh_step(log_eta):
    """A new step function each call (JAX caches traces per function, so each comparison starts afresh)."""

    def step(z, a):
        return jnp.mean(L.soft_target_infonce(z, a, log_noise_probs=log_eta))

    return step


def test_debug_checks_with_checkify_by_hand_and_off_by_default():
    logits, targets, labels, log_eta = _batch()
    short = _with(targets, 3, None, targets[3] * 0.7)
    step = _fresh_step(log_eta)

    # The documented recipe for one's own (jitted) step, gradients included.
    with L.debug_checks():
        err, value = jax.jit(checkify.checkify(jax.value_and_grad(step), errors=checkify.user_checks))(logits, short)
    assert "soft_target_infonce: targets row 3 sums to 0.7, not 1" in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match="targets row 3"):
        err.throw()
    unchecked = jax.jit(_fresh_step(log_eta))(logits, short)  # bad rows pass, unchecked
    np.testing.assert_allclose(value[0], unchecked, rtol=1e-6)

    # Off (the default, and again after the block): the traced program is the one without checks.
    def jaxpr():
        return str(jax.make_jaxpr(_fresh_step(log_eta))(logits, targets))

    plain = jaxpr()
    assert "check" not in plain
    with L.debug_checks():
        assert "check" in jaxpr()
        with L.debug_checks(False):
            assert jaxpr() == plain
        assert "check" in jaxpr()
    assert jaxpr() == plain
    L.debug_checks(True)  # the plain call form sets the switch until it is turned off
    try:
        assert "check" in jaxpr()
    finally:
        L.debug_checks(False)
    assert jaxpr() == plain

    # Checks on but not checkified: dropped (no error); the same trace reused later is harmless too.
    step = _fresh_step(log_eta)
    with L.debug_checks():
        on = jax.jit(step)(logits, short)
    np.testing.assert_array_equal(on, unchecked)
    np.testing.assert_array_equal(jax.jit(step)(logits, short), unchecked)


def test_tolerance_and_low_precision_targets():
    logits, targets, _, _ = _batch()
    off = _with(targets, 2, 0, targets[2, 0] + 1e-3)
    with pytest.raises(ValueError, match=r"targets row 2 sums to 1\.001, not 1"):
        L.checked(L.soft_target_infonce)(logits, off)
    L.checked(L.soft_target_infonce, atol=1e-2)(logits, off)
    # bfloat16 targets: the default tolerance is 4 ulps of 1 (0.03), so rounded rows pass.
    low = jnp.asarray(targets, jnp.bfloat16)
    assert np.abs(np.asarray(low, np.float32).sum(1) - 1).max() > 1e-4
    L.checked(L.soft_target_infonce)(logits, low)
    L.checked(L.soft_target_infonce, jit=False)(logits, targets)


def test_eager_validation_unchanged_with_checks_on():
    logits, targets, labels, _ = _batch()
    with L.debug_checks():
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {C}\)"):
            L.infonce(logits, _with(labels, 1, None, C))
        with pytest.raises(ValueError, match="targets row 3 sums to 0.7, not 1"):
            L.validate_targets(_with(targets, 3, None, targets[3] * 0.7))
