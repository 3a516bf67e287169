"""STI against soft-target CE as the classes grow (the C x M study), on Fashion-MNIST k-tuples.

    python -m softnce.data.fashion_mnist                                 # once: prepare the data
    python experiments/many_class.py --out runs/many_class                # the protocol (about 77 min, 2 cores)
    python experiments/many_class.py --quick --out runs/many_class_quick  # the whole pipeline in 1-2 minutes

The paper's claim concerns ImageNet (C = 1,000 classes, global batch M = 1,024), where a batch holds
few examples of a class and misses most classes; this study asks whether STI's gain (or loss)
against soft-target CE changes with C and M, on ``fashion_mnist_tuples`` (``configs/fashion_tuples.py``:
``k`` = 1, 2, 3 Fashion-MNIST images side by side, C = 10^k classes, 14x14 images (``pool = 2``),
the small CNN, 60,000 training / 6,000 validation / 10,000 test tuples, drawn once with
``config.data.seed = 0``, so every run seed of a C sees the same tuples; ``config.seed`` varies the
initialisation and the batch order). ``augment = auto``: ``nll`` and ``infonce`` train on hard
labels, soft-target CE and STI on label smoothing 0.1 + MixUp 0.8 / CutMix 1.0.

Protocol (:data:`SETTINGS` ``'full'``), every training run through the resumable sweep runner
(:func:`softnce.experiments.sweep.run_sweep`), each phase in its own folder of ``--out``:

1. **Examples, not steps, are fixed.** Every run sees ``E`` training examples: ``steps = E / M``
   (:func:`steps_for`), the warm-up a fixed share of them (:func:`cell_fields`); ``optim.base_lr``
   is per 256 examples (``lr = base_lr * M / 256``, :mod:`softnce.optim`), so one ``base_lr`` serves
   every M.
2. **Selection per C** (``C<C>/selection_lr``, ``C<C>/selection_t``; selection seed 0, validation
   only: these runs never read the test split), at ``M = 256``. Stage A: each loss's ``base_lr``
   from {1e-3, 2e-3, 4e-3}, STI and InfoNCE at ``t = 1``, widened by 2x while the choice lies at an
   edge (at most twice). Stage B: at STI's and InfoNCE's chosen ``base_lr``, ``t`` from {0.5, 1, 2,
   4}, widened by 2x at an edge (at most twice); its ``t = 1`` run repeats stage A's (the sweep
   runner keys runs by folder). Chosen by validation top-1, ties by validation NLL
   (:class:`~softnce.experiments.sweep.SelectionRule`).
3. **Final cells** (``C<C>/final_M<M>``, seeds 1-3, the test split read once at the end of each run):
   the four losses at their chosen values at each C and ``M = 256``; then STI and soft-target CE at
   ``C = 1000`` and ``M`` = 64 and 512 (the ``C = 1000`` choices; the ``M = 256`` cell is shared).
4. **Report** (``report.md``, ``summary.json``, ``many_class.png`` in ``--out``): per cell the
   paired differences STI - soft CE, InfoNCE - NLL and soft CE - NLL (the recipe's own effect at
   C = 10) of test top-1, NLL and NLL at the validation-fitted ``t*``: per seed ``d_s = m_A(s) -
   m_B(s)``, their mean and the 95% t-interval ``mean +- t_{0.975, n-1} std(d) / sqrt(n)``
   (:func:`softnce.experiments.comparison.paired_interval`); the figure plots them against C (``M = 256``)
   and against M (``C = 1000``, STI - soft CE). Per cell also the class make-up of a batch
   (:func:`batch_statistics`): the share of a positive's ``M - 1`` negatives of its own class and
   the share of the C classes absent from the batch, for uniform labels and for the actual training
   labels. And per C and loss the chosen ``base_lr`` and ``t``, whether each lies at an edge of its
   final grid, and the values widening added.

Budget: 3 x (12 + 8 + 12) + 12 = 108 runs before widening, each of E = 307,200 training examples
(1,200 steps at M = 256, 4,800 at 64, 600 at 512: 5.1 epochs of the 60,000 training tuples), 10% of
them warm-up. Measured on 2 quiet cores, one run after another in one process as the study runs them,
on stand-in images of Fashion-MNIST's size (random pixels: the same compute), each run counting its
start-up, data, compilation, test evaluation and ``t*`` fit: C = 1000 at M = 256 58 s (27 steps/s
once compiled, 25 in the trainer's last progress line; about 14 s of start-up and evaluation), at
M = 64 68 s (92 steps/s), at M = 512 59 s (13 steps/s); C = 100 at M = 256 32 s (49 steps/s);
C = 10 29 s (84 steps/s). About 77 minutes in all (:func:`estimate_seconds`, the first line of the
output), plus up to 58 s per run that widening adds (at most 8 + 4 runs per C). Running the same
command again keeps every finished run (a finished study only rewrites the report).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from softnce.experiments import cli, comparison, fair_comparison, sweep

NLL, INFONCE, SOFT_CE, STI = "nll", "infonce", "soft_target_cross_entropy", "soft_target_infonce"
LOSSES = (NLL, INFONCE, SOFT_CE, STI)
TEMPERATURE_LOSSES = fair_comparison.TEMPERATURE_LOSSES  # STI and InfoNCE: the t of stage B
BATCH_STUDY_LOSSES = (SOFT_CE, STI)  # the losses of the M cells
PAIRS = ((STI, SOFT_CE), (INFONCE, NLL), (SOFT_CE, NLL))  # (A, B): the paired differences A - B of every cell
DIFFERENCE_METRICS = ("top1", "nll", "nll_calibrated")  # test top-1, NLL, NLL at the validation-fitted t*


@dataclasses.dataclass(frozen=True)
class Setting:
    """One size of the protocol (module docstring)."""

    ks: tuple[int, ...]  # images per tuple: C = 10^k
    batch_size: int  # M of the selection and of the cells against C
    batch_sizes: tuple[int, ...]  # the further M of the cells against M, at k = ks[-1]
    examples: int  # training examples per run: steps = examples / M
    warmup_fraction: float  # the warm-up's share of the steps (so a fixed number of examples)
    base_lrs: tuple[float, ...]  # stage A's optim.base_lr grid
    temperatures: tuple[float, ...]  # stage B's loss.temperature grid
    widen_factor: float  # the next value beyond an edge: edge * factor or edge / factor
    max_widenings: int
    selection_seed: int
    seeds: tuple[int, ...]  # the final runs' seeds (config.seed)
    run_seconds: tuple[tuple[int, int, float], ...]  # measured (k, M, seconds of one run) for the estimate
    data_seed: int = 0  # config.data.seed: the same tuples in every run of a C
    pool: int = 2  # config.data.pool_size
    overrides: tuple[tuple[str, Any], ...] = ()  # further config fields of every run


SETTINGS = {
    "full": Setting(
        ks=(1, 2, 3), batch_size=256, batch_sizes=(64, 512), examples=307_200, warmup_fraction=0.1,
        base_lrs=(1e-3, 2e-3, 4e-3), temperatures=(0.5, 1.0, 2.0, 4.0), widen_factor=2.0, max_widenings=2,
        selection_seed=0, seeds=(1, 2, 3),
        run_seconds=((1, 256, 29.4), (2, 256, 32.2), (3, 256, 58.3), (3, 64, 67.7), (3, 512, 58.7)),
    ),
    # The whole pipeline with a tiny model, tiny splits and a few dozen steps (a check, not a result).
    # Few training tuples leave classes of C = 100 without examples: prior_smoothing keeps STI's eta positive.
    "quick": Setting(
        ks=(1, 2), batch_size=32, batch_sizes=(64,), examples=768, warmup_fraction=0.1, base_lrs=(2e-3,),
        temperatures=(1.0, 2.0), widen_factor=2.0, max_widenings=1, selection_seed=0, seeds=(1,),
        run_seconds=((1, 32, 2.0), (2, 32, 2.0), (2, 64, 3.0)),
        overrides=(("model.channels", (4, 8)), ("model.hidden", 16), ("data.num_train", 512), ("data.num_val", 64),
                   ("data.num_test", 64), ("data.eval_batch_size", 64), ("loss.prior_smoothing", 1.0)),
    ),
}


def num_classes(k: int) -> int:
    """``C = 10^k``."""
    from softnce.data import fashion_tuples

    return fashion_tuples.num_classes(k)


def cell_name(k: int, batch_size: int) -> str:
    """``'C1000_M256'``: a cell's key in ``summary.json``."""
    return f"C{num_classes(k)}_M{batch_size}"


