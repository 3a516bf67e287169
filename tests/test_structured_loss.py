"""Structured and blockwise soft target InfoNCE: same values and gradients as the dense form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softnce import losses as L
from softnce import targets as T

C, TEMP = 7, 0.5


@functools.lru_cache(maxsize=None)
def _problem(m=16, seed=0):
    """Logits ``[m, C]``, MixUp+smoothing targets (elem mode), and a non-uniform log prior."""
    k = jax.random.split(jax.random.key(seed), 4)
    logits = 3.0 * jax.random.normal(k[0], (m, C))
    labels = jax.random.randint(k[1], (m,), 0, C)
    cfg = T.MixConfig(label_smoothing=0.1, mixup_alpha=0.8, mode="elem", structured=True)
    lam = jax.random.uniform(k[2], (m,))  # per-element MixUp lambdas (no Beta sampler to compile)
    params = T.MixParams(lam, jnp.zeros(m, bool), jnp.zeros(m, jnp.int32), jnp.zeros(m, jnp.int32))
    _, t = T.apply_mix(jnp.zeros((m, 1)), labels, params, num_classes=C, config=cfg)
    log_prior = jax.nn.log_softmax(jax.random.normal(k[3], (C,)))
    return logits, t, log_prior


def _numpy_sti(logits, targets, log_prior):
    """Float64 reference: L_i = logsumexp_j (a_j . s_i) - a_i . s_i, s = z / t - log(eta)."""
    s = np.asarray(logits, np.float64) / TEMP - np.asarray(log_prior, np.float64)
    scores = s @ np.asarray(targets, np.float64).T
    top = scores.max(1, keepdims=True)
    return (top[:, 0] + np.log(np.exp(scores - top).sum(1))) - np.diag(scores)


def _value_and_grad(loss, logits, *args, **kw):
    return jax.jit(jax.value_and_grad(lambda z: loss(z, *args, **kw).sum()))(logits)


def _losses_and_grads(loss, logits, *args, **kw):
    per_example = jax.jit(lambda z: loss(z, *args, **kw))(logits)
    return per_example, _value_and_grad(loss, logits, *args, **kw)[1]


def test_structured_matches_dense_and_numpy():
    logits, t, log_prior = _problem()
    kw = dict(log_noise_probs=log_prior, temperature=TEMP)
    np.testing.assert_allclose(T.to_dense(t.structured, C), t.dense, atol=1e-6)
    dense, dense_grad = _losses_and_grads(L.soft_target_infonce, logits, t.dense, **kw)
    struct, struct_grad = _losses_and_grads(L.structured_soft_target_infonce, logits, t.structured, **kw)
    np.testing.assert_allclose(dense, _numpy_sti(logits, t.dense, log_prior), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(struct, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(struct_grad, dense_grad, rtol=1e-5, atol=1e-6)
    # Registry: the STI adapter takes the structured path when structured targets are given.
    spec = L.get_loss("soft_target_infonce")
    inputs = L.LossInputs(t.dense, t.labels, jax.random.key(0), log_prior, TEMP)
    np.testing.assert_allclose(
        spec.fn(logits, inputs._replace(structured_targets=t.structured)), dense, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(spec.fn(logits, inputs), dense, rtol=1e-6)


@pytest.mark.parametrize("block_size", [3, 16, 64])  # M = 16: not divisible, exact, larger than M
def test_blockwise_matches_dense(block_size):
    logits, t, log_prior = _problem()
    kw = dict(log_noise_probs=log_prior, temperature=TEMP)
    dense, dense_grad = _losses_and_grads(L.soft_target_infonce, logits, t.dense, **kw)
    block, block_grad = _losses_and_grads(L.blockwise_soft_target_infonce, logits, t.dense, block_size=block_size, **kw)
    np.testing.assert_allclose(block, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(block_grad, dense_grad, rtol=1e-5, atol=1e-6)


def test_blockwise_extreme_logits_and_registry():
    logits, t, log_prior = _problem()
    logits = 200.0 * logits  # scores of order 1e3: a naive exp would overflow
    dense, dense_grad = _losses_and_grads(L.soft_target_infonce, logits, t.dense)
    block, block_grad = _losses_and_grads(L.blockwise_soft_target_infonce, logits, t.dense, block_size=5)
    assert np.isfinite(block).all() and np.isfinite(block_grad).all()
    np.testing.assert_allclose(block, dense, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(block_grad, dense_grad, rtol=1e-5, atol=1e-5)
    inputs = L.LossInputs(t.dense, t.labels, jax.random.key(0), log_prior, TEMP)
    np.testing.assert_allclose(
        L.get_loss("soft_target_infonce_blockwise").fn(logits, inputs),
        L.get_loss("soft_target_infonce").fn(logits, inputs),
        rtol=1e-5,
        atol=1e-3,  # float32 rounding of scores of order 1e3
    )


def test_sharded_over_8_devices_equals_single_device_on_concatenated_batch():
    """Each device scores its N = 2 rows against all M = 16 gathered targets (block 3: 16 % 3 != 0)."""
    logits, t, log_prior = _problem(m=16)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    kw = dict(log_noise_probs=log_prior, temperature=TEMP)
    cases = {
        "dense": (L.soft_target_infonce, t.dense, {}),
        "structured": (L.structured_soft_target_infonce, t.structured, {}),
        "blockwise": (L.blockwise_soft_target_infonce, t.dense, dict(block_size=3)),
    }
    reference, reference_grad = _losses_and_grads(L.soft_target_infonce, logits, t.dense, **kw)
    for name, (loss, targets, extra) in cases.items():
        sharded = jax.shard_map(
            functools.partial(loss, axis_name="data", **kw, **extra),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P("data"),
        )
        values, grads = _losses_and_grads(sharded, logits, targets)
        np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(grads, reference_grad, rtol=1e-5, atol=1e-6, err_msg=name)


def _intermediate_sizes(closed_jaxpr):
    """Element counts of every value computed anywhere in a jaxpr, sub-jaxprs included."""
    sizes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(closed_jaxpr.jaxpr)
    return sizes


def test_blockwise_has_no_n_by_m_intermediate():
    n = m = 256
    c, block = 8, 32  # [M, C] targets (2048) and [N, block] scores (8192) are both far below N * M
    logits = jax.random.normal(jax.random.key(0), (n, c))
    targets = jax.nn.softmax(jax.random.normal(jax.random.key(1), (m, c)))
    def grad_of(loss, **kw):
        return jax.value_and_grad(lambda z: loss(z, targets, **kw).sum())
    dense = grad_of(L.soft_target_infonce)
    blockwise = grad_of(L.blockwise_soft_target_infonce, block_size=block)
    assert max(_intermediate_sizes(jax.make_jaxpr(dense)(logits))) >= n * m
    assert max(_intermediate_sizes(jax.make_jaxpr(blockwise)(logits))) <= n * block * 2
    dense_mem = jax.jit(dense).lower(logits).compile().memory_analysis()
    block_mem = jax.jit(blockwise).lower(logits).compile().memory_analysis()
    if dense_mem is not None and block_mem is not None:  # not every backend reports it
        assert block_mem.temp_size_in_bytes < n * m * 4 <= dense_mem.temp_size_in_bytes


def test_shape_errors():
    logits, t, _ = _problem()
    s = t.structured
    with pytest.raises(ValueError, match="class_ids \\[N, k\\], weights \\[N, k\\] and uniform \\[N\\]"):
        L.structured_soft_target_infonce(logits, s._replace(weights=s.weights[:, :1]))
    with pytest.raises(ValueError, match="class_ids \\[N, k\\]"):
        L.structured_soft_target_infonce(logits[:4], s)
    with pytest.raises(ValueError, match="class_ids must be integer"):
        L.structured_soft_target_infonce(logits, s._replace(class_ids=s.class_ids.astype(jnp.float32)))
    with pytest.raises(ValueError, match="log_noise_probs must have shape"):
        L.structured_soft_target_infonce(logits, s, log_noise_probs=jnp.zeros(C + 1))
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        L.blockwise_soft_target_infonce(logits, t.dense, block_size=0)
    with pytest.raises(ValueError, match="targets must have the same shape"):
        L.blockwise_soft_target_infonce(logits, t.dense[:, :3])
