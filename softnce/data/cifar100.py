"""tfds's ``cifar100`` builder (CIFAR-100, 60,000 32x32 colour images, 100 classes) prepared without TensorFlow.

:class:`Cifar100` is tfds's own builder (same name, version and features: ``id``, ``image`` PNG,
``label``, ``coarse_label``, with the label names read from the archive as tfds does), so data
prepared by it and by tfds are interchangeable. The official ``cifar-100-binary.tar.gz``
(https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz) is taken from the manual directory
(``<data_dir>/downloads/manual/`` by default) when it is there, which is how nodes without internet
prepare it; otherwise tfds's download manager fetches it (HTTP through ``requests``, no TensorFlow)
and checks it against tfds's registered checksum. The archive is read with Python's :mod:`tarfile`,
the binary records with numpy (each record: coarse label byte, fine label byte, 3,072 bytes of image
in CHW order) and the images are stored as PNG encoded by Pillow (tfds's builder decodes the records
with ``tf.io.gfile`` and encodes with ``tf.image``).

Prepare with ``python -m softnce.data.images --name cifar100 --data_dir <data_dir>``.
"""

from __future__ import annotations

import logging
import os
import tarfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from softnce.data import records

NAME = "cifar100"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
ARCHIVE = "cifar-100-binary.tar.gz"
IMAGE_SHAPE = (32, 32, 3)
NUM_LABELS = 2  # coarse, fine: the first two bytes of every record
RECORD_BYTES = NUM_LABELS + int(np.prod(IMAGE_SHAPE))

log = logging.getLogger(__name__)


class Cifar100(tfds_cifar.Cifar100, skip_registration=True):
    """tfds's ``cifar100`` builder with a TensorFlow-free preparation (see the module docstring)."""

    name = NAME
    URL = URL  # where the archive is downloaded from when the manual directory lacks it
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Optional (for nodes without internet): put {ARCHIVE} (from {URL}) in the manual directory, by "
        "default <data_dir>/downloads/manual/. Without it the archive is downloaded.")

    @tfds.core.utils.classproperty
    @classmethod
    def _checksums_path(cls):
        """tfds's registered checksums for ``cifar100`` (a download is checked against them)."""
        return tfds_cifar.Cifar100._checksums_path

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        archive = self._archive(dl_manager)
        info = self._cifar_info
        names = read_members(archive, [info.prefix + f for f in info.label_files])
        for label_key, label_file in zip(info.label_keys, info.label_files):  # as tfds: names from the archive
            text = names[info.prefix + label_file].decode("utf-8")
            self.info.features[label_key].names = [name for name in text.split("\n") if name]
        return {
            tfds.Split.TRAIN: self._generate_examples("train_", [(archive, info.prefix + f) for f in info.train_files]),
            tfds.Split.TEST: self._generate_examples("test_", [(archive, info.prefix + f) for f in info.test_files]),
        }

    def _archive(self, dl_manager: tfds.download.DownloadManager) -> str:
        """``cifar-100-binary.tar.gz`` from the manual directory if it is there, else downloaded."""
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError:  # no manual directory, or an empty one
            manual_dir = os.fspath(getattr(dl_manager, "_manual_dir", None) or dl_manager.download_dir / "manual")
        path = os.path.join(manual_dir, ARCHIVE)
        if os.path.exists(path):
            log.info("CIFAR-100: using %s", path)
            return path
        try:
            return os.fspath(dl_manager.download(self.URL))
        except Exception as error:  # network errors come in many types; the cause is kept
            raise RuntimeError(
                f"Downloading CIFAR-100 from {self.URL} failed ({type(error).__name__}: {error}). Without internet, "
                f"download {ARCHIVE} elsewhere and put it in {manual_dir}/ ({path}), then prepare again.") from error

    def _generate_examples(self, split_prefix: str, files: list[tuple[str, str]]):
        """``(index, {'id', 'image': PNG bytes, 'label', 'coarse_label'})``, in record order (tfds's keys and ids)."""
        label_keys = self._cifar_info.label_keys  # ['coarse_label', 'label']: the order of the label bytes
        index = 0
        for archive, member in files:
            for labels, image in read_records(read_members(archive, [member])[member], f"{archive}:{member}",
                                              len(label_keys)):
                record = {key: int(label) for key, label in zip(label_keys, labels)}
                record["id"] = f"{split_prefix}{index:05d}"
                record["image"] = records.encode_png(image)
                yield index, record
                index += 1


def read_members(archive: str, members: list[str]) -> dict[str, bytes]:
    """The contents of ``members`` (paths inside the archive) of a tar(.gz), read in one streaming pass.

    Raises:
      FileNotFoundError: a member is missing (the archive is not CIFAR-100's binary version, or truncated).
    """
    wanted, found = set(members), {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                name = os.path.normpath(member.name)
                if name in wanted and member.isfile():
                    found[name] = tar.extractfile(member).read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"{archive} is not a readable tar.gz archive ({error}); download {ARCHIVE} again "
                         f"from {URL}.") from error
    missing = sorted(wanted - set(found))
    if missing:
        raise FileNotFoundError(f"{archive} has no {', '.join(missing)}: expected CIFAR-100's binary version, "
                                f"{ARCHIVE} from {URL}.")
    return found


def read_records(data: bytes, where: str, num_labels: int = NUM_LABELS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(labels uint8 [num_labels], image uint8 [32, 32, 3])`` of every record of a CIFAR binary file.

    Raises:
      ValueError: the length is not a whole number of records (a truncated or foreign file); names ``where``.
    """
    record_bytes = num_labels + int(np.prod(IMAGE_SHAPE))
    if len(data) % record_bytes:
        raise ValueError(f"{where} is {len(data)} bytes, not a whole number of {record_bytes}-byte CIFAR "
                         f"records: a truncated or foreign file. Download {ARCHIVE} again from {URL}.")
    records = np.frombuffer(data, np.uint8).reshape(-1, record_bytes)
    images = records[:, num_labels:].reshape(-1, 3, *IMAGE_SHAPE[:2]).transpose(0, 2, 3, 1)  # CHW -> HWC
    for labels, image in zip(records[:, :num_labels], images):
        yield labels, image
