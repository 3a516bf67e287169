"""Runs the real CLI (``softnce.main``) on ``tfds.testing.mock_data`` tfds datasets (tests only).

    python tests/mock_launch.py --mock_data_dir DIR --mock_num_examples 16 --mock_datasets imagenet2012 \\
        --config configs/vit_finetune.py:dataset=imagenet2012,model=vit_tiny --workdir W [softnce.main flags]

The tensorflow-datasets wheel ships no dataset metadata, so :func:`write_metadata` writes each dataset's
real ``DatasetInfo`` (features, no split sizes) to ``DIR``: the dataset then counts as prepared, and
mock_data generates ``--mock_num_examples`` random examples per split (the same ones in every process,
mock_data's generator is seeded). Set ``config.data.num_train_examples`` / ``num_eval_examples``.

:func:`mock_datasets` is the same set-up as a context manager for in-process tests.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

from absl import app, flags

from softnce import main as softnce_main  # defines the trainer's flags

_DATA_DIR = flags.DEFINE_string("mock_data_dir", None, "tfds data_dir holding the datasets' metadata.")
_NUM_EXAMPLES = flags.DEFINE_integer("mock_num_examples", 16, "Mock examples per split.")
_DATASETS = flags.DEFINE_list("mock_datasets", ["imagenet2012"], "Datasets whose metadata to write if absent.")


def write_metadata(data_dir: str, names=("imagenet2012",)) -> None:
    """Writes the real ``DatasetInfo`` of each tfds dataset in ``names`` under ``data_dir`` (if absent)."""
    import tensorflow_datasets as tfds

    for name in names:
        builder = tfds.builder(name, data_dir=data_dir)
        if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
            os.makedirs(builder.data_dir, exist_ok=True)
            builder.info.write_to_directory(builder.data_dir)


class _NoMockFs:
    """Stands in for tfds's ``MockFs``, which mock_data enters around every ``builder.as_dataset``.

    ``MockFs`` redirects all epath / tf.io.gfile access of the whole process (every thread) into a
    temporary directory while it is active, so an orbax save running asynchronously in another thread
    during an ``as_dataset`` call would write there and fail. Our data_dir really exists (it holds
    the metadata), so no file-system mock is needed.
    """

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_file(self, path, content=None) -> None:
        del path, content


@contextlib.contextmanager
def mock_datasets(data_dir: str, num_examples: int, names=("imagenet2012",)):
    """Metadata in ``data_dir`` + ``tfds.testing.mock_data`` with ``num_examples`` per split."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import test_utils

    write_metadata(data_dir, names)
    with mock.patch.object(test_utils, "MockFs", _NoMockFs), tfds.testing.mock_data(
        num_examples=num_examples, data_dir=data_dir
    ):
        yield


def _main(argv) -> None:
    if _DATA_DIR.value is None:
        raise app.UsageError("--mock_data_dir is required.")
    with mock_datasets(_DATA_DIR.value, _NUM_EXAMPLES.value, _DATASETS.value):
        softnce_main.main(argv)


if __name__ == "__main__":
    app.run(_main)
