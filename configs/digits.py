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

HARD_LABEL_LOSSES = ("nll", "infonce")


def get_config(arg=None):
    args = config_utils.parse_arg(arg, loss="soft_target_infonce", seed=0, steps=600, augment="auto")
    config = ml_collections.ConfigDict()
    config.seed = args["seed"]
    config.num_train_steps = args["steps"]
    config.log_every_steps = 100
    config.eval_every_steps = 300
    config.checkpoint_every_steps = 300
    config.max_checkpoints = 2
    config.step_timeout_s = config_utils.none(float)  # the step watchdog; None = automatic (softnce.watchdog)
    config.max_steps_in_flight = config_utils.none(int)  # None = 1 on CPU, 2 on accelerators

    # 10% of the 1,257 training images are held out to fit the post-hoc temperature.
    config.data = ml_collections.ConfigDict(dict(
        name="digits", batch_size=128, eval_batch_size=272, validation_fraction=0.1, validation_seed=0,
    ))
    config.model = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(256, 256), dropout_rate=0.0))
    config.loss = ml_collections.ConfigDict(
        dict(name=args["loss"], temperature=1.0, noise_prior="class_prior", prior_smoothing=0.0)
    )
    soft = {"auto": args["loss"] not in HARD_LABEL_LOSSES, "on": True, "off": False}[args["augment"]]
    config.augment = config_utils.augment_config(soft)
    config.optim = ml_collections.ConfigDict(
        dict(base_lr=2e-3, min_lr=1e-6, warmup_steps=min(50, args["steps"] - 1), b1=0.9, b2=0.999, weight_decay=0.05,
             grad_clip_norm=None, layer_decay=None)
    )
    config.init = config_utils.init_config()
    return config
