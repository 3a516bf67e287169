"""Vision Transformer as MAE fine-tunes it (global average pooling + ``fc_norm``), in Flax linen.

The architecture is MAE's ``models_vit.VisionTransformer(global_pool=True)`` (timm's ViT):

    x_0   = [cls ; patches(images) W_e + b_e] + pos            [B, 1 + N, D],  N = (H/p)(W/p)
    y_l   = x_{l-1} + DropPath_l(MHSA(LN1_l(x_{l-1})))
    x_l   = y_l     + DropPath_l(MLP(LN2_l(y_l)))                MLP = fc2(gelu_erf(fc1(.)))
    f     = fc_norm(mean_{n=1..N} x_L[:, n])                     the cls token is not pooled
    logits = f W_h + b_h                                          [B, C]

with pre-norm LayerNorms (eps 1e-6), multi-head self-attention with one fused ``qkv`` projection
(with bias, heads split as timm does: output feature ``o = s*D + h*D/heads + d`` for
``s in {q, k, v}``), exact (erf) GELU as ``torch.nn.GELU()``, and no final ``norm`` on this
path (MAE deletes it when ``global_pool=True``). Drop path (stochastic depth) drops whole residual
branches per sample with rate ``drop_path_rate * l / (depth - 1)`` for block ``l = 0..depth-1``
(``torch.linspace(0, rate, depth)``) and rescales kept samples by ``1 / (1 - rate)``.

Parameter tree (``params`` collection)::

    embedding/{kernel [p, p, 3, D], bias [D]}   cls [1, 1, D]   pos_embedding [1, 1 + N, D]
    encoderblock_{l}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}
    fc_norm/{scale, bias}   head/{kernel [D, C], bias [C]}

The position-embedding length is fixed at ``init`` by the image size given there; applying the
model to another resolution raises flax's ``ScopeParamShapeError`` for ``pos_embedding``: initialise
at the new size and resize pretrained weights into it
(:func:`softnce.models.mae_checkpoint.merge_pretrained`, ``interpolate_pos_embedding``).

Initialisation (used when training from scratch; fine-tuning overwrites all but ``fc_norm`` and
``head``): dense kernels truncated normal std 0.02 (timm), patch embedding Xavier-uniform on the
flattened ``[p*p*3, D]`` kernel (MAE), ``cls``/``pos_embedding`` truncated normal std 0.02, head
truncated normal std 2e-5 (MAE fine-tuning), biases 0, LayerNorm scale 1. JAX's truncated normal
cuts at 2 standard deviations and rescales so the *truncated* distribution has the given std;
torch's ``trunc_normal_(std=s)`` cuts at +-2 in absolute value, i.e. it is a plain normal at these
small stds. The difference is immaterial for training.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softnce.models.factory import variant
from softnce.optim import LayerStructure

Dtype = Any

LAYER_NORM_EPS = 1e-6
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_embedding_init = nn.initializers.truncated_normal(stddev=0.02)
_head_init = nn.initializers.truncated_normal(stddev=2e-5)
# Xavier-uniform of the kernel seen as a [p*p*3, D] matrix, as MAE initialises its patch embedding.
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    # Two-pass variance (E[(x - mean)^2]) as torch computes it, not E[x^2] - mean^2.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, use_fast_variance=False, name=name)


@jax.custom_jvp
def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU ``x Phi(x)`` (``torch.nn.GELU()``); the value is ``jax.nn.gelu(x, approximate=False)``.

    Only the derivative is this module's own: ``Phi(x) + x phi(x)`` with
    ``phi(x) = exp(-x^2 / 2) / sqrt(2 pi)``, instead of differentiating ``erf``/``erfc``.
    """
    return jax.nn.gelu(x, approximate=False)


