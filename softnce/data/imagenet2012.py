"""tfds's ``imagenet2012`` builder (ImageNet-1k, ILSVRC 2012) prepared without TensorFlow.

:class:`Imagenet2012` is tfds's own builder (same name, versions, features, label names and
metadata), so data prepared by it and by tfds are interchangeable and tfds's registered builder reads
them. Only the parts of the preparation that call TensorFlow are replaced:

- the split generators look for the archives with :func:`os.path.exists` (tfds: ``tf.io.gfile``)
  and read the names of the validation images with Python's :mod:`tarfile` (tfds's
  ``validation_labels.txt``, shipped in the tfds package, lists the labels in sorted-name order);
- the archives are read with :mod:`tarfile` in streaming mode (``r|``): the training tar of
  per-class tars (each inner tar streamed too, never held in memory), the validation tar and the
  test tar;
- the 22 CMYK JPEGs and the one PNG of the training set (tfds's ``CMYK_IMAGES`` and ``PNG_IMAGES``)
  are converted to RGB JPEG (quality 100) with Pillow instead of ``tf.image``.

Put ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` (and optionally
``ILSVRC2012_img_test.tar``), unextracted, in the manual directory (``<data_dir>/downloads/manual/``
by default) and run ``python -m softnce.data.images --name imagenet2012 --data_dir <data_dir>``.
A missing archive leaves its split out (with a warning), as in tfds.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from typing import BinaryIO, Iterator

import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

NAME = "imagenet2012"
ARCHIVES = {  # split -> archive in the manual directory
    "train": "ILSVRC2012_img_train.tar",
    "validation": "ILSVRC2012_img_val.tar",
    "test": "ILSVRC2012_img_test.tar",
}
CMYK_IMAGES = frozenset(tfds_imagenet.CMYK_IMAGES)  # training images stored as CMYK JPEG
PNG_IMAGES = frozenset(tfds_imagenet.PNG_IMAGES)  # training images stored as PNG (under a .JPEG name)
JPEG_QUALITY = 100  # tfds's jpeg_cmyk_to_rgb / png_to_jpeg quality

log = logging.getLogger(__name__)


def validation_labels_path() -> str:
    """tfds's ``validation_labels.txt``: the 50,000 validation synsets in sorted image-name order."""
    return os.fspath(tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME))


class Imagenet2012(tfds_imagenet.Builder, skip_registration=True):
    """tfds's ``imagenet2012`` builder with a TensorFlow-free preparation (see the module docstring)."""

    name = NAME
    # tfds's README / citation for the description, as tfds's registered builder reads them.
    pkg_dir_path = tfds.core.tfds_path("datasets/imagenet2012")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)  # AssertionError with the instructions when empty
        splits = {}
        for split, archive in ARCHIVES.items():
            path = os.path.join(manual_dir, archive)
            if not os.path.exists(path):
                log.warning("ImageNet 2012 %s split not found at %s: preparing without it.", split, path)
                continue
            labels = validation_labels(path) if split == "validation" else None
            splits[split] = self._generate_examples(path, split, labels)
        if not splits:
            raise AssertionError(
                "ImageNet requires manual download of the data. Put at least one of "
                + ", ".join(ARCHIVES.values()) + f" (unextracted) in {manual_dir}.\n"
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return splits

    def _fix_image(self, image_fname: str, image: bytes) -> bytes:
        """The CMYK JPEGs and the PNG of the training set as RGB JPEG (tfds's fix, from version 3.0.0)."""
        if self.version < "3.0.0" or (image_fname not in CMYK_IMAGES and image_fname not in PNG_IMAGES):
            return image
        return to_rgb_jpeg(image)

    def _generate_examples(self, path: str, split: str, validation_labels: dict[str, str] | None = None):
        """``(file name, {'file_name', 'image': JPEG bytes, 'label'})`` for every image of one archive.

        ``split`` ``'train'``: a tar of per-class tars ``<synset>.tar`` (the label); ``'validation'``:
        a flat tar, labels from ``validation_labels``; ``'test'``: a flat tar, label -1.
        """
        with open(path, "rb") as archive:
            if split != "train":
                for fname, fobj in iter_tar(archive):
                    label = -1 if split == "test" else validation_labels[fname]
                    yield fname, {"file_name": fname, "image": fobj.read(), "label": label}
                return
            for class_fname, class_fobj in iter_tar(archive):
                label = class_fname[:-4]  # 'n01440764.tar' -> 'n01440764'
                for image_fname, image_fobj in iter_tar(class_fobj):
                    image = self._fix_image(image_fname, image_fobj.read())
                    yield image_fname, {"file_name": image_fname, "image": image, "label": label}


def iter_tar(fileobj: BinaryIO) -> Iterator[tuple[str, BinaryIO]]:
    """``(path, file object)`` of every regular file of a tar, streamed (``tarfile`` mode ``r|``).

    Each file object must be read before the next item is taken. Paths are normalised and hidden or
    absolute ones skipped, as tfds's ``iter_archive`` does.
    """
    with tarfile.open(fileobj=fileobj, mode="r|", bufsize=1 << 20) as tar:
        for member in tar:
            if not member.isfile():  # directories, and links (not readable in streaming mode)
                continue
            path = _normpath(member.name)
            if path is not None:
                yield path, tar.extractfile(member)


def _normpath(path: str) -> str | None:
    """tfds's ``extractor._normpath``: the normalised path, None for hidden, absolute or backup files."""
    path = os.path.normpath(path)
    if path.startswith(".") or os.path.isabs(path) or path.endswith("~") or os.path.basename(path).startswith("."):
        return None
    return path


def validation_labels(val_path: str) -> dict[str, str]:
    """Validation image name -> synset: tfds's ``validation_labels.txt`` zipped with ``val_path``'s sorted file names.

    As tfds's ``imagenet_common.get_validation_labels``, with ``open`` and :mod:`tarfile` (reads only the
    tar headers).

    Raises:
      ValueError: the archive holds more images than there are validation labels.
    """
    with open(validation_labels_path()) as labels_file:
        labels = labels_file.read().strip().splitlines()
    with open(val_path, "rb") as archive, tarfile.open(fileobj=archive, mode="r:") as tar:
        names = sorted(name for name in (_normpath(m.name) for m in tar.getmembers() if m.isfile()) if name)
    if len(names) > len(labels):
        raise ValueError(f"{val_path} holds {len(names)} images; ImageNet's validation split has {len(labels)}. "
                         "Is it ILSVRC2012_img_val.tar?")
    if len(names) != len(labels):
        log.warning("%s holds %d images, not the %d of ImageNet's validation split; labels are assigned in "
                    "sorted-name order, as tfds does.", val_path, len(names), len(labels))
    return dict(zip(names, labels))


def to_rgb_jpeg(image: bytes) -> bytes:
    """Any image Pillow reads (CMYK JPEG, PNG) -> RGB JPEG bytes (quality 100, as tfds's ``tf.image`` fix)."""
    with Image.open(io.BytesIO(image)) as pil_image:
        rgb = pil_image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
