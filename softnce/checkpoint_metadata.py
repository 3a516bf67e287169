"""What a trained classifier needs besides its parameters, saved with every checkpoint (versioned).

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds, beside orbax's ``default/``
item (the train state):

- ``_CHECKPOINT_METADATA``: orbax's step metadata; its ``custom_metadata['softnce']`` is this
  metadata as it was when the step was saved (``t_star`` still ``null``), written atomically with the
  checkpoint (:func:`softnce.checkpointing.save`).
- ``softnce_metadata.json`` (:data:`FILENAME`): the same fields with the post-hoc temperature
  ``t_star``, written after the trainer fits it on the validation split (the final step).

:func:`read` prefers the file, then orbax's copy. A checkpoint written before this metadata existed
has neither; :func:`legacy` rebuilds it from the run's ``config.json``, its dataset and
``metrics.json`` (for ``t_star``), with a warning.

Fields (``version`` 2; version 1 named ``noise_probs`` ``class_prior``, and a run config written before
named ``config.loss.noise`` ``noise_prior``: both are read with today's names)::

    version        2
    step           the checkpoint's step
    num_classes    C
    class_names    [C] names ("0".."C-1" when the dataset has none)
    noise_probs    [C] eta = exp(log eta), the loss's noise distribution; the normalised training-label
                   counts when the loss uses none (or a uniform one)
    temperature    config.loss.temperature, the training temperature t of softmax(z / t)
    t_star         the post-hoc temperature fitted on the validation split, or null
    input          {"shape": example shape, "dtype": dtype of the eval pipeline's inputs,
                    "transform": null | {"kind": "normalize", "mean": [...], "std": [...]}
                                      | {"kind": "dataset"}}  (the dataset's own device transform)
    config         the run's whole config (JSON), so the checkpoint alone rebuilds the model
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import numpy as np

VERSION = 2
FILENAME = "softnce_metadata.json"


class MetadataError(ValueError):
    """Metadata that cannot be used (a newer version, or none and no way to rebuild it)."""


def noise_probs(dataset, log_noise_probs=None) -> list[float]:
    """``exp(log_noise_probs)`` (renormalised), else the normalised training-label counts."""
    if log_noise_probs is not None:
        prior = np.exp(np.asarray(log_noise_probs, np.float64))
    else:
        prior = np.asarray(dataset.train_label_counts(), np.float64)
        if prior.sum() <= 0:
            prior = np.ones(dataset.num_classes)
    return (prior / prior.sum()).tolist()


def class_names(dataset) -> list[str]:
    names = getattr(dataset, "class_names", None)
    if names is None:
        return [str(c) for c in range(dataset.num_classes)]
    if len(names) != dataset.num_classes:
        raise MetadataError(f"the dataset names {len(names)} classes but has {dataset.num_classes}.")
    return [str(name) for name in names]


def transform_spec(transform) -> Optional[dict]:
    """A JSON description of a dataset's ``device_eval_transform`` (see the module docstring)."""
    if transform is None:
        return None
    from softnce.data import device_augment

    if isinstance(transform, device_augment.EvalTransform):
        return {"kind": "normalize", "mean": [float(m) for m in transform.mean],
                "std": [float(s) for s in transform.std]}
    return {"kind": "dataset"}


def make_transform(spec: Optional[dict]):
    """The eval transform described by ``spec``; ``'dataset'`` returns ``None`` (the caller builds it)."""
    if spec is None or spec.get("kind") == "dataset":
        return None
    if spec.get("kind") == "normalize":
        from softnce.data import device_augment

        return device_augment.EvalTransform(mean=tuple(spec["mean"]), std=tuple(spec["std"]))
    raise MetadataError(f"unknown input transform {spec!r} in the checkpoint metadata.")


def build(config, dataset, log_noise_probs=None, *, step: Optional[int] = None,
          t_star: Optional[float] = None) -> dict:
    """The metadata of a run of ``config`` on ``dataset`` (see the module docstring)."""
    config_json = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    return {
        "version": VERSION,
        "step": None if step is None else int(step),
        "num_classes": int(dataset.num_classes),
        "class_names": class_names(dataset),
        "noise_probs": noise_probs(dataset, log_noise_probs),
        "temperature": float(config_json["loss"]["temperature"]),
        "t_star": None if t_star is None else float(t_star),
        "input": {
            "shape": [int(d) for d in dataset.example_shape],
            "dtype": str(np.dtype(getattr(dataset, "input_dtype", "float32"))),
            "transform": transform_spec(dataset.device_eval_transform),
        },
        "config": config_json,
    }


def for_step(metadata: dict, step: int, **updates: Any) -> dict:
    """``metadata`` of checkpoint ``step`` (with ``updates``, e.g. ``t_star``)."""
    return dict(metadata, step=int(step), **updates)


def check(metadata: dict, where: str = "") -> dict:
    """Raises :class:`MetadataError` for metadata of a version this code cannot read."""
    version = metadata.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise MetadataError(
            f"checkpoint metadata{' in ' + where if where else ''} has version {version!r}; this softnce "
            f"reads versions up to {VERSION} (upgrade softnce)."
        )
    if version < 2 and "class_prior" in metadata:  # version 1 named the noise distribution class_prior
        metadata = {("noise_probs" if k == "class_prior" else k): v for k, v in metadata.items()}
    if isinstance(metadata.get("config"), dict):
        metadata = dict(metadata, config=upgrade_config(metadata["config"]))
    return metadata


