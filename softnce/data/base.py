"""The dataset interface the trainer consumes (one instance per process)."""

from __future__ import annotations

import abc
from typing import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


class Dataset(abc.ABC):
    """A classification dataset as one process of the trainer sees it.

    Batches are host numpy arrays of this process's share of the global batch:
    ``inputs`` float32 ``[B, *example_shape]``, ``label`` int32 ``[B]`` and, for evaluation,
    ``mask`` bool ``[B]`` (False on padding), with ``B = global_batch // process_count``.
    """

    num_classes: int
    example_shape: tuple[int, ...]
    num_train_examples: int
    num_eval_examples: int

    @abc.abstractmethod
    def train_label_counts(self) -> np.ndarray:
        """Per-class counts ``[C]`` over the whole training split (all processes), for the prior."""

    @abc.abstractmethod
    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Endless shuffled training batches of ``batch_size`` (this process's share).

        Deterministic in ``(seed, start_step)``: a run resumed at ``start_step`` continues with the
        batches an uninterrupted run would have seen where the dataset can skip exactly (in-memory
        datasets), and reshuffles with a step-dependent seed otherwise (documented per dataset).
        """

    @abc.abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """One pass over the evaluation split, the last batch padded (``mask`` False on padding).

        Every process yields the same number of batches, so collectives stay in step.
        """
