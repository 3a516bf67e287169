"""The trainer: one optax train step, data-parallel over a one-axis device mesh, and the loop around it.

``train_and_evaluate(config, workdir)`` is the library entry point (``softnce.main`` is its CLI). It
is :func:`set_up` (config checks, mesh, data, state, restore) followed by :func:`train_loop`.

The per-device step runs under ``jax.shard_map`` over the mesh axis ``'data'``: every device makes
its own soft targets (label smoothing, MixUp/CutMix) with its own randomness, computes the loss of
its ``N`` examples against the targets of the global batch (``axis_name='data'``), and the loss is
averaged over devices (``pmean``) inside the differentiated function, so the gradient (of the
device-invariant params, summed over devices by the transpose of ``shard_map``) and the update are
those of the global-batch mean loss.

Targets: the labels smoothed and mixed (:mod:`softnce.targets`), or the soft targets given with the
data (``batch['targets']``), smoothed and mixed the same way; with ``config.distill`` a frozen
teacher's distribution on the student's (mixed) inputs is mixed in (:mod:`softnce.distill`).

Start-up order: resume from the newest intact checkpoint in ``workdir/checkpoints`` (a damaged newer
one is reported and moved aside; the training batches' iterator restarts at its saved position),
else the params of ``config.init.checkpoint`` (an earlier run), else ``config.init.pretrained``
(converted MAE weights without the head), else from scratch.

Dispatch: at most ``config.max_steps_in_flight`` train steps are dispatched ahead of the host (1 on
CPU, 2 on accelerators by default), and nothing else with collectives is dispatched while a step is
in flight. With jax 0.10's XLA:CPU, steps of a program with collectives left to queue up behind each
other on simulated CPU devices stall in a collective rendezvous (``Termination timeout for all
gather``, exit 134) in most 8-device runs; one step in flight on CPU avoids it at no cost there.

Post-hoc calibration: at the end, one temperature ``t*`` is fitted on the validation split's NLL
(:func:`softnce.evaluation.fit_temperature`; the test split is never used to fit anything), and the
test metrics are reported at ``t*`` too: ``temperature``, ``nll_calibrated``, ``ece_calibrated``.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import collections
import dataclasses
import functools
import json
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softnce import (
    checkpoint_metadata,
    checkpointing,
    config_checks,
    distill,
    distributed,
    evaluation,
    failures,
    losses,
    models,
    optim,
    preemption,
    targets,
)
from softnce.data import DATASETS, get_dataset
from softnce.data.base import Batch, Dataset, DeviceEvalTransform, DeviceTrainTransform
from softnce.metric_writer import MetricWriter
from softnce.watchdog import StepWatchdog

AXIS = distributed.DATA_AXIS
INPUT_KEY_STREAM = 0x1A6  # folded into the step key for the per-example input-augmentation keys

Params = Any  # the model's parameter pytree
Variables = dict  # what a Flax model's apply takes: {'params': params, **model_state}


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` with the model's state: its collections besides ``params`` that training
    updates (BatchNorm's ``batch_stats``), ``{}`` for a model without any."""

    model_state: dict = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> Variables:
        """``{'params': params, **model_state}``: what ``apply_fn`` takes."""
        return {"params": self.params, **self.model_state}


TrainStepFn = Callable[[TrainState, dict, jax.Array, Optional[jax.Array]], tuple[TrainState, dict]]
"""``(state, global batch, rng, log_noise_probs) -> (new state, metrics)``, :func:`make_sharded_train_step`."""
EvalStepFn = Callable[[Variables, dict, jax.Array], dict]
"""``(variables, global batch, temperature) -> metric sums``, :func:`make_sharded_eval_step`."""
LogitsStepFn = Callable[[Variables, dict], tuple[jax.Array, jax.Array, jax.Array]]
"""``(variables, global batch) -> (logits, label, mask)``, :func:`make_sharded_logits_step`."""


# --------------------------------------------------------------------------------------------------
# The per-device steps and their sharded, jitted forms.
# --------------------------------------------------------------------------------------------------


def make_targets(rng, batch: dict, *, num_classes: int, mix_config: targets.MixConfig,
                 teacher: Optional[distill.Teacher] = None, teacher_variables: Optional[Variables] = None):
    """Inputs and soft targets of one device's batch.

    The recipe's targets are the smoothed and mixed one-hot labels, or the smoothed and mixed
    ``targets`` given with the batch (used as they are when there is neither smoothing nor mixing).
    With a ``teacher`` (:mod:`softnce.distill`) they become ``(1 - beta) a_recipe + beta
    softmax(z_teacher / tau)``, the teacher run on the returned (mixed) inputs.
    """
    given = batch.get("targets")
    if given is not None and not mix_config.mixing and mix_config.label_smoothing == 0:
        inputs, made = batch["inputs"], targets.Targets(given, batch["label"], None)
    else:
        inputs, made = targets.mix_batch(rng, batch["inputs"], batch["label"], num_classes=num_classes,
                                         config=mix_config, soft_targets=given)
    if teacher is not None:
        made = targets.Targets(teacher.targets(teacher_variables, inputs, made.dense), made.labels, None)
    return inputs, made


