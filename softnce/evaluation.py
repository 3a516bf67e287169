"""The evaluation passes over a split: metric sums, logits, the fitted temperature ``t*`` and the result files.

Each pass runs a sharded step of :mod:`softnce.steps` over a dataset's batches on the mesh and sums on
the host (:mod:`softnce.metrics`), so the result does not depend on the number of devices or processes.
Post-hoc calibration: one temperature ``t*`` is fitted on the validation split's NLL
(:func:`fit_validation_temperature`, :func:`softnce.metrics.fit_temperature`); the test split is never
used to fit anything.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import json
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from softnce import distributed, metrics
from softnce.data.base import Dataset
from softnce.steps import EvalStepFn, LogitsStepFn, Variables


def evaluate(eval_fn: EvalStepFn, variables: Variables, batches: Iterator[dict], mesh: Mesh,
             temperature: float) -> tuple[dict, dict]:
    """One pass over ``batches`` at ``temperature``; returns ``(summary, sums)`` (padding excluded)."""
    sums = None
    t = jnp.float32(temperature)
    for batch in batches:
        sums = metrics.add_sums(sums, jax.device_get(eval_fn(variables, distributed.global_batch(mesh, batch), t)))
    return metrics.summarize(sums), sums


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


def fit_validation_temperature(logits_fn: LogitsStepFn, variables: Variables, dataset: Dataset,
                               local_eval_batch: int, mesh: Mesh) -> float:
    """``t*``: the temperature minimising the NLL of the model's ``variables`` on ``dataset``'s validation split."""
    batches = dataset.validation_batches(local_eval_batch)
    val_logits, val_labels = collect_logits(logits_fn, variables, batches, mesh)
    return metrics.fit_temperature(val_logits, val_labels)


def write_results(directory: epath.Path, config: ml_collections.ConfigDict, summary: dict, sums: dict,
                  calibrated_sums: Optional[dict], *, title: Optional[str] = None) -> None:
    """Writes ``metrics.json`` (``summary``), ``eval_sums.json``, ``eval_sums_calibrated.json`` (at
    ``summary['t_star']``, if given) and ``reliability.png`` to ``directory`` (call on process 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "metrics.json", summary)
    write_json(directory / "eval_sums.json", {k: np.asarray(v).tolist() for k, v in sums.items()})
    panels = {f"{config.loss.name} (t = {config.loss.temperature:g})": sums}
    if calibrated_sums is not None:
        write_json(directory / "eval_sums_calibrated.json",
                    {k: np.asarray(v).tolist() for k, v in calibrated_sums.items()})
        panels[f"calibrated (t* = {summary['t_star']:.3g})"] = calibrated_sums
    metrics.plot_reliability_diagram(panels, str(directory / "reliability.png"), title=title or config.data.name)


def write_json(path, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` (an ``epath.Path``: local or ``gs://``)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))
