"""Knowledge distillation: a frozen teacher's predicted distribution as (part of) the training targets.

With ``config.distill`` set (``configs/base.py``; off by default) the trainer makes the targets of
every training example ``i`` as

    a_i = (1 - beta) a_recipe_i + beta softmax(z_teacher(x_i) / tau),

where ``a_recipe`` are the targets the run would use without a teacher (label smoothing, MixUp /
CutMix of the labels or of the soft targets given with the data, :mod:`softnce.targets`) and
``x_i`` are exactly the inputs the student sees in that step: after the dataset's device transform
and after MixUp/CutMix, so the teacher labels each mixed image itself (as DeiT and big_vision's
distillation trainer do). ``beta = 1`` (the default) trains on the teacher's distribution alone;
``tau`` is the teacher temperature (the student's loss keeps its own ``config.loss.temperature``).

The teacher is frozen: its parameters are an argument of the jitted, sharded train step (replicated
over the mesh, never differentiated, never donated, never in the student's checkpoint), and it runs
there in evaluation mode (no dropout). A teacher model config with a ``dtype`` field runs in the
student's compute dtype (``config.model.dtype``; float32 when the student has none).

The teacher is either

- a softnce run: ``config.distill.teacher_workdir`` (its workdir, its ``checkpoints`` directory or one
  checkpoint directory) and ``teacher_step`` (``None``: the latest checkpoint); it is restored with
  that run's own model config from the checkpoint's metadata (:mod:`softnce.inference`'s loading
  path), or
- any registered model with a parameters file: ``config.distill.teacher_model`` (``name`` and the
  model's fields, as ``config.model``) and ``teacher_params``, a ``.npz`` file with one array per
  parameter under its ``/``-joined path (``conv0_0/kernel``; :func:`save_params` writes one) or a
  ``.msgpack`` file of ``flax.serialization.to_bytes(params)``.

Everything is checked before training: a teacher given twice or an unknown model
(:func:`check_config`, from ``softnce.assembly.validate_config``), then, when the trainer starts and
before it writes anything, a missing workdir or file, a teacher with another number of classes or
other inputs, or parameters that do not fit its model (:func:`softnce.assembly.load_teacher`).

Every registered loss trains with a teacher. The hard-label losses (``nll``, ``infonce``,
``soft_distribution_infonce_premix``) read only the labels, so for them the teacher changes nothing;
the trainer says so when it starts.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import dataclasses
import io
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import serialization, traverse_util

from softnce import checkpoint_metadata, models
from softnce.config_checks import ConfigError

Params = Any
Variables = dict  # {'params': params, **model_state}

PARAMS_SUFFIXES = (".npz", ".msgpack")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its Flax module and how its distribution enters the targets.

    Attributes:
      model: ``model.apply(variables, x, train=False) -> logits [N, C]``.
      tau: the teacher temperature of ``softmax(z / tau)``.
      beta: the weight of the teacher's distribution against the recipe's targets.
      description: where it came from (printed when training starts).
    """

    model: Any
    tau: float = 1.0
    beta: float = 1.0
    description: str = ""

    def probs(self, variables: Variables, inputs: jax.Array) -> jax.Array:
        """``softmax(z_teacher / tau)`` float32 ``[N, C]`` on ``inputs`` (evaluation mode, no gradient)."""
        variables = jax.lax.stop_gradient(variables)
        logits = self.model.apply(variables, inputs, train=False)
        return jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32) / self.tau, axis=-1)

    def targets(self, variables: Variables, inputs: jax.Array, recipe_targets: jax.Array) -> jax.Array:
        """``(1 - beta) recipe_targets + beta softmax(z_teacher(inputs) / tau)``, float32 ``[N, C]``."""
        probs = self.probs(variables, inputs)
        if self.beta == 1.0:
            return probs
        return (1.0 - self.beta) * recipe_targets.astype(jnp.float32) + self.beta * probs


class LoadedTeacher(NamedTuple):
    """:func:`softnce.assembly.load_teacher`'s result: the :class:`Teacher` and its variables
    (``{'params', **model_state}``, host numpy arrays)."""

    teacher: Teacher
    variables: Variables


# --------------------------------------------------------------------------------------------------
# The config.
# --------------------------------------------------------------------------------------------------


def _section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.get("distill") or ml_collections.ConfigDict()


