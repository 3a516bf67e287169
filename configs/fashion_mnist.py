"""Fashion-MNIST (28x28 greyscale clothing photos, 10 classes): the five losses on real images, on a CPU.

Prepare the data once (from the Debian package's IDX files, or with ``--download`` from the internet;
see ``softnce/data/fashion_mnist.py``)::

    sudo apt-get install dataset-fashion-mnist
    python -m softnce.data.fashion_mnist

Launch (one run)::

    python -m softnce.main --config configs/fashion_mnist.py:loss=soft_target_infonce,seed=0 --workdir runs/fashion_sti

Variants (``key=value`` after the colon): ``loss`` (any registered loss), ``seed``, ``steps``,
``augment`` (``auto``: label smoothing 0.1 + MixUp 0.8 / CutMix 1.0 for the soft-target losses and
none for the hard-label losses ``nll`` and ``infonce``, as in the paper's comparison; ``on``; ``off``).

Model and schedule are scaled to a 2-core CPU: ``small_cnn`` (two stride-2 3x3 convolutions of 32 and
64 channels, a 128-wide hidden layer; 0.42 M parameters), 2,000 steps of batch 128 (4.7 epochs),
AdamW (betas 0.9/0.999, weight decay 0.05) at ``lr = 2e-3 * 128 / 256``, 100 warm-up steps then a
cosine to 1e-6. No input augmentation besides the soft-target recipe's MixUp/CutMix. 6,000 of the
60,000 training images (``validation_fraction=0.1``) are held out for the post-hoc temperature fit;
the test set is the official 10,000 images. Expected: about 89-91% top-1 for every loss, 1-3
minutes per run on a 2-core CPU (see README/BENCHMARKS for the measured table from
``experiments/fashion_comparison.py``).
"""

import ml_collections

from softnce import config_utils
from softnce.configs import base


def get_config(arg=None):
    args = config_utils.parse_arg(arg, loss="soft_target_infonce", seed=0, steps=2000, augment="auto")
    config = base.get_config()
    config.seed = args["seed"]
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = args["steps"]
    config.log_every_steps = 250
    config.max_checkpoints = 1
    # Off by default: a training subset (None = all 54,000) and random crop (padding 4) + flip.
    config.data.update(name="fashion_mnist", data_dir=config_utils.none(str), num_train_examples=config_utils.none(int),
                       random_crop_padding=0, random_flip=False)
    config.model = ml_collections.ConfigDict(
        dict(name="small_cnn", channels=(32, 64), convs_per_stage=1, hidden=128, dropout_rate=0.0)
    )
    base.set_loss(config, args["loss"], args["augment"])
    config.optim.warmup_steps = 100
    return config
