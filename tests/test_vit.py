"""ViT (MAE global-pool fine-tuning) and MAE checkpoint conversion.

The reference forward pass is float64 numpy written from MAE's state dict in torch layouts
(Linear ``[out, in]``, Conv ``[out, in, kh, kw]``), independent of the Flax code and of the key
mapping. Tiny shapes: a 2-block, width-32, patch-4 ViT on 32x32 images.
"""

from __future__ import annotations

import argparse
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from softnce.models import mae_checkpoint as mc
from softnce.models import vit

DEPTH, WIDTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 2, 32, 2, 64, 4, 32, 5
GRID = IMAGE // PATCH

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (optional extra softnce[torch])")


# --------------------------------------------------------------------------------------------------
# A MAE-shaped state dict (torch names and layouts) and an independent float64 forward pass.
# --------------------------------------------------------------------------------------------------


def mae_state_dict(seed=0, depth=DEPTH, width=WIDTH, mlp=MLP, patch=PATCH, grid=GRID, decoder=True):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    sd = {
        "cls_token": normal(1, 1, width),
        "pos_embed": normal(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": normal(width, 3, patch, patch),
        "patch_embed.proj.bias": normal(width),
        "norm.weight": 1 + normal(width),
        "norm.bias": normal(width),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + normal(width), b + "norm1.bias": normal(width),
            b + "attn.qkv.weight": normal(3 * width, width), b + "attn.qkv.bias": normal(3 * width),
            b + "attn.proj.weight": normal(width, width), b + "attn.proj.bias": normal(width),
            b + "norm2.weight": 1 + normal(width), b + "norm2.bias": normal(width),
            b + "mlp.fc1.weight": normal(mlp, width), b + "mlp.fc1.bias": normal(mlp),
            b + "mlp.fc2.weight": normal(width, mlp), b + "mlp.fc2.bias": normal(width),
        })
    if decoder:  # MAE's pretraining decoder (present in checkpoints saved by main_pretrain.py)
        sd.update({
            "mask_token": normal(1, 1, 16), "decoder_pos_embed": normal(1, 1 + grid * grid, 16),
            "decoder_embed.weight": normal(16, width), "decoder_embed.bias": normal(16),
            "decoder_blocks.0.attn.qkv.weight": normal(48, 16), "decoder_norm.weight": normal(16),
            "decoder_norm.bias": normal(16), "decoder_pred.weight": normal(3 * patch * patch, 16),
            "decoder_pred.bias": normal(3 * patch * patch),
        })
    return sd


def np_layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def np_gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_vit_forward(sd, images, heads, fc_norm_weight, fc_norm_bias, head_weight, head_bias):
    """MAE's global-pool ViT in float64 numpy; ``images`` ``[B, H, W, 3]``, torch-layout weights."""
    f = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)  # NCHW as torch
    weight = f["patch_embed.proj.weight"]
    width, _, p, _ = weight.shape
    batch, _, height, wid = x.shape
    gh, gw = height // p, wid // p
    tokens = np.zeros((batch, gh * gw, width))
    for i in range(gh):
        for j in range(gw):
            window = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
            tokens[:, i * gw + j] = np.einsum("bchw,dchw->bd", window, weight) + f["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(f["cls_token"], (batch, 1, width)), tokens], 1) + f["pos_embed"]
    depth = len({k.split(".")[1] for k in f if k.startswith("blocks.")})
    head_dim = width // heads
    for i in range(depth):
        b = lambda name: f[f"blocks.{i}.{name}"]  # noqa: E731
        h = np_layer_norm(x, b("norm1.weight"), b("norm1.bias"))
        qkv = h @ b("attn.qkv.weight").T + b("attn.qkv.bias")
        qkv = qkv.reshape(batch, -1, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)  # 3, B, heads, T, hd
        q, k, v = qkv
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, -1, width)
        x = x + out @ b("attn.proj.weight").T + b("attn.proj.bias")
        h = np_layer_norm(x, b("norm2.weight"), b("norm2.bias"))
        h = np_gelu_erf(h @ b("mlp.fc1.weight").T + b("mlp.fc1.bias"))
        x = x + h @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
    pooled = np_layer_norm(x[:, 1:].mean(1), fc_norm_weight, fc_norm_bias)
    return pooled @ head_weight.T + head_bias


