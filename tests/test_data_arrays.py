"""In-memory datasets: exact shuffling, per-process shares, padded evaluation."""

import numpy as np
import pytest

from softnce.data.arrays import ArrayDataset, carve_validation
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
    views = [ArrayDataset(*toy_arrays(), num_classes=3, process_index=p, process_count=2) for p in range(2)]
    shares = [next(view.train_batches(5, seed=0)) for view in views]
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


def test_carve_validation_holds_out_a_seeded_fraction_never_trained_on():
    x = np.arange(100, dtype=np.float32)[:, None]
    y = np.arange(100) % 10
    x_tr, y_tr, x_val, y_val = carve_validation(x, y, 0.2, seed=3)
    assert len(y_val) == 20 and len(y_tr) == 80
    assert set(x_tr[:, 0]).isdisjoint(x_val[:, 0]) and len(set(x_tr[:, 0]) | set(x_val[:, 0])) == 100
    assert np.array_equal(y_val, x_val[:, 0].astype(int) % 10)  # rows stay paired
    again = carve_validation(x, y, 0.2, seed=3)[2]
    other = carve_validation(x, y, 0.2, seed=4)[2]
    assert np.array_equal(again, x_val) and not np.array_equal(other, x_val)
    assert len(carve_validation(x, y, 0.0, seed=3)[3]) == 0
    with pytest.raises(ValueError, match=r"validation_fraction = 1.0 is out of range: must be a number in \[0, 1\)"):
        carve_validation(x, y, 1.0, seed=3)  # the rule of config_checks.RULES


def test_validation_batches_cover_the_split_once_with_padding_masked():
    x_tr, y_tr, x_val, y_val = carve_validation(np.arange(50.0)[:, None], np.arange(50) % 5, 0.3, seed=0)
    data = ArrayDataset(x_tr, y_tr, x_tr[:4], y_tr[:4], num_classes=5, validation=(x_val, y_val))
    assert data.num_validation_examples == 15
    seen = np.concatenate([b["inputs"][b["mask"], 0] for b in data.validation_batches(4)])
    assert np.array_equal(seen, x_val[:, 0])
    no_val = ArrayDataset(x_tr, y_tr, x_tr[:4], y_tr[:4], num_classes=5)
    with pytest.raises(ValueError, match="validation_fraction"):
        next(no_val.validation_batches(4))
