"""Grain input pipelines: a global index shuffle, per-process shares, and an iterator state to checkpoint.

Every dataset of softnce is read through this module (in-memory arrays and tfds ``array_record``
files alike); a dataset supplies only ``read``, which turns row indices into a batch.

**Training order.** With ``n`` training examples and a global batch of ``G``, epoch ``e`` is a
permutation of the ``n`` rows drawn from ``(seed, e)``, and step ``s`` reads rows
``[G (s mod E), G (s mod E + 1))`` of epoch ``s // E``, ``E = n // G`` (the remainder of each epoch is
dropped). Process ``p`` of ``P`` reads the ``p``-th ``1/P`` of each global batch, so the global batch
does not depend on the number of processes or devices (1 process x 8 devices reads what 2 processes x
4 devices read). Each example also gets its position in the global stream, ``q = G s + i``, which
seeds its random crop: crops, too, do not depend on the process count.

**Exact resume.** The pipeline is a ``grain.MapDataset`` over steps (element ``s`` is this process's
share of step ``s``'s global batch), read ahead by ``grain.ReadOptions`` threads. Its iterator's
state (``get_state()`` / ``set_state()``) is saved with every checkpoint
(:mod:`softnce.checkpointing`), so a resumed run reads exactly the batches an uninterrupted one would.

**Evaluation.** One pass in order: global batch ``b`` holds rows ``[G b, G (b + 1))``; rows past the
end are padding (row 0 again, ``mask`` False). Every process yields ``ceil(n / G)`` batches, so
collectives stay in step.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import grain
import numpy as np

from softnce.data.base import Batch

# ``read(rows [B], positions [B]) -> Batch``: this process's examples ``rows`` of the training split;
# ``positions`` are their places in the global stream (seeds for per-example randomness).
TrainRead = Callable[[np.ndarray, np.ndarray], Batch]
# ``read(rows [B], valid [B]) -> Batch``: examples ``rows`` of an evaluation split in order, without
# ``mask`` (added here); rows where ``valid`` is False are padding and may be left as zeros.
EvalRead = Callable[[np.ndarray, np.ndarray], Batch]

NUM_STEPS = 2**62  # the training stream is endless; the trainer stops it


class GlobalOrder:
    """Row indices ``[G]`` of the global batch of any step (see the module docstring).

    ``order(step)`` is a pure function of ``(num_examples, global_batch, seed, step)``; each epoch's
    permutation is computed once and kept (threads of the pipeline share it).

    Raises:
      ValueError: the global batch is larger than the training set.
    """

    def __init__(self, num_examples: int, global_batch: int, *, seed: int):
        self.num_examples, self.global_batch, self.seed = int(num_examples), int(global_batch), int(seed)
        self.steps_per_epoch = self.num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the global batch ({global_batch}) is larger than the training set ({num_examples} examples); "
                "lower config.data.batch_size."
            )
        self._lock = threading.Lock()
        self._permutations: dict[int, np.ndarray] = {}  # the epochs being read (at most 2 kept)

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._permutations:
                if len(self._permutations) >= 2:
                    del self._permutations[min(self._permutations)]
                self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            return self._permutations[epoch]

    def __call__(self, step: int) -> np.ndarray:
        epoch, offset = divmod(int(step), self.steps_per_epoch)
        return self._permutation(epoch)[offset * self.global_batch : (offset + 1) * self.global_batch]


def process_share(global_size: int, process_index: int, process_count: int) -> slice:
    """The ``p``-th ``1/P`` of a global batch of ``global_size`` (``P`` must divide it)."""
    if global_size % process_count:
        raise ValueError(f"a global batch of {global_size} does not divide over {process_count} processes.")
    share = global_size // process_count
    return slice(process_index * share, (process_index + 1) * share)


def read_options(num_threads: int) -> grain.ReadOptions:
    """``grain.ReadOptions``: ``num_threads`` reader threads, two batches ahead each."""
    return grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=max(2, 2 * int(num_threads)))


def train_iterator(
    read: TrainRead,
    *,
    num_examples: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    options: grain.ReadOptions,
) -> grain.DatasetIterator:
    """Endless training batches of ``batch_size`` (this process's share), from step ``start_step``.

    Returns a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()`` save and restore its
    position (the trainer stores it in every checkpoint).
    """
    global_size = batch_size * process_count
    order = GlobalOrder(num_examples, global_size, seed=seed)
    share = process_share(global_size, process_index, process_count)
    offsets = np.arange(global_size, dtype=np.int64)[share]

    def load(step: int) -> Batch:
        return read(order(step)[share], int(step) * global_size + offsets)

    dataset = grain.MapDataset.range(start_step, NUM_STEPS).map(load)
    return iter(dataset.to_iter_dataset(options))


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
    """``ceil(n / (batch_size * process_count))``: the batches of one pass, the same on every process."""
    return math.ceil(num_examples / (batch_size * process_count))


def eval_iterator(
    read: EvalRead,
    *,
    num_examples: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    options: grain.ReadOptions,
) -> grain.DatasetIterator:
    """One pass over an evaluation split in order, padded and masked (see the module docstring)."""
    global_size = batch_size * process_count
    share = process_share(global_size, process_index, process_count)

    def load(index: int) -> Batch:
        rows = np.arange(index * global_size, (index + 1) * global_size, dtype=np.int64)[share]
        valid = rows < num_examples
        batch = read(np.where(valid, rows, 0), valid)
        return {**batch, "mask": valid}

    batches = num_eval_batches(num_examples, batch_size, process_count)
    return iter(grain.MapDataset.range(batches).map(load).to_iter_dataset(options))
