"""Real tiny image data for the tests: a Tiny ImageNet folder written from random pixels, prepared through
the real tfds builder (:mod:`softnce.data.tiny_imagenet`) as array_record, offline.

    import tiny_images
    data_dir = tiny_images.prepare_tiny_imagenet(str(tmp_path / "data"))   # 6 train, 7 validation images

``write_tiny_imagenet(root)`` writes the official folder layout (``wnids.txt``, ``train/<wnid>/images``,
``val/images`` + ``val_annotations.txt``) with 3 classes; the dataset keeps Tiny ImageNet's 200 classes.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

WNIDS = ["n02", "n01", "n03"]  # sorted -> labels n01:0, n02:1, n03:2
FOLDER = "tiny-imagenet-200"


def write_tiny_imagenet(root, train_per_class=2, num_val=7, size=20, broken_train=()):
    """Writes the Tiny ImageNet folder layout into ``root`` (the ``tiny-imagenet-200`` folder itself).

    ``train_per_class`` random ``size`` x ``size`` JPEGs per class of :data:`WNIDS`; ``num_val`` validation
    images, image ``i`` a constant colour ``10 * i`` of class ``WNIDS[i % 3]`` (recognisable after
    preprocessing). ``broken_train``: names of training files (e.g. ``'n01_0.JPEG'``) written as the
    bytes ``b'not a jpeg'`` instead of an image.
    """
    root = pathlib.Path(root)
    rng = np.random.default_rng(1)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        (root / "train" / wnid / "images").mkdir(parents=True)
        for i in range(train_per_class):
            path = root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            if path.name in broken_train:
                path.write_bytes(b"not a jpeg")
            else:
                Image.fromarray(pixels).save(path)
    lines = []
    for i in range(num_val):
        Image.fromarray(np.full((size, size, 3), 10 * i, np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % 3]}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def prepare_tiny_imagenet(data_dir, **kw) -> str:
    """Writes the folder into ``<data_dir>/downloads/manual/tiny-imagenet-200`` (``kw``: :func:`write_tiny_imagenet`'s)
    and prepares ``tiny_imagenet`` in ``data_dir`` with ``softnce.data.images.prepare``; returns ``data_dir``."""
    from softnce.data import images

    data_dir = os.fspath(data_dir)
    write_tiny_imagenet(pathlib.Path(data_dir) / "downloads" / "manual" / FOLDER, **kw)
    images.prepare("tiny_imagenet", data_dir)
    return data_dir


def record_file(data_dir, split="train") -> str:
    """The single array_record file of ``split`` of the prepared ``tiny_imagenet`` in ``data_dir``."""
    directory = os.path.join(os.fspath(data_dir), "tiny_imagenet", "1.0.0")
    (name,) = [f for f in os.listdir(directory) if f.startswith(f"tiny_imagenet-{split}.array_record")]
    return os.path.join(directory, name)