def example_keys(rng: jax.Array, num_examples: int, axis_name: Optional[str]) -> jax.Array:
    """One key per example of this device, ``fold_in(rng, global index)`` ``[N]``.

    The global index is ``device * N + i``, so an example gets the same key on 1 or 8 devices.
    """
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * num_examples
    return jax.vmap(functools.partial(jax.random.fold_in, rng))(offset + jnp.arange(num_examples))


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    log_noise_probs: Optional[jax.Array],
    teacher_variables: Optional[Variables] = None,
    *,
    loss_fn: losses.LossFn,
    num_classes: int,
    mix_config: targets.MixConfig,
    temperature: float,
    axis_name: Optional[str],
    input_transform: Optional[DeviceTrainTransform] = None,
    teacher: Optional[distill.Teacher] = None,
) -> tuple[TrainState, dict]:
    """One optimiser step on one device's share of the batch (pure; per-device code).

    Args:
      state: replicated train state.
      batch: ``inputs [N, ...]``, ``label [N]`` (and optionally ``targets [N, C]``).
      rng: the run's key (folded here with the step and the device index).
      log_noise_probs: ``log(eta)`` ``[C]`` or ``None``.
      input_transform: the dataset's ``device_train_transform(keys [N], inputs) -> inputs``
        (per-example keys, see :func:`example_keys`), applied before the targets are made; ``None``
        leaves inputs as they are.
      teacher, teacher_variables: a frozen :class:`softnce.distill.Teacher` and its (replicated)
        variables, whose distribution enters the targets (:func:`make_targets`); ``None``: no teacher.

    Model state (``state.model_state``, e.g. BatchNorm's ``batch_stats``): the forward pass in training
    mode updates it from this device's ``N`` examples (BatchNorm normalises with the statistics of the
    device's own batch), and the updated state is averaged over the devices (``pmean``), so every device
    holds the same running statistics: the mean of the per-device updates.

    Returns:
      The new state and ``{'loss', 'grad_norm'}`` averaged over the global batch.
    """
    rng = jax.random.fold_in(rng, state.step)
    if input_transform is not None:
        keys = example_keys(jax.random.fold_in(rng, INPUT_KEY_STREAM), batch["inputs"].shape[0], axis_name)
        batch = dict(batch, inputs=input_transform(keys, batch["inputs"]))
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    mix_rng, dropout_rng, loss_rng = jax.random.split(rng, 3)
    inputs, batch_targets = make_targets(mix_rng, batch, num_classes=num_classes, mix_config=mix_config,
                                         teacher=teacher, teacher_variables=teacher_variables)
    loss_inputs = losses.LossInputs(
        targets=batch_targets.dense,
        labels=batch_targets.labels,
        rng=loss_rng,
        log_noise_probs=log_noise_probs,
        temperature=temperature,
        axis_name=axis_name,
        structured_targets=batch_targets.structured,
    )

    def mean_loss(params):
        variables, rngs = {"params": params, **state.model_state}, {"dropout": dropout_rng}
        if state.model_state:
            logits, model_state = state.apply_fn(variables, inputs, train=True, rngs=rngs,
                                                 mutable=list(state.model_state))
        else:
            logits, model_state = state.apply_fn(variables, inputs, train=True, rngs=rngs), {}
        loss = jnp.mean(loss_fn(logits, loss_inputs))
        # The global-batch mean. Under shard_map (check_vma on) the params are device-invariant, so
        # their gradient is already summed over devices; a pmean of the gradients afterwards would
        # leave that sum, num_devices times the gradient of the mean (tests/test_vit_gelu.py).
        return (loss if axis_name is None else jax.lax.pmean(loss, axis_name)), model_state

    (loss, model_state), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    if axis_name is not None and model_state:
        model_state = jax.lax.pmean(model_state, axis_name)  # the mean of the per-device updates
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads=grads).replace(model_state=model_state), metrics


