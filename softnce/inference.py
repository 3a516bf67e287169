"""Load a trained classifier from a checkpoint and predict (calibrated) class probabilities.

::

    from softnce import inference

    clf = inference.load("runs/digits_sti")          # the latest checkpoint; or step=300
    clf = inference.load("runs/digits_sti/checkpoints/600")   # a checkpoint directory alone
    p = clf.predict_proba(x)                          # softmax(z / t*) [n, C], t* fitted on validation
    p = clf.predict_proba(x, calibrated=False)        # softmax(z / t) at the training temperature
    y = clf.predict(x)                                # argmax [n]; clf.class_names[y[0]]
    z = clf.logits(x)                                 # raw logits [n, C]

Everything besides the parameters comes from the checkpoint's metadata
(:mod:`softnce.checkpoint_metadata`): the model config, ``t*``, the training temperature, the class
prior and the class names. A checkpoint saved before that metadata existed still loads: the metadata
is rebuilt from the run's ``config.json`` and its dataset, and ``t*`` is taken from the run's
``metrics.json`` (when that reports the same step), with a warning.

**Inputs** are given as the dataset's evaluation pipeline gives them (the ``inputs`` of
``dataset.eval_batches``), ``[n, *example_shape]`` or a single ``example_shape`` example:

- ``digits``: float32 ``[n, 8, 8, 1]``, pixel values / 16 (``sklearn.datasets.load_digits().images / 16``).
- ``fashion_mnist``: float32 ``[n, 28, 28, 1]``, ``(pixel / 255 - 0.2860) / 0.3530``
  (:func:`softnce.data.fashion_mnist.normalize` of the uint8 images).
- ``fashion_mnist_tuples``: float32 ``[n, 28/p, 28k/p, 1]``, ``k`` such images side by side, each
  average-pooled over ``p x p`` blocks (``p = config.data.pool_size``; :mod:`softnce.data.fashion_tuples`).
- ``imagenet2012``, ``cifar100``, ``tiny_imagenet`` (the ImageNet path): uint8 ``[n, S, S, 3]``
  centre crops of RGB images, ``S = config.data.image_size``: resize the shorter side to
  ``floor(S / 0.875)`` (bicubic) and take the central ``S x S``, as
  :func:`preprocess_images` does from encoded image files (JPEG/PNG bytes or paths). The classifier
  normalises them (``(x / 255 - mean) / std`` with the dataset's mean and std) itself; do not
  normalise them beforehand.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from softnce import checkpoint_metadata, checkpointing


class Classifier:
    """A trained model with its metadata: :meth:`logits`, :meth:`predict_proba`, :meth:`predict`.

    Args:
      model: the Flax module (``model.apply(variables, x, train=False) -> logits``).
      variables: its variables, ``{'params': params, **model_state}`` (e.g. BatchNorm's ``batch_stats``).
      metadata: :mod:`softnce.checkpoint_metadata`'s dict (``num_classes``, ``class_names``,
        ``noise_probs``, ``temperature``, ``t_star``, ``input``, ``config``, ...).
      input_transform: the dataset's ``device_eval_transform`` (e.g. uint8 -> normalised float), or ``None``.
    """

    def __init__(self, model, variables: dict, metadata: dict, input_transform=None):
        self.model = model
        self.variables = variables
        self.metadata = dict(metadata)
        self.input_transform = input_transform
        self._logits = jax.jit(self.logits_fn)
        self._proba = jax.jit(self.proba_fn)

    # --------------------------------------------------------------- the pure functions (also exported)
    def logits_fn(self, variables, x):
        """``(variables, inputs [n, ...]) -> float32 logits [n, C]`` (pure, jittable)."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        return self.model.apply(variables, x, train=False).astype(jnp.float32)

    def proba_fn(self, variables, x, temperature):
        """``(variables, inputs, temperature) -> softmax(logits / temperature) [n, C]`` (pure, jittable)."""
        return jax.nn.softmax(self.logits_fn(variables, x) / temperature, axis=-1)

    # --------------------------------------------------------------- metadata
    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def noise_probs(self) -> np.ndarray:
        """``eta``, the noise distribution the model was trained with ([C])."""
        return np.asarray(self.metadata["noise_probs"], np.float64)

    @property
    def temperature(self) -> float:
        """The training temperature ``t`` (``config.loss.temperature``)."""
        return float(self.metadata["temperature"])

    @property
    def t_star(self) -> Optional[float]:
        """The post-hoc temperature fitted on the validation split (``None`` if none was fitted)."""
        value = self.metadata.get("t_star")
        return None if value is None else float(value)

    @property
    def step(self) -> Optional[int]:
        return self.metadata.get("step")

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["input"]["shape"])

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.metadata["input"]["dtype"])

    def temperature_for(self, calibrated: bool) -> float:
        """``t*`` if ``calibrated`` else the training temperature; raises when ``t*`` is unknown."""
        if not calibrated:
            return self.temperature
        if self.t_star is None:
            raise ValueError(
                f"checkpoint {self.step} has no fitted temperature t* (only the final checkpoint of a run with "
                "a validation split has one); use predict_proba(x, calibrated=False), or fit one with "
                "classifier.fit_temperature(x_val, y_val)."
            )
        return self.t_star

    # --------------------------------------------------------------- prediction
    def prepare(self, x) -> tuple[np.ndarray, bool]:
        """``(inputs [n, *example_shape] in the input dtype, whether x was one example)``; checks shape and dtype."""
        x = np.asarray(x)
        single = x.shape == self.example_shape
        if single:
            x = x[None]
        if x.shape[1:] != self.example_shape:
            raise ValueError(
                f"inputs must have shape [n, {', '.join(map(str, self.example_shape))}] (or one example of shape "
                f"{self.example_shape}), as the dataset's eval pipeline gives them; got {x.shape}."
            )
        if self.input_dtype == np.uint8 and x.dtype != np.uint8:
            raise ValueError(
                f"this model takes uint8 images (centre crops, not normalised; see softnce.inference."
                f"preprocess_images), got {x.dtype}."
            )
        return x.astype(self.input_dtype, copy=False), single

    def logits(self, x) -> np.ndarray:
        """Logits ``[n, C]`` (float32) of inputs ``x``."""
        x, single = self.prepare(x)
        z = np.asarray(self._logits(self.variables, x))
        return z[0] if single else z

    def predict_proba(self, x, calibrated: bool = True) -> np.ndarray:
        """``softmax(z / t*)`` (``calibrated``) or ``softmax(z / t)`` at the training temperature, ``[n, C]``."""
        t = jnp.float32(self.temperature_for(calibrated))
        x, single = self.prepare(x)
        p = np.asarray(self._proba(self.variables, x, t))
        return p[0] if single else p

    def predict(self, x) -> np.ndarray:
        """The predicted classes ``argmax_c z_c`` ``[n]`` (the same at every temperature)."""
        return np.argmax(self.logits(x), axis=-1)

    def fit_temperature(self, x, labels) -> float:
        """Fits ``t*`` on ``(x, labels)`` (:func:`softnce.metrics.fit_temperature`), keeps and returns it."""
        from softnce import metrics

        t_star = metrics.fit_temperature(self.logits(x), np.asarray(labels))
        self.metadata["t_star"] = t_star
        return t_star


