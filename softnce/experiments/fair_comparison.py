"""A fair test of the paper's claim on Fashion-MNIST: each loss tuned on validation, where soft targets pay off.

    python -m softnce.data.fashion_mnist                                  # once: prepare the data
    python experiments/fair_comparison.py --out runs/fair_comparison       # the protocol (about 80 min, 2 cores)
    python experiments/fair_comparison.py --quick --out runs/fair_quick    # the whole pipeline in about 2 minutes
    python experiments/fair_comparison.py --setting long --out runs/fair_long  # the long regime (about 90 min)

The regime (:data:`SETTINGS` ``'full'``): the small CNN of ``configs/fashion_mnist.py`` trained on the
first 10,000 of the 54,000 training images left after the validation split, for 3,000 steps of batch
128 (38 epochs), with no input augmentation: there NLL overfits (its validation NLL rises from 0.35
at step 500 to 0.53) and soft-target CE with label smoothing 0.1 + MixUp 0.8 / CutMix 1.0 beats it on
validation (89.4% against 87.9% at today's learning rate, seed 0), while in today's protocol (all
54,000 images, 2,000 steps) it does not. Random crop (padding 4) + flip for every loss was tried and
lowers both (88.3% NLL, 87.0% soft CE at 4,000 steps on all the data): the small CNN underfits it.
The validation split is the same 6,000 held-out images in every run; the test split is the official 10,000.

Phases, each a sweep (:mod:`softnce.experiments.sweep`) in its own folder of ``--out``, all resumable
(running the same command again keeps every finished run):

1. ``regime/``: today's protocol for NLL and soft CE at today's learning rate, with validation
   curves; with the selection runs of the regime at today's learning rate, ``regime.png`` (validation
   top-1 against steps, both settings) and ``summary.json['regime']``.
2. ``selection/`` (selection seed 0, validation only: these runs never read the test split): for
   each loss the learning rate ``optim.base_lr`` from ``2e-3 * 4^k``, ``k = -2..2`` (1.25e-4 to
   3.2e-2, 16x on both sides of today's 2e-3), widened by 4x while the choice lies at an edge; for
   STI and InfoNCE also ``loss.temperature`` in {0.5, 1, 2}. Chosen by validation top-1, ties by
   validation NLL (:class:`~softnce.experiments.sweep.SelectionRule`). ``sweep.png``: validation
   top-1 against the learning rate.
3. ``final/``: every loss at its chosen values on seeds 1-5; each run reads the test split once,
   at its end (test top-1, NLL, ECE at the training temperature and at the validation-fitted t*).
4. ``report.md`` and ``summary.json`` in ``--out``: the regime, the choices, the test table (mean ±
   std over the seeds) and STI's paired differences against every loss (mean ± std of the per-seed
   differences, wins out of the seeds), raw and post-hoc calibrated.

The long regime (``--setting long``): all 54,000 training images, 10,000 steps, NLL, soft CE and STI,
4 learning rates each (widened by 2x at an edge), 5 seeds, and an equivalence test of STI - soft CE in
test top-1 with a margin of +-0.3 points declared before the runs (:func:`equivalence`): 2 + 12 + 15
runs, 274,000 steps, about 89 minutes.

Budget: 2 + 45 (+ widening) + 25 runs, 214,000 steps; at ~55 steps/s of the small CNN on 2 quiet
cores (validation every 250 steps included) and ~12 s of start-up and evaluation per run, about 79
minutes, plus about 67 s per run that widening adds (:func:`estimate_seconds`; the first line of the
output says it). Measured: BENCHMARKS.md, "Run times".
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from softnce.experiments import cli, comparison, sweep

TODAY_LR = 2e-3  # configs/base.py's optim.base_lr: the one learning rate of the earlier tables
TEMPERATURE_LOSSES = ("soft_target_infonce", "infonce")  # the losses with the reference's --t
HARD, SOFT = "nll", "soft_target_cross_entropy"  # the regime's pair


@dataclasses.dataclass(frozen=True)
class Setting:
    """One size of the protocol."""

    steps: int  # training steps of every regime run (selection and final)
    num_train_examples: Optional[int]  # the regime's training subset (None: all 54,000)
    random_crop_padding: int  # input augmentation of the regime (0 / False: none)
    random_flip: bool
    base_lrs: tuple[float, ...]  # the learning-rate grid (optim.base_lr)
    temperatures: tuple[float, ...]  # the t grid of TEMPERATURE_LOSSES
    widen_factor: float  # the next learning rate beyond an edge: edge * factor or edge / factor
    max_widenings: int
    selection_seed: int
    seeds: tuple[int, ...]  # the seeds of the final runs
    validation_every_steps: int  # the learning curves' resolution
    baseline_steps: int  # today's protocol (all data, no input augmentation) for the regime figure
    overrides: tuple[tuple[str, Any], ...] = ()  # further config fields of every run
    losses: tuple[str, ...] = comparison.LOSSES  # the losses compared (the command line's default)
    equivalence_margin: Optional[float] = None  # the declared margin m of test top-1 (a fraction), or None


SETTINGS = {
    "full": Setting(
        steps=3000, num_train_examples=10000, random_crop_padding=0, random_flip=False,
        base_lrs=tuple(TODAY_LR * 4.0**k for k in range(-2, 3)), temperatures=(0.5, 1.0, 2.0), widen_factor=4.0,
        max_widenings=2, selection_seed=0, seeds=(1, 2, 3, 4, 5), validation_every_steps=250, baseline_steps=2000,
    ),
    # The long regime: all 54,000 training images, 10,000 steps of batch 128 (24 epochs), NLL, soft CE and
    # STI (t = 1) each at the best of 4 learning rates on validation, then 5 seeds. The equivalence margin
    # was declared before any run: STI and soft CE are equivalent when the 90% t-interval of STI - soft CE
    # (test top-1, paired by seed) lies within +-0.3 points (two one-sided tests at 5%).
    "long": Setting(
        steps=10000, num_train_examples=None, random_crop_padding=0, random_flip=False,
        base_lrs=(5e-4, 1e-3, 2e-3, 4e-3), temperatures=(1.0,), widen_factor=2.0, max_widenings=2, selection_seed=0,
        seeds=(1, 2, 3, 4, 5), validation_every_steps=1000, baseline_steps=2000,
        losses=("nll", "soft_target_cross_entropy", "soft_target_infonce"), equivalence_margin=0.003,
    ),
    # The whole pipeline on a smaller grid, a smaller model and a few steps (a check, not a result).
    "quick": Setting(
        steps=40, num_train_examples=10000, random_crop_padding=0, random_flip=False, base_lrs=(TODAY_LR, 4 * TODAY_LR),
        temperatures=(1.0, 2.0), widen_factor=4.0, max_widenings=0, selection_seed=0, seeds=(1,),
        validation_every_steps=20, baseline_steps=20,
        overrides=(("model.channels", (8, 16)), ("model.hidden", 32), ("optim.warmup_steps", 5)),
    ),
}


def grid(setting: Setting, losses: Sequence[str]) -> sweep.Grid:
    """The selection grid: the learning rates for every loss, and the temperatures for :data:`TEMPERATURE_LOSSES`."""
    return {loss: {"optim.base_lr": list(setting.base_lrs),
                   **({"loss.temperature": list(setting.temperatures)} if loss in TEMPERATURE_LOSSES else {})}
            for loss in losses}


def estimate_seconds(setting: Setting, losses: Sequence[str], *, steps_per_second: float = 55.0,
                     overhead_seconds: float = 12.0) -> dict:
    """Runs, steps and the estimated time of the protocol before widening (from a measured step rate)."""
    selection = sum(len(sweep.points(fields)) for fields in grid(setting, losses).values())
    runs = {"regime": 2, "selection": selection, "final": len(losses) * len(setting.seeds)}
    steps = 2 * setting.baseline_steps + (selection + runs["final"]) * setting.steps
    seconds = steps / steps_per_second + sum(runs.values()) * overhead_seconds
    return {"runs": runs, "steps": steps, "seconds": seconds, "steps_per_second": steps_per_second,
            "widening_run_seconds": setting.steps / steps_per_second + overhead_seconds}


def make_config_fn(setting: Setting, *, data_dir: Optional[str], overrides: dict, regime: bool = True,
                   steps: Optional[int] = None) -> Callable[[str, int], Any]:
    """``(loss, seed) -> config``: ``configs/fashion_mnist.py`` in the regime (``regime=False``: today's
    protocol, all data and no input augmentation) with the setting's and the command line's overrides."""
    from softnce.configs import fashion_mnist

    def make_config(loss: str, seed: int):
        config = fashion_mnist.get_config(f"loss={loss},seed={seed},steps={steps or setting.steps}")
        config.data.data_dir = data_dir
        if regime:
            config.data.update(num_train_examples=setting.num_train_examples,
                               random_crop_padding=setting.random_crop_padding, random_flip=setting.random_flip)
        config.update_from_flattened_dict(dict(setting.overrides))
        config.update_from_flattened_dict(overrides)
        return config

    return make_config


def regime_summary(baseline: dict, selection: dict, out: str, setting: Setting) -> dict:
    """Validation top-1 of NLL and soft CE at today's learning rate in today's protocol and in the regime
    (final and best along the curve), their difference, and the same at each loss's chosen values."""
    def at(result, folder, loss, params):
        record = next(r for r in result["results"][loss]["metrics"] if r["params"] == params)
        curve = sweep.read_curve(os.path.join(out, folder, record["workdir"])) or []
        validation = record.get("validation") or {}
        return {"params": params, "final_top1": validation.get("top1"), "final_nll": validation.get("nll"),
                "best_top1": max((p["top1"] for p in curve), default=None),
                "curve": [(p["step"], p["top1"]) for p in curve]}

    today = {"optim.base_lr": TODAY_LR}
    settings = {
        "today's protocol": {loss: at(baseline, "regime", loss, {}) for loss in (HARD, SOFT)},
        "regime, today's lr": {loss: at(selection, "selection", loss, today) for loss in (HARD, SOFT)
                               if today["optim.base_lr"] in selection["grids"][loss]["optim.base_lr"]},
        "regime, chosen lr": {loss: at(selection, "selection", loss, selection["selected"][loss]["params"])
                              for loss in (HARD, SOFT)},
    }
    for numbers in settings.values():
        if len(numbers) == 2 and None not in (numbers[HARD]["final_top1"], numbers[SOFT]["final_top1"]):
            numbers["soft_minus_nll_top1"] = numbers[SOFT]["final_top1"] - numbers[HARD]["final_top1"]
    plot = {name: {f"{loss} ({sweep.point_name(n['params']) or 'lr ' + format(TODAY_LR, 'g')})": n["curve"]
                   for loss, n in numbers.items() if isinstance(n, dict) and n["curve"]}
            for name, numbers in settings.items()}
    figure = sweep.plot_curves({}, os.path.join(out, "regime.png"), panels=plot,
                               title="Fashion-MNIST validation top-1: NLL against soft-target CE")
    images = f"{setting.num_train_examples:,}" if setting.num_train_examples else "all 54,000"
    description = (f"{images} training images, {setting.steps:,} steps, "
                   f"crop padding {setting.random_crop_padding}, flip {setting.random_flip}")
    return {"regime": description, "baseline": f"all 54,000 images, {setting.baseline_steps:,} steps, no crop/flip",
            "figure": figure and os.path.basename(figure),
            "settings": {name: {loss: ({k: v for k, v in n.items() if k != "curve"} if isinstance(n, dict) else n)
                                for loss, n in numbers.items()} for name, numbers in settings.items()}}


