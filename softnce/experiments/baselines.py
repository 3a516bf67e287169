"""Strong baselines and attribution in the fair comparison's regime, each loss chosen by validation top-1
and by validation NLL.

    python experiments/baselines.py --out runs/baselines                 # the protocol (after fair_comparison)
    python experiments/baselines.py --quick --out runs/baselines_quick   # the whole pipeline in 1-2 minutes

The regime is :mod:`softnce.experiments.fair_comparison`'s ``'full'`` setting (Fashion-MNIST, the small CNN,
10,000 training images, 3,000 steps of batch 128, no input augmentation); its results are the
comparison's committed summary (``--comparison``, default ``docs/fair_comparison_summary.json``). The
groups added (:data:`GROUPS`), each a registered loss with fixed config fields:

- ``nll_label_smoothing``: one-hot labels smoothed by 0.1, no mixing (soft-target CE on them): label
  smoothing alone.
- ``nll_weight_decay``: NLL with its decoupled weight decay tuned (from 0.05, the comparison's, up): a
  regularised hard-label baseline.
- ``mixed_inputs_sampled_ce``: MixUp/CutMix inputs with the recipe's targets, trained by NLL on a label drawn
  from each mixed target (``soft_distribution_cross_entropy``): input mixing without soft targets. Against
  soft-target CE it isolates the effect of training on the soft targets themselves.
- ``infonce``: hard InfoNCE with ``t`` from {0.5, 1, 2, 4} (the comparison's grid stopped at 2, its choice).

Protocol, every run through the resumable sweep runner, in ``--out``:

1. ``selection_lr/``: each group's ``optim.base_lr`` from the comparison's grid (1.25e-4 to 3.2e-2, 4x
   apart), widened by 4x at an edge; ``selection_second/``: at that learning rate, the group's second
   field (:data:`GROUPS`), widened at an edge. Selection seed 0, validation only.
2. Two choices per group from the same selection runs: by validation top-1 (ties by NLL; the comparison's
   rule) and by validation NLL (ties by top-1). The comparison's own losses get both choices from the
   selection points in its summary.
3. ``final/``: every group at its top-1 choice, seeds 1-5; ``final_by_nll/``: every group and every
   comparison loss whose NLL choice differs from its top-1 choice, seeds 1-5 (the test split read once at
   the end of each run). A choice that is the same point reuses the runs (or the comparison's).
4. ``report.md``, ``summary.json``: per rule the test metrics of every loss (mean +- std over seeds, raw and
   at the validation-fitted ``t*``), the paired differences of STI against each (mean and 95%
   t-interval), and the loss with the lowest test NLL, raw and at ``t*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

from softnce.experiments import cli, comparison, fair_comparison, sweep

# group -> (registered loss, fixed config fields, (the field tuned after the learning rate, its grid, widening factor))
GROUPS: dict[str, tuple[str, tuple[tuple[str, Any], ...], Optional[tuple[str, tuple[float, ...], float]]]] = {
    "nll_label_smoothing": ("soft_target_cross_entropy", (("augment.mixup_alpha", 0.0), ("augment.cutmix_alpha", 0.0)),
                            None),
    "nll_weight_decay": ("nll", (), ("optim.weight_decay", (0.05, 0.2, 0.8), 4.0)),
    "mixed_inputs_sampled_ce": ("soft_distribution_cross_entropy", (), None),
    "infonce": ("infonce", (), ("loss.temperature", (0.5, 1.0, 2.0, 4.0), 2.0)),
}
REFERENCE = comparison.REFERENCE_LOSS  # STI: the paired differences are STI minus each loss
BY_TOP1 = sweep.SelectionRule()
BY_NLL = sweep.SelectionRule(metric="nll", higher_is_better=False, tie_break="top1", tie_break_higher_is_better=True)
RULES = {"top1": BY_TOP1, "nll": BY_NLL}
DEFAULT_COMPARISON = os.path.join("docs", "fair_comparison_summary.json")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One size of the protocol: the regime (a :class:`softnce.experiments.fair_comparison.Setting`) and its groups."""

    regime: fair_comparison.Setting
    groups: tuple[str, ...] = tuple(GROUPS)