def steps_for(examples: int, batch_size: int) -> int:
    """``steps = examples / M``; raises ``ValueError`` unless ``M`` divides ``examples``."""
    if examples % batch_size:
        raise ValueError(f"{examples} training examples are not a whole number of batches of {batch_size}.")
    return examples // batch_size


def cell_fields(setting: Setting, batch_size: int) -> dict:
    """The config fields of a cell's batch ``M``: ``steps = E / M`` training steps (evaluated and saved at
    the end), ``round(warmup_fraction * steps)`` warm-up steps, and the fixed draw of the tuples."""
    steps = steps_for(setting.examples, batch_size)
    return {"data.batch_size": batch_size, "data.seed": setting.data_seed, "num_train_steps": steps,
            "eval_every_steps": steps, "checkpoint_every_steps": steps,
            "optim.warmup_steps": max(1, round(setting.warmup_fraction * steps))}


def make_config_fn(setting: Setting, k: int, batch_size: int, *, data_dir: Optional[str],
                   overrides: dict) -> Callable[[str, int], Any]:
    """``(loss, seed) -> config``: ``configs/fashion_tuples.py`` at ``k``, the setting's and the command
    line's overrides, then the cell's fields (:func:`cell_fields`), which no override changes."""
    from softnce.configs import fashion_tuples

    def make_config(loss: str, seed: int):
        config = fashion_tuples.get_config(f"k={k},loss={loss},seed={seed},pool={setting.pool}")
        config.data.data_dir = data_dir
        config.update_from_flattened_dict(dict(setting.overrides))
        config.update_from_flattened_dict(overrides)
        config.update_from_flattened_dict(cell_fields(setting, batch_size))
        return config

    return make_config


