"""Fashion-MNIST k-tuples: ``k`` Fashion-MNIST images side by side, ``C = 10^k`` classes (``fashion_mnist_tuples``).

A *tuple* is ``k`` images placed left to right into one image of shape ``[H, k W, 1]``, labelled by
the ``k``-digit base-10 number of their labels: ``label = sum_i label_i * 10^(k-1-i)``, the leftmost
image giving the leading digit. ``k = 1, 2, 3`` gives ``C = 10, 100, 1000`` classes, named
``"0".."9"``, ``"00".."99"``, ``"000".."999"`` (the 10 garment classes of Fashion-MNIST as digits:
0 T-shirt/top, 1 Trouser, ..., 9 Ankle boot).

**Splits.** The source images are those of :mod:`softnce.data.fashion_mnist`, read, normalised and
split by its code: the official 60,000 training images minus the validation images carved off them
(``validation_fraction``, ``validation_seed``, as for ``fashion_mnist``), those validation images,
and the official 10,000 test images. Each tuple is ``k`` independent uniform draws, with
replacement, from the images of its own split only: ``num_train`` training tuples from the training
images, ``num_val`` validation tuples from the validation images (none when ``validation_fraction``
is 0) and ``num_test`` test tuples from the test images, so no image is drawn by two splits. The
draws are reproducible: split ``s`` draws with ``numpy.random.default_rng([seed, s])``
(``s = 0, 1, 2`` for train, validation, test), so each split depends only on the seed and its own
size. The dataset keeps its draws as ``components[split]``, ``int [n, k]`` indices into that split's
images. Optionally each image is average-pooled over ``pool_size x pool_size`` blocks first
(``pool_size = 2``: 14x14 images, tuples of ``14 x 14k``), which keeps CPU runs short; pooling
commutes with the normalisation, so the inputs are the pooled normalised images. Nothing is
prepared on disk beyond ``fashion_mnist`` itself (``python -m softnce.data.fashion_mnist``).

**How it differs from ImageNet.** ImageNet's 1,000 classes are 1,000 kinds of object; here the
1,000 classes of ``k = 3`` factorise into three independent 10-way choices, one per position, so a
model can share features across classes (three 10-way garment classifiers would do) and the label
of a tuple is exactly predictable from its parts. What the losses see in a batch is as at
ImageNet's ``C`` (both near uniform): with uniform labels, a batch of ``M`` examples misses a share
``(1 - 1/C)^M`` of the classes and gives each positive ``(M - 1) / C`` same-class negatives on
average (:func:`batch_class_statistics`). At the CPU batch ``M = 128`` and ``C = 1000`` that is 88%
of the classes absent and 0.13 same-class negatives (36% and 1.0 at the paper's ImageNet batch of
1,024), against essentially none absent and 12.7 same-class negatives at ``C = 10``.

Config fields (``config.data``): ``tuple_size`` (``k``, 1 to 3), ``num_train``, ``num_val``,
``num_test`` (tuples per split), ``seed`` (the draws), ``pool_size`` (1: 28x28 images; 2: 14x14;
any divisor of 28), ``validation_fraction``, ``validation_seed`` and ``data_dir`` (as for
``fashion_mnist``). The tuples are held in memory as float32: ``num_train * 28^2 k / pool_size^2 * 4``
bytes for the training split (141 MB for 60,000 tuples of ``k = 3`` at ``pool_size = 2``).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from scipy.special import gammaln

from softnce import config_checks
from softnce.data import fashion_mnist
from softnce.data.arrays import ArrayDataset, carve_validation

NAME = "fashion_mnist_tuples"
DIGITS = fashion_mnist.NUM_CLASSES  # the base of the labels: one digit per image
SPLITS = ("train", "validation", "test")  # split s draws with default_rng([seed, s])
SIZE_FIELDS = {"train": "num_train", "validation": "num_val", "test": "num_test"}  # config.data: tuples per split


def num_classes(k: int) -> int:
    """``C = 10^k``."""
    return DIGITS**k


def class_names(k: int) -> tuple[str, ...]:
    """The ``k``-digit strings ``"0..0"`` to ``"9..9"``, one per class."""
    return tuple(f"{c:0{k}d}" for c in range(num_classes(k)))


def tuple_labels(component_labels: np.ndarray) -> np.ndarray:
    """``sum_i label_i * 10^(k-1-i)`` of ``component_labels`` ``int [n, k]``: int32 ``[n]``."""
    component_labels = np.asarray(component_labels, np.int64)
    k = component_labels.shape[1]
    return (component_labels @ (DIGITS ** np.arange(k - 1, -1, -1))).astype(np.int32)


def average_pool(images: np.ndarray, pool_size: int) -> np.ndarray:
    """The means of ``pool_size x pool_size`` blocks of ``images`` ``[n, H, W, c]`` (``pool_size`` divides H and W)."""
    if pool_size == 1:
        return images
    n, h, w, c = images.shape
    blocks = images.reshape(n, h // pool_size, pool_size, w // pool_size, pool_size, c)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def draw_tuples(
    images: np.ndarray, labels: np.ndarray, num_tuples: int, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num_tuples`` tuples of ``k`` independent uniform draws (with replacement) from ``images [n, H, W, c]``.

    Returns ``(inputs [num_tuples, H, k W, c], labels int32 [num_tuples], components int [num_tuples, k])``:
    tuple ``j`` is ``images[components[j, 0]], ..., images[components[j, k-1]]`` left to right, and
    its label the base-10 number of their labels (:func:`tuple_labels`).
    """
    components = rng.integers(0, len(labels), size=(num_tuples, k))
    inputs = np.concatenate([images[components[:, i]] for i in range(k)], axis=2)
    return inputs, tuple_labels(np.asarray(labels)[components]), components


