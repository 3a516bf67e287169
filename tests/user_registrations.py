"""A user's module outside the package: registers its own loss, models and datasets (tests/test_registry.py,
tests/test_component_fields.py).

It is what ``python -m softnce.main --import_modules=user_registrations`` would import: importing it
makes ``config.loss.name = 'user_focal'`` (with its field ``config.loss.gamma``), ``config.model.name =
'user_linear'``, ``'user_mlp'`` (Linen, BatchNorm, the field ``config.model.width``) and ``'user_nnx'``
(Flax NNX, BatchNorm and Dropout, ``width`` too) and ``config.data.name =
'user_blobs'`` (and ``'user_soft_blobs'``, the blobs with soft targets given with the data) valid.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softnce import config_checks
from softnce.data import register_dataset
from softnce.data.arrays import ArrayDataset, carve_validation, held_out_mask
from softnce.losses import LossInputs, register_loss
from softnce.models import register_model

NUM_CLASSES = 4
FEATURES = 8
CALLS: list[tuple[str, dict]] = []  # (factory, its arguments), to show the trainer built these


class LinearClassifier(nn.Module):
    """``x [B, ...] -> x W + b`` ``[B, num_classes]``."""

    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


@register_model("user_linear")
def user_linear(num_classes: int, **fields) -> nn.Module:
    CALLS.append(("user_linear", dict(fields, num_classes=num_classes)))
    return LinearClassifier(num_classes=num_classes)


class WideMLP(nn.Module):
    """``x [B, ...] -> Dense(width) -> BatchNorm -> relu -> Dense(num_classes)``: a model with state
    (BatchNorm's running statistics, the ``batch_stats`` collection)."""

    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(self.width, name="hidden")(x.reshape(x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x))
        return nn.Dense(self.num_classes, name="head")(x)


# The factory's keyword argument width is the model's field config.model.width; its range is declared here.
register_model("user_mlp", WideMLP, ranges={"width": config_checks.count(1, "units of the hidden layer")})


@register_model("user_nnx", ranges={"width": config_checks.count(1, "units of each hidden layer")})
class NNXNet(nnx.Module):
    """A Flax NNX model: two hidden layers (a list: integer keys), BatchNorm and Dropout; ``x [B, ...]`` with
    ``in_features`` values per example. Its keyword arguments besides ``rngs`` are config fields."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, width: int = 32, in_features: int = 64,
                 dropout_rate: float = 0.1):
        self.layers = nnx.List([nnx.Linear(in_features, width, rngs=rngs), nnx.Linear(width, width, rngs=rngs)])
        self.norm = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(self.dropout(nnx.relu(self.norm(x))))


@register_loss("user_focal", ranges={"gamma": config_checks.non_negative("the focusing exponent")})
def focal_loss(logits, inputs: LossInputs, *, gamma: float = 2.0):
    """Soft-target focal loss ``-sum_c a_c (1 - p_c)^gamma log p_c``, ``p = softmax(z / t)``; ``[N]``.

    ``gamma`` is the loss's field ``config.loss.gamma`` (``gamma = 0``: soft-target cross-entropy).
    """
    log_p = jax.nn.log_softmax(logits / inputs.temperature, axis=-1)
    loss = -jnp.sum(inputs.targets * (1.0 - jnp.exp(log_p)) ** gamma * log_p, axis=-1)
    return loss if inputs.where is None else jnp.where(inputs.where, loss, 0.0)


def blobs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of ``NUM_CLASSES`` well-separated Gaussian blobs in ``FEATURES`` dimensions."""
    labels = rng.integers(0, NUM_CLASSES, n)
    means = 3.0 * np.eye(NUM_CLASSES, FEATURES)
    return means[labels] + rng.normal(size=(n, FEATURES)), labels


# The factory's keyword-only argument num_points is the dataset's field config.data.num_points (its range
# declared here); the trainer's fields of the section (validation_fraction, ...) come in config.
@register_dataset("user_blobs", ranges={"num_points": config_checks.count(16, "training points drawn")})
def make_blobs_dataset(config, *, process_index: int, process_count: int, num_points: int = 640) -> ArrayDataset:
    CALLS.append(("user_blobs", dict(name=config.name, process_index=process_index, process_count=process_count,
                                     num_points=num_points)))
    rng = np.random.default_rng(0)
    x, y = blobs(rng, num_points)
    x_test, y_test = blobs(rng, 160)
    x, y, x_val, y_val = carve_validation(x, y, config.validation_fraction, config.validation_seed)
    return ArrayDataset(
        x, y, x_test, y_test, num_classes=NUM_CLASSES, validation=(x_val, y_val),
        process_index=process_index, process_count=process_count,
    )


# Soft targets given with the data: annotators who call class k "k" 70% of the time and "k + 1" 30%.
CONFUSION = 0.7 * np.eye(NUM_CLASSES) + 0.3 * np.roll(np.eye(NUM_CLASSES), 1, axis=1)


@register_dataset("user_soft_blobs")
def make_soft_blobs_dataset(config, *, process_index: int, process_count: int) -> ArrayDataset:
    CALLS.append(("user_soft_blobs", dict(name=config.name)))
    rng = np.random.default_rng(1)
    x, y = blobs(rng, 640)
    x_test, y_test = blobs(rng, 160)
    held_out = held_out_mask(len(y), config.validation_fraction, config.validation_seed)
    return ArrayDataset(
        x[~held_out], y[~held_out], x_test, y_test, num_classes=NUM_CLASSES, train_targets=CONFUSION[y[~held_out]],
        validation=(x[held_out], y[held_out]), process_index=process_index, process_count=process_count,
    )