def _teacher_model_name(distill: ml_collections.ConfigDict) -> Optional[str]:
    teacher_model = distill.get("teacher_model")
    return None if teacher_model is None else teacher_model.get("name")


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` names a teacher (``config.distill.teacher_workdir`` or ``teacher_params``)."""
    distill = _section(config)
    return bool(distill.get("teacher_workdir") or distill.get("teacher_params"))


def check_config(config: ml_collections.ConfigDict, *, files: bool = True) -> None:
    """Checks ``config.distill`` without loading anything large; raises :class:`ConfigError` (one line).

    The teacher is given once (a workdir, or a model with a parameters file) and its model is
    registered; with ``files`` also that the workdir holds a finished checkpoint (of
    ``teacher_step``, if given) and the parameters file exists. ``softnce.assembly.validate_config``
    checks without ``files`` (evaluating a distilled student needs no teacher); the trainer checks
    them before any work (:func:`softnce.assembly.load_teacher`). The numbers (``tau``, ``beta``, ``teacher_step``)
    are checked by :func:`softnce.config_checks.check_config`.
    """
    distill = _section(config)
    workdir, params_file = distill.get("teacher_workdir"), distill.get("teacher_params")
    model_name = _teacher_model_name(distill)
    if workdir and params_file:
        raise ConfigError(
            f"config.distill: give one teacher, teacher_workdir={workdir!r} (a softnce run) or teacher_params="
            f"{params_file!r} with teacher_model (any registered model), not both."
        )
    if distill.get("teacher_step") is not None and not workdir:
        raise ConfigError("config.distill.teacher_step is a checkpoint step of config.distill.teacher_workdir, "
                          "which is not set.")
    if params_file and not model_name:
        raise ConfigError(
            f"config.distill.teacher_params={params_file!r} needs its model: set config.distill.teacher_model "
            "(name and the model's fields, as config.model) in the config file."
        )
    if model_name and not params_file:
        raise ConfigError(
            f"config.distill.teacher_model.name={model_name!r} is the model of config.distill.teacher_params, "
            "which is not set (a teacher_workdir brings its own model config)."
        )
    if model_name:
        try:
            models.MODELS.get(model_name)
        except ValueError as error:
            raise ConfigError(f"config.distill.teacher_model: {error}") from None
    if not files:
        return
    if workdir:
        try:
            checkpoint_metadata.locate(workdir, distill.get("teacher_step"))
        except FileNotFoundError as error:
            raise ConfigError(f"config.distill.teacher_workdir={workdir!r}: {error}") from None
    if params_file:
        if not epath.Path(params_file).exists():
            raise ConfigError(f"config.distill.teacher_params={params_file!r} does not exist.")
        if not str(params_file).endswith(PARAMS_SUFFIXES):
            raise ConfigError(
                f"config.distill.teacher_params={params_file!r}: a parameters file is {' or '.join(PARAMS_SUFFIXES)} "
                "(see softnce.distill.save_params)."
            )


def teacher_model_config(model_config: ml_collections.ConfigDict,
                         config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``model_config`` with its ``dtype`` (if it has one) set to the student's compute dtype."""
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    if "dtype" in model_config:
        model_config.dtype = config.model.get("dtype") or "float32"
    return model_config


# --------------------------------------------------------------------------------------------------
# Parameters files.
# --------------------------------------------------------------------------------------------------


def _flat(params: Params) -> dict[str, Any]:
    """``{'a/b/kernel': leaf}`` of a nested-dict parameter tree."""
    return traverse_util.flatten_dict(params, sep="/")


def save_params(path: str, params: Params) -> None:
    """Writes ``params`` as a parameters file for ``config.distill.teacher_params`` (``.npz`` or ``.msgpack``)."""
    target = epath.Path(path)
    if str(path).endswith(".msgpack"):
        target.write_bytes(serialization.to_bytes(jax.device_get(params)))
        return
    if not str(path).endswith(".npz"):
        raise ValueError(f"a parameters file is .npz or .msgpack, got {path!r}.")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in _flat(jax.device_get(params)).items()})
    target.write_bytes(buffer.getvalue())


def load_params(path: str, abstract: Params, *, what: str = "config.distill.teacher_params") -> Params:
    """The parameters in file ``path``, checked against ``abstract`` (the model's shapes and dtypes).

    Raises :class:`ConfigError` naming the first missing, unexpected or mis-shaped parameter.
    """
    raw = epath.Path(path).read_bytes()
    if str(path).endswith(".msgpack"):
        flat = {k: np.asarray(v) for k, v in _flat(serialization.msgpack_restore(raw)).items()}
    else:
        with np.load(io.BytesIO(raw)) as arrays:
            flat = {k: arrays[k] for k in arrays.files}
    expected = _flat(abstract)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"{what}={path!r} does not fit the teacher model: missing parameters {missing[:5]}, unexpected "
            f"{extra[:5]} (the file holds {len(flat)}, the model has {len(expected)})."
        )
    for name, spec in expected.items():
        if tuple(flat[name].shape) != tuple(spec.shape):
            raise ConfigError(
                f"{what}={path!r}: parameter {name} has shape {tuple(flat[name].shape)} in the file, the teacher "
                f"model expects {tuple(spec.shape)} (a teacher with another number of classes or input shape?)."
            )
    return traverse_util.unflatten_dict({name: np.asarray(flat[name], spec.dtype) for name, spec in expected.items()},
                                        sep="/")


# --------------------------------------------------------------------------------------------------
# Loading a teacher for a dataset.
# --------------------------------------------------------------------------------------------------


def describe(loaded: LoadedTeacher, config: ml_collections.ConfigDict) -> str:
    """One line for the start of training: the teacher, tau, beta, and a note for a hard-label loss."""
    teacher = loaded.teacher
    num_params = sum(int(np.size(p)) for p in jax.tree.leaves(loaded.variables["params"]))
    text = (f"distilling from {teacher.description}: {num_params:,} frozen parameters, targets "
            f"(1 - {teacher.beta:g}) a_recipe + {teacher.beta:g} softmax(z_teacher / {teacher.tau:g})")
    from softnce import losses

    if losses.get_loss(config.loss.name).reads_labels_only:
        text += (f"; note: config.loss.name={config.loss.name!r} reads only the hard labels, so the teacher's "
                 "targets do not enter its loss")
    return text
