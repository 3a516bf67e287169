"""In-memory datasets (numpy arrays): exact, skippable shuffling for small data."""

from __future__ import annotations

from typing import Optional, Sequence

import grain
import numpy as np

from softnce import config_checks
from softnce.data import pipeline
from softnce.data.base import Batch, Dataset

# Slicing arrays in memory is cheap: one reader thread keeps two batches ready.
READ_OPTIONS = pipeline.read_options(1)


class ArrayDataset(Dataset):
    """A dataset held in memory, shared by all processes, each feeding its slice of the global batch.

    Batches come from the Grain pipelines of :mod:`softnce.data.pipeline`: the global index shuffle
    (epoch ``e`` a permutation drawn from ``(seed, e)``), process ``p`` of ``P`` reading the ``p``-th
    ``1/P`` of each global batch (so the global batch does not depend on the number of processes or
    devices), and an iterator whose state the trainer checkpoints (exact resume).

    Args:
      train_inputs, train_labels: ``[n, ...]`` float32 and ``[n]`` int.
      eval_inputs, eval_labels: the held-out split.
      num_classes: ``C``.
      train_targets: optional soft targets ``[n, C]`` given with the data (e.g. annotator votes);
        batches then carry ``targets`` and the trainer uses them instead of ``one_hot(label)``
        (smoothed and mixed as ``config.augment`` says). Every row must be a distribution: the first
        one that is not is named in a ``ValueError`` here, before training.
      validation: optional ``(inputs, labels)`` held out from training (see :func:`carve_validation`),
        served by :meth:`validation_batches`.
    """

    def __init__(
        self,
        train_inputs,
        train_labels,
        eval_inputs,
        eval_labels,
        *,
        num_classes: int,
        train_targets=None,
        validation: Optional[Sequence] = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.train_inputs = np.asarray(train_inputs, np.float32)
        self.train_labels = np.asarray(train_labels, np.int32)
        self.eval_inputs = np.asarray(eval_inputs, np.float32)
        self.eval_labels = np.asarray(eval_labels, np.int32)
        self.train_targets = None if train_targets is None else np.asarray(train_targets, np.float32)
        if len(self.train_inputs) != len(self.train_labels) or len(self.eval_inputs) != len(self.eval_labels):
            raise ValueError("inputs and labels must have the same number of rows in each split.")
        if self.train_targets is not None and self.train_targets.shape != (len(self.train_labels), num_classes):
            raise ValueError(
                f"train_targets must have shape [n, C] = {(len(self.train_labels), num_classes)}, "
                f"got {self.train_targets.shape}."
            )
        if self.train_targets is not None:
            check_targets(self.train_targets, "train_targets")
        self.num_classes = num_classes
        self.example_shape = tuple(self.train_inputs.shape[1:])
        self.num_train_examples = len(self.train_labels)
        self.num_eval_examples = len(self.eval_labels)
        if validation is not None:
            self.val_inputs = np.asarray(validation[0], np.float32)
            self.val_labels = np.asarray(validation[1], np.int32)
            if len(self.val_inputs) != len(self.val_labels) or self.val_inputs.shape[1:] != self.example_shape:
                raise ValueError(
                    f"validation inputs {self.val_inputs.shape} and labels {self.val_labels.shape} must have one "
                    f"row per example and examples of shape {self.example_shape}."
                )
            self.num_validation_examples = len(self.val_labels)
        self.process_index = process_index
        self.process_count = process_count

    def train_label_counts(self) -> np.ndarray:
        return np.bincount(self.train_labels, minlength=self.num_classes)

    def train_target_sums(self) -> Optional[np.ndarray]:
        return None if self.train_targets is None else self.train_targets.sum(axis=0, dtype=np.float64)

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> grain.DatasetIterator:
        def read(rows: np.ndarray, positions: np.ndarray) -> Batch:
            batch = {"inputs": self.train_inputs[rows], "label": self.train_labels[rows]}
            if self.train_targets is not None:
                batch["targets"] = self.train_targets[rows]
            return batch

        return pipeline.train_iterator(
            read, num_examples=self.num_train_examples, batch_size=batch_size, seed=seed,
            process_index=self.process_index, process_count=self.process_count, start_step=start_step,
            options=READ_OPTIONS,
        )

    def eval_batches(self, batch_size: int) -> grain.DatasetIterator:
        return self._padded_batches(self.eval_inputs, self.eval_labels, batch_size)

    def validation_batches(self, batch_size: int) -> grain.DatasetIterator:
        if not self.num_validation_examples:
            return super().validation_batches(batch_size)
        return self._padded_batches(self.val_inputs, self.val_labels, batch_size)

    def _padded_batches(self, inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> grain.DatasetIterator:
        """One pass in order; the last global batch padded with row 0 and ``mask`` False."""
        return pipeline.eval_iterator(
            lambda rows, valid: {"inputs": inputs[rows], "label": labels[rows]}, num_examples=len(labels),
            batch_size=batch_size, process_index=self.process_index, process_count=self.process_count,
            options=READ_OPTIONS,
        )


def check_targets(targets, what: str = "targets") -> None:
    """Raises ``ValueError`` naming ``what`` and the first row of ``targets [n, C]`` that is not a distribution."""
    from softnce import losses  # the light core's check (jax-free at call time)

    try:
        losses.validate_targets(targets)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def held_out_mask(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean ``[n]``: the ``round(fraction * n)`` examples drawn with ``seed`` for validation."""
    config_checks.check_field("data.validation_fraction", fraction)
    held_out = np.zeros(num_examples, bool)
    held_out[np.random.default_rng(seed).permutation(num_examples)[: int(round(fraction * num_examples))]] = True
    return held_out


def carve_validation(inputs, labels, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Splits ``round(fraction * n)`` random examples (drawn with ``seed``) off a training set.

    Returns ``(train_inputs, train_labels, val_inputs, val_labels)``; both parts keep the original
    order. ``fraction = 0`` returns the data unchanged and an empty validation part. The split is
    :func:`held_out_mask` (apply it to soft targets given with the data to split them alike).
    """
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    held_out = held_out_mask(len(labels), fraction, seed)
    return inputs[~held_out], labels[~held_out], inputs[held_out], labels[held_out]
