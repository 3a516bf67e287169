"""The trainer: one optax train step, data-parallel over a one-axis device mesh, and the loop around it.

``train_and_evaluate(config, workdir)`` is the library entry point (``softnce.main`` is its CLI).
The per-device step runs under ``jax.shard_map`` over the mesh axis ``'data'``: every device makes
its own soft targets (label smoothing, MixUp/CutMix) with its own randomness, computes the loss of
its ``N`` examples against the targets of the global batch (``axis_name='data'``), and the
gradients are averaged over devices (``pmean``), so the update is that of the global-batch mean loss.

Start-up order: resume from ``workdir/checkpoints`` if it holds a checkpoint, else the params of
``config.init.checkpoint`` (an earlier run), else ``config.init.pretrained`` (converted MAE weights
without the head), else from scratch.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softnce import checkpointing, distributed, evaluation, losses, models, optim, targets
from softnce.data import DATASETS, get_dataset
from softnce.data.base import Dataset

TrainState = train_state.TrainState
AXIS = distributed.DATA_AXIS


# --------------------------------------------------------------------------------------------------
# The per-device steps and their sharded, jitted forms.
# --------------------------------------------------------------------------------------------------


def make_targets(rng, batch: dict, *, num_classes: int, mix_config: targets.MixConfig):
    """Inputs and soft targets of one device's batch: given ``targets`` or smoothed/mixed labels."""
    if "targets" in batch:
        return batch["inputs"], targets.Targets(batch["targets"], batch["label"], None)
    return targets.mix_batch(rng, batch["inputs"], batch["label"], num_classes=num_classes, config=mix_config)


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    log_noise_probs: Optional[jax.Array],
    *,
    loss_fn: losses.LossFn,
    num_classes: int,
    mix_config: targets.MixConfig,
    temperature: float,
    axis_name: Optional[str],
) -> tuple[TrainState, dict]:
    """One optimiser step on one device's share of the batch (pure; per-device code).

    Args:
      state: replicated train state. batch: ``inputs [N, ...]``, ``label [N]`` (and optionally
      ``targets [N, C]``). rng: the run's key (folded here with the step and the device index).
      log_noise_probs: ``log(eta)`` ``[C]`` or ``None``.

    Returns:
      The new state and ``{'loss', 'grad_norm'}`` averaged over the global batch.
    """
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    mix_rng, dropout_rng, loss_rng = jax.random.split(rng, 3)
    inputs, batch_targets = make_targets(mix_rng, batch, num_classes=num_classes, mix_config=mix_config)
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
        logits = state.apply_fn({"params": params}, inputs, train=True, rngs={"dropout": dropout_rng})
        return jnp.mean(loss_fn(logits, loss_inputs))

    loss, grads = jax.value_and_grad(mean_loss)(state.params)
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads=grads), metrics


def make_sharded_train_step(mesh: Mesh, **step_kwargs):
    """``jit(shard_map(train_step))``: state, rng and prior replicated, batch split on ``'data'``."""
    step = functools.partial(train_step, axis_name=AXIS, **step_kwargs)
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P(), P()), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0,))


def eval_step(params, batch: dict, *, apply_fn, temperature: float, axis_name: Optional[str]) -> dict:
    """Per-device evaluation sums (see :func:`softnce.evaluation.metric_sums`), summed over devices."""
    logits = apply_fn({"params": params}, batch["inputs"], train=False)
    sums = evaluation.metric_sums(logits, batch["label"], batch["mask"], temperature=temperature)
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def make_sharded_eval_step(mesh: Mesh, **step_kwargs):
    step = functools.partial(eval_step, axis_name=AXIS, **step_kwargs)
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))


def evaluate(eval_fn, params, dataset: Dataset, mesh: Mesh, batch_size: int) -> tuple[dict, dict]:
    """One pass over the evaluation split; returns ``(summary, sums)`` (padding excluded)."""
    sums = None
    for batch in dataset.eval_batches(batch_size):
        sums = evaluation.add_sums(sums, jax.device_get(eval_fn(params, distributed.global_batch(mesh, batch))))
    return evaluation.summarize(sums), sums


