"""Optimiser and schedule of the reference recipe."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from softnce import optim
from softnce.models import vit


def optim_config(**kw):
    base = dict(base_lr=1e-3, min_lr=1e-6, warmup_steps=10, b1=0.9, b2=0.999, weight_decay=0.05,
                grad_clip_norm=None, layer_decay=None)
    return ml_collections.ConfigDict({**base, **kw})


def test_schedule_scaling_warmup_and_cosine():
    schedule = optim.learning_rate_schedule(optim_config(), global_batch=512, total_steps=110)
    peak = 1e-3 * 512 / 256
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(peak * 5 / 10)  # linear warm-up, per step
    assert float(schedule(10)) == pytest.approx(peak)
    assert float(schedule(60)) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5, rel=1e-5)  # half-way down the cosine
    assert float(schedule(110)) == pytest.approx(1e-6)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = vit.vit_tiny(10)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    mask = optim.weight_decay_mask(params)
    assert mask["head"]["kernel"] and mask["encoderblock_0"]["attn"]["qkv"]["kernel"]
    assert not mask["head"]["bias"] and not mask["fc_norm"]["scale"]
    assert not mask["pos_embedding"] and not mask["cls"]


def test_adamw_decays_only_masked_parameters():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx, _ = optim.make_optimizer(optim_config(warmup_steps=0), params, global_batch=256, total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only the decoupled decay moves the matrix: -lr * wd * w at step 0 (lr = 1e-3).
    np.testing.assert_allclose(updates["w"], -1e-3 * 0.05 * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_allclose(updates["b"], 0.0)


def test_layer_decay_scales_updates_by_depth():
    model = vit.vit_tiny(10)  # depth 2: layers 0 (embeddings), 1, 2 (blocks), 3 (head, fc_norm)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    config = optim_config(layer_decay=0.5, weight_decay=0.0, warmup_steps=0)
    layers = optim.layer_structure(model)
    assert layers == optim.LayerStructure(layer_id=vit.layer_id, depth=2)
    with_decay, _ = optim.make_optimizer(config, params, global_batch=256, total_steps=10, layers=layers)
    plain_config = optim_config(weight_decay=0.0, warmup_steps=0)
    plain, _ = optim.make_optimizer(plain_config, params, global_batch=256, total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    a, _ = with_decay.update(grads, with_decay.init(params), params)
    b, _ = plain.update(grads, plain.init(params), params)
    ratio = jax.tree.map(lambda x, y: float(jnp.mean(x / y)), a, b)
    assert ratio["head"]["kernel"] == pytest.approx(1.0)
    assert ratio["encoderblock_1"]["mlp"]["fc1"]["kernel"] == pytest.approx(0.5)
    assert ratio["encoderblock_0"]["mlp"]["fc1"]["kernel"] == pytest.approx(0.25)
    assert ratio["pos_embedding"] == pytest.approx(0.125)


def test_only_models_that_declare_layers_have_a_layer_structure():
    from softnce.models.mlp import MLP

    assert optim.layer_structure(MLP(10)) is None
    assert optim.layer_structure(vit.vit_b16(10)) == optim.LayerStructure(vit.layer_id, 12)
    assert isinstance(vit.vit_tiny(10), optim.HasLayerStructure)


def test_layer_decay_without_layers_is_an_error():
    with pytest.raises(ValueError, match="layer_decay is set but the model has no layer structure"):
        optim.make_optimizer(optim_config(layer_decay=0.65), {"w": jnp.ones((2, 2))}, global_batch=8, total_steps=4)


def test_gradient_clipping():
    params = {"w": jnp.zeros((3,))}
    config = optim_config(grad_clip_norm=1.0, warmup_steps=0, weight_decay=0.0, b1=0.0, b2=0.0)
    tx, _ = optim.make_optimizer(config, params, global_batch=256, total_steps=10)
    clip_only = optax.clip_by_global_norm(1.0)
    clipped, _ = clip_only.update({"w": jnp.array([30.0, 40.0, 0.0])}, clip_only.init(params))
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8, 0.0], rtol=1e-6)
    updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))
