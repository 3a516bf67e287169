"""In-memory datasets: exact shuffling, per-process shares, padded evaluation."""

import numpy as np
import pytest

from softnce.data.arrays import ArrayDataset
from softnce.data.digits import load_digits_split


def toy_arrays(n=50, n_eval=13):
    x = np.arange(n, dtype=np.float32)[:, None]
    xe = np.arange(n_eval, dtype=np.float32)[:, None] + 1000
    return x, np.arange(n) % 3, xe, np.arange(n_eval) % 3


def take(it, k):
    return [next(it) for _ in range(k)]


def test_epochs_are_permutations_and_resume_is_exact():
    ds = ArrayDataset(*toy_arrays(), num_classes=3)
    batches = take(ds.train_batches(10, seed=1), 10)
    epoch0 = np.concatenate([b["inputs"][:, 0] for b in batches[:5]])
    assert sorted(epoch0.tolist()) == list(range(50))  # 5 batches of 10 = one epoch, each example once
    resumed = take(ds.train_batches(10, seed=1, start_step=7), 3)
    for a, b in zip(batches[7:], resumed):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    other = next(ds.train_batches(10, seed=2))
    assert not np.array_equal(other["inputs"], batches[0]["inputs"])


def test_process_shares_make_up_the_global_batch():
    single = next(ArrayDataset(*toy_arrays(), num_classes=3).train_batches(10, seed=0))
    shares = [next(ArrayDataset(*toy_arrays(), num_classes=3, process_index=p, process_count=2).train_batches(5, seed=0)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([s["inputs"] for s in shares]), single["inputs"])


def test_eval_padding_counts_every_example_once_on_every_process():
    seen, counts = [], []
    for p in range(2):
        ds = ArrayDataset(*toy_arrays(), num_classes=3, process_index=p, process_count=2)
        batches = list(ds.eval_batches(4))  # global eval batch 8 over 13 examples -> 2 batches each
        counts.append(len(batches))
        seen += [x for b in batches for x, m in zip(b["inputs"][:, 0], b["mask"]) if m]
    assert counts == [2, 2]
    assert sorted(seen) == [1000 + i for i in range(13)]


def test_errors_and_digits_split():
    with pytest.raises(ValueError, match="larger than the training set"):
        next(ArrayDataset(*toy_arrays(), num_classes=3).train_batches(64, seed=0))
    x, y, xt, yt = toy_arrays()
    with pytest.raises(ValueError, match=r"train_targets must have shape \[n, C\]"):
        ArrayDataset(x, y, xt, yt, num_classes=3, train_targets=np.ones((50, 4)) / 4)
    x, y, xt, yt = load_digits_split()
    assert x.shape == (1257, 8, 8, 1) and xt.shape == (540, 8, 8, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(yt).min() >= 50  # stratified split: every class in the test set
