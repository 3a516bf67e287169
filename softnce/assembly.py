"""The assembly: what a config builds, the one place each piece is built.

From a config: its checks (:func:`validate_config`, with the fields of the named components), the
dataset and the model (:func:`make_dataset_and_model`), the noise distribution ``eta``
(:func:`log_noise_probs`), the initial variables and the train state (:func:`initial_variables`,
:func:`create_train_state`), the train step (:func:`train_step_kwargs`, :func:`make_train_step`), the
evaluation steps (:func:`make_eval_fns`) and the teacher (:func:`load_teacher`); and for a checkpoint,
its metadata (:func:`checkpoint_info`). The trainer, the evaluation and inference entry points, the
toy's vmapped engine, the benchmarks, the sweeps and distillation all build through it.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from softnce import (
    checkpoint_metadata,
    checkpointing,
    config_checks,
    distill,
    distributed,
    losses,
    models,
    optim,
    steps,
    targets,
)
from softnce.config_checks import ConfigError
from softnce.data import DATASETS, get_dataset
from softnce.data import SHARED_FIELDS as DATA_SHARED_FIELDS
from softnce.data.base import Dataset
from softnce.steps import EvalStepFn, LogitsStepFn, TrainState, TrainStepFn, Variables


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every name and every number in ``config`` before any work starts.

    Unknown names list the valid choices; numbers outside their range name the field, the value
    and the range (:mod:`softnce.config_checks`).
    """
    components = config_components(config)
    if config.loss.noise not in NOISE_CHOICES:
        raise config_checks.ConfigError(
            f"config.loss.noise must be one of {', '.join(map(repr, NOISE_CHOICES))} ('explicit' with "
            f"config.loss.noise_probs), got {config.loss.noise!r}."
        )
    config_checks.check_config(config, components=components)
    try:
        targets.MixConfig.from_config(config.augment)
    except ValueError as error:
        raise config_checks.ConfigError(f"config.augment: {error}") from None
    noise_probs = config.loss.get("noise_probs")
    if (config.loss.noise == "explicit") != (noise_probs is not None):
        raise config_checks.ConfigError(
            "config.loss.noise='explicit' and config.loss.noise_probs (the noise distribution eta, one probability per "
            f"class) go together; got noise={config.loss.noise!r}, noise_probs={noise_probs!r}."
        )
    distill.check_config(config, files=False)  # the teacher's files: when training starts (set_up)


def config_components(config: ml_collections.ConfigDict) -> list[config_checks.Component]:
    """The registered components that ``config`` names, with the fields they take
    (:class:`softnce.config_checks.Component`): the loss, the dataset, the model and a registered teacher
    model. An unknown name raises :class:`~softnce.config_checks.ConfigError` listing the valid ones."""
    sections = [("loss", losses.LOSSES, losses.SHARED_FIELDS), ("data", DATASETS, DATA_SHARED_FIELDS),
                ("model", models.MODELS, ("name",))]
    teacher = config.get("distill", {}).get("teacher_model", {})
    if teacher.get("name") is not None:
        sections.append(("distill.teacher_model", models.MODELS, ("name",)))
    components = []
    for section, registry, shared in sections:
        found = config_checks.section_of(config, section)
        name = found.get("name") if found is not None else None
        if name is None:
            raise config_checks.ConfigError(f"config.{section}.name is not set; name a {registry.kind}: "
                                            f"{', '.join(registry.names())}.")
        try:
            fields, ranges = registry.fields(name), registry.ranges(name)
        except ValueError as error:
            raise config_checks.ConfigError(str(error)) from None
        components.append(config_checks.Component(section, registry.kind, name, fields, ranges, shared))
    return components


NOISE_CHOICES = ("class_prior", "uniform", "target_mean", "explicit")
"""The choices of ``config.loss.noise``, the noise distribution eta (:func:`log_noise_probs`)."""