def tiny_model(**kwargs):
    return vit.vit_tiny(CLASSES, **kwargs)


def init_params(model, image=IMAGE, seed=0):
    init = lambda key: model.init(key, jnp.zeros((1, image, image, 3)), train=False)["params"]  # noqa: E731
    return jax.jit(init)(jax.random.key(seed))


def param_shapes(model, image=IMAGE):
    """The params tree as ShapeDtypeStructs (nothing is computed)."""
    return jax.eval_shape(lambda: init_params(model, image))


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, init_params(model)


def flat_paths(tree):
    return set(traverse_util.flatten_dict(tree))


# --------------------------------------------------------------------------------------------------
# Key mapping.
# --------------------------------------------------------------------------------------------------


def test_every_key_is_mapped_and_the_tree_completes_the_model(tiny):
    _, params = tiny
    converted = mc.convert_mae_state_dict(mae_state_dict())
    fresh = {path for path in flat_paths(params) if path[0] in ("fc_norm", "head")}
    assert flat_paths(converted) == flat_paths(params) - fresh
    assert fresh == {("fc_norm", "scale"), ("fc_norm", "bias"), ("head", "kernel"), ("head", "bias")}
    sd = mae_state_dict(decoder=False)
    assert len(sd) - 2 == len(flat_paths(converted))  # all but norm.weight/bias are used, once each


@pytest.mark.parametrize("drop", ["blocks.1.attn.qkv.bias", "cls_token", "patch_embed.proj.weight"])
def test_missing_key_is_named(drop):
    sd = mae_state_dict()
    del sd[drop]
    with pytest.raises(ValueError, match=rf"missing keys: \['{drop}'\]"):
        mc.convert_mae_state_dict(sd)


@pytest.mark.parametrize("extra", ["head.weight", "blocks.0.attn.q_bias", "fc_norm.bias"])
def test_unexpected_key_is_named(extra):
    sd = mae_state_dict()
    sd[extra] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=rf"unexpected keys: \['{extra}'\]"):
        mc.convert_mae_state_dict(sd)


def test_inconsistent_shapes_are_reported():
    sd = mae_state_dict()
    sd["pos_embed"] = sd["pos_embed"][..., :-1]
    with pytest.raises(ValueError, match="pos_embed has shape"):
        mc.convert_mae_state_dict(sd)


def test_merge_rejects_a_model_that_does_not_fit(tiny):
    converted = mc.convert_mae_state_dict(mae_state_dict())
    deeper = param_shapes(tiny_model(depth=3))
    with pytest.raises(ValueError, match=r"missing parameters: \['encoderblock_2/attn/proj/bias'"):
        mc.merge_pretrained(deeper, converted)
    wider = param_shapes(tiny_model(hidden_size=64, mlp_dim=128))
    with pytest.raises(ValueError, match=r"shape mismatches: \['cls: pretrained \(1, 1, 32\) vs model \(1, 1, 64\)"):
        mc.merge_pretrained(wider, converted)
    with pytest.raises(ValueError, match=r"unexpected parameters: \['encoderblock_1/"):
        mc.merge_pretrained(param_shapes(tiny_model(depth=1)), converted)
    with pytest.raises(ValueError, match="variables\\['params'\\]"):
        mc.merge_pretrained({"params": tiny[1]}, converted)


def test_merge_keeps_the_fresh_head_and_fc_norm(tiny):
    _, params = tiny
    sd = mae_state_dict()
    merged = mc.merge_pretrained(params, mc.convert_mae_state_dict(sd))
    for name in ("fc_norm", "head"):
        jax.tree.map(np.testing.assert_array_equal, merged[name], params[name])
    np.testing.assert_array_equal(merged["encoderblock_1"]["attn"]["qkv"]["kernel"], sd["blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(merged["pos_embedding"], sd["pos_embed"])


def test_vit_b16_matches_mae_names_and_shapes():
    """MAE's real ViT-B/16 keys and shapes convert into exactly vit_b16's tree (shapes only, no arrays)."""
    d, mlp = 768, 3072
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in {
            "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
            "mlp.fc1.weight": (mlp, d), "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (d, mlp), "mlp.fc2.bias": (d,),
        }.items()})
    state_dict = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
    converted = jax.eval_shape(mc.convert_mae_state_dict, state_dict)
    model = vit.vit_b16(1000)
    init = param_shapes(model, image=224)
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(init)) == 86_567_656  # ViT-B/16, 1000 classes
    merged = jax.eval_shape(mc.merge_pretrained, init, converted)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), merged) == jax.tree.map(lambda s: (s.shape, s.dtype), init)
    assert flat_paths(converted) == {p for p in flat_paths(init) if p[0] not in ("fc_norm", "head")}