# --------------------------------------------------------------------------------------------------
# Set-up: validation of the config, the state, the prior.
# --------------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every name in ``config`` before any work starts; errors list the valid choices."""
    losses.get_loss(config.loss.name)
    if config.data.name not in DATASETS:
        raise ValueError(f"unknown dataset {config.data.name!r}; valid datasets: {', '.join(sorted(DATASETS))}.")
    if config.model.name not in models.MODELS:
        raise ValueError(f"unknown model {config.model.name!r}; valid models: {', '.join(sorted(models.MODELS))}.")
    if config.loss.noise_prior not in ("class_prior", "uniform"):
        raise ValueError(f"config.loss.noise_prior must be 'class_prior' or 'uniform', got {config.loss.noise_prior!r}.")
    if config.num_train_steps <= 0:
        raise ValueError(f"config.num_train_steps must be positive, got {config.num_train_steps}.")
    targets.MixConfig.from_config(config.augment)


def noise_prior(config: ml_collections.ConfigDict, dataset: Dataset) -> Optional[jax.Array]:
    """``log(eta)`` from the training-label counts, computed once; ``None`` for uniform / unused."""
    if not losses.get_loss(config.loss.name).uses_noise_prior or config.loss.noise_prior == "uniform":
        return None
    counts = np.asarray(dataset.train_label_counts())
    labels = np.repeat(np.arange(dataset.num_classes), counts)
    return losses.log_class_prior(labels, dataset.num_classes, smoothing=config.loss.get("prior_smoothing", 0.0))


def _layer_structure(model) -> dict:
    """The model's layer ids for layer-wise lr decay, if it has them (ViTs)."""
    if hasattr(model, "depth"):
        from softnce.models import vit

        return {"layer_id": vit.layer_id, "depth": model.depth}
    return {}


def initial_params(config: ml_collections.ConfigDict, model, example_shape, rng, *, use_init: bool = True) -> Any:
    """Fresh params, replaced by ``config.init.checkpoint`` or ``config.init.pretrained`` if given.

    ``use_init=False`` skips both (a resumed run restores its own checkpoint instead).
    """
    params = model.init(rng, jnp.zeros((1, *example_shape), jnp.float32), train=False)["params"]
    init = config.get("init", ml_collections.ConfigDict()) if use_init else ml_collections.ConfigDict()
    if init.get("checkpoint"):
        return checkpointing.restore_params(init.checkpoint, params)
    if init.get("pretrained"):
        from softnce.models import mae_checkpoint

        return mae_checkpoint.merge_pretrained(params, mae_checkpoint.load_pretrained_params(init.pretrained))
    return params


def create_train_state(config, model, example_shape, rng, mesh: Mesh, global_batch: int, *, use_init: bool = True):
    """The replicated initial ``TrainState`` and the learning-rate schedule."""
    params = initial_params(config, model, example_shape, rng, use_init=use_init)
    tx, schedule = optim.make_optimizer(
        config.optim, params, global_batch=global_batch, total_steps=config.num_train_steps,
        **_layer_structure(model),
    )
    make = jax.jit(
        lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=tx),
        out_shardings=distributed.replicated(mesh),
    )
    return make(params), schedule


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (restores the old handler on exit)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


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


def _check_finite(history: list[tuple[int, dict]], last_saved: Optional[int], ckpt_dir: str) -> list[dict]:
    """Fetches pending step metrics; raises ``FloatingPointError`` at the first non-finite one."""
    fetched = [(step, jax.device_get(m)) for step, m in history]
    for step, metrics in fetched:
        for name in sorted(metrics, key=lambda k: k != "loss"):  # report the loss first
            value = metrics[name]
            if not np.all(np.isfinite(value)):
                kept = f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}" if last_saved else "no checkpoint was written yet"
                raise FloatingPointError(
                    f"non-finite {name} ({float(value)}) at step {step}; training stopped and {kept}. "
                    "Lower the learning rate or enable config.optim.grad_clip_norm."
                )
    return [m for _, m in fetched]


def _log_train_metrics(history, *, step, schedule, writer, progress, is_chief, last_saved, manager, ckpt_dir) -> None:
    """Checks the pending step metrics for non-finite values, then logs their mean.

    On a non-finite value the last good (possibly still asynchronous) save is finished before the
    ``FloatingPointError`` propagates, so it stays the latest checkpoint.
    """
    try:
        fetched = _check_finite(history, last_saved, ckpt_dir)
    except FloatingPointError:
        manager.wait_until_finished()
        writer.flush()
        raise
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    mean["learning_rate"] = float(schedule(step - 1))
    writer.write_scalars(step, {f"train/{k}": v for k, v in mean.items()})
    if is_chief:
        print(progress.line(step, mean), flush=True)


