"""Loads a classifier exported by ``python -m softnce.export``; needs only jax and numpy.

This file is copied into every export as ``load.py``, beside the artefact it loads::

    metadata.json         the checkpoint metadata (classes, t*, temperature, noise distribution, input, config)
                          and the export's own fields (the files below, jax version, platforms)
    variables.npz         the model's variables (parameters and state), one array per leaf
                          (``variable_paths`` in metadata.json)
    logits.jax            jax.export of  (variables, x) -> logits [b, C]
    predict_proba.jax     jax.export of  (variables, x, temperature) -> softmax(logits / temperature) [b, C]

Both functions are StableHLO with a symbolic batch dimension ``b`` and include the dataset's
evaluation input transform, so ``x`` is what the dataset's eval pipeline yields (see
``metadata['input']``: shape and dtype of one example). Use it without softnce or Flax,
importing it as the module ``load`` with the export directory on the import path: run ``python -c``
or an interactive python in it (``cd EXPORT_DIR``), or set ``PYTHONPATH=EXPORT_DIR`` (needed for a
script kept elsewhere, whose own directory, not the working one, comes first on Python's import path)::

    import load
    model = load.load()                       # the directory of load.py; or load.load("EXPORT_DIR")
    model.predict_proba(x)                    # softmax(z / t*), the calibrated probabilities
    model.predict_proba(x, calibrated=False)  # softmax(z / t) at the training temperature
    model.predict(x), model.logits(x), model.class_names

Deserialising needs a jax that reads the export's serialisation version (jax keeps reading versions
for a while after it writes newer ones; ``metadata['export']['jax_version']`` is the writer's).
"""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

FORMAT = "softnce-export"


def _nest(paths, leaves):
    """The nested dicts whose leaf at key path ``paths[i]`` is ``leaves[i]``."""
    tree: dict = {}
    for path, leaf in zip(paths, leaves):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


class ExportedClassifier:
    """An exported classifier: :meth:`logits`, :meth:`predict_proba`, :meth:`predict`."""

    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, "metadata.json")) as f:
            self.metadata = json.load(f)
        export = self.metadata.get("export", {})
        if export.get("format") != FORMAT:
            raise ValueError(f"{directory} does not hold a softnce export (no {FORMAT!r} metadata.json).")
        with open(os.path.join(directory, export["variables"]), "rb") as f:
            arrays = np.load(io.BytesIO(f.read()))
            leaves = [jnp.asarray(arrays[f"p{i}"]) for i in range(len(export["variable_paths"]))]
        self.variables = _nest([tuple(p) for p in export["variable_paths"]], leaves)
        self._functions = {}
        for name, filename in export["functions"].items():
            with open(os.path.join(directory, filename), "rb") as f:
                self._functions[name] = jax.jit(jax_export.deserialize(bytearray(f.read())).call)

    @property
    def class_names(self) -> list:
        return list(self.metadata["class_names"])

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def temperature(self) -> float:
        return float(self.metadata["temperature"])

    @property
    def t_star(self):
        value = self.metadata.get("t_star")
        return None if value is None else float(value)

    @property
    def noise_probs(self) -> np.ndarray:
        """``eta``, the noise distribution the model was trained with ([C])."""
        # An export of softnce < 0.5 (checkpoint metadata version 1) names it class_prior.
        return np.asarray(self.metadata.get("noise_probs", self.metadata.get("class_prior")), np.float64)

    def _prepare(self, x):
        shape = tuple(self.metadata["input"]["shape"])
        dtype = np.dtype(self.metadata["input"]["dtype"])
        x = np.asarray(x)
        single = x.shape == shape
        if single:
            x = x[None]
        if x.shape[1:] != shape:
            raise ValueError(f"inputs must have shape [n, {', '.join(map(str, shape))}], got {x.shape}.")
        if dtype == np.uint8 and x.dtype != np.uint8:
            raise ValueError(f"this model takes uint8 images (centre crops, not normalised), got {x.dtype}.")
        return x.astype(dtype, copy=False), single

    def logits(self, x) -> np.ndarray:
        x, single = self._prepare(x)
        z = np.asarray(self._functions["logits"](self.variables, x))
        return z[0] if single else z

    def predict_proba(self, x, calibrated: bool = True) -> np.ndarray:
        """``softmax(z / t*)`` (``calibrated``) or ``softmax(z / t)`` at the training temperature."""
        if calibrated and self.t_star is None:
            raise ValueError("this export has no fitted temperature t*; use predict_proba(x, calibrated=False).")
        t = self.t_star if calibrated else self.temperature
        x, single = self._prepare(x)
        p = np.asarray(self._functions["predict_proba"](self.variables, x, np.float32(t)))
        return p[0] if single else p

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.logits(x), axis=-1)


def load(directory: str | None = None) -> ExportedClassifier:
    """The export in ``directory`` (default: the directory of this file)."""
    return ExportedClassifier(directory or os.path.dirname(os.path.abspath(__file__)))