def explicit_log_prior(noise_probs, num_classes: int, *, atol: float = 1e-3) -> jax.Array:
    """``log(noise_probs)`` float32 ``[C]`` for ``noise='explicit'``; checks length, sign and sum."""
    probs = np.asarray(noise_probs, np.float64)
    if probs.shape != (num_classes,):
        raise config_checks.ConfigError(
            f"config.loss.noise_probs has {probs.size} entries; the dataset has {num_classes} classes."
        )
    if not np.all(probs > 0) or abs(probs.sum() - 1.0) > atol:
        raise config_checks.ConfigError(
            f"config.loss.noise_probs = {tuple(probs.tolist())} must be positive and sum to 1 (within {atol}); "
            f"it sums to {probs.sum():.6g}."
        )
    return jnp.asarray(np.log(probs), jnp.float32)


def log_noise_probs(config: ml_collections.ConfigDict, dataset: Dataset) -> Optional[jax.Array]:
    """``log(eta)`` of the InfoNCE-type losses, computed once; ``None`` for uniform / unused.

    ``config.loss.noise``: ``'class_prior'`` the training-label frequencies, ``'target_mean'``
    the mean of the soft targets given with the training split (their per-class sums, with the same
    ``prior_smoothing``: :func:`softnce.losses.log_prior_from_mass`), ``'explicit'``
    ``config.loss.noise_probs``. A class without mass is a :class:`~softnce.config_checks.ConfigError`
    unless ``config.loss.prior_smoothing > 0``.
    """
    kind = config.loss.noise
    if not losses.get_loss(config.loss.name).uses_noise or kind == "uniform":
        return None
    smoothing = config.loss.get("prior_smoothing", 0.0)
    if kind == "explicit":
        return explicit_log_prior(config.loss.noise_probs, dataset.num_classes)
    if kind == "target_mean":
        sums = dataset.train_target_sums()
        if sums is None:
            raise config_checks.ConfigError(
                f"config.loss.noise='target_mean' is the mean of the soft targets given with the data, but "
                f"the dataset {config.data.name!r} gives none; use 'class_prior', 'uniform' or 'explicit'."
            )
        mass, what = sums, "soft-target mass in the training split"
    else:
        mass, what = dataset.train_label_counts(), "training examples"
    try:
        return losses.log_prior_from_mass(mass, smoothing=smoothing, what=what)
    except ValueError as error:
        raise config_checks.ConfigError(
            f"noise distribution: {error} Set config.loss.prior_smoothing > 0 or another config.loss.noise."
        ) from None