def _write_results(workdir, config, summary: dict, sums: dict) -> None:
    """``metrics.json``, ``eval_sums.json`` and ``reliability.png`` in ``workdir`` (process 0 only)."""
    _write_json(workdir / "metrics.json", summary)
    _write_json(workdir / "eval_sums.json", {k: np.asarray(v).tolist() for k, v in sums.items()})
    evaluation.plot_reliability_diagram(
        {config.loss.name: sums}, str(workdir / "reliability.png"), title=config.data.name
    )


def _write_json(path, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` (an ``epath.Path``: local or ``gs://``)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: Optional[int] = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final eval metrics.

    ``stop_at_step`` ends this invocation early at that step, saving a checkpoint as a preemption
    would (the schedule still follows ``config.num_train_steps``); running again resumes.

    Writes ``config.json``, TensorBoard scalars, ``checkpoints/``, ``metrics.json``,
    ``eval_sums.json`` (the calibration-bin sums) and ``reliability.png`` to ``workdir`` (process 0).
    Raises ``FloatingPointError`` on a non-finite loss, keeping the last good checkpoint.
    """
    from clu import metric_writers

    validate_config(config)
    mesh = distributed.make_mesh()
    is_chief = jax.process_index() == 0
    local_batch = distributed.check_batch_size(config.data.batch_size, mesh)
    local_eval_batch = distributed.check_batch_size(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")
    dataset = get_dataset(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    log_noise_probs = noise_prior(config, dataset)
    mix_config = targets.MixConfig.from_config(config.augment)
    loss_spec = losses.get_loss(config.loss.name)

    workdir = checkpointing.resolve(workdir)  # local or gs://; every write below is on process 0 only
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_chief)

    model = models.get_model(config.model, dataset.num_classes)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    ckpt_dir = str(workdir / "checkpoints")
    manager = checkpointing.make_manager(ckpt_dir, max_to_keep=config.get("max_checkpoints", 3))
    last_saved = manager.latest_step()
    resuming = last_saved is not None  # then neither init.checkpoint nor init.pretrained is read
    state, schedule = create_train_state(
        config, model, dataset.example_shape, init_rng, mesh, config.data.batch_size, use_init=not resuming
    )
    if resuming:
        state = checkpointing.restore(manager, state, last_saved)
    start_step = int(state.step)

    step_fn = make_sharded_train_step(
        mesh, loss_fn=loss_spec.fn, num_classes=dataset.num_classes, mix_config=mix_config,
        temperature=config.loss.temperature,
    )
    eval_fn = make_sharded_eval_step(mesh, apply_fn=model.apply, temperature=config.loss.temperature)
    batches: Iterator[dict] = dataset.train_batches(local_batch, seed=config.seed, start_step=start_step)
    progress = Progress(config.num_train_steps, start_step)
    history: list[tuple[int, dict]] = []
    summary: dict = {}
    total = config.num_train_steps

    with _Preemption() as preemption:
        for step in range(start_step + 1, total + 1):
            batch = distributed.global_batch(mesh, next(batches))
            state, metrics = step_fn(state, batch, train_rng, log_noise_probs)
            history.append((step, metrics))
            is_last = step == total
            preempted = preemption.requested if jax.process_count() == 1 else manager.reached_preemption(step)
            preempted = preempted or step == stop_at_step
            save_now = is_last or preempted or step % config.checkpoint_every_steps == 0
            if save_now or step % config.log_every_steps == 0:
                _log_train_metrics(
                    history, step=step, schedule=schedule, writer=writer, progress=progress, is_chief=is_chief,
                    last_saved=last_saved, manager=manager, ckpt_dir=ckpt_dir,
                )
                history = []
            if save_now:
                checkpointing.save(manager, step, state)
                last_saved = step
            if preempted and not is_last:
                manager.wait_until_finished()
                if is_chief:
                    print(f"stopped at step {step} (preempted or stop_at_step); saved to {ckpt_dir}; "
                          "rerun the same command to resume.", flush=True)
                writer.flush()
                return {"preempted_at_step": step}
            if is_last or step % config.eval_every_steps == 0:
                summary, sums = evaluate(eval_fn, state.params, dataset, mesh, local_eval_batch)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in summary.items()})
                if is_chief:
                    print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()), flush=True)
    manager.wait_until_finished()
    if not summary:  # the run had already finished: evaluate the restored state
        summary, sums = evaluate(eval_fn, state.params, dataset, mesh, local_eval_batch)
    summary = dict(summary, step=int(state.step))
    if is_chief:
        _write_results(workdir, config, summary, sums)
    writer.flush()
    return summary