def preprocess_images(images: Iterable[Any], image_size: int) -> np.ndarray:
    """Encoded images (bytes, or paths to JPEG/PNG/... files) -> uint8 ``[n, S, S, 3]`` evaluation crops.

    The evaluation pipeline's own host transform (:func:`softnce.data.image_augment.resize_and_center_crop`):
    bicubic resize of the shorter side to ``floor(S / 0.875)``, then the centre ``S x S`` crop.
    """
    from softnce.data import image_augment

    crops = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = f.read()
        crops.append(image_augment.resize_and_center_crop(bytes(image), image_size))
    return np.stack(crops).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------


def load(path, step: Optional[int] = None) -> Classifier:
    """The classifier of checkpoint ``step`` (default: the latest) of a run.

    Args:
      path: a run's workdir, its ``checkpoints`` directory, or one checkpoint directory
        (``<workdir>/checkpoints/<step>``: the checkpoint alone is enough).
      step: the checkpoint step (``None``: the latest; must match a step directory's own).
    """
    from softnce import assembly, models

    workdir, ckpt_dir, step = checkpoint_metadata.locate(path, step)
    metadata, dataset = assembly.checkpoint_info(workdir, ckpt_dir, step)
    config = checkpoint_metadata.to_config(metadata["config"])
    model = models.get_model(config.model, metadata["num_classes"])
    spec = metadata["input"]["transform"]
    transform = checkpoint_metadata.make_transform(spec)
    if spec is not None and spec.get("kind") == "dataset":  # a transform of the dataset's own: build it
        if dataset is None:
            dataset, _ = assembly.make_dataset_and_model(config)
        transform = dataset.device_eval_transform
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = assembly.abstract_variables(model, metadata["input"]["shape"], device)
    variables = checkpointing.restore_variables_only(ckpt_dir, step, target)
    return Classifier(model, variables, metadata, transform)
