"""MAE pretrained ViT weights for :class:`softnce.models.vit.VisionTransformer`.

The pipeline, as MAE's ``main_finetune.py`` loads a pretrain checkpoint into its global-pool model:

1. :func:`load_torch_state_dict` reads a PyTorch checkpoint (``mae_pretrain_vit_base.pth``) into
   ``{name: float32 numpy array}`` (needs the optional ``torch`` extra).
2. :func:`convert_mae_state_dict` maps every encoder key to this project's Flax parameter paths and
   drops what MAE's fine-tuning drops: the final ``norm.*`` (global-pool fine-tuning uses a fresh
   ``fc_norm``) and, when present, the pretraining decoder (``mask_token``, ``decoder_*``). Any
   other key, or a missing encoder key, is an error.
3. :func:`save_pretrained_params` / :func:`load_pretrained_params` store the converted tree as an
   orbax checkpoint (``python -m softnce.models.mae_checkpoint``, or ``experiments/convert_mae_checkpoint.py``,
   does steps 1-3 once, offline).
4. :func:`merge_pretrained` puts the pretrained tree into a freshly initialised ``params`` tree of
   the model to fine-tune: it keeps the fresh ``fc_norm`` and ``head`` (MAE asserts that exactly
   these are missing), resizes ``pos_embedding`` when the model's token grid differs from the
   checkpoint's (:func:`interpolate_pos_embedding`), and raises on any other mismatch.

Layout conversions (torch -> Flax): ``Linear.weight [out, in]`` -> ``Dense.kernel [in, out]``
(transpose); ``Conv2d.weight [D, 3, p, p]`` -> ``Conv.kernel [p, p, 3, D]``; LayerNorm ``weight`` ->
``scale``. The fused ``qkv`` projection keeps timm's feature order, so no head count is needed.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from softnce import cli

Params = dict[str, Any]

TORCH_INSTALL_HINT = "pip install 'softnce[torch]'  (or: pip install torch)"

# Parameters of a fine-tuning model that a pretrain checkpoint does not provide.
FRESH_PARAMS = ("fc_norm", "head")
# Keys MAE's global-pool fine-tuning does not load: the encoder's final norm and the decoder.
_DROPPED_EXACT = {"norm.weight", "norm.bias", "mask_token", "decoder_pos_embed"}
_DROPPED_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")

_identity: Callable[[Any], Any] = lambda x: x  # noqa: E731
_linear_kernel: Callable[[Any], Any] = lambda w: w.transpose(1, 0)  # noqa: E731
_conv_kernel: Callable[[Any], Any] = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731

# (torch name, Flax path, layout conversion) outside the blocks.
_STEM_KEYS = (
    ("cls_token", ("cls",), _identity),
    ("pos_embed", ("pos_embedding",), _identity),
    ("patch_embed.proj.weight", ("embedding", "kernel"), _conv_kernel),
    ("patch_embed.proj.bias", ("embedding", "bias"), _identity),
)
# (torch suffix after "blocks.{i}.", Flax path below "encoderblock_{i}", layout conversion).
_BLOCK_KEYS = (
    ("norm1.weight", ("norm1", "scale"), _identity),
    ("norm1.bias", ("norm1", "bias"), _identity),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), _linear_kernel),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), _identity),
    ("attn.proj.weight", ("attn", "proj", "kernel"), _linear_kernel),
    ("attn.proj.bias", ("attn", "proj", "bias"), _identity),
    ("norm2.weight", ("norm2", "scale"), _identity),
    ("norm2.bias", ("norm2", "bias"), _identity),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), _linear_kernel),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), _identity),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), _linear_kernel),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), _identity),
)
_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------------
# Reading PyTorch checkpoints.
# --------------------------------------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"Reading a PyTorch checkpoint needs PyTorch: {TORCH_INSTALL_HINT}") from error
    return torch


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into ``{name: float32 numpy array}``.

    Loads with ``torch.load(path, map_location='cpu', weights_only=True)`` (no arbitrary code runs;
    ``argparse.Namespace``, which MAE's own training checkpoints store under ``'args'``, is allowed),
    takes the ``'model'`` entry if there is one, and converts every tensor to float32 numpy.
    """
    torch = _import_torch()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_torch_state_dict: no checkpoint file at {os.fspath(path)!r}.")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"load_torch_state_dict: {os.fspath(path)!r} holds a {type(state_dict).__name__}, not a state "
            "dict (a mapping of parameter names to tensors, possibly under the key 'model')."
        )
    not_tensors = sorted(name for name, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"load_torch_state_dict: entries of {os.fspath(path)!r} are not tensors: {not_tensors}."
        )
    return {name: value.detach().to(torch.float32).numpy() for name, value in state_dict.items()}