def check_pool_size(pool_size: int) -> None:
    """Raises :class:`~softnce.config_checks.ConfigError` unless ``pool_size`` is in range and divides 28."""
    config_checks.check_field("data.pool_size", pool_size)
    size = fashion_mnist.IMAGE_SIZE
    if size % pool_size:
        divisors = ", ".join(str(d) for d in range(1, size + 1) if size % d == 0)
        raise config_checks.ConfigError(
            f"config.data.pool_size = {pool_size} is out of range: must divide {size} (one of {divisors})."
        )


def source_images(config: ml_collections.ConfigDict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images float32 [n, 28/p, 28/p, 1], labels int32 [n])}``: the images each split draws from.

    Fashion-MNIST read and normalised by :mod:`softnce.data.fashion_mnist`, the validation images
    carved off the training split as there, then average-pooled (``p = pool_size``).
    """
    pool_size = config.get("pool_size", 1)
    check_pool_size(pool_size)
    data_dir = config.get("data_dir")
    x_train, y_train = fashion_mnist.load_split(data_dir, "train")
    x_test, y_test = fashion_mnist.load_split(data_dir, "test")
    x_train, y_train, x_val, y_val = carve_validation(
        x_train, y_train, config.get("validation_fraction", 0.0), config.get("validation_seed", 0)
    )
    splits = {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}
    return {s: (average_pool(fashion_mnist.normalize(x), pool_size), y) for s, (x, y) in splits.items()}


def make_fashion_tuples_dataset(config: ml_collections.ConfigDict, *, process_index: int, process_count: int):
    """The in-memory Fashion-MNIST k-tuples for the trainer (``config`` is ``config.data``; see the module docstring).

    Also sets ``tuple_size``, ``class_names`` and ``components`` (``{split: int [n, k]}``, the
    indices of each tuple's images into :func:`source_images` ``[split]``).

    Raises:
      FileNotFoundError: ``fashion_mnist`` was never prepared (the message gives both preparation commands).
      ConfigError: ``tuple_size`` or ``pool_size`` out of range.
    """
    k = config.tuple_size
    config_checks.check_field("data.tuple_size", k)
    seed = config.get("seed", 0)
    drawn, components = {}, {}
    for split, (images, labels) in source_images(config).items():
        if not len(labels):  # validation_fraction = 0: no validation images, no validation tuples
            continue
        size = config[SIZE_FIELDS[split]]
        config_checks.check_field(f"data.{SIZE_FIELDS[split]}", size)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        inputs, tuple_label, components[split] = draw_tuples(images, labels, size, k, rng)
        drawn[split] = (inputs, tuple_label)
    dataset = ArrayDataset(
        *drawn["train"], *drawn["test"], num_classes=num_classes(k), validation=drawn.get("validation"),
        process_index=process_index, process_count=process_count,
    )
    dataset.tuple_size = k
    dataset.class_names = class_names(k)
    dataset.components = components
    return dataset


# --------------------------------------------------------------------------------------------------
# What a batch holds at many classes.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchClassStatistics:
    """The expected class make-up of a training batch of ``batch_size`` examples over ``num_classes`` classes.

    ``same_class_share``: of a positive's ``M - 1`` negatives (the other examples of its batch), the
    expected share that have its own class, ``E[#same-class negatives] / (M - 1)``.
    ``absent_share``: the expected share of the ``C`` classes with no example in the batch.
    """

    batch_size: int
    num_classes: int
    same_class_share: float
    absent_share: float

    @property
    def same_class_negatives(self) -> float:
        """``E[#same-class negatives]`` of a positive."""
        return self.same_class_share * (self.batch_size - 1)

    @property
    def absent_classes(self) -> float:
        """``E[#classes absent from the batch]``."""
        return self.absent_share * self.num_classes


def batch_class_statistics(
    batch_size: int, label_distribution, *, without_replacement: bool = False
) -> BatchClassStatistics:
    """:class:`BatchClassStatistics` of batches of ``M = batch_size`` labels over ``C`` classes, exactly.

    Args:
      batch_size: ``M >= 2``.
      label_distribution: ``[C]`` class probabilities or counts (normalised here), e.g. a dataset's
        ``train_label_counts()``.
      without_replacement: ``False``: the batch is ``M`` independent draws from ``p``, so the
        same-class share is ``sum_c p_c^2`` and the absent share ``mean_c (1 - p_c)^M`` (uniform
        labels: ``1/C`` and ``(1 - 1/C)^M``). ``True``: ``label_distribution`` holds the integer
        counts ``n_c`` of a training split of ``N`` examples, and the batch is ``M`` distinct examples
        drawn uniformly from it (as the trainer's global shuffle draws it): the same-class share is
        ``sum_c (n_c / N) (n_c - 1) / (N - 1)`` and class ``c`` is absent with probability
        ``binom(N - n_c, M) / binom(N, M)``.
    """
    dist = np.asarray(label_distribution, np.float64)
    if dist.ndim != 1 or dist.size == 0 or np.any(dist < 0) or not np.all(np.isfinite(dist)) or dist.sum() <= 0:
        raise ValueError(f"label_distribution must be [C] non-negative numbers with a positive sum, got {dist}.")
    if batch_size < 2 or batch_size != int(batch_size):
        raise ValueError(f"batch_size must be an integer >= 2 (a positive and a negative), got {batch_size}.")
    m = int(batch_size)
    if not without_replacement:
        p = dist / dist.sum()
        same, absent = np.sum(p**2), np.mean((1.0 - p) ** m)
    else:
        if np.any(dist != np.round(dist)):
            raise ValueError("without_replacement=True needs integer label counts.")
        n = dist.sum()
        if m > n:
            raise ValueError(f"a batch of {m} distinct examples needs at least {m} examples, got {int(n)}.")
        same = np.sum(dist / n * (dist - 1.0) / (n - 1.0))
        rest = n - dist  # binom(rest, M) / binom(N, M), 0 where rest < M
        log_ratio = gammaln(rest + 1) - gammaln(np.maximum(rest - m, 0) + 1) - gammaln(n + 1) + gammaln(n - m + 1)
        absent = np.mean(np.where(rest >= m, np.exp(log_ratio), 0.0))
    return BatchClassStatistics(m, int(dist.size), float(same), float(absent))
