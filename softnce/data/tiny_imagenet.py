"""A tfds builder for Tiny ImageNet (200 classes, 64x64 JPEGs) from the official folder layout.

The official ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip) holds::

    tiny-imagenet-200/wnids.txt                      one WordNet id per line (the 200 classes)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 training images per class
    tiny-imagenet-200/val/images/*.JPEG              10,000 validation images
    tiny-imagenet-200/val/val_annotations.txt        file_name <TAB> wnid <TAB> bounding box

Put the zip file or the extracted ``tiny-imagenet-200/`` folder in the manual directory
(``<data_dir>/downloads/manual/`` by default) and prepare with
``python -m softnce.data.images --name tiny_imagenet --data_dir <data_dir>``. The zip is extracted
with Python's :mod:`zipfile` (no TensorFlow) into ``<data_dir>/downloads/extracted/tiny-imagenet-200.zip/``,
once (a later preparation reuses that folder).
Labels are the positions of the wnids in sorted order. The unlabelled test split is not built.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from typing import Iterator

import tensorflow_datasets as tfds
from etils import epath

FOLDER = "tiny-imagenet-200"
ZIP_NAME = "tiny-imagenet-200.zip"
NUM_CLASSES = 200


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny ImageNet (Stanford CS231n): 100,000 training and 10,000 validation images, 200 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train and validation splits from the official folder layout."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {ZIP_NAME} from http://cs231n.stanford.edu/{ZIP_NAME} and place the zip file "
        f"(or the extracted {FOLDER}/ folder) in the manual directory, by default "
        "<data_dir>/downloads/manual/.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = find_root(os.fspath(dl_manager.manual_dir), dl_manager)
        wnids = read_wnids(root)
        return {
            "train": self._generate_examples(train_files(root, wnids)),
            "validation": self._generate_examples(validation_files(root, wnids)),
        }

    def _generate_examples(self, files: list[tuple[str, int]]) -> Iterator[tuple[str, dict]]:
        for path, label in files:
            name = os.path.basename(path)
            yield name, {"image": path, "label": label, "file_name": name}


def find_root(manual_dir: str, dl_manager: tfds.download.DownloadManager | None = None) -> str:
    """The ``tiny-imagenet-200`` folder inside ``manual_dir`` (extracting the zip when needed)."""
    for candidate in (os.path.join(manual_dir, FOLDER), manual_dir):
        if epath.Path(candidate, "wnids.txt").exists():
            return candidate
    zip_path = os.path.join(manual_dir, ZIP_NAME)
    if dl_manager is not None and epath.Path(zip_path).exists():
        return os.path.join(extract_zip(zip_path, os.path.join(os.fspath(dl_manager.download_dir), "extracted",
                                                               ZIP_NAME)), FOLDER)
    raise FileNotFoundError(
        f"No Tiny ImageNet in {manual_dir}: expected {FOLDER}/wnids.txt or {ZIP_NAME} there. "
        + TinyImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS)


def extract_zip(zip_path: str, target: str) -> str:
    """Extracts ``zip_path`` into the folder ``target`` with :mod:`zipfile` (no TensorFlow), unless done before.

    The zip is extracted into a temporary sibling folder that is then renamed to ``target``, so an
    interrupted extraction is never taken for a finished one. Returns ``target``.

    Raises:
      ValueError: ``zip_path`` is not a readable zip file.
    """
    if os.path.isdir(target):
        return target
    tmp = f"{target}.tmp.{uuid.uuid4().hex}"
    os.makedirs(tmp)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
        try:
            os.replace(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # else: another process extracted it meanwhile
                raise
    except zipfile.BadZipFile as error:
        raise ValueError(f"{zip_path} is not a readable zip file ({error}); download {ZIP_NAME} again.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_wnids(root: str) -> dict[str, int]:
    """WordNet id -> label (position in sorted order) from ``wnids.txt``."""
    lines = epath.Path(root, "wnids.txt").read_text().splitlines()
    wnids = sorted({line.strip() for line in lines if line.strip()})
    if not 0 < len(wnids) <= NUM_CLASSES:
        raise ValueError(f"{root}/wnids.txt lists {len(wnids)} classes; Tiny ImageNet has {NUM_CLASSES}.")
    return {wnid: label for label, wnid in enumerate(wnids)}


def train_files(root: str, wnids: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of every ``train/<wnid>/images/*.JPEG``."""
    files = []
    for wnid, label in wnids.items():
        folder = epath.Path(root, "train", wnid, "images")
        files += [(os.fspath(path), label) for path in sorted(folder.glob("*.JPEG"))]
    if not files:
        raise FileNotFoundError(f"No training images {root}/train/<wnid>/images/*.JPEG.")
    return files


def validation_files(root: str, wnids: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of the validation images listed in ``val/val_annotations.txt``."""
    files = []
    lines = epath.Path(root, "val", "val_annotations.txt").read_text().splitlines()
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, wnid = line.split("\t")[:2]
        if wnid not in wnids:
            raise ValueError(f"val_annotations.txt line {line_number}: class {wnid!r} is not in wnids.txt.")
        files.append((os.path.join(root, "val", "images", name), wnids[wnid]))
    return files