# Workaround for an upstream jax bug (seen in jax 0.12.0.1; jax 0.10.x is not affected): the JVP
# of lax.erf/erfc computes exp(-x^2) as jax._src.lax.erf.exp_neg_sq, whose _expm1_lo evaluates
# lax.polynomial(u, [1, 1/2, 1/6, 1/24, 1/120]). lax.polynomial turns those Python-float
# coefficients into constants that vary over no mesh axis and binds polynomial_p without the
# core.auto_insert_reshard (pvary) that add/mul do, so under jax.shard_map with check_vma=True
# (the default) a device-varying x fails with "Primitive polynomial requires varying manual axes
# to match". Giving only GELU's derivative in closed form keeps check_vma on for the whole step;
# the forward value is jax.nn.gelu's, bit for bit (tests/test_vit_gelu.py tests both sides).
@gelu_erf.defjvp
def _gelu_erf_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    x = jnp.asarray(x)
    cdf = 0.5 * jax.lax.erfc(-x * np.sqrt(0.5).astype(x.dtype))  # Phi(x); erfc's value is fine
    pdf = jnp.exp(-0.5 * x * x) * np.asarray(1.0 / np.sqrt(2.0 * np.pi), x.dtype)
    return gelu_erf(x), (cdf + x * pdf) * x_dot


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's ``Attention``).

    ``x`` ``[B, T, D]`` -> ``[B, T, D]``: ``[q | k | v] = x W_qkv + b_qkv`` ``[B, T, 3D]``, split
    into ``num_heads`` heads of ``D / num_heads``; ``softmax(q k^T / sqrt(D / heads)) v`` per head
    (``jax.nn.dot_product_attention``, softmax in float32), heads concatenated, then ``proj``.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=_dense_init, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        attended = jax.nn.dot_product_attention(q, k, v)  # [B, T, heads, head_dim]
        attended = attended.reshape(batch, tokens, width)
        return nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init, name="proj")(attended)


class Mlp(nn.Module):
    """``fc2(gelu_erf(fc1(x)))``, ``[B, T, D]`` -> ``[B, T, mlp_dim]`` -> ``[B, T, D]``."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_dense_init, name="fc1")(x)
        hidden = gelu_erf(hidden)
        return nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init, name="fc2")(hidden)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with per-sample drop path on both residual branches."""

    num_heads: int
    mlp_dim: int
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # Dropout broadcast over (tokens, features) = one keep/drop decision per sample, scaled by
        # 1 / (1 - rate): exactly timm's DropPath.
        drop_path = nn.Dropout(
            self.drop_path_rate, broadcast_dims=(1, 2), deterministic=not train, name="drop_path"
        )
        attention = SelfAttention(self.num_heads, dtype=self.dtype, name="attn")
        branch = attention(_layer_norm("norm1", self.dtype)(x))
        x = x + drop_path(branch)
        branch = Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))
        return x + drop_path(branch)


