"""Loss comparisons through the real trainer: losses x seeds, markdown tables, paired differences, plots.

    python experiments/digits_comparison.py --seeds 5 --out runs/digits_comparison
    python -m softnce.data.fashion_mnist          # once: prepare the data (see configs/fashion_mnist.py)
    python experiments/fashion_comparison.py --seeds 5 --out runs/fashion_comparison

Both are :func:`main` over one config (``configs/digits.py``, ``configs/fashion_mnist.py``, with
``augment=auto``): NLL and InfoNCE with hard labels; soft-target CE, STI and soft-distribution
InfoNCE with label smoothing 0.1 + MixUp 0.8 / CutMix 1.0, as in the paper's comparison. Each run
holds out part of the training split, fits one temperature on it at the end and reports the test
split at t = 1 and at the fitted t*.

Every run is the real trainer (``softnce.train.train_and_evaluate``) on a config built by the
caller's ``make_config(loss, seed)``, through the sweep runner (:mod:`softnce.experiments.sweep`,
one point per loss). Runs go seed by seed (all losses of seed 0, then of seed 1,
...), so a grid stopped early still holds complete, paired seeds. Running again with the same
``out`` continues it: runs that finished (recorded in ``results.json`` and with a final
``metrics.json``) are kept as they are, an interrupted run resumes from its checkpoint, and a
larger ``seeds`` adds seeds to a finished grid.

Outputs in ``out``: ``results.json`` (every run's ``metrics.json`` and wall time, rewritten after
each run), ``table.md`` (:func:`metrics_table` and :func:`paired_table`) and ``reliability.png``
(the test-set calibration bins of each loss summed over seeds, at t = 1; plus
``reliability_calibrated.png`` at the fitted temperature when the trainer wrote those sums).

Statistics over seeds ``s = 1..n``: mean and sample standard deviation (``ddof = 1``). The paired
comparison of a loss ``A`` against ``B`` uses the per-seed differences ``d_s = m_A(s) - m_B(s)`` of
a metric ``m`` (same seed: same initialisation, batch order and validation split), reported as
``mean(d) ± std(d)`` and the number of seeds where ``A`` is better (higher top-1, lower NLL / ECE).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from softnce import cli

LOSSES = ("nll", "infonce", "soft_target_cross_entropy", "soft_target_infonce", "soft_distribution_infonce")
REFERENCE_LOSS = "soft_target_infonce"
# (metrics.json key, column title, scale, decimals, higher is better)
METRICS = (
    ("top1", "top-1 (%)", 100, 2, True),
    ("nll", "NLL", 1, 3, False),
    ("ece", "ECE (%)", 100, 2, False),
    ("t_star", "t*", 1, 2, None),
    ("nll_calibrated", "NLL at t*", 1, 3, False),
    ("ece_calibrated", "ECE at t* (%)", 100, 2, False),
)


def targets_description(config) -> str:
    """How the run's training targets are made, from ``config.augment`` (and ``config.distill``)."""
    a = config.augment
    mixing = a.mixup_alpha > 0 or a.cutmix_alpha > 0
    if mixing:
        recipe = f"smoothing {a.label_smoothing:g} + MixUp/CutMix"
    else:
        recipe = f"smoothing {a.label_smoothing:g}" if a.label_smoothing > 0 else "hard labels"
    d = config.get("distill")
    if d is None or not (d.get("teacher_workdir") or d.get("teacher_params")):
        return recipe
    teacher = f"teacher at tau {d.tau:g}" + (" on MixUp/CutMix inputs" if mixing else "")
    return teacher if d.beta == 1 else f"{1 - d.beta:g} ({recipe}) + {d.beta:g} {teacher}"


def _values(runs: list[dict], key: str, scale: float) -> Optional[np.ndarray]:
    if not runs or any(key not in r for r in runs):
        return None
    return np.array([r[key] for r in runs], np.float64) * scale


def _mean_std(values: np.ndarray, digits: int, sign: bool = False) -> str:
    spread = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():{'+' if sign else ''}.{digits}f} ± {spread:.{digits}f}"


