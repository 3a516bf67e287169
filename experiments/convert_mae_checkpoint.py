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

from softnce.models import mae_checkpoint

if __name__ == "__main__":
    mae_checkpoint.main()
