"""The ViT's exact GELU (``softnce.models.vit.gelu_erf``) and the check_vma workaround it carries.

Both sides of the workaround: outside ``shard_map`` it is ``jax.nn.gelu(x, approximate=False)``
(value bit for bit, derivatives against float64 and against jax's own); inside ``jax.shard_map``
with ``check_vma=True`` (the default) its gradient traces and the ViT train step runs, where the
plain op either works (jax without the upstream bug) or fails with exactly the upstream error.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from scipy import special

from softnce import distributed, losses, steps, targets
from softnce.models import vit

X = np.concatenate([np.linspace(-12.0, 12.0, 4001), [0.0, -0.7518, 1e-8, -1e-8, 30.0, -30.0]]).astype(np.float32)


def plain_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def reference_gelu_derivatives(x):
    """Phi(x) + x phi(x) and its derivative phi(x) (2 - x^2), in float64."""
    x = np.asarray(x, np.float64)
    pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    return special.ndtr(x) + x * pdf, pdf * (2.0 - x * x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_value_is_jax_gelu_bit_for_bit(dtype):
    x = jnp.asarray(X, dtype)
    out = jax.jit(vit.gelu_erf)(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(jax.jit(plain_gelu)(x), np.float32))


def test_derivatives_match_float64_and_jax_outside_shard_map():
    x = jnp.asarray(X)
    grad = jax.jit(jax.vmap(jax.grad(vit.gelu_erf)))(x)
    second = jax.jit(jax.vmap(jax.grad(jax.grad(vit.gelu_erf))))(x)
    first_ref, second_ref = reference_gelu_derivatives(X)
    np.testing.assert_allclose(grad, first_ref, rtol=0, atol=5e-7)
    np.testing.assert_allclose(second, second_ref, rtol=0, atol=5e-7)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(plain_gelu))(x), rtol=0, atol=5e-7)
    # Forward mode and the vjp of a whole batch give the same derivative (up to rounding).
    _, tangent = jax.jvp(vit.gelu_erf, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, grad, rtol=0, atol=2e-7)
    np.testing.assert_allclose(jax.grad(lambda v: vit.gelu_erf(v).sum())(x), grad, rtol=0, atol=2e-7)


def _sharded_grad(fn):
    mesh = distributed.make_mesh()
    body = jax.grad(lambda v: fn(v).sum())
    # check_vma=True is jax.shard_map's default; spelled out because it is what is tested.
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=True))


def test_gradient_under_shard_map_with_check_vma():
    x = jnp.asarray(X[: 8 * (len(X) // 8)]).reshape(8, -1)  # 8 devices (conftest)
    expected = jax.vmap(jax.grad(plain_gelu))(x.ravel()).reshape(x.shape)
    np.testing.assert_allclose(_sharded_grad(vit.gelu_erf)(x), expected, rtol=0, atol=5e-7)

    # The upstream side: jax's own erf-GELU gradient either works here (jax 0.10.x) or fails with
    # the error that vit.py's comment describes (jax 0.12.0.1). Anything else is a new problem.
    try:
        plain = _sharded_grad(plain_gelu)(x)
    except ValueError as error:
        assert "Primitive polynomial requires varying manual axes to match" in str(error), error
    else:
        np.testing.assert_allclose(plain, expected, rtol=0, atol=5e-7)


def test_vit_train_step_runs_under_shard_map_and_matches_one_device():
    """The trainer's jit(shard_map(train_step)) with check_vma on, on 8 devices, against the same
    step without shard_map on the whole batch (no mixing, no drop path: the rng plays no role)."""
    model = vit.vit_tiny(num_classes=10)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=16).astype(np.int32),
    }
    params = jax.device_get(model.init(jax.random.PRNGKey(0), batch["inputs"][:1], train=False)["params"])

    def new_state():  # fresh arrays each time: the sharded step donates its state
        return steps.TrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.array, params),
                                             tx=optax.sgd(0.5))

    step_kwargs = dict(loss_fn=losses.get_loss("nll").fn, num_classes=10, mix_config=targets.MixConfig(),
                       temperature=1.0)
    key = jax.random.PRNGKey(1)
    one_device = jax.jit(functools.partial(steps.train_step, axis_name=None, **step_kwargs))
    state_1, metrics_1 = one_device(new_state(), batch, key, None)

    mesh = distributed.make_mesh()
    assert mesh.devices.size == 8
    sharded = steps.make_sharded_train_step(mesh, **step_kwargs)
    state_8, metrics_8 = sharded(new_state(), distributed.global_batch(mesh, batch), key, None)

    assert np.isfinite(float(metrics_8["loss"])) and float(metrics_8["grad_norm"]) > 0
    np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state_8.params, params)
    assert max(jax.tree.leaves(moved)) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state_8.params, state_1.params)
