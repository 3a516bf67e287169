"""The per-device train and eval steps and their sharded, jitted forms (pure functions of their arguments).

The per-device step runs under ``jax.shard_map`` over the mesh axis ``'data'``: every device makes
its own soft targets (label smoothing, MixUp/CutMix) with its own randomness, computes the loss of
its ``N`` examples against the targets of the global batch (``axis_name='data'``), and the loss is
averaged over devices (``pmean``) inside the differentiated function, so the gradient (of the
device-invariant params, summed over devices by the transpose of ``shard_map``) and the update are
those of the global-batch mean loss.

Targets: the labels smoothed and mixed (:mod:`softnce.targets`), or the soft targets given with the
data (``batch['targets']``), smoothed and mixed the same way; with a teacher a frozen model's
distribution on the student's (mixed) inputs is mixed in (:mod:`softnce.distill`).

Model state (the collections besides ``params``, e.g. BatchNorm's ``batch_stats``) lives in
:class:`TrainState` ``.model_state``; the evaluation steps take the model's variables
``{'params': params, **model_state}``. :func:`softnce.assembly.make_train_step` builds the train step
of a config.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softnce import distill, distributed, losses, metrics, targets
from softnce.data.base import DeviceEvalTransform, DeviceTrainTransform

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
    """Per-device evaluation sums at ``temperature`` (:func:`softnce.metrics.metric_sums`), summed over devices."""
    logits = _eval_logits(variables, batch, apply_fn=apply_fn, input_transform=input_transform)
    sums = metrics.metric_sums(logits, batch["label"], batch["mask"], temperature=temperature)
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