def make_sharded_train_step(mesh: Mesh, *, teacher_variables: Optional[Variables] = None,
                            **step_kwargs) -> TrainStepFn:
    """``jit(shard_map(train_step))``: state, rng and prior replicated, batch split on ``'data'``.

    With ``teacher=`` (in ``step_kwargs``) the teacher's ``teacher_variables`` are replicated over the
    mesh once and passed to every step as an argument (not donated, not part of the state).
    """
    step = functools.partial(train_step, axis_name=AXIS, **step_kwargs)
    if step_kwargs.get("teacher") is None:
        sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P(), P()), out_specs=(P(), P()))
        return jax.jit(sharded, donate_argnums=(0,))
    if teacher_variables is None:
        raise ValueError("make_sharded_train_step: a teacher needs its teacher_variables.")
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P(), P(), P()), out_specs=(P(), P()))
    jitted = jax.jit(sharded, donate_argnums=(0,))
    replicated = jax.jit(lambda p: p, out_shardings=distributed.replicated(mesh))(jax.device_get(teacher_variables))

    def step_with_teacher(state, batch, rng, log_noise_probs):
        return jitted(state, batch, rng, log_noise_probs, replicated)

    return step_with_teacher


def _eval_logits(variables: Variables, batch: dict, *, apply_fn, input_transform: Optional[DeviceEvalTransform]):
    inputs = batch["inputs"] if input_transform is None else input_transform(batch["inputs"])
    return apply_fn(variables, inputs, train=False)


def eval_step(variables: Variables, batch: dict, temperature, *, apply_fn, axis_name: Optional[str],
              input_transform: Optional[DeviceEvalTransform] = None) -> dict:
    """Per-device evaluation sums at ``temperature`` (:func:`softnce.evaluation.metric_sums`), summed over devices."""
    logits = _eval_logits(variables, batch, apply_fn=apply_fn, input_transform=input_transform)
    sums = evaluation.metric_sums(logits, batch["label"], batch["mask"], temperature=temperature)
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def make_sharded_eval_step(mesh: Mesh, **step_kwargs) -> EvalStepFn:
    """``(variables, batch, temperature) -> sums``; the temperature is an argument (no recompilation)."""
    step = functools.partial(eval_step, axis_name=AXIS, **step_kwargs)
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P()))


def make_sharded_logits_step(mesh: Mesh, **step_kwargs) -> LogitsStepFn:
    """``(variables, batch) -> (logits [B, C], label [B], mask [B])``, global arrays split on ``'data'``."""
    step = functools.partial(_eval_logits, **step_kwargs)
    per_device = lambda variables, batch: (step(variables, batch), batch["label"], batch["mask"])  # noqa: E731
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))


def evaluate(eval_fn: EvalStepFn, variables: Variables, batches: Iterator[dict], mesh: Mesh,
             temperature: float) -> tuple[dict, dict]:
    """One pass over ``batches`` at ``temperature``; returns ``(summary, sums)`` (padding excluded)."""
    sums = None
    t = jnp.float32(temperature)
    for batch in batches:
        sums = evaluation.add_sums(sums, jax.device_get(eval_fn(variables, distributed.global_batch(mesh, batch), t)))
    return evaluation.summarize(sums), sums


