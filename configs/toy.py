"""The 2-D, 3-class Gaussian toy problem (``softnce/data/toy.py``): one loss, one label setting.

Launch (one run through the normal trainer)::

    python -m softnce.main --workdir runs/toy_sti \\
      --config configs/toy.py:prior=imbalanced,annotators=3,loss=soft_target_infonce,seed=0

Variants (``key=value`` after the colon): ``prior`` (``balanced`` or ``imbalanced`` = 0.6/0.3/0.1),
``annotators`` (``m`` = 1, 3, 10 simulated annotators whose vote histogram is the soft target, or
``inf`` for the true posterior), ``loss`` (any registered loss; ``nll`` and ``infonce`` train on
the first annotator's vote, soft-target losses on the ``m``-vote histogram), ``noise``
(``class_prior`` or ``uniform``), ``seed``, ``steps``.

The full grid (every loss, prior and ``m``, 5 seeds, figures and tables) is
``experiments/toy_experiment.py`` (``make demo``), which takes its hyperparameters from here.
Expected (800 steps): about 0.77 top-1 on the balanced and 0.835 on the imbalanced test set (Bayes
accuracy 0.77 / 0.84); one run takes 20-30 s on a 2-core CPU, mostly start-up and compilation.
"""

import ml_collections

from softnce import config_utils
from softnce.configs import base


def get_config(arg=None):
    args = config_utils.parse_arg(
        arg, prior="balanced", annotators=10, loss="soft_target_infonce", noise="class_prior",
        seed=0, steps=800,
    )
    config = base.get_config()
    config.seed = args["seed"]
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = args["steps"]
    config.log_every_steps = 200
    config.max_checkpoints = 1

    # The data bring their own validation set (num_val), drawn with the run's seed.
    del config.data.validation_fraction, config.data.validation_seed
    config.data.update(
        name="toy", prior=args["prior"], annotators=args["annotators"], seed=args["seed"],
        num_train=2000, num_val=2000, num_test=8000,
    )
    config.model = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(32, 32), dropout_rate=0.0))
    # The targets come with the data (annotator votes): no smoothing or mixing.
    base.set_loss(config, args["loss"], "off")
    config.loss.noise = args["noise"]
    config.optim.update(
        base_lr=3e-3, min_lr=1e-5, warmup_steps=min(config.optim.warmup_steps, args["steps"] - 1), weight_decay=0.01,
    )
    return config