def selection_grid_table(selection: dict, metric: str = "top1") -> str:
    """Validation ``metric`` (%) of every selection run as one Markdown table: a row per loss (and temperature),
    a column per learning rate, the chosen cell in bold."""
    rows, lrs = {}, set()  # {(loss, t): {lr: cell}}
    for loss, runs in selection["results"].items():
        chosen = selection["selected"][loss]["params"]
        for record in runs["metrics"]:
            lr, t = record["params"]["optim.base_lr"], record["params"].get("loss.temperature")
            value = (record.get("validation") or {}).get(metric)
            cell = "diverged" if value is None else f"{100 * value:.2f}"
            rows.setdefault((loss, t), {})[lr] = f"**{cell}**" if record["params"] == chosen else cell
            lrs.add(lr)
    lrs = sorted(lrs)
    lines = ["| loss | t | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for (loss, t), cells in rows.items():
        lines.append(f"| {loss} | {'–' if t is None else format(t, 'g')} | "
                     + " | ".join(cells.get(lr, "") for lr in lrs) + " |")
    return "\n".join(lines)


def paired_summary(results: dict, reference: str = comparison.REFERENCE_LOSS) -> dict:
    """``{other loss: {metric: {mean, std, wins, seeds}}}`` of ``reference`` minus ``other`` (per-seed differences)."""
    paired = {}
    for other in results:
        if other == reference or reference not in results:
            continue
        paired[other] = {}
        for key, _, _, _, higher_better in comparison.METRICS:
            d = comparison.paired_differences(results, reference, other, key) if higher_better is not None else None
            if d is not None:
                wins = int(np.sum(d > 0) if higher_better else np.sum(d < 0))
                paired[other][key] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                                      "wins": wins, "seeds": len(d)}
    return paired