SETTINGS = {
    "full": Setting(regime=fair_comparison.SETTINGS["full"]),
    "quick": Setting(regime=fair_comparison.SETTINGS["quick"], groups=("nll_weight_decay", "mixed_inputs_sampled_ce")),
}


def make_config_fn(setting: Setting, *, data_dir: Optional[str], overrides: dict) -> Callable[[str, int], Any]:
    """``(group or loss, seed) -> config``: the regime's config of the group's loss with its fixed fields."""
    regime = fair_comparison.make_config_fn(setting.regime, data_dir=data_dir, overrides=overrides)

    def make_config(group: str, seed: int):
        loss, fixed, _ = GROUPS.get(group, (group, (), None))
        config = regime(loss, seed)
        config.update_from_flattened_dict(dict(fixed))
        return config

    return make_config


def choose(points: list[dict], rule: sweep.SelectionRule) -> dict:
    """The params of the best of ``points`` (``[{'params', 'validation'}]``, one seed each) under ``rule``."""
    index = rule.choose([(p["params"], [p.get("validation")]) for p in points])
    return dict(points[index]["params"])


def selection_points(*results: dict) -> dict[str, list[dict]]:
    """``{group: [{'params', 'validation'}]}`` of every run of the sweep ``results`` (their union per group)."""
    points: dict[str, list[dict]] = {}
    for result in results:
        for group, runs in result["results"].items():
            points.setdefault(group, []).extend(
                {"params": r["params"], "validation": None if r.get("diverged") else r.get("validation")}
                for r in runs["metrics"])
    return points


def select(setting: Setting, make_config, *, out: str, log) -> tuple[dict[str, list[dict]], float]:
    """The two selection stages (module docstring); returns every run's point per group and the seconds of
    training summed over the runs."""
    regime = setting.regime
    common = dict(seeds=[regime.selection_seed], select=BY_TOP1, validation_every_steps=regime.validation_every_steps,
                  log=log)
    lr_grid = {group: {"optim.base_lr": list(regime.base_lrs)} for group in setting.groups}
    if not setting.groups:
        return {}, 0.0
    first = sweep.run_sweep(make_config, lr_grid, out=os.path.join(out, "selection_lr"),
                            widen={"optim.base_lr": regime.widen_factor}, max_widenings=regime.max_widenings,
                            title="baselines: learning rate (validation top-1)", **common)
    second_grid, widen = {}, {}
    for group in setting.groups:
        second = GROUPS[group][2]
        if second is not None:
            field, values, factor = second
            second_grid[group] = {"optim.base_lr": [first["selected"][group]["params"]["optim.base_lr"]],
                                  field: list(values)}
            widen[field] = factor
    results = [first]
    if second_grid:
        results.append(sweep.run_sweep(make_config, second_grid, out=os.path.join(out, "selection_second"), widen=widen,
                                       max_widenings=regime.max_widenings,
                                       title="baselines: second field (validation top-1)", **common))
    return selection_points(*results), sum(result["run_seconds"] for result in results)