def cells(setting: Setting) -> list[tuple[int, int, tuple[str, ...]]]:
    """``[(k, M, losses)]`` of the final cells: every loss at each ``k`` and the main ``M``, then the
    :data:`BATCH_STUDY_LOSSES` at ``k = ks[-1]`` and each further ``M``."""
    return ([(k, setting.batch_size, LOSSES) for k in setting.ks]
            + [(setting.ks[-1], m, BATCH_STUDY_LOSSES) for m in setting.batch_sizes])


# --------------------------------------------------------------------------------------------------
# Budget.
# --------------------------------------------------------------------------------------------------


def planned_runs(setting: Setting) -> dict[str, list[tuple[int, int]]]:
    """``{'selection': [(k, M)], 'final': [(k, M)]}``, one entry per run before widening."""
    per_c = len(LOSSES) * len(setting.base_lrs) + len(TEMPERATURE_LOSSES) * len(setting.temperatures)
    return {"selection": [(k, setting.batch_size) for k in setting.ks for _ in range(per_c)],
            "final": [(k, m) for k, m, losses in cells(setting) for _ in range(len(losses) * len(setting.seeds))]}


def estimate_seconds(setting: Setting) -> dict:
    """Runs, steps and the estimated time of the protocol before widening: the sum over runs of the
    measured time of a run at its ``(k, M)`` (``setting.run_seconds``; a final run's, which also reads the
    test split: selection runs take a few seconds less). ``widening_run_seconds``: the most a run that
    widening adds takes (at the largest ``k``)."""
    measured = {(k, m): seconds for k, m, seconds in setting.run_seconds}
    runs = planned_runs(setting)
    every = [run for planned in runs.values() for run in planned]
    return {"runs": {phase: len(planned) for phase, planned in runs.items()},
            "steps": sum(steps_for(setting.examples, m) for _, m in every), "examples": setting.examples,
            "seconds": sum(measured[run] for run in every),
            "widening_run_seconds": max(measured[(k, setting.batch_size)] for k in setting.ks)}