# --------------------------------------------------------------------------------------------------
# Forward pass.
# --------------------------------------------------------------------------------------------------


def test_forward_on_converted_weights_matches_float64_numpy(tiny):
    model, params = tiny
    sd = mae_state_dict()
    rng = np.random.default_rng(1)
    params = mc.merge_pretrained(params, mc.convert_mae_state_dict(sd))
    # Replace the fresh fc_norm/head (near-zero head) by random values so the logits are O(1).
    fc_w, fc_b = 1 + 0.2 * rng.standard_normal(WIDTH), 0.2 * rng.standard_normal(WIDTH)
    head_w, head_b = rng.standard_normal((CLASSES, WIDTH)), rng.standard_normal(CLASSES)
    params = {**params, "fc_norm": {"scale": jnp.float32(fc_w), "bias": jnp.float32(fc_b)},
              "head": {"kernel": jnp.float32(head_w.T), "bias": jnp.float32(head_b)}}
    images = rng.standard_normal((3, IMAGE, IMAGE, 3)).astype(np.float32)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images)
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731 (the weights Flax sees)
    want = np_vit_forward(sd, images, HEADS, f32(fc_w), f32(fc_b), f32(head_w), f32(head_b))
    assert logits.shape == (3, CLASSES) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-4)


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
    _, params = tiny
    images = jax.random.normal(jax.random.key(3), (2, IMAGE, IMAGE, 3))
    model16 = tiny_model(dtype=jnp.bfloat16)
    assert jax.tree.map(lambda a: a.dtype, param_shapes(model16)) == jax.tree.map(lambda a: a.dtype, params)
    head = jax.random.normal(jax.random.key(5), params["head"]["kernel"].shape)
    params = {**params, "head": {**params["head"], "kernel": head}}  # O(1) logits instead of ~1e-4
    both = lambda p: [m.apply({"params": p}, images, train=False) for m in (model16, tiny_model())]  # noqa: E731
    logits16, logits32 = jax.jit(both)(params)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))


def test_bad_images_are_rejected(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        model.apply({"params": params}, jnp.zeros((1, 30, 30, 3)), train=False)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)), train=False)


# --------------------------------------------------------------------------------------------------
# Drop path.
# --------------------------------------------------------------------------------------------------


def test_drop_path_rates_increase_linearly_to_the_rate():
    np.testing.assert_allclose(vit.vit_b16(10, drop_path_rate=0.1).block_drop_path_rates(), np.linspace(0, 0.1, 12))


def test_drop_path_is_deterministic_at_eval_and_random_per_sample_in_training(tiny):
    _, params = tiny
    head = jax.random.normal(jax.random.key(5), params["head"]["kernel"].shape)
    params = {**params, "head": {**params["head"], "kernel": head}}  # O(1) logits instead of ~1e-4
    model = tiny_model(drop_path_rate=0.9)
    image = jax.random.normal(jax.random.key(0), (1, IMAGE, IMAGE, 3))
    images = jnp.repeat(image, 16, axis=0)

    @jax.jit
    def outputs(x):
        apply = lambda seed, train: model.apply(  # noqa: E731
            {"params": params}, x, train=train, rngs={"dropout": jax.random.key(seed)})
        no_drop_path = tiny_model().apply({"params": params}, x, train=False)
        return apply(1, False), apply(2, False), no_drop_path, apply(1, True), apply(2, True)

    eval_a, eval_b, no_drop_path, train_a, train_b = outputs(images)
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_allclose(eval_a, no_drop_path, rtol=1e-5)
    assert not np.allclose(train_a, train_b)  # different rngs
    assert not np.allclose(train_a, train_a[:1])  # identical images, different per-sample masks
    assert not np.allclose(train_a, eval_a)


