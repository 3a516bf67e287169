"""Fashion-MNIST k-tuples (``softnce/data/fashion_tuples.py``): k images side by side, ``C = 10^k`` classes, on a CPU.

Uses the prepared Fashion-MNIST and prepares nothing else::

    sudo apt-get install dataset-fashion-mnist
    python -m softnce.data.fashion_mnist

Launch (one run)::

    python -m softnce.main --config configs/fashion_tuples.py:k=3,loss=soft_target_infonce,seed=0 --workdir runs/t3_sti

Variants (``key=value`` after the colon): ``k`` (images per tuple: 1, 2 or 3, so ``C`` = 10, 100 or
1000), ``loss`` (any registered loss), ``seed`` (the run's and the data's: ``config.data.seed``, the
draw of the tuples; override it with ``--config.data.seed`` to keep the tuples fixed across run
seeds), ``steps``, ``augment`` (as in ``configs/fashion_mnist.py``: ``auto`` gives the soft-target
losses label smoothing 0.1 + MixUp 0.8 / CutMix 1.0 and ``nll`` / ``infonce`` hard labels; ``on``;
``off``), ``pool`` (``config.data.pool_size``: 2 averages 2x2 blocks, 14x14 images; 1 keeps 28x28).

Data: 60,000 training tuples drawn from the 54,000 training images left after the validation split
(``validation_fraction=0.1``), 6,000 validation tuples from the 6,000 validation images (the
post-hoc temperature fit), 10,000 test tuples from the official 10,000 test images; inputs
``[14, 14k, 1]``. Model and schedule as ``configs/fashion_mnist.py``, scaled to a 2-core CPU:
``small_cnn`` (two stride-2 3x3 convolutions of 32 and 64 channels, a 128-wide hidden layer),
3,000 steps of batch 128 (6.4 epochs of the training tuples), AdamW at ``lr = 2e-3 * 128 / 256``,
100 warm-up steps then a cosine to 1e-6. The noise distribution is the training-label frequencies (base's
``class_prior``); with fewer than about 20 training tuples per class a class may be missing from them,
which stops the run: set ``--config.loss.prior_smoothing=1`` then. A run of ``k = 3`` takes about 1-2
minutes on a 2-core CPU (300 steps with start-up and evaluation: 31 s).
"""

import ml_collections

from softnce import config_utils
from softnce.configs import base


def get_config(arg=None):
    args = config_utils.parse_arg(arg, k=3, loss="soft_target_infonce", seed=0, steps=3000, augment="auto", pool=2)
    config = base.get_config()
    config.seed = args["seed"]
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = args["steps"]
    config.log_every_steps = 250
    config.max_checkpoints = 1
    config.data.update(
        name="fashion_mnist_tuples", data_dir=config_utils.none(str), tuple_size=args["k"], pool_size=args["pool"],
        seed=args["seed"], num_train=60000, num_val=6000, num_test=10000,
    )
    config.model = ml_collections.ConfigDict(
        dict(name="small_cnn", channels=(32, 64), convs_per_stage=1, hidden=128, dropout_rate=0.0)
    )
    base.set_loss(config, args["loss"], args["augment"])
    config.optim.warmup_steps = min(100, args["steps"] - 1)
    return config