# --------------------------------------------------------------------------------------------------
# Selection and final cells.
# --------------------------------------------------------------------------------------------------


def learning_rate_grid(setting: Setting) -> sweep.Grid:
    """Stage A: ``optim.base_lr`` from ``setting.base_lrs`` for every loss, STI and InfoNCE at ``t = 1``."""
    return fair_comparison.grid(dataclasses.replace(setting, temperatures=(1.0,)), LOSSES)


def temperature_grid(setting: Setting, learning_rates: dict) -> sweep.Grid:
    """Stage B: ``loss.temperature`` from ``setting.temperatures`` at each :data:`TEMPERATURE_LOSSES`'s chosen
    ``optim.base_lr`` (``learning_rates``: stage A's ``selected``)."""
    return {loss: {"optim.base_lr": [learning_rates[loss]["params"]["optim.base_lr"]],
                   "loss.temperature": list(setting.temperatures)} for loss in TEMPERATURE_LOSSES}


def select(setting: Setting, k: int, *, out: str, data_dir: Optional[str], overrides: dict,
           log: Callable[[str], None]) -> tuple[dict, dict]:
    """Stages A and B of ``k`` at ``setting.batch_size`` into ``out/selection_lr`` and ``out/selection_t``:
    ``(stage A's sweep result, stage B's)`` (:func:`softnce.experiments.sweep.run_sweep`)."""
    make_config = make_config_fn(setting, k, setting.batch_size, data_dir=data_dir, overrides=overrides)
    common = dict(seeds=[setting.selection_seed], select=sweep.SelectionRule(), max_widenings=setting.max_widenings,
                  log=log)
    title = f"C = {num_classes(k)}: validation top-1"
    learning_rates = sweep.run_sweep(make_config, learning_rate_grid(setting), out=os.path.join(out, "selection_lr"),
                                     widen={"optim.base_lr": setting.widen_factor}, title=title, **common)
    temperatures = sweep.run_sweep(make_config, temperature_grid(setting, learning_rates["selected"]),
                                   out=os.path.join(out, "selection_t"),
                                   widen={"loss.temperature": setting.widen_factor}, title=title, **common)
    return learning_rates, temperatures


def chosen_values(learning_rates: dict, temperatures: dict) -> dict:
    """``{loss: {'params', 'validation', 'at_edge' {field: bool}, 'widened' {field: [added values]}}}``:
    stage B's choice for :data:`TEMPERATURE_LOSSES` (its ``base_lr`` and edge flag from stage A), stage A's
    for the others."""
    chosen = {}
    for loss, choice in learning_rates["selected"].items():
        final = temperatures["selected"].get(loss, choice)
        at_edge = {"optim.base_lr": choice["at_edge"].get("optim.base_lr", False)}
        if loss in temperatures["selected"]:
            at_edge["loss.temperature"] = final["at_edge"].get("loss.temperature", False)
        widened = {field: [w["value"] for w in stage["widened"] if w["group"] == loss and w["field"] == field]
                   for field, stage in (("optim.base_lr", learning_rates), ("loss.temperature", temperatures))
                   if field in at_edge}
        chosen[loss] = {"params": final["params"], "validation": final["validation"], "at_edge": at_edge,
                        "widened": widened}
    return chosen


