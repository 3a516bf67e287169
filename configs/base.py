"""The shared default: every launchable config starts from ``get_config()`` and overrides what differs.

Flax's examples pattern (``examples/imagenet/configs/default.py``): one base holds each field that
most configs share, with its default, and ``configs/digits.py`` etc. set only their dataset, model
and what their experiment changes. Not launchable by itself: it names no dataset and no model.

Every numeric field has its validity rule: the base fields in ``softnce.config_checks.RULES``, the
fields of the loss and the model where they are registered (``softnce.config_checks``).
"""

import ml_collections

from softnce.config_utils import none

# The paper's hard-label baselines, trained on one_hot(labels) by default: no label smoothing, no MixUp /
# CutMix. Each reads only the hard labels (registered with reads_labels_only=True, softnce.losses); the
# reference's soft_distribution_infonce_premix does too, but trains on mixed inputs, so it keeps the recipe.
HARD_LABEL_LOSSES = ("nll", "infonce")
AUGMENT_CHOICES = ("auto", "on", "off")


def augment(soft: bool) -> ml_collections.ConfigDict:
    """``config.augment``: the reference's soft-target recipe, or no smoothing and no mixing.

    ``soft=True``: label smoothing 0.1, MixUp alpha 0.8, CutMix alpha 1.0, mix probability 0.8,
    switch probability 0.5, one lambda per batch (timm's ``Mixup`` as MAE fine-tuning uses it), with
    structured targets for STI. ``soft=False``: targets are ``one_hot(labels)`` (the hard-target runs).
    Either way ``cutmix_minmax`` is off (``(lo, hi)``: timm's box side fractions, which override
    ``cutmix_alpha``) and ``correct_lam`` on (the CutMix lambda is the area actually kept). Soft targets
    given with the data are smoothed and mixed in place of ``one_hot(labels)``.
    """
    return ml_collections.ConfigDict(dict(
        label_smoothing=0.1 if soft else 0.0,
        mixup_alpha=0.8 if soft else 0.0,
        cutmix_alpha=1.0 if soft else 0.0,
        mix_prob=0.8,
        switch_prob=0.5,
        mode="batch",
        structured=True,
        cutmix_minmax=none(tuple),
        correct_lam=True,
    ))


def set_loss(config: ml_collections.ConfigDict, loss: str, augment_choice: str = "auto") -> None:
    """Sets ``config.loss.name`` and, with it, ``config.augment``.

    ``augment_choice``: ``'auto'``, the soft-target recipe for every loss except
    :data:`HARD_LABEL_LOSSES`, which get ``one_hot(labels)``; ``'on'`` / ``'off'``, the recipe / no
    smoothing and no mixing whatever the loss.
    """
    if augment_choice not in AUGMENT_CHOICES:
        raise ValueError(f"unknown augment {augment_choice!r}; valid choices: {', '.join(AUGMENT_CHOICES)}.")
    config.loss.name = loss
    config.augment = augment(loss not in HARD_LABEL_LOSSES if augment_choice == "auto" else augment_choice == "on")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_train_steps = 1000  # every config sets its own
    config.log_every_steps = 100
    config.eval_every_steps = 1000  # evaluation and checkpoint go together in every config
    config.checkpoint_every_steps = 1000
    config.max_checkpoints = 2  # the newest and one to fall back on
    config.step_timeout_s = none(float)  # the step watchdog; None = automatic (softnce.watchdog)
    config.max_steps_in_flight = none(int)  # None = 1 on CPU, 2 on accelerators
    # Validation tracking (softnce.experiments.sweep): the validation split's metrics every
    # validation_every_steps and at the end (history.json, validation_metrics.json; None = off);
    # evaluate_test = False never reads the test split (selection runs; implies the final validation).
    config.validation_every_steps = none(int)
    config.evaluate_test = True

    # Each config adds data.name and its dataset's fields. validation_fraction: the share of the
    # training data held out to fit the post-hoc temperature (never trained on).
    config.data = ml_collections.ConfigDict(dict(
        batch_size=128, eval_batch_size=1000, validation_fraction=0.1, validation_seed=0,
    ))
    # noise: the noise distribution eta of the InfoNCE losses, 'class_prior' (training-label frequencies), 'uniform',
    # 'target_mean' (the mean of the soft targets given with the data) or 'explicit' (noise_probs, [C]);
    # prior_smoothing: pseudo-count added to every class count (or target mass).
    config.loss = ml_collections.ConfigDict(dict(
        name="soft_target_infonce", temperature=1.0, noise="class_prior", prior_smoothing=0.0,
        noise_probs=none(tuple),
    ))
    config.augment = augment(soft=True)
    # AdamW; lr = base_lr * batch / 256 after a linear warm-up, then a half-cosine to min_lr.
    # layer_decay: layer-wise lr decay of the ViT (None = off).
    config.optim = ml_collections.ConfigDict(dict(
        base_lr=2e-3, min_lr=1e-6, warmup_steps=50, b1=0.9, b2=0.999, weight_decay=0.05,
        grad_clip_norm=None, layer_decay=None,
    ))
    # Start from an earlier run's checkpoint or from converted MAE weights (both off).
    config.init = ml_collections.ConfigDict(dict(checkpoint=none(str), pretrained=none(str)))
    # Knowledge distillation (off; softnce.distill): the targets become
    # a = (1 - beta) a_recipe + beta softmax(z_teacher / tau), the teacher frozen and run in the train step on
    # the student's (mixed) inputs. The teacher: a softnce run (teacher_workdir, its checkpoint teacher_step,
    # None = the latest; built with that run's own model config), or any registered model (teacher_model:
    # name and fields, set in a config file) with a parameters file (teacher_params: .npz or .msgpack).
    config.distill = ml_collections.ConfigDict(dict(
        teacher_workdir=none(str), teacher_step=none(int), teacher_params=none(str),
        teacher_model=ml_collections.ConfigDict(dict(name=none(str))), tau=1.0, beta=1.0,
    ))
    return config
