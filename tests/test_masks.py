"""Row masks (``where=``): a loss with masked rows equals the loss on the batch with those rows dropped.

For every loss, values and gradients w.r.t. the logits of the kept rows equal the float64 numpy reference
of tests/test_losses.py on the kept rows only (the masked rows are neither scored nor candidates), and the
masked rows get loss 0 and a gradient of exactly 0 although they hold garbage (NaN logits and targets,
label -1). Checked on one device and under ``jax.shard_map`` on 8 devices, with a device whose rows are
all masked and with every row masked.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_losses import TEMPERATURE, TOL, np_soft_ce, np_sti, one_hot

from softnce import losses as L
from softnce import targets as T

DEVICES, PER_DEVICE, C = 8, 2, 5
M = DEVICES * PER_DEVICE
RNG_KEY = jax.random.key(11)

MASKS = {
    # Rows 6 and 7 (device 3) are all masked; the others mix kept and masked rows.
    "some": np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1], bool),
    "one_kept": np.eye(M, dtype=bool)[9],
    "none_masked": np.ones(M, bool),
    "all_masked": np.zeros(M, bool),
}


@functools.lru_cache(maxsize=None)
def _batch():
    """Clean logits, labels, dense and structured targets (MixUp + smoothing) and a log prior, ``M`` rows."""
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(M, C)).astype(np.float32)
    labels = rng.integers(0, C, size=M).astype(np.int32)
    lam = rng.uniform(size=M).astype(np.float32)
    e = 0.1
    structured = T.StructuredTargets(
        class_ids=jnp.asarray(np.stack([labels, labels[::-1]], axis=1)),
        weights=jnp.asarray(np.stack([lam * (1 - e), (1 - lam) * (1 - e)], axis=1)),
        uniform=jnp.full((M,), e, jnp.float32),
    )
    dense = np.asarray(T.to_dense(structured, C))
    log_eta = np.log(rng.dirichlet(np.ones(C))).astype(np.float32)
    return logits, labels, dense, structured, log_eta


def _garbage(where):
    """The batch with the masked rows overwritten by garbage (what padding may hold)."""
    logits, labels, dense, structured, log_eta = _batch()
    dropped = ~where
    logits, labels, dense = logits.copy(), labels.copy(), dense.copy()
    logits[dropped] = np.nan
    labels[dropped] = -1
    dense[dropped] = np.nan
    structured = T.StructuredTargets(
        class_ids=jnp.where(dropped[:, None], -1, structured.class_ids),
        weights=jnp.where(dropped[:, None], jnp.nan, structured.weights),
        uniform=jnp.where(dropped, jnp.inf, structured.uniform),
    )
    return logits, labels, dense, structured, log_eta


def _sampled_labels(dense, axis):
    """The labels soft_distribution_infonce draws (per device folded with the device index under ``axis``)."""
    if axis is None:
        return np.asarray(L.sample_hard_labels(RNG_KEY, dense))
    keys = [jax.random.fold_in(RNG_KEY, d) for d in range(DEVICES)]
    rows = dense.reshape(DEVICES, PER_DEVICE, C)
    return np.concatenate([np.asarray(L.sample_hard_labels(k, r)) for k, r in zip(keys, rows)])


def _loss_fn(name, log_eta, axis):
    """``fn(logits, labels, dense, structured, where) -> [N]`` of the loss ``name`` (per device under ``axis``)."""
    opts = dict(log_noise_probs=log_eta, temperature=TEMPERATURE, axis_name=axis)
    return {
        "nll": lambda z, y, a, st, w: L.nll(z, y, temperature=TEMPERATURE, where=w),
        "soft_target_cross_entropy": lambda z, y, a, st, w: L.soft_target_cross_entropy(
            z, a, temperature=TEMPERATURE, where=w
        ),
        "infonce": lambda z, y, a, st, w: L.infonce(z, y, **opts, where=w),
        "soft_target_infonce": lambda z, y, a, st, w: L.soft_target_infonce(z, a, **opts, where=w),
        "structured": lambda z, y, a, st, w: L.structured_soft_target_infonce(z, st, **opts, where=w),
        "blockwise": lambda z, y, a, st, w: L.blockwise_soft_target_infonce(z, a, **opts, block_size=3, where=w),
        "soft_distribution_infonce": lambda z, y, a, st, w: L.soft_distribution_infonce(
            z, a, RNG_KEY, **opts, where=w
        ),
    }[name]


NAMES = ["nll", "soft_target_cross_entropy", "infonce", "soft_target_infonce", "structured", "blockwise",
         "soft_distribution_infonce"]


def _reference(name, where, axis):
    """Float64 losses and gradients of the kept rows alone (the batch with the masked rows dropped)."""
    logits, labels, dense, _, log_eta = _batch()
    z = logits[where]
    if name == "nll":
        return np_soft_ce(z, one_hot(labels[where], C), TEMPERATURE)
    if name == "soft_target_cross_entropy":
        return np_soft_ce(z, dense[where].astype(np.float64), TEMPERATURE)
    if name == "infonce":
        return np_sti(z, one_hot(labels[where], C), log_eta, TEMPERATURE)
    if name == "soft_distribution_infonce":
        return np_sti(z, one_hot(_sampled_labels(dense, axis)[where], C), log_eta, TEMPERATURE)
    return np_sti(z, dense[where], log_eta, TEMPERATURE)  # the three STI forms


def _run(name, where, mapping):
    """Per-example losses and the gradient of their sum w.r.t. the logits, with garbage in the masked rows."""
    logits, labels, dense, structured, log_eta = _garbage(where)
    axis = None if mapping == "single" else "data"
    fn = _loss_fn(name, log_eta, axis)
    if mapping == "shard_map":
        mesh = Mesh(np.array(jax.devices()), ("data",))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    args = (labels, dense, structured, jnp.asarray(where))
    values = jax.jit(fn)(logits, *args)
    grads = jax.jit(jax.grad(lambda z: fn(z, *args).sum()))(logits)
    return np.asarray(values), np.asarray(grads)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mapping", ["single", "shard_map"])
def test_masked_rows_equal_dropped_rows(name, mask, mapping):
    if mapping == "shard_map":
        assert jax.device_count() == DEVICES, "tests/conftest.py should provide 8 CPU devices"
    where = MASKS[mask]
    values, grads = _run(name, where, mapping)
    assert values.shape == (M,) and values.dtype == np.float32
    # Masked rows: loss 0 and gradient exactly 0 (no NaN from their garbage), on every device.
    np.testing.assert_array_equal(values[~where], 0.0)
    np.testing.assert_array_equal(grads[~where], 0.0)
    if where.any():
        ref_values, ref_grads = _reference(name, where, None if mapping == "single" else "data")
        np.testing.assert_allclose(values[where], ref_values, **TOL)
        np.testing.assert_allclose(grads[where], ref_grads, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_all_true_mask_equals_no_mask(name):
    """``where`` all True gives the numbers of ``where=None`` (and None keeps the old code path)."""
    logits, labels, dense, structured, log_eta = _batch()
    fn = _loss_fn(name, log_eta, None)
    with_mask = jax.jit(lambda z: fn(z, labels, dense, structured, jnp.ones(M, bool)))(logits)
    without = jax.jit(lambda z: fn(z, labels, dense, structured, None))(logits)
    np.testing.assert_allclose(with_mask, without, rtol=1e-6, atol=1e-6)


def test_eager_calls_and_bfloat16():
    """Eager (no jit) masked calls agree with the references; bfloat16 logits give float32 losses."""
    where = MASKS["some"]
    logits, labels, dense, structured, log_eta = _garbage(where)
    ref, _ = np_sti(_batch()[0][where], dense[where], log_eta, TEMPERATURE)
    out = L.soft_target_infonce(logits, dense, log_noise_probs=log_eta, temperature=TEMPERATURE, where=where)
    np.testing.assert_allclose(np.asarray(out)[where], ref, **TOL)
    # Eager label check: label -1 in masked rows is allowed, in a kept row it is an error.
    L.infonce(logits, labels, where=where)
    L.nll(logits, labels, where=jnp.asarray(where))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        L.infonce(logits, labels, where=where | np.eye(M, dtype=bool)[1])
    low = jnp.asarray(_batch()[0], jnp.bfloat16)
    out = L.soft_target_infonce(low, dense, where=where)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_registered_losses_pass_where_through():
    """Every registry entry gives its public function's numbers with ``LossInputs.where``."""
    where = MASKS["some"]
    logits, labels, dense, structured, log_eta = _garbage(where)
    logits = jnp.asarray(logits)
    w = jnp.asarray(where)
    inputs = L.LossInputs(
        targets=dense, labels=labels, rng=RNG_KEY, log_noise_probs=log_eta, temperature=TEMPERATURE, where=w
    )
    opts = dict(log_noise_probs=log_eta, temperature=TEMPERATURE, where=w)
    public = {
        "nll": L.nll(logits, labels, temperature=TEMPERATURE, where=w),
        "soft_target_cross_entropy": L.soft_target_cross_entropy(logits, dense, temperature=TEMPERATURE, where=w),
        "infonce": L.infonce(logits, labels, **opts),
        "soft_target_infonce": L.soft_target_infonce(logits, dense, **opts),
        "soft_target_infonce_blockwise": L.blockwise_soft_target_infonce(logits, dense, **opts),
        "soft_distribution_infonce": L.soft_distribution_infonce(logits, dense, RNG_KEY, **opts),
        "soft_distribution_infonce_premix": L.infonce(logits, labels, **opts),
    }
    for name, expected in public.items():
        got = L.get_loss(name).fn(logits, inputs)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        np.testing.assert_array_equal(np.asarray(got)[~where], 0.0, err_msg=name)
    # The structured path of the STI entry masks the same rows.
    structured_inputs = inputs._replace(structured_targets=structured)
    np.testing.assert_allclose(
        L.get_loss("soft_target_infonce").fn(logits, structured_inputs), public["soft_target_infonce"], **TOL
    )
    assert L.LossInputs(dense, labels, RNG_KEY).where is None


def test_where_shape_and_dtype_errors():
    logits, labels, dense, structured, _ = _batch()
    for bad in (np.ones(M - 1, bool), np.ones((M, 1), bool), np.ones(M, np.int32)):
        for call in (
            lambda w: L.soft_target_infonce(logits, dense, where=w),
            lambda w: L.infonce(logits, labels, where=w),
            lambda w: L.nll(logits, labels, where=w),
            lambda w: L.soft_target_cross_entropy(logits, dense, where=w),
            lambda w: L.structured_soft_target_infonce(logits, structured, where=w),
            lambda w: L.blockwise_soft_target_infonce(logits, dense, where=w),
            lambda w: L.soft_distribution_infonce(logits, dense, RNG_KEY, where=w),
        ):
            with pytest.raises(ValueError, match=r"where must be a boolean row mask of shape \[N\]"):
                call(bad)