def final_cell(setting: Setting, k: int, batch_size: int, losses: Sequence[str], chosen: dict, *, out: str,
               data_dir: Optional[str], overrides: dict, log: Callable[[str], None]) -> dict:
    """``losses`` at their ``chosen`` values on ``setting.seeds``, test split read, into ``out``: the sweep result."""
    return sweep.run_sweep(
        make_config_fn(setting, k, batch_size, data_dir=data_dir, overrides=overrides),
        {loss: {field: [value] for field, value in chosen[loss]["params"].items()} for loss in losses},
        seeds=setting.seeds, out=out, evaluate_test=True, describe=comparison.targets_description,
        table=lambda result: comparison.comparison_tables(result["results"]), title=cell_name(k, batch_size), log=log)


# --------------------------------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------------------------------


def cell_differences(results: dict, pairs: Sequence[tuple[str, str]] = PAIRS,
                     metrics: Sequence[str] = DIFFERENCE_METRICS) -> dict:
    """``{'A - B': {metric: paired_interval}}`` of the ``pairs`` both present in ``results`` (a final sweep's
    ``results``), paired by seed (:func:`softnce.experiments.comparison.paired_differences`)."""
    out = {}
    for a, b in pairs:
        if a in results and b in results:
            found = {m: comparison.paired_differences(results, a, b, m) for m in metrics}
            out[f"{a} - {b}"] = {m: comparison.paired_interval(d) for m, d in found.items() if d is not None}
    return out


def training_label_counts(config) -> np.ndarray:
    """``[C]`` label counts of the training tuples that ``config`` draws (built as the trainer builds them)."""
    from softnce.data import get_dataset

    return get_dataset(config.data).train_label_counts()


def batch_statistics(batch_size: int, label_counts: np.ndarray) -> dict:
    """The expected class make-up of a batch of ``M = batch_size`` over ``C = len(label_counts)`` classes
    (:func:`softnce.data.fashion_tuples.batch_class_statistics`): ``'uniform'`` for ``M`` independent uniform
    labels (same-class share ``1/C``, absent share ``(1 - 1/C)^M``), ``'training_labels'`` for ``M``
    distinct examples of the actual training split (the trainer's shuffle). Each:
    ``{batch_size, num_classes, same_class_share, absent_share, same_class_negatives, absent_classes}``."""
    from softnce.data import fashion_tuples

    def described(stats) -> dict:
        return {**dataclasses.asdict(stats), "same_class_negatives": stats.same_class_negatives,
                "absent_classes": stats.absent_classes}

    counts = np.asarray(label_counts)
    return {"uniform": described(fashion_tuples.batch_class_statistics(batch_size, np.ones(len(counts)))),
            "training_labels": described(fashion_tuples.batch_class_statistics(batch_size, counts,
                                                                               without_replacement=True))}


# --------------------------------------------------------------------------------------------------
# The protocol.
# --------------------------------------------------------------------------------------------------