# --------------------------------------------------------------------------------------------------
# Key mapping.
# --------------------------------------------------------------------------------------------------


def _is_dropped(name: str) -> bool:
    return name in _DROPPED_EXACT or name.startswith(_DROPPED_PREFIXES)


def _depth_of(state_dict: Mapping[str, Any]) -> int:
    indices = {int(match.group(1)) for name in state_dict if (match := _BLOCK_NAME.match(name))}
    return max(indices) + 1 if indices else 0


def expected_mae_keys(depth: int) -> list[str]:
    """The encoder keys a MAE ViT of ``depth`` blocks must provide (``norm.*`` and decoder aside)."""
    return [name for name, _, _ in _STEM_KEYS] + [
        f"blocks.{block}.{suffix}" for block in range(depth) for suffix, _, _ in _BLOCK_KEYS
    ]


def _mapping(depth: int) -> dict[str, tuple[tuple[str, ...], Callable[[Any], Any]]]:
    table = {name: (path, convert) for name, path, convert in _STEM_KEYS}
    for block in range(depth):
        for suffix, path, convert in _BLOCK_KEYS:
            table[f"blocks.{block}.{suffix}"] = ((f"encoderblock_{block}",) + path, convert)
    return table


def _check_stem_shapes(state_dict: Mapping[str, Any]) -> None:
    width = state_dict["cls_token"].shape[-1]
    checks = {
        "cls_token": (tuple(state_dict["cls_token"].shape), (1, 1, width)),
        "pos_embed": (tuple(state_dict["pos_embed"].shape[::2]), (1, width)),
        "patch_embed.proj.weight": (tuple(state_dict["patch_embed.proj.weight"].shape[:2]), (width, 3)),
    }
    for name, (got, want) in checks.items():
        if got != want:
            raise ValueError(
                f"convert_mae_state_dict: {name} has shape {tuple(state_dict[name].shape)}, "
                "inconsistent with "
                f"cls_token {tuple(state_dict['cls_token'].shape)} (width {width}, 3 input channels)."
            )


def convert_mae_state_dict(state_dict: Mapping[str, Any]) -> Params:
    """Maps MAE's ViT state dict to a (partial) Flax ``params`` tree of :class:`VisionTransformer`.

    Args:
      state_dict: ``{torch name: array}`` as :func:`load_torch_state_dict` returns (numpy arrays;
        any array type with ``.shape``/``.transpose`` works, so ``jax.eval_shape`` can trace it).
        Encoder keys: ``cls_token [1, 1, D]``, ``pos_embed [1, 1 + N, D]``,
        ``patch_embed.proj.{weight [D, 3, p, p], bias [D]}``, and per block ``i`` ``blocks.{i}.``
        ``norm1``, ``attn.qkv [3D, D]``, ``attn.proj [D, D]``, ``norm2``, ``mlp.fc1 [M, D]``,
        ``mlp.fc2 [D, M]`` (``.weight`` and ``.bias`` each).

    Returns:
      ``{'cls', 'pos_embedding', 'embedding', 'encoderblock_{i}'}`` with Flax layouts; no
      ``fc_norm`` or ``head`` (use :func:`merge_pretrained` to complete a fresh ``params`` tree).
      The position embedding keeps the checkpoint's grid.

    Raises:
      ValueError: naming every unexpected key and every missing encoder key.
    """
    depth = _depth_of(state_dict)
    table = _mapping(depth)
    unexpected = sorted(name for name in state_dict if name not in table and not _is_dropped(name))
    missing = [name for name in expected_mae_keys(depth) if name not in state_dict]
    if unexpected or missing:
        raise ValueError(
            "convert_mae_state_dict: the state dict is not a MAE ViT encoder checkpoint "
            f"(inferred depth {depth}).\n  unexpected keys: {unexpected}\n  missing keys: {missing}\n"
            "Expected the keys of MAE's mae_pretrain_vit_*.pth "
            "(encoder; 'norm.*' and decoder keys are dropped)."
        )
    _check_stem_shapes(state_dict)
    flat = {path: convert(state_dict[name]) for name, (path, convert) in table.items()}
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------
# Position embeddings at other resolutions.
# --------------------------------------------------------------------------------------------------


