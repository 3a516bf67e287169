"""Converts MAE's PyTorch ViT checkpoint to an orbax checkpoint of Flax parameters.

    python experiments/convert_mae_checkpoint.py \\
        --input mae_pretrain_vit_base.pth --output /path/to/mae_vit_b16_flax

Needs PyTorch (``pip install 'softnce[torch]'``). The output directory holds the encoder of
:class:`softnce.models.vit.VisionTransformer` at the checkpoint's resolution (no ``fc_norm``,
no ``head``); the trainer restores it with
``softnce.models.mae_checkpoint.load_pretrained_params(DIR)`` and completes a fresh parameter tree
with ``merge_pretrained(init_params, pretrained)``, which also resizes the position embedding to the
fine-tuning resolution. The weights are downloaded by hand from MAE's repository
(facebookresearch/mae, "Pre-trained checkpoints": ViT-Base ``mae_pretrain_vit_base.pth``).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from softnce.models import mae_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", required=True, help="MAE PyTorch checkpoint, e.g. mae_pretrain_vit_base.pth"
    )
    parser.add_argument("--output", required=True, help="new directory for the orbax checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Runs the conversion; returns the absolute output directory."""
    args = parse_args(argv)
    output = os.path.abspath(args.output)
    if os.path.exists(output):
        raise FileExistsError(f"--output {output!r} exists; give a new directory (nothing is overwritten).")
    state_dict = mae_checkpoint.load_torch_state_dict(args.input)
    params = mae_checkpoint.convert_mae_state_dict(state_dict)
    mae_checkpoint.save_pretrained_params(output, params)

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
    main(sys.argv[1:])