def run(setting: Setting, *, out: str, data_dir: Optional[str] = None, overrides: Optional[dict] = None,
        log: Callable[[str], None] = print) -> dict:
    """Runs the protocol (module docstring) into ``out``; returns the summary (also ``summary.json``)."""
    kwargs = dict(data_dir=data_dir, overrides=dict(overrides or {}), log=log)
    os.makedirs(out, exist_ok=True)
    estimate = estimate_seconds(setting)
    measured = ", ".join(f"C {num_classes(k)} M {m} {seconds:g} s" for k, m, seconds in setting.run_seconds)
    log(f"many-class study: {sum(estimate['runs'].values())} runs {estimate['runs']} before widening, "
        f"{estimate['steps']} steps, {setting.examples} examples a run; about {estimate['seconds'] / 60:.0f} min "
        f"from measured run times ({measured}; 2 cores), + up to {estimate['widening_run_seconds']:.0f} s per run "
        "that widening adds")
    start = time.time()
    selection = {}
    for k in setting.ks:
        log(f"C = {num_classes(k)}: selection on validation, seed {setting.selection_seed} (the test split unread)")
        learning_rates, temperatures = select(setting, k, out=os.path.join(out, f"C{num_classes(k)}"), **kwargs)
        selection[f"C{num_classes(k)}"] = {"chosen": chosen_values(learning_rates, temperatures),
                                           "stages": {"learning_rate": learning_rates, "temperature": temperatures}}
    finals = run_cells(setting, selection, out=out, **kwargs)
    sweeps = [s for c in selection.values() for s in c["stages"].values()] + [f["result"] for f in finals.values()]
    summary = {
        "setting": dataclasses.asdict(setting), "losses": list(LOSSES), "overrides": kwargs["overrides"],
        "estimate": estimate, "selection": {name: selection_summary(s) for name, s in selection.items()},
        "cells": {name: f["summary"] for name, f in finals.items()},
        "against_C": [cell_name(k, setting.batch_size) for k in setting.ks],
        "against_M": [cell_name(setting.ks[-1], m) for m in sorted((setting.batch_size, *setting.batch_sizes))],
        "trained": sum(s["trained"] for s in sweeps), "run_seconds": sum(s["run_seconds"] for s in sweeps),
        "invocation_seconds": time.time() - start, "complete": True,
    }
    summary["figure"] = os.path.basename(plot_differences(summary, os.path.join(out, "many_class.png")))
    sweep.write_json(os.path.join(out, "summary.json"), summary)
    tables = {name: comparison.metrics_table(f["result"]["results"]) for name, f in finals.items()}
    report = report_markdown(summary, selection, tables)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    log(report)
    log(f"many-class study done in {sweep.format_seconds(summary['invocation_seconds'])} ({summary['trained']} runs "
        f"trained now); wrote {out}/report.md, summary.json, many_class.png")
    return summary


def run_cells(setting: Setting, selection: dict, *, out: str, data_dir: Optional[str], overrides: dict,
              log: Callable[[str], None]) -> dict:
    """Every final cell (:func:`cells`) at its C's chosen values into ``out/C<C>/final_M<M>``:
    ``{cell name: {'result': the sweep result, 'summary': cell_summary}}``."""
    finals, counts = {}, {}
    for k, m, losses in cells(setting):
        name, folder = cell_name(k, m), os.path.join(out, f"C{num_classes(k)}")
        log(f"{name}: {', '.join(losses)} at their chosen values on seeds {list(setting.seeds)}")
        result = final_cell(setting, k, m, losses, selection[f"C{num_classes(k)}"]["chosen"],
                            out=os.path.join(folder, f"final_M{m}"), data_dir=data_dir, overrides=overrides, log=log)
        if k not in counts:  # the same tuples at every M of a C
            config = make_config_fn(setting, k, m, data_dir=data_dir, overrides=overrides)(losses[0], setting.seeds[0])
            counts[k] = training_label_counts(config)
        finals[name] = {"result": result, "summary": cell_summary(setting, k, m, result, counts[k])}
    return finals


def cell_summary(setting: Setting, k: int, batch_size: int, result: dict, label_counts: np.ndarray) -> dict:
    """One final cell: its C, M, steps, the test metrics
    (:func:`softnce.experiments.fair_comparison.final_summary`), the paired differences
    (:func:`cell_differences`) and the batch statistics (:func:`batch_statistics`)."""
    fields = cell_fields(setting, batch_size)
    return {"C": num_classes(k), "k": k, "M": batch_size, "steps": fields["num_train_steps"],
            "warmup_steps": fields["optim.warmup_steps"], "examples": setting.examples,
            "losses": list(result["results"]), "test": fair_comparison.final_summary(result["results"]),
            "differences": cell_differences(result["results"]), "batch": batch_statistics(batch_size, label_counts)}


def selection_summary(selection: dict) -> dict:
    """What ``summary.json`` keeps of one C's selection: the choices and each stage's grids, widenings and
    every run's validation metrics."""
    stages = {name: {"grids": s["grids"], "widened": s["widened"], "rule": s["rule"],
                     "points": {loss: [{"params": r["params"], "validation": r.get("validation"),
                                        "diverged": bool(r.get("diverged"))} for r in runs["metrics"]]
                                for loss, runs in s["results"].items()}}
              for name, s in selection["stages"].items()}
    return {"chosen": selection["chosen"], "stages": stages}