def metrics_table(results: dict) -> str:
    """Markdown: one row per loss, mean ± std over seeds of every metric the runs report."""
    present = [m for m in METRICS if any(_values(r["metrics"], m[0], 1) is not None for r in results.values())]
    lines = ["| loss | targets | seeds | " + " | ".join(m[1] for m in present) + " |",
             "|---|---|---|" + "---|" * len(present)]
    for loss, runs in results.items():
        cols = []
        for key, _, scale, digits, _ in present:
            values = _values(runs["metrics"], key, scale)
            cols.append("n/a" if values is None else _mean_std(values, digits))
        lines.append(f"| {loss} | {runs['targets']} | {len(runs['metrics'])} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def paired_differences(results: dict, reference: str, other: str, key: str) -> Optional[np.ndarray]:
    """``m_reference(s) - m_other(s)`` over the seeds both losses finished (``None`` if unreported)."""
    ref = {r["seed"]: r for r in results[reference]["metrics"]}
    oth = {r["seed"]: r for r in results[other]["metrics"]}
    seeds = sorted(set(ref) & set(oth))
    if not seeds or any(key not in ref[s] or key not in oth[s] for s in seeds):
        return None
    return np.array([ref[s][key] - oth[s][key] for s in seeds], np.float64)


def paired_table(results: dict, reference: str = REFERENCE_LOSS) -> str:
    """Markdown: ``reference`` minus each other loss, per metric: ``mean ± std (wins/seeds)``."""
    metrics = [m for m in METRICS if m[4] is not None]
    others = [loss for loss in results if loss != reference]
    if reference not in results or not others:
        return ""
    cols = [m for m in metrics if any(paired_differences(results, reference, o, m[0]) is not None for o in others)]
    titles = [f"Δ {m[1]}".replace("(%)", "(points)") for m in cols]  # differences of percentages
    lines = [f"| {reference} minus | " + " | ".join(titles) + " |",
             "|---|" + "---|" * len(cols)]
    for other in others:
        cells = []
        for key, _, scale, digits, higher_better in cols:
            d = paired_differences(results, reference, other, key)
            if d is None:
                cells.append("n/a")
                continue
            wins = int(np.sum(d > 0) if higher_better else np.sum(d < 0))
            cells.append(f"{_mean_std(d * scale, digits, sign=True)} ({wins}/{len(d)})")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pooled_reliability(results: dict, out: str) -> tuple[dict, dict]:
    """``({loss: test-set calibration-bin sums pooled over its runs}, {loss: the same at t*})`` from the
    runs' ``eval_sums.json`` / ``eval_sums_calibrated.json`` (run records with a ``workdir`` in ``out``)."""
    from softnce import metrics

    sums, calibrated_sums = {}, {}
    for loss, runs in results.items():
        for record in runs["metrics"]:
            for store, name in ((sums, "eval_sums.json"), (calibrated_sums, "eval_sums_calibrated.json")):
                path = os.path.join(out, record.get("workdir", f"{loss}_seed{record['seed']}"), name)
                if os.path.exists(path):
                    with open(path) as f:
                        store[loss] = metrics.add_sums(store.get(loss), json.load(f))
    return sums, calibrated_sums


def plot_reliability(results: dict, out: str, title: str, seeds: int) -> None:
    """``reliability.png`` (t = 1) and, when every loss has its sums at t*, ``reliability_calibrated.png``."""
    from softnce import metrics

    sums, calibrated_sums = pooled_reliability(results, out)
    if sums:
        metrics.plot_reliability_diagram(
            sums, os.path.join(out, "reliability.png"), title=f"{title}, t = 1, {seeds} seeds pooled")
    if calibrated_sums and len(calibrated_sums) == len(results):
        metrics.plot_reliability_diagram(
            calibrated_sums, os.path.join(out, "reliability_calibrated.png"),
            title=f"{title}, at the fitted t*, {seeds} seeds pooled")


def comparison_tables(results: dict, reference: str = REFERENCE_LOSS) -> str:
    """:func:`metrics_table` and :func:`paired_table` of ``results``."""
    return metrics_table(results) + "\n\n" + paired_table(results, reference)


def run_grid(
    make_config: Callable[[str, int], object],
    *,
    losses: Sequence[str] = LOSSES,
    seeds: int,
    out: str,
    title: str,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains every ``(seed, loss)`` with the real trainer; writes and returns the results.

    A sweep (:func:`softnce.experiments.sweep.run_sweep`) of one point per loss, with the test split
    evaluated; ``table.md`` holds :func:`metrics_table` and :func:`paired_table`.

    Args:
      make_config: ``(loss, seed) -> ml_collections.ConfigDict`` of one run.
      losses: registered loss names (table order).
      seeds: seeds ``0 .. seeds - 1`` per loss.
      out: output folder (one workdir per run, ``<loss>_seed<s>``, plus the tables and plots).
      title: the reliability plots' title.

    Returns:
      ``{'results': {loss: {'targets', 'metrics': [metrics.json + seed, wall_seconds]}},
      'wall_seconds' (this invocation), 'run_seconds' (the sum over all runs), 'tables'}``.
    """
    from softnce.experiments import sweep

    def table(result: dict) -> str:
        run_seconds, wall = result["run_seconds"], result["wall_seconds"]
        return (
            comparison_tables(result["results"]) + f"\n\n{len(losses)} losses x {seeds} seeds; sum of the run times "
            f"{sweep.format_seconds(run_seconds)} ({run_seconds:.0f} s); this invocation "
            f"{sweep.format_seconds(wall)} ({result['trained']} runs trained)."
        )

    result = sweep.run_sweep(make_config, {loss: {} for loss in losses}, seeds=range(seeds), out=out,
                             evaluate_test=True, describe=targets_description, table=table, title=title, log=log)
    results, wall, run_seconds = result["results"], result["wall_seconds"], result["run_seconds"]
    plot_reliability(results, out, title, seeds)
    tables = comparison_tables(results)
    log(tables)
    log(
        f"this invocation {sweep.format_seconds(wall)}, sum of the run times {sweep.format_seconds(run_seconds)}; "
        f"wrote {out}/table.md, results.json, reliability.png"
    )
    return {"results": results, "wall_seconds": wall, "run_seconds": run_seconds, "tables": tables}


# --------------------------------------------------------------------------------------------------
# The command line of a comparison on one config.
# --------------------------------------------------------------------------------------------------

COMPARISONS = {  # name -> (config module of softnce.configs, default steps (None: the config's), plot title)
    "digits": ("digits", 600, "digits test set"),
    "fashion_mnist": ("fashion_mnist", None, "Fashion-MNIST test set"),
}


def parse_args(name: str, argv=None) -> tuple[argparse.Namespace, dict]:
    """``(arguments, config overrides)`` of the comparison ``name``'s command line."""
    _, default_steps, _ = COMPARISONS[name]
    parser = cli.ArgumentParser(
        description=f"The losses on {name} over several seeds (softnce.experiments.comparison).",
        epilog=OVERRIDES_HELP,
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds per loss")
    parser.add_argument(
        "--steps", type=int, default=default_steps, help="training steps per run (default: %(default)s)"
    )
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated registered loss names")
    parser.add_argument(
        "--data_dir", default=None, help="tfds data directory (tfds datasets; default ~/tensorflow_datasets)"
    )
    parser.add_argument("--out", default=f"runs/{name}_comparison", help="output folder")
    overrides, rest = config_overrides(argv)
    return parser.parse_args(rest), overrides


def config_overrides(argv: Optional[Sequence[str]], name: str = "config") -> tuple[dict, list[str]]:
    """``({field: value}, the other arguments)`` of a command line: its ``--config.<field>=<value>`` (or
    ``--<name>.<field> <value>``) overrides, the values read as Python literals (else kept as strings), the
    convention of every command line of the package (``softnce.main``, ``softnce.evaluate``). A bad
    override is one line, ``softnce: error: ...``, and exit code 2."""
    from softnce import cli

    try:
        raw, rest = cli.split_overrides(list(sys.argv[1:] if argv is None else argv), name)
    except cli.UsageError as error:
        cli.fail(error)
    overrides = {}
    for field, text in raw.items():
        try:
            overrides[field] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[field] = text
    return overrides, rest


OVERRIDES_HELP = "Any --config.<field>=<value> overrides that field of every run, e.g. --config.data.batch_size=64."


def main(name: str, argv=None) -> dict:
    """Runs the comparison ``name`` (a key of :data:`COMPARISONS`) with the command line ``argv``."""
    import importlib

    from absl import logging

    args, overrides = parse_args(name, argv)
    logging.set_verbosity(logging.WARNING)
    module, _, title = COMPARISONS[name]
    config_module = importlib.import_module(f"softnce.configs.{module}")
    if name == "fashion_mnist":
        from softnce.data import fashion_mnist

        fashion_mnist.load_split(args.data_dir, "train")  # an unprepared data_dir fails here, before any training

    def make_config(loss: str, seed: int):
        config = config_module.get_config(f"loss={loss},seed={seed}" + (f",steps={args.steps}" if args.steps else ""))
        if name == "digits":  # one evaluation and one checkpoint, at the end
            config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = args.steps
        if "data_dir" in config.data:
            config.data.data_dir = args.data_dir
        config.update_from_flattened_dict(overrides)
        return config

    losses = [loss for loss in args.losses.split(",") if loss]
    return run_grid(make_config, losses=losses, seeds=args.seeds, out=args.out, title=title)


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of ``n`` paired differences ``d`` and its t-interval.

    ``mean +- t_{(1 + confidence) / 2, n - 1} * std(d, ddof=1) / sqrt(n)`` (scipy's Student t quantile);
    with one difference the interval is unknown (``half_width``, ``low``, ``high``: ``None``).

    Returns ``{'mean', 'half_width', 'low', 'high', 'n', 'confidence', 'differences'}`` (float64 maths).
    """
    from scipy import stats

    d = np.asarray(differences, np.float64)
    if d.ndim != 1 or not d.size:
        raise ValueError(f"paired_interval needs a non-empty [n] array of differences, got shape {d.shape}.")
    mean = float(d.mean())
    half = None
    if d.size > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return {"mean": mean, "half_width": half, "low": None if half is None else mean - half,
            "high": None if half is None else mean + half, "n": int(d.size), "confidence": confidence,
            "differences": d.tolist()}