def final_summary(results: dict) -> dict:
    """``{loss: {metric: {mean, std, values}}}`` of the final runs' test metrics."""
    out = {}
    for loss, runs in results.items():
        out[loss] = {}
        for key, *_ in comparison.METRICS:
            present = [r for r in runs["metrics"] if key in r]
            values = [r[key] for r in present]
            if values:
                out[loss][key] = {"mean": float(np.mean(values)),
                                  "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "values": values,
                                  "seeds": [r["seed"] for r in present]}
    return out


def run(setting: Setting, *, out: str, losses: Sequence[str] = comparison.LOSSES, data_dir: Optional[str] = None,
        overrides: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
    """Runs the four phases (module docstring) into ``out``; returns the summary (also ``summary.json``)."""
    if HARD not in losses or SOFT not in losses or comparison.REFERENCE_LOSS not in losses:
        raise ValueError(f"losses must include {HARD}, {SOFT} and {comparison.REFERENCE_LOSS}; got {list(losses)}.")
    overrides = dict(overrides or {})
    os.makedirs(out, exist_ok=True)
    estimate = estimate_seconds(setting, losses)
    log(f"fair comparison: {sum(estimate['runs'].values())} runs {estimate['runs']} before widening, "
        f"{estimate['steps']} steps; about {estimate['seconds'] / 60:.0f} min at {estimate['steps_per_second']:g} "
        f"steps/s (+{estimate['widening_run_seconds']:.0f} s per widening run)")
    start, seconds = time.time(), {}
    sweep_kwargs = dict(validation_every_steps=setting.validation_every_steps, log=log)

    log("phase 1/3: today's protocol for NLL and soft CE (validation only)")
    baseline = sweep.run_sweep(
        make_config_fn(setting, data_dir=data_dir, overrides=overrides, regime=False, steps=setting.baseline_steps),
        {HARD: {}, SOFT: {}}, seeds=[setting.selection_seed], out=os.path.join(out, "regime"),
        title="today's protocol", **sweep_kwargs)
    seconds["regime"] = time.time() - start

    log(f"phase 2/3: selection on validation, seed {setting.selection_seed} (the test split is not read)")
    selection = sweep.run_sweep(
        make_config_fn(setting, data_dir=data_dir, overrides=overrides), grid(setting, losses),
        seeds=[setting.selection_seed], out=os.path.join(out, "selection"), select=sweep.SelectionRule(),
        widen={"optim.base_lr": setting.widen_factor}, max_widenings=setting.max_widenings,
        title="selection: validation top-1", **sweep_kwargs)
    seconds["selection"] = time.time() - start - seconds["regime"]
    regime = regime_summary(baseline, selection, out, setting)

    log(f"phase 3/3: the chosen values on seeds {list(setting.seeds)}, the test split read once at the end of each run")
    chosen = {loss: {f: [v] for f, v in selection["selected"][loss]["params"].items()} for loss in losses}
    final = sweep.run_sweep(
        make_config_fn(setting, data_dir=data_dir, overrides=overrides), chosen, seeds=setting.seeds,
        out=os.path.join(out, "final"), evaluate_test=True, describe=comparison.targets_description,
        table=lambda result: comparison.comparison_tables(result["results"]), title="final", **sweep_kwargs)
    comparison.plot_reliability(final["results"], os.path.join(out, "final"), "Fashion-MNIST test set",
                                len(setting.seeds))
    seconds["final"] = time.time() - start - seconds["regime"] - seconds["selection"]
    seconds["total"] = time.time() - start
    run_seconds = {"regime": baseline["run_seconds"], "selection": selection["run_seconds"],
                   "final": final["run_seconds"]}
    run_seconds["total"] = sum(run_seconds.values())

    summary = {
        "setting": dataclasses.asdict(setting), "losses": list(losses), "overrides": overrides,
        "estimate": estimate, "regime": regime,
        "selection": {"rule": selection["rule"], "seed": setting.selection_seed, "grids": selection["grids"],
                      "widened": selection["widened"], "chosen": selection["selected"],
                      "points": {loss: [{"params": r["params"], "validation": r.get("validation"),
                                         "diverged": bool(r.get("diverged"))} for r in runs["metrics"]]
                                 for loss, runs in selection["results"].items()}},
        "test": final_summary(final["results"]), "paired": paired_summary(final["results"]),
        "equivalence": (None if setting.equivalence_margin is None
                        else equivalence(final["results"], setting.equivalence_margin)),
        "invocation_seconds": seconds, "run_seconds": run_seconds, "complete": True,
    }
    sweep.write_json(os.path.join(out, "summary.json"), summary)
    report = report_markdown(summary, selection_grid_table(selection) + "\n\n" + selection["table"],
                             comparison.comparison_tables(final["results"]))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    log(report)
    log(f"fair comparison done in {sweep.format_seconds(seconds['total'])}; wrote {out}/report.md, summary.json, "
        "regime.png, selection/sweep.png, final/table.md")
    return summary


def equivalence(results: dict, margin: float, a: str = comparison.REFERENCE_LOSS, b: str = SOFT,
                metric: str = "top1", confidence: float = 0.90) -> dict:
    """Whether ``a`` and ``b`` are equivalent in test ``metric`` within the declared ``margin``.

    Two one-sided tests at level ``(1 - confidence) / 2`` each: equivalent when the ``confidence``
    t-interval of the per-seed differences ``d_s = m_a(s) - m_b(s)``
    (:func:`softnce.experiments.comparison.paired_interval`) lies inside ``(-margin, +margin)``.
    Returns ``{'pair', 'metric', 'margin', 'interval', 'equivalent', 'verdict'}``.
    """
    differences = comparison.paired_differences(results, a, b, metric)
    if differences is None or len(differences) < 2:
        raise ValueError(f"equivalence needs at least 2 seeds of both {a} and {b} with test {metric}.")
    interval = comparison.paired_interval(differences, confidence=confidence)
    inside = -margin < interval["low"] and interval["high"] < margin
    verdict = (f"{a} - {b}: {100 * interval['mean']:+.2f} points, {int(100 * confidence)}% interval "
               f"[{100 * interval['low']:+.2f}, {100 * interval['high']:+.2f}], "
               + (f"inside the margin +-{100 * margin:.2f}: equivalent" if inside
                  else f"not inside the margin +-{100 * margin:.2f}: equivalence not shown"))
    return {"pair": f"{a} - {b}", "metric": metric, "margin": margin, "interval": interval, "equivalent": inside,
            "verdict": verdict}


def report_markdown(summary: dict, selection_table: str, final_tables: str) -> str:
    """The protocol's Markdown report: the regime, the selection table, the test tables."""
    regime = summary["regime"]
    lines = [f"# Fair comparison on Fashion-MNIST\n\nRegime: {regime['regime']}; baseline: {regime['baseline']}.\n",
             "## The regime: validation top-1 (%) of NLL and soft-target CE\n",
             "| setting | NLL | soft CE | soft CE minus NLL (points) |", "|---|---|---|---|"]
    for name, numbers in regime["settings"].items():
        cells = [numbers.get(loss, {}).get("final_top1") for loss in (HARD, SOFT)]
        cells.append(numbers.get("soft_minus_nll_top1"))
        shown = ["n/a" if c is None else f"{100 * c:{'+' if i == 2 else ''}.2f}" for i, c in enumerate(cells)]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    seconds, run_seconds = summary["invocation_seconds"], summary["run_seconds"]
    lines += ["", "## Selection (validation split, seed %d)\n" % summary["selection"]["seed"], selection_table, "",
              "## Test split at the chosen values (seeds %s)\n" % ", ".join(map(str, summary["setting"]["seeds"])),
              final_tables, ""]
    if summary.get("equivalence"):
        lines += ["## Equivalence (declared before the runs)\n", summary["equivalence"]["verdict"] + ".", ""]
    lines += ["Time of the training runs (summed over runs, kept when a sweep resumes): "
              + ", ".join(f"{k} {sweep.format_seconds(v)}" for k, v in run_seconds.items())
              + "; this invocation: " + ", ".join(f"{k} {sweep.format_seconds(v)}" for k, v in seconds.items())
              + ".\n"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    """The command line (``experiments/fair_comparison.py``; :func:`softnce.experiments.cli.parse_protocol`):
    ``--setting`` full (default), long (all data, 10,000 steps, the equivalence test) or quick."""
    def add_arguments(parser):
        parser.add_argument("--losses", default=None,
                            help="comma-separated registered loss names (default: the setting's)")

    protocol = cli.parse_protocol(
        argv, description="Every loss tuned on validation in a regime where soft targets pay off, then compared on "
                          "the test split (softnce.experiments.fair_comparison).",
        settings=SETTINGS, out="runs/fair_comparison", add_arguments=add_arguments, config_overrides=True,
        fashion_mnist=True)
    given = protocol.args.losses
    losses = [loss for loss in given.split(",") if loss] if given else list(protocol.setting.losses)
    return run(protocol.setting, out=protocol.out, losses=losses, data_dir=protocol.data_dir,
               overrides=protocol.overrides)


if __name__ == "__main__":
    main()