# --------------------------------------------------------------------------------------------------
# Tables and the figure.
# --------------------------------------------------------------------------------------------------


def _interval_text(interval: Optional[dict], scale: float, digits: int) -> str:
    if interval is None:
        return "n/a"
    mean = f"{interval['mean'] * scale:+.{digits}f}"
    if interval["half_width"] is None:
        return mean
    return f"{mean} [{interval['low'] * scale:+.{digits}f}, {interval['high'] * scale:+.{digits}f}]"


def differences_table(summary: dict) -> str:
    """Markdown: a row per pair and cell, the mean paired difference [95% t-interval] of each metric."""
    titles = {"top1": ("Δ test top-1 (points)", 100, 2), "nll": ("Δ test NLL", 1, 3),
              "nll_calibrated": ("Δ test NLL at t*", 1, 3)}
    lines = ["| A - B | C | M | seeds | " + " | ".join(t for t, _, _ in titles.values()) + " |",
             "|---|---|---|---|" + "---|" * len(titles)]
    for a, b in PAIRS:
        for name, cell in summary["cells"].items():
            found = cell["differences"].get(f"{a} - {b}")
            if found is None:
                continue
            n = max((i["n"] for i in found.values()), default=0)
            shown = [_interval_text(found.get(m), s, d) for m, (_, s, d) in titles.items()]
            lines.append(f"| {a} - {b} | {cell['C']} | {cell['M']} | {n} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def batch_table(summary: dict) -> str:
    """Markdown: per cell the share of a positive's negatives of its own class and of the classes absent
    from a batch (uniform labels / the actual training labels)."""
    lines = ["| C | M | same-class share of negatives: uniform / training | same-class negatives per positive | "
             "absent share of classes: uniform / training | absent classes |", "|---|---|---|---|---|---|"]
    for cell in summary["cells"].values():
        u, t = cell["batch"]["uniform"], cell["batch"]["training_labels"]
        lines.append(f"| {cell['C']} | {cell['M']} "
                     f"| {100 * u['same_class_share']:.3f}% / {100 * t['same_class_share']:.3f}% "
                     f"| {u['same_class_negatives']:.3f} / {t['same_class_negatives']:.3f} "
                     f"| {100 * u['absent_share']:.1f}% / {100 * t['absent_share']:.1f}% "
                     f"| {u['absent_classes']:.1f} / {t['absent_classes']:.1f} |")
    return "\n".join(lines)


def choices_table(summary: dict) -> str:
    """Markdown: per C and loss the chosen ``base_lr`` and ``t``, their validation metrics, edge flags and
    the values widening added."""
    lines = ["| C | loss | base_lr | t | val top-1 (%) | val NLL | at an edge | widened by |",
             "|---|---|---|---|---|---|---|---|"]
    for name, selection in summary["selection"].items():
        for loss, choice in selection["chosen"].items():
            params, val = choice["params"], choice["validation"] or {}
            t = params.get("loss.temperature")
            edges = ", ".join(f.rsplit(".", 1)[-1] for f, at in choice["at_edge"].items() if at) or "no"
            widened = "; ".join(f"{f.rsplit('.', 1)[-1]} " + ", ".join(f"{v:g}" for v in vs)
                                for f, vs in choice["widened"].items() if vs) or "–"
            top1 = f"{100 * val['top1']:.2f}" if "top1" in val else "diverged"
            nll = f"{val['nll']:.3f}" if "nll" in val else "–"
            t = "–" if t is None else format(t, "g")
            lines.append(f"| {name[1:]} | {loss} | {params['optim.base_lr']:g} | {t} | {top1} | {nll} | {edges} "
                         f"| {widened} |")
    return "\n".join(lines)


def report_markdown(summary: dict, selection: dict, test_tables: dict) -> str:
    """The study's Markdown report: differences, batch statistics, choices, each cell's test metrics
    (``test_tables`` ``{cell: Markdown}``) and the selection runs (``selection`` ``{'C<C>': {'stages'}}``)."""
    s = summary["setting"]
    lines = [
        "# STI against soft-target CE as the classes grow (Fashion-MNIST k-tuples)\n",
        f"{s['examples']:,} training examples per run (steps = examples / M), pool {s['pool']}, data seed "
        f"{s['data_seed']}; selection on validation (seed {s['selection_seed']}), final runs on seeds "
        f"{', '.join(map(str, s['seeds']))}. Differences are paired by seed: mean [95% t-interval].\n",
        "## Paired differences on the test split\n", differences_table(summary), "",
        f"![differences]({summary['figure']})\n", "## What a batch holds\n", batch_table(summary), "",
        "## Chosen values (validation)\n", choices_table(summary), "", "## Test metrics per cell\n"]
    for name, cell in summary["cells"].items():
        lines += [f"### {name}: {cell['steps']} steps of M = {cell['M']}\n", test_tables[name], ""]
    lines.append("## Selection runs (validation top-1, %)\n")
    for name, chosen in selection.items():
        for stage, result in chosen["stages"].items():
            lines += [f"### {name}, {stage}\n", fair_comparison.selection_grid_table(result), ""]
    lines.append(f"Training runs: {sweep.format_seconds(summary['run_seconds'])} summed over runs (kept when a "
                 f"sweep resumes); this invocation {sweep.format_seconds(summary['invocation_seconds'])}, "
                 f"{summary['trained']} runs trained.\n")
    return "\n".join(lines)


def plot_differences(summary: dict, path: str) -> str:
    """``many_class.png``: the paired differences (mean, 95% t-interval as error bars) of test top-1 (points,
    top row) and test NLL (bottom row) against C at the main M (left; every pair) and against M at the
    largest C (right; STI - soft CE), both on log axes."""
    from softnce import plotting

    plt = plotting.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), squeeze=False)
    panels = ((summary["against_C"], "C", PAIRS), (summary["against_M"], "M", PAIRS[:1]))
    for column, (names, axis, pairs) in enumerate(panels):
        for row, (metric, scale, label) in enumerate((("top1", 100, "Δ test top-1 (points)"),
                                                      ("nll", 1, "Δ test NLL"))):
            ax = axes[row][column]
            for i, (a, b) in enumerate(pairs):
                xs, means, halves = [], [], []
                for name in names:
                    interval = summary["cells"][name]["differences"].get(f"{a} - {b}", {}).get(metric)
                    if interval is not None:  # each pair a little apart, so that the error bars do not overlap
                        xs.append(summary["cells"][name][axis] * 1.04 ** (i - (len(pairs) - 1) / 2))
                        means.append(scale * interval["mean"])
                        halves.append(scale * (interval["half_width"] or 0.0))
                ax.errorbar(xs, means, yerr=halves, fmt="o-", capsize=3, label=f"{a} - {b}")
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.set_xscale("log")
            xs = sorted({summary["cells"][name][axis] for name in names})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            ax.set_xlabel(f"{axis} (classes)" if axis == "C" else "M (global batch)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fixed = summary["cells"][names[0]]
        axes[0][column].set_title(f"against C at M = {fixed['M']}" if axis == "C" else f"against M at C = {fixed['C']}",
                                  fontsize=9)
    fig.suptitle("Paired differences on the test split (mean, 95% t-interval over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """The command line (``experiments/many_class.py``; :func:`softnce.experiments.cli.parse_protocol`)."""
    protocol = cli.parse_protocol(
        argv, description="STI against soft-target CE (and InfoNCE against NLL) on Fashion-MNIST k-tuples as C "
                          "and M grow (softnce.experiments.many_class).",
        settings=SETTINGS, out="runs/many_class", config_overrides=True, fashion_mnist=True)
    return run(protocol.setting, out=protocol.out, data_dir=protocol.data_dir, overrides=protocol.overrides)


if __name__ == "__main__":
    main()
