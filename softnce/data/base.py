"""The dataset interface the trainer consumes (one instance per process)."""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterator, Optional

import numpy as np

Batch = dict[str, np.ndarray]


class DataError(ValueError):
    """Data that cannot be used as they are: a damaged record or file, data in a format softnce no longer
    reads. The message names the file (and record, where known) and how to fix it."""


class DataNotPreparedError(FileNotFoundError):
    """A dataset that was never prepared; the message ends with the command that prepares it."""

# ``f(keys [N], inputs [N, ...]) -> float32 inputs``: jittable, one PRNG key per example.
DeviceTrainTransform = Callable[[Any, Any], Any]
# ``f(inputs [N, ...]) -> float32 inputs``: jittable.
DeviceEvalTransform = Callable[[Any], Any]


class Dataset(abc.ABC):
    """A classification dataset as one process of the trainer sees it.

    Batches are host numpy arrays of this process's share of the global batch:
    ``inputs`` float32 ``[B, *example_shape]``, ``label`` int32 ``[B]`` and, for evaluation,
    ``mask`` bool ``[B]`` (False on padding), with ``B = global_batch // process_count``. Training
    batches may also carry soft targets given with the data, ``targets`` float32 ``[B, C]`` (rows are
    distributions; check them with :func:`softnce.losses.validate_targets` before training, as
    :class:`~softnce.data.arrays.ArrayDataset` does); the trainer smooths and mixes them in place of
    ``one_hot(label)`` and reports their mean through :meth:`train_target_sums`.

    The validation split (``num_validation_examples`` of them, possibly 0) is carved from the
    training data (``config.data.validation_fraction``, ``config.data.validation_seed``): those
    examples are never trained on, and the trainer fits its post-hoc temperature on them, so the
    evaluation (test) split is never used to fit anything.

    Per-example work can move onto the accelerators: ``device_train_transform(keys, inputs)`` (one
    PRNG key per example, derived from the run key, the step and the example's index in the
    global batch) and ``device_eval_transform(inputs)`` run inside the jitted, sharded steps on the
    inputs as the host shipped them (e.g. uint8 crops). ``None`` (the default): inputs are final.

    ``input_dtype`` is the dtype of those shipped inputs and ``class_names`` the name of each class
    (``None``: ``"0"`` .. ``"C-1"``); both are saved with every checkpoint for inference.
    """

    num_classes: int
    example_shape: tuple[int, ...]
    num_train_examples: int
    num_eval_examples: int
    num_validation_examples: int = 0
    device_train_transform: Optional[DeviceTrainTransform] = None
    device_eval_transform: Optional[DeviceEvalTransform] = None
    # What a trained model is given (saved with each checkpoint, softnce.checkpoint_metadata): the
    # dtype of the ``inputs`` that eval_batches yields, and one name per class (None: "0".."C-1").
    input_dtype: str = "float32"
    class_names: Optional[tuple[str, ...]] = None

    @abc.abstractmethod
    def train_label_counts(self) -> np.ndarray:
        """Per-class counts ``[C]`` over the whole training split (all processes), for the prior."""

    def train_target_sums(self) -> Optional[np.ndarray]:
        """Per-class sums ``[C]`` of the soft targets given with the whole training split, or ``None``.

        A dataset whose training batches carry ``targets [B, C]`` (annotator vote distributions,
        another model's labels) returns them; the trainer's ``noise='target_mean'`` is their
        mean. ``None`` (the default): the data bring no soft targets.
        """
        return None

    @abc.abstractmethod
    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Endless shuffled training batches of ``batch_size`` (this process's share), from step ``start_step``.

        Deterministic in ``(seed, start_step)``. The package's datasets return a
        ``grain.DatasetIterator`` (:func:`softnce.data.pipeline.train_iterator`): the trainer saves
        its ``get_state()`` with every checkpoint and restores it on resume, so a resumed run reads
        exactly the batches of an uninterrupted one. Any other iterator is restarted at the resumed
        step through ``start_step``.
        """

    @abc.abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """One pass over the evaluation split, the last batch padded (``mask`` False on padding).

        Every process yields the same number of batches, so collectives stay in step.
        """

    def validation_batches(self, batch_size: int) -> Iterator[Batch]:
        """One pass over the validation split, padded and masked like :meth:`eval_batches`."""
        raise ValueError(
            f"{type(self).__name__} has no validation split; set config.data.validation_fraction > 0 "
            "(or 0 to skip the post-hoc temperature fit)."
        )
