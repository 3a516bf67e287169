"""Many seeds of one small model at once: the trainer's own step, ``vmap``-ed over runs and ``scan``-ed over steps.

For models small enough that one device trains many of them in parallel (the toy MLP), every run
of a grid (seeds, label settings) trains in one ``jax.jit(jax.vmap(run))`` call, where ``run``
initialises the params and optimiser as :func:`softnce.assembly.create_train_state` does and scans
:func:`softnce.steps.train_step` (``axis_name=None``) over the batches of
:class:`softnce.data.pipeline.GlobalOrder`, the trainer's batch order. A run of this engine with seed
``s`` therefore follows the same key split, batch order and steps as ``python -m softnce.main``
with ``config.seed = s`` on the same in-memory data (``tests/test_toy.py`` checks it).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np

from softnce import assembly, models, optim, steps
from softnce.data.pipeline import GlobalOrder


@functools.lru_cache(maxsize=16)
def batch_rows(seed: int, num_examples: int, batch_size: int, num_steps: int) -> np.ndarray:
    """Row indices ``[num_steps, batch_size]`` of the trainer's batches for ``seed`` (cached; read-only)."""
    order = GlobalOrder(num_examples, batch_size, seed=seed)
    rows = np.stack([order(step) for step in range(num_steps)]).astype(np.int32)
    rows.flags.writeable = False
    return rows


def stacked_batch_rows(seeds: Sequence[int], num_examples: int, batch_size: int, num_steps: int) -> np.ndarray:
    """:func:`batch_rows` of each seed, stacked ``[R, num_steps, batch_size]``."""
    return np.stack([batch_rows(int(s), num_examples, batch_size, num_steps) for s in seeds])


def make_train_fn(config, num_classes: int, example_shape: tuple[int, ...]) -> Callable:
    """``jit(vmap(run))`` with ``run(seed_key, data, rows, log_noise_probs) -> (variables, losses [T])``.

    ``run`` splits ``seed_key = PRNGKey(seed)`` as the trainer does (:func:`softnce.assembly.run_keys`),
    initialises the model of ``config`` (:func:`softnce.assembly.initial_variables`), builds the optimiser
    (:func:`softnce.optim.make_optimizer`) and scans ``config.num_train_steps`` calls of
    :func:`softnce.steps.train_step` over the batches ``rows [T, B]`` (:func:`batch_rows`) of
    ``data`` = ``{'inputs' [n, ...], 'label' [n], 'targets' [n, C] (optional)}``. Everything but
    ``config`` is an argument, so one compile serves every dataset of the same shapes.
    """
    model = models.get_model(config.model, num_classes)
    num_steps = config.num_train_steps
    abstract_params = jax.eval_shape(
        lambda r: assembly.initial_variables(config, model, example_shape, r)["params"], jax.random.PRNGKey(0)
    )
    tx, _ = optim.make_optimizer(
        config.optim, abstract_params, global_batch=config.data.batch_size, total_steps=num_steps
    )
    step = functools.partial(steps.train_step, **assembly.train_step_kwargs(config, num_classes), axis_name=None)

    def run(seed_key, data, rows, log_noise_probs):
        init_rng, train_rng = assembly.run_keys(seed_key)
        variables = assembly.initial_variables(config, model, example_shape, init_rng)
        params = variables.pop("params")
        state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx, model_state=variables)

        def body(state, r):
            state, metrics = step(state, jax.tree.map(lambda v: v[r], data), train_rng, log_noise_probs)
            return state, metrics["loss"]

        state, loss_curve = jax.lax.scan(body, state, rows)
        return state.variables, loss_curve

    return jax.jit(jax.vmap(run))


def make_apply_fn(config, num_classes: int) -> Callable:
    """``jit(vmap(apply))``: stacked variables and inputs ``[R, n, ...]`` -> logits ``[R, n, C]``."""
    model = models.get_model(config.model, num_classes)
    return jax.jit(jax.vmap(lambda variables, x: model.apply(variables, x, train=False)))