def test_drop_path_drops_whole_branches_per_sample():
    """Each sample's block output is one of 4 cases: attention and MLP branch each kept (x 1/(1-r)) or dropped."""
    rate = 0.5
    block = vit.EncoderBlock(num_heads=HEADS, mlp_dim=MLP, drop_path_rate=rate)

    @jax.jit
    def outputs_and_candidates(x):
        params = block.init(jax.random.key(1), x, train=False)["params"]
        out = block.apply({"params": params}, jnp.repeat(x, 32, axis=0), train=True,
                          rngs={"dropout": jax.random.key(2)})
        # The four candidates, built from the block's parts with its parameters.
        norm = lambda name, h: nn.LayerNorm(epsilon=1e-6).apply({"params": params[name]}, h)  # noqa: E731
        attn = vit.SelfAttention(HEADS).apply({"params": params["attn"]}, norm("norm1", x))
        candidates = {}
        for keep_attn in (0, 1):
            y = x + keep_attn * attn / (1 - rate)
            mlp = vit.Mlp(MLP).apply({"params": params["mlp"]}, norm("norm2", y))
            for keep_mlp in (0, 1):
                candidates[keep_attn, keep_mlp] = (y + keep_mlp * mlp / (1 - rate))[0]
        return out, candidates

    out, candidates = jax.device_get(outputs_and_candidates(jax.random.normal(jax.random.key(0), (1, 5, WIDTH))))
    cases = []
    for row in out:
        matches = [case for case, want in candidates.items() if np.allclose(row, want, atol=1e-5)]
        assert len(matches) == 1
        cases.append(matches[0])
    assert len(set(cases)) >= 3  # per-sample decisions: several cases occur in one batch


# --------------------------------------------------------------------------------------------------
# Position-embedding interpolation.
# --------------------------------------------------------------------------------------------------


def test_interpolation_keeps_cls_and_resizes_the_grid():
    pos = mae_state_dict()["pos_embed"]  # [1, 1 + 8*8, 32]
    assert mc.interpolate_pos_embedding(pos, (GRID, GRID)) is pos  # identity at the same size
    for grid in [(4, 4), (12, 12)]:
        out = np.asarray(mc.interpolate_pos_embedding(pos, grid))
        assert out.shape == (1, 1 + grid[0] * grid[1], WIDTH)
        np.testing.assert_array_equal(out[:, 0], pos[:, 0])


def test_interpolation_reproduces_constants_and_interior_linear_ramps():
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    grid = np.stack([np.ones_like(rows), 2 * rows - cols], axis=-1).reshape(1, 16, 2)
    pos = np.concatenate([np.full((1, 1, 2), 7.0), grid], axis=1).astype(np.float32)
    out = np.asarray(mc.interpolate_pos_embedding(pos, (8, 8)))[0, 1:].reshape(8, 8, 2)
    np.testing.assert_allclose(out[..., 0], 1.0, atol=1e-6)
    # Half-pixel centres: output u samples input (u + 0.5) / 2 - 0.5; u = 3, 4 see only in-range taps.
    centre = (np.arange(8) + 0.5) / 2 - 0.5
    want = 2 * centre[:, None] - centre[None, :]
    np.testing.assert_allclose(out[3:5, 3:5, 1], want[3:5, 3:5], atol=1e-5)


def test_merge_resizes_the_position_embedding(tiny):
    sd = mae_state_dict()
    _, params = tiny
    small = {**params, "pos_embedding": jnp.zeros((1, 17, WIDTH))}  # the tiny model's tree at 16 px (4 x 4 tokens)
    merged = mc.merge_pretrained(small, mc.convert_mae_state_dict(sd))
    np.testing.assert_allclose(merged["pos_embedding"], mc.interpolate_pos_embedding(sd["pos_embed"], (4, 4)))
    assert merged["pos_embedding"].shape == (1, 17, WIDTH)


