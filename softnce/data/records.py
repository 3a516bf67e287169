"""Prepared tfds datasets as random-access ``array_record`` sources, read without TensorFlow.

tensorflow-datasets prepares a dataset into ``array_record`` files (``file_format='array_record'``)
and reads them back through ``builder.as_data_source`` (no TensorFlow in either direction). This
module is the one place that opens them:

- :func:`builder` and :func:`assert_prepared`: a dataset that was never prepared, or that was
  prepared as TFRecord (which only TensorFlow reads), is a
  :class:`~softnce.data.base.DataNotPreparedError` / :class:`~softnce.data.base.DataError` that
  names the command that (re)builds it.
- :class:`RecordSource`: ``read(rows)`` returns the records of a split (images left encoded); a
  damaged record is a :class:`~softnce.data.base.DataError` that names the file and the record.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.data_sources import base as data_sources_base

from softnce.data.base import DataError, DataNotPreparedError

# tfds decodes images with Pillow where OpenCV is absent and says so in a warning on every run; Pillow is
# what softnce decodes with anyway (timm's decoder), so that warning is dropped.
logging.getLogger("absl").addFilter(lambda record: "OpenCV is not installed" not in record.getMessage())

FILE_FORMAT = "array_record"
GENERATE_AGAIN = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # keep downloads, write the records anew


def builder(name: str, data_dir: str | None, **kwargs) -> tfds.core.DatasetBuilder:
    """``tfds.builder(name)`` in ``data_dir`` that prepares ``array_record`` files.

    Data already prepared keep the format they were prepared in (``tfds.builder(file_format=...)``
    refuses to open data prepared as TFRecord), so that :func:`assert_prepared` can name the command
    that rebuilds them and :func:`prepare` can rebuild them.
    """
    dataset_builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    if not is_tfrecord(dataset_builder):
        dataset_builder.info.set_file_format(FILE_FORMAT, override=True, override_if_initialized=True)
    return dataset_builder


def is_tfrecord(dataset_builder: tfds.core.DatasetBuilder) -> bool:
    """Whether ``dataset_builder``'s prepared data are TFRecord files (prepared before softnce read array_record)."""
    return dataset_builder.is_prepared() and str(dataset_builder.info.file_format.value) == "tfrecord"


def assert_prepared(dataset_builder: tfds.core.DatasetBuilder, how_to_prepare: str, rebuild_command: str) -> None:
    """Raises unless ``dataset_builder``'s data are prepared as ``array_record``.

    Raises:
      DataNotPreparedError: never prepared (a FileNotFoundError; the message ends with ``how_to_prepare``).
      DataError: prepared as TFRecord; one line naming ``rebuild_command``, which writes it as array_record.
    """
    if not dataset_builder.is_prepared():
        raise DataNotPreparedError(
            f"Dataset {dataset_builder.name!r} is not prepared: no {dataset_builder.data_dir}.\n{how_to_prepare}")
    if is_tfrecord(dataset_builder):
        raise DataError(
            f"Dataset {dataset_builder.name!r} in {dataset_builder.data_dir} was prepared as TFRecord, which needs "
            f"TensorFlow; rebuild it as array_record with: {rebuild_command}")


def prepare(dataset_builder: tfds.core.DatasetBuilder, download_config=None) -> None:
    """``download_and_prepare`` as ``array_record``; data prepared earlier as TFRecord are written anew."""
    download_config = download_config or tfds.download.DownloadConfig()
    if is_tfrecord(dataset_builder):
        download_config.download_mode = GENERATE_AGAIN
    # Set here, not through download_and_prepare(file_format=...): tfds refuses that for an info read
    # from disk (the TFRecord case).
    dataset_builder.info.set_file_format(FILE_FORMAT, override=True, override_if_initialized=True)
    dataset_builder.download_and_prepare(download_config=download_config)


class RecordSource:
    """The records of one split of a prepared dataset, by index, with images left encoded.

    ``read(rows)`` returns one dict per row (tfds's numpy decoding; ``skip_decoding`` features stay
    bytes). Thread-safe (Grain's reader threads share one source).
    """

    def __init__(self, dataset_builder: tfds.core.DatasetBuilder, split: str,
                 skip_decoding: Sequence[str] = ("image",)):
        self.name, self.split = dataset_builder.name, split
        decoders = {key: tfds.decode.SkipDecoding() for key in skip_decoding}
        self._source = dataset_builder.as_data_source(split=split, decoders=decoders or None)
        self._files = data_sources_base.file_instructions(dataset_builder.info, split)
        self._starts = np.cumsum([0] + [f.take for f in self._files])

    def __len__(self) -> int:
        return len(self._source)

    def locate(self, row: int) -> str:
        """``'<file>, record <i>'``: where row ``row`` of the split is stored."""
        shard = int(np.searchsorted(self._starts, row, side="right")) - 1
        file = self._files[shard]
        return f"{file.filename}, record {file.skip + row - int(self._starts[shard])}"

    def read(self, rows: Sequence[int]) -> list[dict]:
        """The records ``rows`` (in that order).

        Raises:
          DataError: a record cannot be read (damaged or truncated file); names the file and record.
        """
        rows = [int(r) for r in rows]
        try:
            return list(self._source.__getitems__(rows))
        except Exception:  # noqa: BLE001  (find the record; array_record names neither file nor record)
            for row in rows:
                try:
                    self._source[row]
                except Exception as error:  # noqa: BLE001
                    raise self.error(row, error) from None
            raise

    def error(self, row: int, error: BaseException) -> DataError:
        """A :class:`DataError` naming the file and record of ``row``, with ``error``'s first line."""
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        return DataError(f"damaged record in {self.name} {self.split}: {self.locate(row)} ({reason}). "
                         "Prepare the dataset again (its preparation command), or restore the file.")

    def map_records(self, rows: Sequence[int], fn: Callable[[int, dict], np.ndarray], out: np.ndarray) -> None:
        """``out[i] = fn(i, record of rows[i])``; a record ``fn`` fails on (an undecodable image) is a DataError."""
        for i, (row, record) in enumerate(zip(rows, self.read(rows))):
            try:
                out[i] = fn(i, record)
            except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for bad image bytes
                raise self.error(int(row), error) from None


def read_arrays(dataset_builder: tfds.core.DatasetBuilder, split: str, keys: Sequence[str],
                hint: str = "") -> dict[str, np.ndarray]:
    """The features ``keys`` of every example of ``split``, decoded and stacked ``[n, ...]`` (small datasets).

    Raises:
      ValueError: a key is not a feature of the dataset (the message lists its features, then ``hint``).
      DataError: a damaged record (see :meth:`RecordSource.read`).
    """
    features = set(dataset_builder.info.features.keys())
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(f"tfds dataset {dataset_builder.info.full_name} has no feature {', '.join(missing)}; its "
                         f"features are {', '.join(sorted(features))}{hint}.")
    source = RecordSource(dataset_builder, split, skip_decoding=())
    examples = source.read(range(len(source)))
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}


def encode_png(image: np.ndarray) -> bytes:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> PNG bytes (Pillow), how the builders store images they are given
    as pixels (tfds encodes those with TensorFlow)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, "PNG")
    return buffer.getvalue()


def data_dir_root(dataset_builder: tfds.core.DatasetBuilder) -> str:
    """The tfds data directory of ``dataset_builder`` (the one to pass to the preparation commands)."""
    return os.fspath(dataset_builder.data_dir_root)