def choices(points: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """``{rule: {group: params}}`` of every group under :data:`RULES`."""
    return {name: {group: choose(group_points, rule) for group, group_points in points.items()}
            for name, rule in RULES.items()}


def run_final(make_config, chosen: dict[str, dict], seeds, *, out: str, title: str, log) -> dict:
    """``chosen`` ``{group: params}`` on ``seeds`` with the test split read at the end; the sweep result."""
    grid = {group: {field: [value] for field, value in params.items()} for group, params in chosen.items()}
    if not grid:
        return {"results": {}, "run_seconds": 0.0}
    return sweep.run_sweep(make_config, grid, seeds=seeds, out=out, evaluate_test=True,
                           describe=comparison.targets_description,
                           table=lambda result: comparison.comparison_tables(result["results"]), title=title, log=log)


def test_values(final_results: dict) -> dict[str, dict]:
    """``{group: {metric: {'values', 'seeds'}}}`` of a final sweep's results (as the comparison's summary has them)."""
    return fair_comparison.final_summary(final_results)


def as_results(tests: dict[str, dict]) -> dict:
    """Summary test values ``{loss: {metric: {'values', 'seeds'}}}`` as sweep results (for the paired tables)."""
    results = {}
    for loss, metrics in tests.items():
        records: dict[int, dict] = {}
        for metric, found in metrics.items():
            for seed, value in zip(found["seeds"], found["values"]):
                records.setdefault(seed, {"seed": seed})[metric] = value
        results[loss] = {"metrics": [records[s] for s in sorted(records)]}
    return results


def rule_table(tests: dict[str, dict]) -> list[dict]:
    """Per loss: test top-1, NLL, NLL at ``t*``, ECE, ECE at ``t*`` (mean, std) and STI minus it (95% t-interval)."""
    results, rows = as_results(tests), []
    for loss in tests:
        row = {"loss": loss}
        for metric in ("top1", "nll", "nll_calibrated", "ece", "ece_calibrated"):
            found = tests[loss].get(metric)
            row[metric] = None if found is None else {"mean": found["mean"], "std": found["std"]}
            if loss != REFERENCE and metric in ("top1", "nll", "nll_calibrated"):
                d = comparison.paired_differences(results, REFERENCE, loss, metric)
                row[f"sti_minus_{metric}"] = None if d is None or len(d) < 2 else comparison.paired_interval(d)
        rows.append(row)
    return rows


def calibration_finding(rows: list[dict], rule: str) -> str:
    """One sentence: the loss with the lowest test NLL under ``rule``, raw and at ``t*``."""
    def best(metric):
        ranked = sorted((r[metric]["mean"], r["loss"]) for r in rows if r.get(metric))
        return f"{ranked[0][1]} ({ranked[0][0]:.4f})" if ranked else "n/a"

    return (f"Chosen by validation {rule}: the lowest test NLL is {best('nll')} raw and {best('nll_calibrated')} "
            "at the validation-fitted t*.")


def choices_table(chosen: dict[str, dict[str, dict]]) -> str:
    """Markdown: each loss's chosen config fields under each rule (``{rule: {group: params}}``)."""
    def described(params: dict) -> str:
        return ", ".join(f"{field.split('.')[-1]} {value:g}" if isinstance(value, float) else f"{field} {value}"
                         for field, value in sorted(params.items())) or "–"

    rules = list(chosen)
    lines = ["| loss | " + " | ".join(f"chosen by validation {rule}" for rule in rules) + " |",
             "|---|" + "---|" * len(rules)]
    for group in chosen[rules[0]]:
        lines.append(f"| {group} | " + " | ".join(described(chosen[rule][group]) for rule in rules) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """Markdown of :func:`rule_table`."""
    def cell(v, scale, digits):
        return "n/a" if v is None else f"{scale * v['mean']:.{digits}f} ± {scale * v['std']:.{digits}f}"

    def diff(v, scale, digits):
        if v is None:
            return "–"
        return f"{scale * v['mean']:+.{digits}f} [{scale * v['low']:+.{digits}f}, {scale * v['high']:+.{digits}f}]"

    lines = ["| loss | top-1 (%) | NLL | NLL at t* | ECE (%) | ECE at t* (%) | STI minus: top-1 (points) | NLL | "
             "NLL at t* |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {cell(r['top1'], 100, 2)} | {cell(r['nll'], 1, 4)} | "
                     f"{cell(r['nll_calibrated'], 1, 4)} | {cell(r['ece'], 100, 2)} | "
                     f"{cell(r['ece_calibrated'], 100, 2)} | "
                     f"{diff(r.get('sti_minus_top1'), 100, 2)} | {diff(r.get('sti_minus_nll'), 1, 4)} | "
                     f"{diff(r.get('sti_minus_nll_calibrated'), 1, 4)} |")
    return "\n".join(lines)


def run(setting: Setting, *, out: str, comparison_summary: dict, data_dir: Optional[str] = None,
        overrides: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
    """Runs the protocol (module docstring) into ``out``; returns the summary (also ``summary.json``)."""
    overrides = dict(overrides or {})
    os.makedirs(out, exist_ok=True)
    start = time.time()
    make_config = make_config_fn(setting, data_dir=data_dir, overrides=overrides)
    seeds = setting.regime.seeds
    log(f"baselines: groups {', '.join(setting.groups)} in the fair comparison's regime; seeds {list(seeds)}")
    points, selection_seconds = select(setting, make_config, out=out, log=log)
    chosen = choices(points)
    compared = comparison_summary["selection"]["points"]  # the comparison's own losses
    for name, rule in RULES.items():  # a group named as a comparison loss (infonce) chooses from both grids
        chosen[name].update({loss: choose(points.get(loss, []) + loss_points, rule)
                             for loss, loss_points in compared.items()})

    by_top1 = run_final(make_config, {g: chosen["top1"][g] for g in setting.groups}, seeds,
                        out=os.path.join(out, "final"), title="final: chosen by validation top-1", log=log)
    differs = {g: p for g, p in chosen["nll"].items() if p != chosen["top1"][g]}
    by_nll = run_final(make_config, differs, seeds, out=os.path.join(out, "final_by_nll"),
                       title="final: chosen by validation NLL", log=log)
    earlier = comparison_summary["test"]
    tests = {"top1": {**earlier, **test_values(by_top1["results"])}}
    tests["nll"] = {loss: values for loss, values in tests["top1"].items() if loss not in differs}
    tests["nll"].update(test_values(by_nll["results"]))
    tables = {rule: rule_table(found) for rule, found in tests.items()}
    summary = {
        "setting": dataclasses.asdict(setting), "groups": {g: list(GROUPS[g][:2]) for g in setting.groups},
        "overrides": overrides, "chosen": chosen, "nll_choice_differs": sorted(differs),
        "selection": points, "test": tests, "tables": tables,
        "findings": {rule: calibration_finding(rows, rule) for rule, rows in tables.items()},
        "run_seconds": selection_seconds + sum(r.get("run_seconds", 0.0) for r in (by_top1, by_nll)),
        "invocation_seconds": time.time() - start, "complete": True,
    }
    sweep.write_json(os.path.join(out, "summary.json"), summary)
    lines = ["# Strong baselines and attribution (fair comparison regime)\n", "## Chosen values\n",
             choices_table(chosen), ""]
    for rule in RULES:
        lines += [f"## Chosen by validation {rule}\n", markdown_table(tables[rule]), "", summary["findings"][rule], ""]
    lines.append(f"Training runs: {sweep.format_seconds(summary['run_seconds'])} summed over the runs of this protocol "
                 "(kept when it resumes).")
    report = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    log(report)
    log(f"baselines done in {sweep.format_seconds(summary['invocation_seconds'])}; wrote {out}/report.md, summary.json")
    return summary


def _existing_summary(path: str) -> str:
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path} does not exist; run experiments/fair_comparison.py first.")
    return path


def main(argv=None) -> dict:
    """The command line (``experiments/baselines.py``; :func:`softnce.experiments.cli.parse_protocol`)."""
    def add_arguments(parser):
        parser.add_argument("--comparison", default=DEFAULT_COMPARISON, type=_existing_summary,
                            help="the fair comparison's summary.json (its selection points and test values)")

    protocol = cli.parse_protocol(
        argv, description="Strong baselines and attribution in the fair comparison's regime, each loss chosen by "
                          "validation top-1 and NLL (softnce.experiments.baselines).",
        settings=SETTINGS, out="runs/baselines", add_arguments=add_arguments, config_overrides=True,
        fashion_mnist=True)
    with open(protocol.args.comparison) as f:
        comparison_summary = json.load(f)
    return run(protocol.setting, out=protocol.out, comparison_summary=comparison_summary,
               data_dir=protocol.data_dir, overrides=protocol.overrides)


if __name__ == "__main__":
    main()
