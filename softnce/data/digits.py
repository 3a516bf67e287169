"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes), no download.

Fixed split: ``sklearn.model_selection.train_test_split(test_size=0.3, stratify=labels,
random_state=0)`` -> 1,257 training and 540 test images. Pixels are scaled from [0, 16] to [0, 1];
inputs have shape ``[8, 8, 1]`` so that CutMix applies.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from softnce.data.arrays import ArrayDataset, carve_validation

TEST_FRACTION = 0.3
SPLIT_SEED = 0


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``(x_train [1257, 8, 8, 1], y_train, x_test [540, 8, 8, 1], y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int32), test_size=TEST_FRACTION,
        stratify=digits.target, random_state=SPLIT_SEED,
    )
    return x_train, y_train, x_test, y_test


def make_digits_dataset(config: ml_collections.ConfigDict, *, process_index: int, process_count: int):
    """The 1,257 training images minus ``config.validation_fraction`` of them (the validation split)."""
    x_train, y_train, x_test, y_test = load_digits_split()
    x_train, y_train, x_val, y_val = carve_validation(
        x_train, y_train, config.get("validation_fraction", 0.0), config.get("validation_seed", 0)
    )
    return ArrayDataset(
        x_train, y_train, x_test, y_test, num_classes=10, validation=(x_val, y_val) if len(y_val) else None,
        process_index=process_index, process_count=process_count,
    )
