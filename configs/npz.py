"""Your own data from ``.npz`` files (``softnce/data/npz.py``), with soft targets if the files have them.

Each file holds ``inputs [n, ...]`` (float, already normalised), ``labels [n]`` and optionally
``targets [n, C]`` (one distribution per example: annotator votes, another model's labels)::

    np.savez("train.npz", inputs=x, labels=y, targets=votes / votes.sum(1, keepdims=True))
    np.savez("test.npz", inputs=x_test, labels=y_test)

Launch::

    python -m softnce.main --config configs/npz.py:loss=soft_target_infonce,model=mlp \\
      --config.data.train_file=train.npz --config.data.test_file=test.npz --workdir runs/mine

Variants (``key=value`` after the colon): ``loss`` (any registered loss), ``model`` (``mlp`` for any
inputs, ``small_cnn`` for images ``[n, H, W, c]``), ``augment`` (``off``, the default: the given
targets as they are, or ``one_hot(labels)`` without them; ``mixup``: MixUp 0.8 of inputs and targets,
for any inputs; ``on``: label smoothing 0.1 + MixUp/CutMix, images only), ``noise``
(``class_prior``, ``uniform``, ``target_mean``: the mean of the given targets), ``seed``, ``steps``,
``batch``. ``config.data.validation_file`` names a validation file; without one,
``validation_fraction`` (0.1) of the training file is held out for the post-hoc temperature fit.
``config.data.num_classes`` (None: from the targets, else the labels) and ``class_names`` are optional.
"""

import ml_collections

from softnce import config_utils
from softnce.configs import base

MODELS = {
    "mlp": dict(name="mlp", hidden_sizes=(128, 128), dropout_rate=0.0),
    "small_cnn": dict(name="small_cnn", channels=(32, 64), convs_per_stage=1, hidden=128, dropout_rate=0.0),
}
AUGMENTS = ("off", "mixup", "on")


def get_config(arg=None):
    args = config_utils.parse_arg(
        arg, loss="soft_target_infonce", model="mlp", augment="off", noise="class_prior", seed=0,
        steps=1000, batch=128,
    )
    if args["model"] not in MODELS:
        raise ValueError(f"unknown model {args['model']!r}; valid models: {', '.join(MODELS)}.")
    if args["augment"] not in AUGMENTS:
        raise ValueError(f"unknown augment {args['augment']!r}; valid choices: {', '.join(AUGMENTS)}.")
    config = base.get_config()
    config.seed = args["seed"]
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = args["steps"]
    config.log_every_steps = max(1, min(100, args["steps"] // 4))
    config.max_checkpoints = 1
    config.data.update(
        name="npz", batch_size=args["batch"], eval_batch_size=max(args["batch"], 256),
        train_file=config_utils.none(str), test_file=config_utils.none(str), validation_file=config_utils.none(str),
        num_classes=config_utils.none(int), class_names=config_utils.none(tuple),
    )
    config.model = ml_collections.ConfigDict(MODELS[args["model"]])
    base.set_loss(config, args["loss"], "on" if args["augment"] == "on" else "off")
    if args["augment"] == "mixup":
        config.augment.mixup_alpha = 0.8
    config.loss.noise = args["noise"]
    config.optim.warmup_steps = min(config.optim.warmup_steps, args["steps"] - 1)
    return config