def collect_logits(
    logits_fn: LogitsStepFn, variables: Variables, batches: Iterator[dict], mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[n, C]`` and labels ``[n]`` of one pass over ``batches`` on every process (padding dropped)."""
    from jax.experimental import multihost_utils

    parts = []
    for batch in batches:
        out = logits_fn(variables, distributed.global_batch(mesh, batch))
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        logits, labels, mask = (np.asarray(x) for x in jax.device_get(out))
        parts.append((logits[mask], labels[mask]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --------------------------------------------------------------------------------------------------
# Set-up: config checks, the state, the prior, restore.
# --------------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every name and every number in ``config`` before any work starts.

    Unknown names list the valid choices; numbers outside their range name the field, the value
    and the range (:mod:`softnce.config_checks`).
    """
    components = config_components(config)
    if config.loss.noise_prior not in NOISE_PRIORS:
        raise config_checks.ConfigError(
            f"config.loss.noise_prior must be one of {', '.join(map(repr, NOISE_PRIORS))} ('explicit' with "
            f"config.loss.noise_probs), got {config.loss.noise_prior!r}."
        )
    config_checks.check_config(config, components=components)
    try:
        targets.MixConfig.from_config(config.augment)
    except ValueError as error:
        raise config_checks.ConfigError(f"config.augment: {error}") from None
    noise_probs = config.loss.get("noise_probs")
    if (config.loss.noise_prior == "explicit") != (noise_probs is not None):
        raise config_checks.ConfigError(
            "config.loss.noise_prior='explicit' and config.loss.noise_probs (the prior eta, one probability per "
            f"class) go together; got noise_prior={config.loss.noise_prior!r}, noise_probs={noise_probs!r}."
        )
    distill.check_config(config, files=False)  # the teacher's files: when training starts (set_up)


def config_components(config: ml_collections.ConfigDict) -> list[config_checks.Component]:
    """The registered components that ``config`` names, with the fields they take
    (:class:`softnce.config_checks.Component`): the loss, the dataset, the model and a registered teacher
    model. An unknown name raises :class:`~softnce.config_checks.ConfigError` listing the valid ones."""
    sections = [("loss", losses.LOSSES, losses.SHARED_FIELDS), ("data", DATASETS, ("name",)),
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


NOISE_PRIORS = ("class_prior", "uniform", "target_mean", "explicit")
"""The choices of ``config.loss.noise_prior`` (:func:`noise_prior`)."""


def explicit_log_prior(noise_probs, num_classes: int, *, atol: float = 1e-3) -> jax.Array:
    """``log(noise_probs)`` float32 ``[C]`` for ``noise_prior='explicit'``; checks length, sign and sum."""
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


def noise_prior(config: ml_collections.ConfigDict, dataset: Dataset) -> Optional[jax.Array]:
    """``log(eta)`` of the InfoNCE-type losses, computed once; ``None`` for uniform / unused.

    ``config.loss.noise_prior``: ``'class_prior'`` the training-label frequencies, ``'target_mean'``
    the mean of the soft targets given with the training split (their per-class sums, with the same
    ``prior_smoothing``: :func:`softnce.losses.log_prior_from_mass`), ``'explicit'``
    ``config.loss.noise_probs``. A class without mass is a :class:`~softnce.config_checks.ConfigError`
    unless ``config.loss.prior_smoothing > 0``.
    """
    kind = config.loss.noise_prior
    if not losses.get_loss(config.loss.name).uses_noise_prior or kind == "uniform":
        return None
    smoothing = config.loss.get("prior_smoothing", 0.0)
    if kind == "explicit":
        return explicit_log_prior(config.loss.noise_probs, dataset.num_classes)
    if kind == "target_mean":
        sums = dataset.train_target_sums()
        if sums is None:
            raise config_checks.ConfigError(
                f"config.loss.noise_prior='target_mean' is the mean of the soft targets given with the data, but "
                f"the dataset {config.data.name!r} gives none; use 'class_prior', 'uniform' or 'explicit'."
            )
        mass, what = sums, "soft-target mass in the training split"
    else:
        mass, what = dataset.train_label_counts(), "training examples"
    try:
        return losses.log_prior_from_mass(mass, smoothing=smoothing, what=what)
    except ValueError as error:
        raise config_checks.ConfigError(
            f"noise prior: {error} Set config.loss.prior_smoothing > 0 or another config.loss.noise_prior."
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
    return make_sharded_eval_step(mesh, **eval_kwargs), make_sharded_logits_step(mesh, **eval_kwargs)


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


def max_steps_in_flight(config: ml_collections.ConfigDict) -> int:
    """``config.max_steps_in_flight``, or 1 on CPU and 2 on accelerators (see the module docstring)."""
    configured = config.get("max_steps_in_flight")
    if configured is not None:
        return int(configured)
    return 1 if jax.default_backend() == "cpu" else 2


@dataclasses.dataclass
class Run:
    """Everything :func:`train_loop` needs, made by :func:`set_up`."""

    config: ml_collections.ConfigDict
    workdir: epath.Path  # local or gs://
    mesh: Mesh
    dataset: Dataset
    batches: Iterator[Batch]  # the training batches from the state's step on (checkpointed with it)
    state: TrainState
    schedule: optax.Schedule
    train_rng: jax.Array
    log_noise_probs: Optional[jax.Array]
    step_fn: TrainStepFn
    eval_fn: EvalStepFn
    logits_fn: LogitsStepFn
    manager: ocp.CheckpointManager
    ckpt_dir: str
    last_saved: Optional[int]
    writer: MetricWriter
    local_batch: int
    local_eval_batch: int
    is_chief: bool

    @property
    def start_step(self) -> int:
        return int(self.state.step)


def _print_chief(is_chief: bool, text: str) -> None:
    if is_chief:
        print(text, flush=True)


def set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks the config, builds the mesh, data, model and state, and restores the newest intact checkpoint."""
    from jax.experimental import multihost_utils

    validate_config(config)
    mesh = distributed.make_mesh()
    is_chief = jax.process_index() == 0
    local_batch = distributed.check_batch_size(config.data.batch_size, mesh)
    local_eval_batch = distributed.check_batch_size(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")
    dataset, model = make_dataset_and_model(config)
    log_noise_probs = noise_prior(config, dataset)
    mix_config = targets.MixConfig.from_config(config.augment)
    loss_spec = losses.get_loss(config.loss.name)
    teacher = distill.load_teacher(config, dataset)  # None without config.distill; checked before any write
    if teacher is not None:
        _print_chief(is_chief, distill.describe(teacher, config))

    workdir = checkpointing.resolve(workdir)  # local or gs://; every write below is on process 0 only
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))

    init_rng, train_rng = run_keys(jax.random.PRNGKey(config.seed))
    ckpt_dir = str(workdir / "checkpoints")
    manager = checkpointing.make_manager(ckpt_dir, max_to_keep=config.get("max_checkpoints", 3))
    resuming = manager.latest_step() is not None  # then neither init.checkpoint nor init.pretrained is read
    state, schedule = create_train_state(
        config, model, dataset.example_shape, init_rng, mesh, config.data.batch_size, use_init=not resuming
    )
    last_saved = None
    batches = dataset.train_batches(local_batch, seed=config.seed)
    if resuming:
        sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else (lambda name: None)
        state, last_saved, iterator_restored = checkpointing.restore_newest_intact(
            manager, state, log=functools.partial(_print_chief, is_chief), is_chief=is_chief, sync=sync,
            data_iterator=batches,
        )
        if not iterator_restored:  # no iterator state for this process: restart the stream at the step
            batches = dataset.train_batches(local_batch, seed=config.seed, start_step=last_saved)
        _print_chief(is_chief, f"resumed from the checkpoint of step {last_saved} in {ckpt_dir}")

    teacher_kwargs = {} if teacher is None else dict(teacher=teacher.teacher, teacher_variables=teacher.variables)
    step_fn = make_sharded_train_step(
        mesh, loss_fn=loss_spec.bind(config.loss), num_classes=dataset.num_classes, mix_config=mix_config,
        temperature=config.loss.temperature, input_transform=dataset.device_train_transform, **teacher_kwargs,
    )
    eval_fn, logits_fn = make_eval_fns(mesh, model, dataset)
    # Last, so that a start-up that fails leaves no writer (and no writer thread) behind.
    writer = MetricWriter(str(workdir) if is_chief else None)
    return Run(
        config=config, workdir=workdir, mesh=mesh, dataset=dataset, batches=batches, state=state, schedule=schedule,
        train_rng=train_rng, log_noise_probs=log_noise_probs, step_fn=step_fn,
        eval_fn=eval_fn, logits_fn=logits_fn,
        manager=manager, ckpt_dir=ckpt_dir, last_saved=last_saved, writer=writer, local_batch=local_batch,
        local_eval_batch=local_eval_batch, is_chief=is_chief,
    )


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------


class Progress:
    """Prints ``step i/T | metrics | steps/s | ETA`` lines on process 0."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.time()

    def line(self, step: int, metrics: dict) -> str:
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = (step - self.start) / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        return f"step {step}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {eta_text}"


class StepsInFlight:
    """Bounds how many dispatched train steps may be unfinished at once (the one place dispatch is throttled).

    :meth:`dispatched` records a step's output and then blocks on the oldest pending steps until
    fewer than ``limit`` remain, reporting each to the watchdog: at most ``limit`` steps are ever in
    flight, and ``limit = 1`` runs each step to completion before the host prepares the next.
    :meth:`drain` blocks on all of them (before evaluation, checkpointing or any other program
    with collectives).
    """

    def __init__(self, limit: int, watchdog: StepWatchdog):
        self.limit, self.watchdog = limit, watchdog
        self.pending: collections.deque = collections.deque()

    def dispatched(self, step: int, output: Any) -> None:
        self.pending.append((step, output))
        while len(self.pending) >= self.limit:
            self._finish_oldest()

    def drain(self) -> None:
        while self.pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        step, output = self.pending.popleft()
        jax.block_until_ready(output)
        self.watchdog.step_finished(step)


def _check_finite(history: list[tuple[int, dict]], last_saved: Optional[int], ckpt_dir: str) -> list[dict]:
    """Fetches pending step metrics; raises ``FloatingPointError`` at the first non-finite one."""
    fetched = [(step, jax.device_get(m)) for step, m in history]
    for step, metrics in fetched:
        for name in sorted(metrics, key=lambda k: k != "loss"):  # report the loss first
            value = metrics[name]
            if not np.all(np.isfinite(value)):
                kept = "no checkpoint was written yet"
                if last_saved:
                    kept = f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}"
                raise FloatingPointError(
                    f"non-finite {name} ({float(value)}) at step {step}; training stopped and {kept}. "
                    "Lower the learning rate or enable config.optim.grad_clip_norm."
                )
    return [m for _, m in fetched]


def _log_train_metrics(run: Run, history, *, step: int, progress: Progress) -> None:
    """Checks the pending step metrics for non-finite values, then logs their mean.

    On a non-finite value the last good (possibly still asynchronous) save is finished before the
    ``FloatingPointError`` propagates, so it stays the latest checkpoint.
    """
    try:
        fetched = _check_finite(history, run.last_saved, run.ckpt_dir)
    except FloatingPointError:
        run.manager.wait_until_finished()
        raise
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    mean["learning_rate"] = float(run.schedule(step - 1))
    run.writer.write_scalars(step, {f"train/{k}": v for k, v in mean.items()})
    _print_chief(run.is_chief, progress.line(step, mean))


def _evaluate_test(run: Run) -> tuple[dict, dict]:
    """Test metrics at the training temperature ``config.loss.temperature``."""
    batches = run.dataset.eval_batches(run.local_eval_batch)
    return evaluate(run.eval_fn, run.state.variables, batches, run.mesh, run.config.loss.temperature)


def fit_validation_temperature(logits_fn: LogitsStepFn, variables: Variables, dataset: Dataset,
                               local_eval_batch: int, mesh: Mesh) -> float:
    """``t*``: the temperature minimising the NLL of the model's ``variables`` on ``dataset``'s validation split."""
    batches = dataset.validation_batches(local_eval_batch)
    val_logits, val_labels = collect_logits(logits_fn, variables, batches, mesh)
    return evaluation.fit_temperature(val_logits, val_labels)


def calibrate(run: Run) -> Optional[tuple[dict, dict]]:
    """Fits ``t*`` on the validation NLL and evaluates the test split at ``t*``.

    Returns ``({'temperature', 'nll_calibrated', 'ece_calibrated'}, sums at t*)``, or ``None`` when
    the dataset has no validation split (``config.data.validation_fraction = 0``).
    """
    if not run.dataset.num_validation_examples:
        return None
    t_star = fit_validation_temperature(run.logits_fn, run.state.variables, run.dataset, run.local_eval_batch, run.mesh)
    summary, sums = evaluate(
        run.eval_fn, run.state.variables, run.dataset.eval_batches(run.local_eval_batch), run.mesh, t_star
    )
    return {"temperature": t_star, "nll_calibrated": summary["nll"], "ece_calibrated": summary["ece"]}, sums


def _write_results(run: Run, summary: dict, sums: dict, calibrated_sums: Optional[dict]) -> None:
    """``metrics.json``, ``eval_sums.json`` (and ``eval_sums_calibrated.json`` at ``t*``) and ``reliability.png``
    in the workdir (process 0 only)."""
    if run.is_chief:
        write_results(run.workdir, run.config, summary, sums, calibrated_sums)


def write_results(directory: epath.Path, config: ml_collections.ConfigDict, summary: dict, sums: dict,
                  calibrated_sums: Optional[dict], *, title: Optional[str] = None) -> None:
    """Writes ``metrics.json`` (``summary``), ``eval_sums.json``, ``eval_sums_calibrated.json`` (at
    ``summary['temperature']``, if given) and ``reliability.png`` to ``directory`` (call on process 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "metrics.json", summary)
    _write_json(directory / "eval_sums.json", {k: np.asarray(v).tolist() for k, v in sums.items()})
    panels = {f"{config.loss.name} (t = {config.loss.temperature:g})": sums}
    if calibrated_sums is not None:
        _write_json(directory / "eval_sums_calibrated.json",
                    {k: np.asarray(v).tolist() for k, v in calibrated_sums.items()})
        panels[f"calibrated (t* = {summary['temperature']:.3g})"] = calibrated_sums
    evaluation.plot_reliability_diagram(panels, str(directory / "reliability.png"), title=title or config.data.name)


def _write_json(path, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` (an ``epath.Path``: local or ``gs://``)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _print_eval(run: Run, step: int, summary: dict, *, prefix: str = "eval", label: str = "eval") -> None:
    """Writes ``summary`` as ``<prefix>/<metric>`` scalars and prints ``<label> at step <step>: ...`` (process 0)."""
    run.writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in summary.items()})
    _print_chief(run.is_chief, f"{label} at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))


def tracks_validation(config: ml_collections.ConfigDict) -> bool:
    """Whether a run records validation metrics: ``config.validation_every_steps`` set, or
    ``config.evaluate_test`` False (a selection run, which never reads the test split)."""
    return bool(config.get("validation_every_steps")) or not config.get("evaluate_test", True)


def _evaluate_validation(run: Run, step: int, curve: list[dict]) -> dict:
    """Validation metrics at ``config.loss.temperature``: logged as ``val/*``, appended to ``curve`` and
    written to ``history.json`` (the learning curve; process 0)."""
    batches = run.dataset.validation_batches(run.local_eval_batch)
    summary, _ = evaluate(run.eval_fn, run.state.variables, batches, run.mesh, run.config.loss.temperature)
    _print_eval(run, step, summary, prefix="val", label="validation")
    curve.append(dict(summary, step=step))
    if run.is_chief:
        _write_json(run.workdir / "history.json", curve)
    return summary


def _load_curve(run: Run) -> list[dict]:
    """The points of ``history.json`` up to the step a resumed run restarts from (empty for a fresh run)."""
    path = run.workdir / "history.json"
    if not run.start_step or not path.exists():
        return []
    return [point for point in json.loads(path.read_text()) if point["step"] <= run.start_step]


def _final_validation(run: Run, curve: list[dict], calibrated: Optional[tuple[dict, dict]]) -> dict:
    """The final validation metrics and ``t*`` (fitted on them), written to ``validation_metrics.json``."""
    step = int(run.state.step)
    last = curve[-1] if curve and curve[-1]["step"] == step else None
    summary = dict(last) if last is not None else dict(_evaluate_validation(run, step, curve), step=step)
    if calibrated is not None:
        t_star = calibrated[0]["temperature"]
    else:
        t_star = fit_validation_temperature(run.logits_fn, run.state.variables, run.dataset, run.local_eval_batch,
                                            run.mesh)
    summary.update(temperature=t_star, split="validation")
    if run.is_chief:
        _write_json(run.workdir / "validation_metrics.json", summary)
    return summary


def train_loop(run: Run, *, stop_at_step: Optional[int] = None) -> dict:
    """Trains from ``run.state`` to ``config.num_train_steps``; evaluates, calibrates and writes the results.

    With ``config.validation_every_steps`` the validation split is evaluated every that many steps
    and at the end (``history.json``); with ``config.evaluate_test = False`` the test split is never
    read (no ``metrics.json``). Either way ``validation_metrics.json`` holds the final validation
    metrics and ``t*``, also returned as ``'validation'``.

    Returns the final metrics (``{'preempted_at_step': s}`` if stopped early).
    """
    config, total = run.config, run.config.num_train_steps
    evaluate_test, validation_every = config.get("evaluate_test", True), config.get("validation_every_steps")
    if tracks_validation(config) and not run.dataset.num_validation_examples:
        raise config_checks.ConfigError(
            "config.validation_every_steps and config.evaluate_test = False need a validation split; set "
            "config.data.validation_fraction > 0."
        )
    curve = _load_curve(run) if tracks_validation(config) else []
    progress = Progress(total, run.start_step)
    history: list[tuple[int, dict]] = []
    summary: dict = {}
    sums: dict = {}
    watchdog = StepWatchdog(config.get("step_timeout_s"), process_index=jax.process_index())
    in_flight = StepsInFlight(max_steps_in_flight(config), watchdog)
    metadata = checkpoint_metadata.build(config, run.dataset, run.log_noise_probs)  # saved with every checkpoint

    with (preemption.Preemption(run.start_step) as stop_request, watchdog,
          failures.end_job_on_failed_save(run.ckpt_dir)):
        for step in range(run.start_step + 1, total + 1):
            batch = distributed.global_batch(run.mesh, next(run.batches))
            run.state, metrics = run.step_fn(run.state, batch, run.train_rng, run.log_noise_probs)
            in_flight.dispatched(step, metrics)
            history.append((step, metrics))
            checkpointing.raise_if_save_failed(run.manager)
            is_last = step == total
            preempted = stop_request.requested(step) or step == stop_at_step
            save_now = is_last or preempted or step % config.checkpoint_every_steps == 0
            evaluate_now = is_last or step % config.eval_every_steps == 0
            validate_now = bool(validation_every) and (is_last or step % validation_every == 0)
            if not (save_now or evaluate_now or validate_now or step % config.log_every_steps == 0):
                continue
            in_flight.drain()
            with watchdog.paused():
                _log_train_metrics(run, history, step=step, progress=progress)
                history = []
                if save_now:
                    checkpointing.save(run.manager, step, run.state, checkpoint_metadata.for_step(metadata, step),
                                       data_iterator=run.batches)
                    run.last_saved = step
                if validate_now:  # before a stop, so that a resumed run's curve has this step
                    _evaluate_validation(run, step, curve)
                if preempted and not is_last:
                    run.manager.wait_until_finished()
                    _print_chief(run.is_chief, f"stopped at step {step} (preempted or stop_at_step); saved to "
                                 f"{run.ckpt_dir}; rerun the same command to resume.")
                    return {"preempted_at_step": step}
                if evaluate_now and evaluate_test:
                    summary, sums = _evaluate_test(run)
                    _print_eval(run, step, summary)
        in_flight.drain()
        with watchdog.paused():
            run.manager.wait_until_finished()
            if evaluate_test and not summary:  # the run had already finished: evaluate the restored state
                summary, sums = _evaluate_test(run)
            calibrated = calibrate(run) if evaluate_test else None
            validation = _final_validation(run, curve, calibrated) if tracks_validation(config) else None
    summary = dict(summary, step=int(run.state.step))
    calibrated_sums = None
    if calibrated is not None:
        calibration, calibrated_sums = calibrated
        summary.update(calibration)
        _print_eval(run, summary["step"], calibration)
    if run.is_chief and run.last_saved == summary["step"]:  # the final checkpoint's metadata, now with t*
        t_star = summary.get("temperature") if evaluate_test else validation["temperature"]
        checkpoint_metadata.write(run.ckpt_dir, summary["step"],
                                  checkpoint_metadata.for_step(metadata, summary["step"], t_star=t_star))
    if evaluate_test:
        _write_results(run, summary, sums, calibrated_sums)
    if validation is not None:
        summary["validation"] = validation
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: Optional[int] = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final eval metrics.

    ``stop_at_step`` ends this invocation early at that step, saving a checkpoint as a preemption
    would (the schedule still follows ``config.num_train_steps``); running again resumes.

    Writes ``config.json``, TensorBoard scalars, ``checkpoints/``, ``metrics.json`` (test metrics at
    the training temperature, plus ``temperature``, ``nll_calibrated`` and ``ece_calibrated`` when
    the data has a validation split), ``eval_sums.json`` (the calibration-bin sums) and
    ``reliability.png`` to ``workdir`` (process 0). Validation tracking (``config.validation_every_steps``,
    ``config.evaluate_test``) adds ``history.json`` and ``validation_metrics.json`` (:func:`train_loop`).

    A run that already finished in ``workdir`` (:func:`completed_results`) is not touched: its
    results are read back and returned. Raises ``FloatingPointError`` on a non-finite loss, keeping
    the last good checkpoint, and a :class:`softnce.failures.RunFailure` with a one-line message for
    a full disk or a lost process; the step watchdog ends a stuck process (see :mod:`softnce.watchdog`).
    """
    results = completed_results(config, workdir)
    if results is not None:
        summary = json.loads(results.read_text())
        _print_chief(jax.process_index() == 0, f"the run in {workdir} is complete (step {summary['step']}); its "
                     f"results are in {results}; nothing was changed.")
        return summary
    run = None
    try:
        run = set_up(config, workdir)
        summary = train_loop(run, stop_at_step=stop_at_step)
        run.writer.close()
        return summary
    except Exception as error:
        if run is not None:
            _close_after_failure(run.writer)
        explained = failures.explain(error, str(checkpointing.resolve(workdir) / "checkpoints"))
        if explained is error:
            raise
        raise explained from error


def _close_after_failure(writer: MetricWriter) -> None:
    """Closes the event file of a run that failed; a second error (a full disk) would hide the first."""
    try:
        writer.close()
    except OSError:
        pass


def completed_results(config: ml_collections.ConfigDict, workdir: str) -> Optional[epath.Path]:
    """The results file of a run of ``config`` that already finished in ``workdir``, else ``None``.

    Finished means: the checkpoint of step ``config.num_train_steps`` exists with its final metadata
    (``softnce_metadata.json``, written after ``t*``), and the last results file the run writes
    (``metrics.json``, or ``validation_metrics.json`` when ``config.evaluate_test`` is False) reports
    that step. Anything less (a run that stopped during its final evaluation, say) is not finished.
    """
    workdir = checkpointing.resolve(workdir)
    results = workdir / ("metrics.json" if config.get("evaluate_test", True) else "validation_metrics.json")
    final_step = checkpointing.step_dir(workdir / "checkpoints", config.num_train_steps)
    final_metadata = final_step / checkpoint_metadata.FILENAME
    if not (results.exists() and final_metadata.exists()):
        return None
    try:
        reported = json.loads(results.read_text()).get("step")
    except ValueError:  # a results file cut short
        return None
    return results if reported == config.num_train_steps else None