def write(ckpt_dir, step: int, metadata: dict) -> None:
    """Writes ``metadata`` to ``<ckpt_dir>/<step>/softnce_metadata.json`` (process 0).

    Idempotent: the file is written to a temporary name of this process and moved over any earlier
    one in one step (``replace``), so a reader sees the old or the new file, never part of one.
    """
    from softnce import checkpointing

    directory = checkpointing.step_dir(ckpt_dir, step)
    tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True))
        tmp.replace(directory / FILENAME)
    finally:
        if tmp.exists():
            tmp.unlink()


def read(ckpt_dir, step: int) -> Optional[dict]:
    """The metadata of checkpoint ``step``: the file, else orbax's step metadata, else ``None``."""
    from softnce import checkpointing

    path = checkpointing.step_dir(ckpt_dir, step) / FILENAME
    if path.exists():
        return check(json.loads(path.read_text()), str(path))
    saved = checkpointing.saved_metadata(checkpointing.read_only_manager(ckpt_dir), step)
    return None if saved is None else check(dict(saved), str(checkpointing.step_dir(ckpt_dir, step)))


def stored_t_star(workdir, step: int) -> Optional[float]:
    """``t*`` from a run's ``metrics.json`` when it reports the checkpoint ``step``, else ``None``."""
    from softnce import checkpointing

    path = checkpointing.resolve(workdir) / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    t_star = metrics.get("t_star", metrics.get("temperature"))  # "temperature": written before softnce 0.5
    if metrics.get("step") != step or t_star is None:
        return None
    return float(t_star)


def legacy(workdir, config, dataset, log_noise_probs, step: int) -> dict:
    """Metadata for a checkpoint saved without any: from the run's config, dataset and ``metrics.json``.

    Warns (``UserWarning``) that ``t_star`` comes from ``metrics.json`` (only if that reports ``step``).
    """
    t_star = stored_t_star(workdir, step)
    where = os.path.join(str(workdir), "metrics.json")
    warnings.warn(
        f"checkpoint {step} in {workdir} was saved without softnce metadata (an older softnce); rebuilt it "
        f"from config.json and the dataset, t* {'= %.4g from %s' % (t_star, where) if t_star else 'unknown'}.",
        UserWarning, stacklevel=3,
    )
    return build(config, dataset, log_noise_probs, step=step, t_star=t_star)


def upgrade_config(config_json: dict) -> dict:
    """A run config saved by an earlier softnce with today's names: ``loss.noise_prior`` is ``loss.noise``."""
    loss = config_json.get("loss")
    if isinstance(loss, dict) and "noise_prior" in loss and "noise" not in loss:
        loss = {("noise" if k == "noise_prior" else k): v for k, v in loss.items()}
        config_json = dict(config_json, loss=loss)
    return config_json


def to_config(config_json: dict):
    """A ``ConfigDict`` from a config saved as JSON (``config.json``, the metadata's ``config``), with today's
    names (:func:`upgrade_config`); lists become tuples again, as the config files write them."""
    import ml_collections

    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return value

    return ml_collections.ConfigDict(tuples(upgrade_config(config_json)))


def read_run_config(workdir):
    """The ``config.json`` that the trainer wrote to ``workdir``, as a ``ConfigDict`` (imports no jax)."""
    from etils import epath

    text = os.fspath(workdir)
    path = epath.Path(text if "://" in text else os.path.abspath(text)) / "config.json"  # checkpointing.resolve
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {workdir} the workdir of a softnce run?")
    return to_config(json.loads(path.read_text()))


class CheckpointNotFoundError(FileNotFoundError):
    """No such run, checkpoint directory or step."""


def locate(path, step: Optional[int] = None) -> tuple[Any, Any, int]:
    """``(workdir or None, checkpoints dir, step)`` for a workdir, its ``checkpoints`` dir or one step dir.

    ``step=None`` picks the latest finished checkpoint.
    """
    from softnce import checkpointing

    path = checkpointing.resolve(path)
    if (path / "checkpoints").is_dir():
        workdir, ckpt_dir = path, path / "checkpoints"
    elif path.name.isdigit() and (path / "default").is_dir():
        workdir, ckpt_dir = path.parent.parent, path.parent
        if step is not None and int(step) != int(path.name):
            raise CheckpointNotFoundError(f"{path} is the checkpoint of step {path.name}, not of step {step}.")
        step = int(path.name)
    elif path.is_dir():
        workdir, ckpt_dir = path.parent, path
    else:
        raise CheckpointNotFoundError(f"{path} does not exist (give a run's workdir or one of its checkpoints).")
    steps = sorted(checkpointing.read_only_manager(ckpt_dir).all_steps())
    if not steps:
        raise CheckpointNotFoundError(f"no finished checkpoint in {ckpt_dir}.")
    if step is None:
        step = steps[-1]
    elif int(step) not in steps:
        raise CheckpointNotFoundError(
            f"no checkpoint of step {step} in {ckpt_dir}; the saved steps are {', '.join(map(str, steps))}."
        )
    return (workdir if (workdir / "config.json").exists() else None), ckpt_dir, int(step)
