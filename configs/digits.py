"""scikit-learn digits (8x8, 10 classes): the five losses on real data, in about 10 s per run on CPU.

Launch (one run)::

    python -m softnce.main --config configs/digits.py:loss=soft_target_infonce,seed=0 --workdir runs/digits_sti

Variants (``key=value`` after the colon): ``loss`` (any registered loss), ``seed``, ``steps``,
``augment`` (``auto``: label smoothing 0.1 + MixUp 0.8 / CutMix 1.0 for soft-target losses and
none for the hard-label losses ``nll`` and ``infonce``, as in the paper's comparison; ``on``; ``off``).
Expected: about 96-98% top-1 on the 540 test images for every loss (see README/BENCHMARKS for
the measured 5-seed table from ``experiments/digits_comparison.py``).
"""

import ml_collections

from softnce import config_utils
from softnce.configs import base


def get_config(arg=None):
    args = config_utils.parse_arg(arg, loss="soft_target_infonce", seed=0, steps=600, augment="auto")
    config = base.get_config()
    config.seed = args["seed"]
    config.num_train_steps = args["steps"]
    config.eval_every_steps = config.checkpoint_every_steps = 300
    # 10% of the 1,257 training images (base's validation_fraction) fit the post-hoc temperature.
    config.data.update(name="digits", eval_batch_size=272)
    config.model = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(256, 256), dropout_rate=0.0))
    base.set_loss(config, args["loss"], args["augment"])
    config.optim.warmup_steps = min(config.optim.warmup_steps, args["steps"] - 1)
    return config
