"""Random crop with padding and horizontal flip of in-memory images (softnce.data.array_augment)."""

import jax
import ml_collections
import numpy as np

from softnce.data import array_augment


def test_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    images = np.random.default_rng(0).normal(size=(64, 6, 5, 1)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    out = np.asarray(array_augment.CropFlip(padding=2, flip=True, fill=-7.0)(keys, images))
    assert out.shape == images.shape
    shifts, flips = set(), 0
    for image, result in zip(images, out):
        padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), constant_values=-7.0)
        found = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                 if np.array_equal((padded[top:top + 6, left:left + 5])[:, ::-1] if flip else
                                   padded[top:top + 6, left:left + 5], result)]
        assert found, "every output is a (mirrored) window of the padded image"
        shifts.add(found[0][:2])
        flips += found[0][2]
    assert len(shifts) > 10 and 16 < flips < 48  # offsets spread over the 25, about half mirrored
    # The same keys give the same images; padding 0 without flip is the identity.
    again = np.asarray(array_augment.CropFlip(padding=2, flip=True, fill=-7.0)(keys, images))
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(np.asarray(array_augment.CropFlip(padding=0, flip=False)(keys, images)), images)


def test_from_config_is_off_by_default():
    assert array_augment.from_config(ml_collections.ConfigDict(), fill=0.0) is None
    config = ml_collections.ConfigDict(dict(random_crop_padding=4, random_flip=False))
    assert array_augment.from_config(config, fill=-1.0) == array_augment.CropFlip(padding=4, flip=False, fill=-1.0)