def mae_sincos_pos_embed(width, size):
    """MAE's fixed 2-D sin-cos position embedding with a zero cls row, ``[1, 1 + size*size, width]``."""
    def one_axis(positions, dim):
        omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
        angles = positions.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    cols, rows = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    grid = np.concatenate([one_axis(cols, width // 2), one_axis(rows, width // 2)], axis=1)
    return np.concatenate([np.zeros((1, width)), grid])[None].astype(np.float32)


@needs_torch
def test_interpolation_is_close_to_torch_bicubic():
    """The documented difference from MAE's torch interpolation (a = -0.5 vs -0.75, border handling)."""
    pos = mae_sincos_pos_embed(768, 14)  # MAE ViT-B/16's pos_embed at 224 px
    patch_rows = torch.from_numpy(pos[0, 1:].reshape(14, 14, 768)).permute(2, 0, 1)[None]
    for size in (8, 16, 24):
        ours = np.asarray(mc.interpolate_pos_embedding(pos, (size, size)))[0, 1:]
        theirs = torch.nn.functional.interpolate(patch_rows, size=(size, size), mode="bicubic", align_corners=False)
        difference = np.abs(ours - theirs[0].permute(1, 2, 0).reshape(-1, 768).numpy())
        assert 1e-3 < difference.max() < 0.06  # different, by at most 0.06 on entries in [-1, 1]
        assert difference.mean() < 0.003


# --------------------------------------------------------------------------------------------------
# Layer ids for layer-wise lr decay.
# --------------------------------------------------------------------------------------------------


def test_layer_id_follows_mae_lrd():
    depth = 12
    assert vit.layer_id(("cls",), depth) == 0
    assert vit.layer_id(("params", "pos_embedding"), depth) == 0
    assert vit.layer_id(("embedding", "kernel"), depth) == 0
    assert vit.layer_id(("encoderblock_0", "norm1", "scale"), depth) == 1
    assert vit.layer_id(("encoderblock_11", "attn", "qkv", "kernel"), depth) == 12
    assert vit.layer_id(("fc_norm", "bias"), depth) == 13
    assert vit.layer_id(("head", "kernel"), depth) == 13
    with pytest.raises(ValueError, match="outside a model of depth 12"):
        vit.layer_id(("encoderblock_12", "mlp"), depth)


def test_layer_ids_tree(tiny):
    _, params = tiny
    ids = vit.layer_ids(params, DEPTH)
    assert ids["cls"] == 0 and ids["embedding"]["kernel"] == 0
    assert ids["encoderblock_1"]["mlp"]["fc2"]["bias"] == 2
    assert ids["head"]["kernel"] == ids["fc_norm"]["scale"] == DEPTH + 1


# --------------------------------------------------------------------------------------------------
# Storage.
# --------------------------------------------------------------------------------------------------


def test_orbax_round_trip(tmp_path):
    converted = mc.convert_mae_state_dict(mae_state_dict())
    mc.save_pretrained_params(tmp_path / "mae", converted)
    restored = mc.load_pretrained_params(tmp_path / "mae")
    assert jax.tree.structure(restored) == jax.tree.structure(converted)
    jax.tree.map(np.testing.assert_array_equal, restored, converted)
    with pytest.raises(FileNotFoundError, match="convert_mae_checkpoint.py"):
        mc.load_pretrained_params(tmp_path / "absent")


def test_missing_torch_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"softnce\[torch\]"):
        mc.load_torch_state_dict(tmp_path / "x.pth")


@needs_torch
def test_load_torch_state_dict(tmp_path):
    sd = mae_state_dict()
    tensors = {name: torch.from_numpy(value) for name, value in sd.items()}
    tensors["blocks.0.norm1.bias"] = tensors["blocks.0.norm1.bias"].to(torch.float16)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": tensors, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, wrapped)  # main_pretrain style
    plain = tmp_path / "plain.pth"
    torch.save(tensors, plain)
    for path in (wrapped, plain):
        loaded = mc.load_torch_state_dict(path)
        assert set(loaded) == set(sd)
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in loaded.values())
        np.testing.assert_array_equal(loaded["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
        np.testing.assert_allclose(loaded["blocks.0.norm1.bias"], sd["blocks.0.norm1.bias"], atol=1e-3)
    with pytest.raises(FileNotFoundError):
        mc.load_torch_state_dict(tmp_path / "absent.pth")


@needs_torch
def test_conversion_cli_end_to_end(tmp_path, tiny, capsys):
    model, params = tiny
    sd = mae_state_dict()
    torch.save({"model": {name: torch.from_numpy(value) for name, value in sd.items()}}, tmp_path / "mae.pth")
    output = mc.main(["--input", str(tmp_path / "mae.pth"), "--output", str(tmp_path / "flax")])
    assert "depth 2, width 32, patch 4" in capsys.readouterr().out
    merged = mc.merge_pretrained(params, mc.load_pretrained_params(output))
    np.testing.assert_array_equal(merged["embedding"]["kernel"], sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(FileExistsError):
        mc.main(["--input", str(tmp_path / "mae.pth"), "--output", output])