def interpolate_pos_embedding(pos_embedding: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Resizes a ``[1, 1 + n*n, D]`` position embedding to a ``grid = (h, w)`` token grid.

    As MAE's ``interpolate_pos_embed``: the cls row is kept unchanged, the ``n x n`` patch rows are
    resized bicubically to ``h x w`` and flattened row-major, giving ``[1, 1 + h*w, D]``; at the same
    grid the input is returned unchanged.

    Uses ``jax.image.resize(method='bicubic', antialias=False)`` (half-pixel centres, like torch's
    ``align_corners=False``; no antialiasing, like torch's default). It differs numerically from
    torch's ``F.interpolate(mode='bicubic', align_corners=False)``: JAX uses the Keys kernel with
    ``a = -0.5`` where torch uses ``a = -0.75``, and at the border JAX renormalises the weights of
    the in-range samples where torch repeats the edge sample. On MAE's ViT-B position embedding
    (fixed 2-D sin-cos, entries in [-1, 1]) the largest absolute difference from torch is 0.052 and
    the mean 0.0024, for 14x14 -> 24x24 (384 px), -> 16x16 and -> 8x8 alike (measured with torch
    2.13); a model at a new resolution is fine-tuned anyway.
    """
    if pos_embedding.ndim != 3 or pos_embedding.shape[0] != 1:
        raise ValueError(
            f"interpolate_pos_embedding: expected [1, 1 + n*n, D], got shape {tuple(pos_embedding.shape)}."
        )
    _, tokens, width = pos_embedding.shape
    size = _square_grid(tokens, "interpolate_pos_embedding: the input")[0]
    if (size, size) == tuple(grid):
        return pos_embedding
    patch_rows = pos_embedding[0, 1:].reshape(size, size, width)
    resized = jax.image.resize(patch_rows, (grid[0], grid[1], width), method="bicubic", antialias=False)
    resized = resized.reshape(1, grid[0] * grid[1], width).astype(pos_embedding.dtype)
    return jnp.concatenate([pos_embedding[:, :1], resized], axis=1)


def _square_grid(tokens: int, what: str) -> tuple[int, int]:
    """``(n, n)`` for a position embedding of ``1 + n*n`` tokens (cls + a square grid)."""
    size = int(round(max(tokens - 1, 0) ** 0.5))
    if size * size != tokens - 1:
        raise ValueError(
            f"{what} position embedding has {tokens} tokens, not 1 + n*n: only square token grids "
            "(square images) can be resized."
        )
    return size, size


# --------------------------------------------------------------------------------------------------
# Merging into a fresh model.
# --------------------------------------------------------------------------------------------------


def merge_pretrained(init_params: Params, pretrained: Params) -> Params:
    """Fills a freshly initialised ``params`` tree with pretrained weights.

    Every leaf of ``pretrained`` must exist in ``init_params`` with the same shape, except
    ``pos_embedding``, which is resized to the model's token grid with
    :func:`interpolate_pos_embedding`. Every leaf of ``init_params`` that ``pretrained`` lacks must be
    under ``fc_norm`` or ``head``; those keep their fresh values (MAE: fresh ``fc_norm``, head drawn
    from a truncated normal with std 2e-5). Leaves are cast to the ``init_params`` dtype.

    Raises:
      ValueError: listing unexpected, missing and wrongly shaped parameters.
    """
    if "params" in init_params and len(init_params) == 1:
        raise ValueError(
            "merge_pretrained: pass the 'params' collection (variables['params']), not all variables."
        )
    init_flat = traverse_util.flatten_dict(init_params)
    pretrained_flat = dict(traverse_util.flatten_dict(pretrained))
    key = ("pos_embedding",)
    if key in pretrained_flat and key in init_flat and pretrained_flat[key].shape != init_flat[key].shape:
        grid = _square_grid(init_flat[key].shape[1], "merge_pretrained: the model's")
        pretrained_flat[key] = interpolate_pos_embedding(pretrained_flat[key], grid)

    unexpected = sorted("/".join(path) for path in pretrained_flat if path not in init_flat)
    missing = sorted(
        "/".join(path) for path in init_flat if path not in pretrained_flat and path[0] not in FRESH_PARAMS
    )
    mismatched = sorted(
        f"{'/'.join(path)}: pretrained {tuple(value.shape)} vs model {tuple(init_flat[path].shape)}"
        for path, value in pretrained_flat.items()
        if path in init_flat and tuple(value.shape) != tuple(init_flat[path].shape)
    )
    if unexpected or missing or mismatched:
        raise ValueError(
            "merge_pretrained: the pretrained weights do not fit the model "
            "(check depth, width, patch size).\n"
            f"  unexpected parameters: {unexpected}\n  missing parameters: {missing}\n"
            f"  shape mismatches: {mismatched}"
        )
    merged = {
        path: jnp.asarray(pretrained_flat[path], dtype=value.dtype) if path in pretrained_flat else value
        for path, value in init_flat.items()
    }
    return traverse_util.unflatten_dict(merged)


# --------------------------------------------------------------------------------------------------
# Storage as an orbax checkpoint.
# --------------------------------------------------------------------------------------------------


def save_pretrained_params(path: str | os.PathLike, params: Params) -> None:
    """Writes a (converted) ``params`` tree to a new orbax checkpoint directory ``path``."""
    import orbax.checkpoint as ocp

    from softnce.checkpointing import resolve

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(resolve(path), params)
    checkpointer.wait_until_finished()


def load_pretrained_params(path: str | os.PathLike) -> Params:
    """Restores a tree written by :func:`save_pretrained_params` as host numpy arrays."""
    import orbax.checkpoint as ocp

    from softnce.checkpointing import resolve

    directory = resolve(path)  # local paths or gs:// buckets
    if not directory.is_dir():
        raise FileNotFoundError(
            f"load_pretrained_params: no checkpoint directory at {str(directory)!r}; create it with "
            "experiments/convert_mae_checkpoint.py --input mae_pretrain_vit_base.pth --output DIR."
        )
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(directory).item_metadata
    target = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), metadata)
    return checkpointer.restore(directory, target)


# --------------------------------------------------------------------------------------------------
# The command line: python -m softnce.models.mae_checkpoint --input mae_pretrain_vit_base.pth --output DIR
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        description="Converts MAE's PyTorch ViT checkpoint to an orbax checkpoint of Flax parameters."
    )
    parser.add_argument("--input", required=True, help="MAE PyTorch checkpoint, e.g. mae_pretrain_vit_base.pth")
    parser.add_argument("--output", required=True, help="new directory for the orbax checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Runs the conversion; returns the absolute output directory."""
    args = parse_args(argv)
    output = os.path.abspath(args.output)
    if os.path.exists(output):
        raise FileExistsError(f"--output {output!r} exists; give a new directory (nothing is overwritten).")
    state_dict = load_torch_state_dict(args.input)
    params = convert_mae_state_dict(state_dict)
    save_pretrained_params(output, params)

    depth = sum(1 for name in params if name.startswith("encoderblock_"))
    patch, _, _, width = params["embedding"]["kernel"].shape
    tokens = params["pos_embedding"].shape[1]
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    print(
        f"Converted {len(state_dict)} tensors of {args.input} -> {output}\n"
        f"  ViT: depth {depth}, width {width}, patch {patch}, {tokens - 1} patch positions + cls, "
        f"{count / 1e6:.2f}M parameters (norm.* and decoder keys dropped; fc_norm and head are fresh)."
    )
    return output


if __name__ == "__main__":
    main()