def make_dataset_and_model(config: ml_collections.ConfigDict) -> tuple[Dataset, Any]:
    """This process's dataset of ``config.data`` and the Flax model of ``config.model`` for its classes.

    The one place that builds them: training (:func:`set_up`), ``softnce.evaluate`` and ``softnce.inference``.
    """
    dataset = get_dataset(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    return dataset, models.get_model(config.model, dataset.num_classes)


def make_eval_fns(mesh: Mesh, model, dataset: Dataset) -> tuple[EvalStepFn, LogitsStepFn]:
    """``(eval_fn, logits_fn)`` of ``model`` on ``dataset``'s eval inputs (its ``device_eval_transform`` applied)."""
    eval_kwargs = dict(apply_fn=model.apply, input_transform=dataset.device_eval_transform)
    return steps.make_sharded_eval_step(mesh, **eval_kwargs), steps.make_sharded_logits_step(mesh, **eval_kwargs)


def run_keys(seed_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(init_rng, train_rng)`` of a run from ``PRNGKey(config.seed)``: parameter initialisation, then
    the key that :func:`train_step` folds with the step (and the device)."""
    init_rng, train_rng = jax.random.split(seed_key)
    return init_rng, train_rng


def initial_variables(config: ml_collections.ConfigDict, model, example_shape, rng, *,
                      use_init: bool = True) -> Variables:
    """Fresh variables (``params`` and the model's state), replaced by ``config.init.checkpoint`` (its params and
    model state) or, for the params, by ``config.init.pretrained`` if given.

    ``use_init=False`` skips both (a resumed run restores its own checkpoint instead).
    """
    variables = dict(model.init(rng, jnp.zeros((1, *example_shape), jnp.float32), train=False))
    init = config.get("init", ml_collections.ConfigDict()) if use_init else ml_collections.ConfigDict()
    if init.get("checkpoint"):
        return checkpointing.restore_variables(init.checkpoint, variables)
    if init.get("pretrained"):
        from softnce.models import mae_checkpoint

        pretrained = mae_checkpoint.load_pretrained_params(init.pretrained)
        return {**variables, "params": mae_checkpoint.merge_pretrained(variables["params"], pretrained)}
    return variables


def create_train_state(config, model, example_shape, rng, mesh: Mesh, global_batch: int, *, use_init: bool = True):
    """The replicated initial ``TrainState`` and the learning-rate schedule."""
    variables = initial_variables(config, model, example_shape, rng, use_init=use_init)
    params = variables.pop("params")
    tx, schedule = optim.make_optimizer(
        config.optim, params, global_batch=global_batch, total_steps=config.num_train_steps,
        layers=optim.layer_structure(model),  # the model's layers for layer-wise lr decay, if it declares them
    )
    make = jax.jit(
        lambda p, model_state: TrainState.create(apply_fn=model.apply, params=p, tx=tx, model_state=model_state),
        out_shardings=distributed.replicated(mesh),
    )
    return make(params, variables), schedule


def train_step_kwargs(config: ml_collections.ConfigDict, num_classes: int, *, input_transform=None,
                      teacher: Optional[distill.Teacher] = None) -> dict:
    """The keyword arguments of :func:`softnce.steps.train_step` for ``config``: the loss with its fields
    bound (:meth:`softnce.losses.LossSpec.bind`), the soft-target recipe, the temperature, the dataset's
    device transform and the teacher."""
    return dict(loss_fn=losses.get_loss(config.loss.name).bind(config.loss), num_classes=num_classes,
                mix_config=targets.MixConfig.from_config(config.augment), temperature=config.loss.temperature,
                input_transform=input_transform, teacher=teacher)


def make_train_step(config: ml_collections.ConfigDict, dataset: Dataset, mesh: Mesh,
                    teacher: Optional[distill.LoadedTeacher] = None) -> TrainStepFn:
    """The sharded, jitted train step of ``config`` on ``dataset`` over ``mesh`` (with ``teacher``'s frozen
    variables replicated once)."""
    kwargs = train_step_kwargs(config, dataset.num_classes, input_transform=dataset.device_train_transform,
                               teacher=None if teacher is None else teacher.teacher)
    if teacher is not None:
        kwargs["teacher_variables"] = teacher.variables
    return steps.make_sharded_train_step(mesh, **kwargs)


def abstract_variables(model, example_shape: Sequence[int], sharding) -> dict:
    """The shapes and dtypes of ``model``'s variables (``params`` and its state; no computation), each with
    ``sharding``."""
    shapes = dict(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *example_shape), jnp.float32), train=False)
    ))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def checkpoint_info(workdir, ckpt_dir, step: int, *, dataset=None) -> tuple[dict, Any]:
    """``(metadata, dataset or None)`` of checkpoint ``step``: saved, or rebuilt for an older checkpoint.

    Rebuilding needs the run's ``config.json`` and dataset (built here unless ``dataset`` is given).
    """
    metadata = checkpoint_metadata.read(ckpt_dir, step)
    if metadata is not None:
        return metadata, dataset
    if workdir is None:
        raise checkpoint_metadata.MetadataError(
            f"checkpoint {step} in {ckpt_dir} has no softnce metadata (saved by an older softnce) and there is "
            "no config.json beside it; load it from its run's workdir."
        )
    config = checkpoint_metadata.read_run_config(workdir)
    if dataset is None:
        dataset, _ = make_dataset_and_model(config)
    metadata = checkpoint_metadata.legacy(workdir, config, dataset, log_noise_probs(config, dataset), step)
    return metadata, dataset


def _input_description(shape, dtype, transform) -> str:
    text = f"inputs {list(shape)} {dtype}"
    if transform is not None:
        text += f" with the eval transform {transform}"
    return text


def _abstract_variables(model, example_shape, what: str) -> Variables:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        return abstract_variables(model, example_shape, device)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{what}: the teacher model does not take inputs of shape {tuple(example_shape)}: "
                          f"{' '.join(str(error).split())}") from None


def _from_workdir(config: ml_collections.ConfigDict, dataset) -> tuple[Any, Variables, str]:
    """The teacher model and variables of a softnce run, checked against ``dataset``."""
    section = config.distill
    what = f"config.distill.teacher_workdir={section.teacher_workdir!r}"
    try:
        workdir, ckpt_dir, step = checkpoint_metadata.locate(section.teacher_workdir, section.get("teacher_step"))
        metadata, _ = checkpoint_info(workdir, ckpt_dir, step)
    except (FileNotFoundError, checkpoint_metadata.MetadataError) as error:
        raise ConfigError(f"{what}: {error}") from None
    if int(metadata["num_classes"]) != dataset.num_classes:
        raise ConfigError(
            f"{what}: the teacher has {metadata['num_classes']} classes, the student's dataset "
            f"{config.data.name!r} has {dataset.num_classes}; distil from a teacher of the same classes."
        )
    teacher_input = (list(metadata["input"]["shape"]), metadata["input"]["dtype"], metadata["input"]["transform"])
    student_input = (
        [int(d) for d in dataset.example_shape],
        str(np.dtype(getattr(dataset, "input_dtype", "float32"))),
        checkpoint_metadata.transform_spec(dataset.device_eval_transform),
    )
    if teacher_input != student_input:
        raise ConfigError(
            f"{what}: the teacher was trained on {_input_description(*teacher_input)}, the student's "
            f"dataset gives {_input_description(*student_input)}; the teacher sees the student's inputs, so "
            "both must come from the same input pipeline."
        )
    run_config = checkpoint_metadata.to_config(metadata["config"])
    model = models.get_model(distill.teacher_model_config(run_config.model, config), dataset.num_classes)
    abstract = _abstract_variables(model, dataset.example_shape, what)
    variables = checkpointing.restore_variables_only(ckpt_dir, step, abstract)
    description = f"the run {workdir or ckpt_dir}, step {step} ({run_config.model.name}, {run_config.loss.name})"
    return model, variables, description


def _from_params_file(config: ml_collections.ConfigDict, dataset) -> tuple[Any, Variables, str]:
    """A registered model with a parameters file, checked against ``dataset``."""
    section = config.distill
    what = f"config.distill.teacher_params={section.teacher_params!r}"
    model = models.get_model(distill.teacher_model_config(section.teacher_model, config), dataset.num_classes)
    abstract = _abstract_variables(model, dataset.example_shape, what)
    state = sorted(k for k in abstract if k != "params")
    if state:
        raise ConfigError(f"{what}: the teacher model {section.teacher_model.name!r} keeps state ({', '.join(state)}) "
                          "that a parameters file does not hold; give its run as config.distill.teacher_workdir.")
    params = distill.load_params(section.teacher_params, abstract["params"])
    return model, {"params": params}, f"{section.teacher_model.name} with the parameters {section.teacher_params}"


def load_teacher(config: ml_collections.ConfigDict, dataset) -> Optional[distill.LoadedTeacher]:
    """The teacher of ``config.distill`` for ``dataset`` (``None`` when no teacher is named).

    Raises :class:`ConfigError` for a teacher with another number of classes or other inputs than
    ``dataset``, or parameters that do not fit its model. The parameters come back as host arrays.
    """
    if not distill.enabled(config):
        return None
    distill.check_config(config)
    if config.distill.get("teacher_workdir"):
        model, variables, description = _from_workdir(config, dataset)
    else:
        model, variables, description = _from_params_file(config, dataset)
    teacher = distill.Teacher(model=model, tau=float(config.distill.tau), beta=float(config.distill.beta),
                              description=description)
    return distill.LoadedTeacher(teacher, jax.device_get(variables))
