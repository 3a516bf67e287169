"""A ResNet with BatchNorm trained from scratch on CIFAR-100 or Tiny ImageNet, with any loss.

Launch::

    python -m softnce.main --config configs/resnet.py:dataset=cifar100,model=resnet18,loss=soft_target_infonce \\
      --workdir runs/c100_resnet18_sti

Variants (``key=value`` after the colon):
  dataset: ``cifar100`` (32 px) | ``tiny_imagenet`` (64 px); both at their native size, so the ResNet has
    the small-image stem (``model.small_images``: a 3x3 stride-1 convolution, no max pool).
  model: ``resnet18`` (default) | ``resnet50`` (softnce.models.resnet).
  loss: any registered loss; ``nll`` and ``infonce`` train on hard labels, every other loss on the soft-target
    recipe (label smoothing 0.1, MixUp 0.8 / CutMix 1.0), as in configs/vit_finetune.py.
  epochs: 100 by default; batch: 256 global; seed.

The image pipeline is the recipe's (softnce.data.images: random resized crop, flip, RandAugment, random
erasing) at the native size. AdamW, lr = 2e-3 * batch / 256 after 5 warm-up epochs, half-cosine to 1e-6,
weight decay 0.05, temperature 1: a starting point, not tuned here. BatchNorm's running statistics are the
model's state (softnce.steps.TrainState): averaged over the devices after every step, checkpointed with
the run and used by evaluation, inference and the export.
"""

import ml_collections

from softnce import config_utils
from softnce.configs import base

SIZES = {"cifar100": (50_000, 32), "tiny_imagenet": (100_000, 64)}  # (training examples, image side)
MODELS = ("resnet18", "resnet50")


def get_config(arg=None):
    args = config_utils.parse_arg(arg, dataset="cifar100", model="resnet18", loss="soft_target_infonce", epochs=100,
                                  batch=256, seed=0)
    if args["dataset"] not in SIZES:
        raise ValueError(f"unknown dataset {args['dataset']!r}; valid datasets: {', '.join(SIZES)}.")
    if args["model"] not in MODELS:
        raise ValueError(f"unknown model {args['model']!r}; valid models: {', '.join(MODELS)}.")
    num_train, image_size = SIZES[args["dataset"]]
    steps_per_epoch = num_train // args["batch"]

    config = base.get_config()
    config.seed = args["seed"]
    config.num_train_steps = args["epochs"] * steps_per_epoch
    config.eval_every_steps = config.checkpoint_every_steps = 5 * steps_per_epoch
    config.data.update(config_utils.image_data_config())
    config.data.update(name=args["dataset"], image_size=image_size, batch_size=args["batch"],
                       eval_batch_size=args["batch"], validation_fraction=0.02)
    config.model = ml_collections.ConfigDict(dict(name=args["model"], small_images=True))
    base.set_loss(config, args["loss"])
    config.optim.update(base_lr=2e-3, warmup_steps=5 * steps_per_epoch)
    return config