class VisionTransformer(nn.Module):
    """ViT classifier with MAE's global-pool fine-tuning head; see the module docstring.

    Attributes:
      num_classes: C, the number of logits.
      patch_size: p; images must have height and width divisible by p.
      hidden_size: D, the token width.
      depth: the number of encoder blocks L.
      num_heads: attention heads (D must be divisible by it).
      mlp_dim: the MLP's hidden width (4 D in ViT-B).
      drop_path_rate: the stochastic-depth rate of the last block (linear from 0 at block 0).
      dtype: the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32 and the logits are
        returned in float32 (the head is computed in float32).
    """

    num_classes: int
    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    def _check_config(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionTransformer: hidden_size={self.hidden_size} must be divisible by "
                f"num_heads={self.num_heads}."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(
                f"VisionTransformer: drop_path_rate must be in [0, 1), got {self.drop_path_rate}."
            )

    def _check_images(self, images: jax.Array) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"VisionTransformer: images must be [B, H, W, 3], got shape {tuple(images.shape)}."
            )
        height, width = images.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"VisionTransformer: image size {height}x{width} is not divisible by patch_size="
                f"{self.patch_size}; resize or crop the images."
            )

    def layer_structure(self) -> LayerStructure:
        """:func:`layer_id` and ``depth``, for layer-wise lr decay (:class:`softnce.optim.HasLayerStructure`)."""
        return LayerStructure(layer_id=layer_id, depth=self.depth)

    def block_drop_path_rates(self) -> list[float]:
        """``drop_path_rate * l / (depth - 1)`` for ``l = 0..depth-1`` (``torch.linspace``)."""
        if self.depth == 1:
            return [0.0]
        return [self.drop_path_rate * layer / (self.depth - 1) for layer in range(self.depth)]

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """``images`` float ``[B, H, W, 3]`` -> float32 logits ``[B, num_classes]``.

        With ``train=True`` and ``drop_path_rate > 0`` it needs a ``'dropout'`` rng.
        """
        self._check_config()
        self._check_images(images)
        patches = nn.Conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=_patch_init,
            name="embedding",
        )(images)
        batch, grid_h, grid_w, width = patches.shape
        tokens = patches.reshape(batch, grid_h * grid_w, width)  # row-major patches, as torch's flatten(2)

        cls = self.param("cls", _embedding_init, (1, 1, width))
        pos_embedding = self.param("pos_embedding", _embedding_init, (1, 1 + grid_h * grid_w, width))
        cls = jnp.broadcast_to(cls, (batch, 1, width)).astype(tokens.dtype)
        x = jnp.concatenate([cls, tokens], axis=1) + pos_embedding.astype(tokens.dtype)

        for layer, rate in enumerate(self.block_drop_path_rates()):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, rate, dtype=self.dtype, name=f"encoderblock_{layer}"
            )(x, train=train)

        pooled = x[:, 1:].mean(axis=1)  # global average over the patch tokens, cls excluded
        pooled = _layer_norm("fc_norm", self.dtype)(pooled)
        head = nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            kernel_init=_head_init,
            bias_init=nn.initializers.zeros,
            name="head",
        )
        return head(pooled.astype(jnp.float32))


def layer_id(path: Sequence[str], depth: int) -> int:
    """Layer id for layer-wise lr decay (BEiT/MAE ``get_layer_id_for_vit``).

    ``cls``, ``pos_embedding`` and ``embedding/*`` -> 0; ``encoderblock_i/*`` -> ``i + 1``;
    everything else (``fc_norm``, ``head``) -> ``depth + 1``. MAE then scales the learning rate of
    layer ``j`` by ``decay ** (depth + 1 - j)``. ``path`` is a parameter path of the ``params``
    tree, optionally starting with ``'params'``, e.g. ``('encoderblock_3', 'attn', 'qkv', 'kernel')``.
    """
    names = tuple(path)
    if names and names[0] == "params":
        names = names[1:]
    if not names:
        raise ValueError(f"layer_id: empty parameter path {tuple(path)!r}.")
    top = names[0]
    if top in ("cls", "pos_embedding", "embedding"):
        return 0
    if top.startswith("encoderblock_"):
        block = int(top[len("encoderblock_"):])
        if not 0 <= block < depth:
            raise ValueError(f"layer_id: {top!r} is outside a model of depth {depth}.")
        return block + 1
    return depth + 1


def layer_ids(params: Any, depth: int) -> Any:
    """The tree of :func:`layer_id` values with the structure of ``params`` (for ``optax`` masks/scales)."""

    def leaf_id(key_path, _):
        return layer_id(tuple(str(getattr(k, "key", k)) for k in key_path), depth)

    return jax.tree_util.tree_map_with_path(leaf_id, params)


vit_b16 = variant(VisionTransformer, "vit_b16", "ViT-B/16 (86.6M params): D=768, 12 blocks, 12 heads, MLP 3072, "
                  "patch 16 (MAE's vit_base_patch16).", patch_size=16, hidden_size=768, depth=12, num_heads=12,
                  mlp_dim=3072)
vit_tiny = variant(VisionTransformer, "vit_tiny", "A tiny ViT for tests and CPU smoke runs: patch 4 (8x8 tokens at "
                   "32 px), D=32, 2 blocks, 2 heads.", patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_dim=64)
