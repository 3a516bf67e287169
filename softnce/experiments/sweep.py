"""Hyperparameter sweeps through the real trainer: a config, a grid and a selection rule in; a table and figures out.

    from softnce.experiments import sweep
    result = sweep.run_sweep(
        make_config,                                   # (group, seed) -> ml_collections.ConfigDict
        {"nll": {"optim.base_lr": [5e-4, 2e-3, 8e-3]},  # group -> {dotted config field: values}
         "soft_target_infonce": {"optim.base_lr": [5e-4, 2e-3, 8e-3], "loss.temperature": [0.5, 1.0, 2.0]}},
        seeds=[0], out="runs/sweep", select=sweep.SelectionRule(), widen={"optim.base_lr": 4.0},
    )
    result["selected"]["nll"]["params"]                # {'optim.base_lr': ...}

A *group* (usually a loss) has its own grid: every combination of its fields' values is a *point*,
and every point runs once per seed through :func:`softnce.train.train_and_evaluate` on
``make_config(group, seed)`` with the point's fields set (``config.update_from_flattened_dict``).
Runs go seed by seed, so a sweep stopped early holds complete seeds.

Validation only, by default: ``evaluate_test=False`` sets ``config.evaluate_test = False``, so a
selection run never reads the test split, and each run reports the validation split's top-1, NLL,
ECE and fitted ``t*`` (the trainer's ``validation_metrics.json``); ``validation_every_steps`` also
records its learning curve (``history.json``). ``evaluate_test=True`` keeps the config's test
evaluation (the runs at chosen values; :mod:`softnce.experiments.comparison`).

Selection (:class:`SelectionRule`): per group, the point with the best mean over seeds of a
validation metric (top-1), ties (within ``tolerance``) broken by a second one (lower NLL), then by
grid order; a run that diverged (non-finite loss) ranks last. ``widen={field: factor}``: while a
group's chosen value of ``field`` lies at the edge of its values, the next value beyond that edge
(``edge * factor`` or ``edge / factor``) is added and run, at most ``max_widenings`` times.

Resumable: running again with the same ``out`` keeps every run recorded in ``results.json`` whose
final metrics file is there (or that diverged), resumes an interrupted run from its checkpoint and
trains only what is missing (new seeds, new values). Progress: one line per run with the elapsed
time and an ETA.

Outputs in ``out``: one workdir per run (``<group>[_<point>]_seed<s>``), ``results.json`` (every
run's record, rewritten after each run), ``summary.json`` (the rule, the final grids, the widening
steps, each group's chosen point and its validation metrics), ``table.md`` (every point's mean
validation metrics, the chosen one marked; or ``table(result)``'s Markdown), ``sweep.png``
(validation top-1 against the first swept field, one panel per group, one line per value of the
others) and ``curves.png`` (validation top-1 against steps of each group's chosen point) when the
runs recorded curves.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

Grid = Mapping[str, Mapping[str, Sequence[Any]]]
"""``{group: {dotted config field: values}}``; an empty field mapping is one point (the config as made)."""


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """The best point by the mean over seeds of validation ``metric``; ties by ``tie_break``, then grid order.

    Two means count as tied when they differ by at most ``tolerance``. A point with a diverged run
    (no validation metrics) ranks below every point without one.
    """

    metric: str = "top1"
    higher_is_better: bool = True
    tie_break: str = "nll"
    tie_break_higher_is_better: bool = False
    tolerance: float = 0.0

    def scores(self, validations: Sequence[Optional[dict]]) -> tuple[float, float]:
        """``(metric, tie_break)`` means over seeds, signed so that larger is better (``-inf`` if any run diverged)."""
        if not validations or any(v is None for v in validations):
            return -math.inf, -math.inf
        primary = float(np.mean([v[self.metric] for v in validations]))
        secondary = float(np.mean([v[self.tie_break] for v in validations]))
        return (primary if self.higher_is_better else -primary,
                secondary if self.tie_break_higher_is_better else -secondary)

    def choose(self, candidates: Sequence[tuple[Any, Sequence[Optional[dict]]]]) -> int:
        """The index of the best of ``[(point, [validation metrics of each seed]), ...]``."""
        if not candidates:
            raise ValueError("SelectionRule.choose needs at least one candidate.")
        scores = [self.scores(validations) for _, validations in candidates]
        best_primary = max(s[0] for s in scores)
        tied = [i for i, s in enumerate(scores) if s[0] >= best_primary - self.tolerance]
        return max(tied, key=lambda i: (scores[i][1], -i))


def points(fields: Mapping[str, Sequence[Any]]) -> list[dict]:
    """Every combination of ``fields``' values, the last field varying fastest (``[{}]`` for no fields)."""
    names = list(fields)
    return [dict(zip(names, values)) for values in itertools.product(*(fields[n] for n in names))]


def point_name(params: Mapping[str, Any]) -> str:
    """A short, file-safe name of a point: ``base_lr0.002_temperature0.5`` (the last part of each field)."""
    def value(v):
        return f"{v:g}" if isinstance(v, float) else str(v).replace(" ", "").replace("/", "-")

    return "_".join(f"{field.rsplit('.', 1)[-1]}{value(v)}" for field, v in params.items())


def run_name(group: str, params: Mapping[str, Any], seed: int) -> str:
    """The workdir of one run, relative to the sweep's ``out``: ``<group>[_<point>]_seed<s>``."""
    return "_".join(part for part in (group, point_name(params), f"seed{seed}") if part)


def _key(group: str, params: Mapping[str, Any], seed: int) -> tuple[str, str, int]:
    return group, json.dumps(dict(params), sort_keys=True), seed


def format_seconds(seconds: float) -> str:
    """``'12m05s'``."""
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"


def read_json(path: str) -> Optional[dict]:
    """The JSON in ``path``, or ``None`` when there is no such file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_json(path: str, obj) -> None:
    """Writes ``obj`` to ``path`` atomically (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _is_finished(record: dict, workdir: str, config) -> bool:
    """A recorded run whose final metrics files are in ``workdir`` (or that diverged)."""
    if record.get("diverged"):
        return True
    from softnce import train

    wanted = (["metrics.json"] if config.get("evaluate_test", True) else []) + (
        ["validation_metrics.json"] if train.tracks_validation(config) else [])
    return all((read_json(os.path.join(workdir, name)) or {}).get("step") == config.num_train_steps
               for name in wanted)


def beyond_edge(values: Sequence[Any], chosen: Any, factor: float) -> Optional[float]:
    """The value beyond the edge of ``values`` where ``chosen`` lies (``None`` if it is inside)."""
    numeric = sorted(float(v) for v in values)
    if len(numeric) < 2 or chosen not in (numeric[0], numeric[-1]):
        return None
    beyond = numeric[-1] * factor if chosen == numeric[-1] else numeric[0] / factor
    return float(f"{beyond:.12g}")


class _Runner:
    """Trains and records the runs of one sweep (one invocation of :func:`run_sweep`)."""

    def __init__(self, make_config, *, out, evaluate_test, validation_every_steps, describe, log):
        self.make_config, self.out, self.log = make_config, out, log
        self.evaluate_test, self.validation_every_steps, self.describe = evaluate_test, validation_every_steps, describe
        saved = read_json(os.path.join(out, "results.json")) or {"results": {}}
        for runs in saved["results"].values():
            for record in runs["metrics"]:
                _name_t_star(record)
        self.finished = {_key(group, r.get("params", {}), r["seed"]): r
                         for group, runs in saved["results"].items() for r in runs["metrics"]}
        self.results: dict = {}
        self.start, self.done, self.trained, self.total = time.time(), 0, 0, 0

    def config(self, group: str, params: Mapping[str, Any], seed: int):
        config = self.make_config(group, seed)
        config.update_from_flattened_dict(dict(params))
        config.evaluate_test = self.evaluate_test
        if self.validation_every_steps is not None:
            config.validation_every_steps = self.validation_every_steps
        return config

    def run(self, group: str, params: Mapping[str, Any], seed: int) -> dict:
        """The record of one run: trained now, resumed, or kept from an earlier invocation."""
        from softnce import train

        config = self.config(group, params, seed)
        name = run_name(group, params, seed)
        workdir = os.path.join(self.out, name)
        if group not in self.results:
            self.results[group] = {"targets": self.describe(config) if self.describe else "", "metrics": []}
        record = self.finished.get(_key(group, params, seed))
        if record is not None and _is_finished(record, workdir, config):
            status = "done before"
        else:
            run_start = time.time()
            try:
                metrics = train.train_and_evaluate(config, workdir)
                record = dict(metrics)
            except FloatingPointError as error:  # kept as a diverged run: it ranks last and is not rerun
                record = {"diverged": True, "error": str(error)[:300]}
            record.update(seed=seed, params=dict(params), workdir=name, wall_seconds=time.time() - run_start)
            self.trained += 1
            status = f"run {format_seconds(record['wall_seconds'])}"
        self.results[group]["metrics"].append(record)
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.trained * (self.total - self.done) if self.trained else None
        eta_text = format_seconds(eta) if eta is not None else "?"
        self.log(f"[{self.done}/{self.total}] seed {seed} {group} {point_name(params) or '-'}: "
                 f"{describe_record(record)} | {status}, elapsed {format_seconds(elapsed)}, ETA {eta_text}")
        write_json(os.path.join(self.out, "results.json"),
                   {"results": self.results, "wall_seconds": elapsed, "complete": False})
        return record


def _name_t_star(record: dict) -> None:
    """A record written before softnce 0.5 named the fitted temperature ``t*`` ``'temperature'``: ``'t_star'`` now."""
    for metrics in (record, record.get("validation") or {}):
        if "temperature" in metrics and "t_star" not in metrics:
            metrics["t_star"] = metrics.pop("temperature")


def describe_record(record: dict) -> str:
    """One run's metrics for a progress line: validation (``val``) and test, where reported."""
    if record.get("diverged"):
        return "diverged"
    parts = []
    validation = record.get("validation") or {}
    parts += [f"val {k} {validation[k]:.4f}" for k in ("top1", "nll") if k in validation]
    parts += [f"{k} {record[k]:.4f}" for k in ("top1", "nll", "ece", "t_star", "ece_calibrated") if k in record]
    return ", ".join(parts) or "no metrics"


def validations(results: dict, group: str, params: Mapping[str, Any], seeds: Sequence[int]) -> list[Optional[dict]]:
    """The validation metrics of ``group`` at ``params`` for each of ``seeds`` (``None``: diverged)."""
    by_key = {(json.dumps(r["params"], sort_keys=True), r["seed"]): r for r in results[group]["metrics"]}
    found = [by_key[(json.dumps(dict(params), sort_keys=True), s)] for s in seeds]
    return [None if r.get("diverged") else r.get("validation") for r in found]


def choose(results: dict, grids: Grid, seeds: Sequence[int], rule: SelectionRule) -> dict:
    """``{group: {'params', 'validation' (means over seeds), 'at_edge' {field: bool}}}`` by ``rule``."""
    chosen = {}
    for group, fields in grids.items():
        candidates = [(p, validations(results, group, p, seeds)) for p in points(fields)]
        params, vals = candidates[rule.choose(candidates)]
        means = None if any(v is None for v in vals) else {
            k: float(np.mean([v[k] for v in vals])) for k in ("top1", "nll", "ece", "t_star")}
        at_edge = {f: len(vs) > 1 and params[f] in (min(vs), max(vs)) for f, vs in fields.items()
                   if all(isinstance(v, (int, float)) for v in vs)}
        chosen[group] = {"params": params, "validation": means, "at_edge": at_edge}
    return chosen


def run_sweep(
    make_config: Callable[[str, int], Any],
    grid: Grid,
    *,
    seeds: Sequence[int] = (0,),
    out: str,
    select: SelectionRule = SelectionRule(),
    widen: Optional[Mapping[str, float]] = None,
    max_widenings: int = 3,
    evaluate_test: bool = False,
    validation_every_steps: Optional[int] = None,
    title: str = "",
    describe: Optional[Callable[[Any], str]] = None,
    table: Optional[Callable[[dict], str]] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs every point of ``grid`` for every seed, widens where the choice lies at an edge; writes and returns it all.

    Args:
      make_config: ``(group, seed) -> ml_collections.ConfigDict`` of one run, before the point's fields.
      grid: ``{group: {dotted field: values}}`` (:data:`Grid`).
      seeds: the seeds of every point; selection uses the mean over them.
      out: the output folder (see the module docstring).
      select: how a group's point is chosen (:class:`SelectionRule`).
      widen: ``{field: factor}`` of the fields to extend while the choice lies at their edge.
      evaluate_test: False (selection): the runs never read the test split. True: the config's test
        evaluation (``metrics.json``) as well.
      validation_every_steps: sets ``config.validation_every_steps`` (learning curves); None: the config's.
      describe: ``config -> str``, a group's description in ``results.json`` (``targets``).
      table: ``result -> Markdown`` for ``table.md``, in place of :func:`sweep_table`.

    Returns:
      ``{'results': {group: {'targets', 'metrics': [run records]}}, 'selected': {group: ...}
      (:func:`choose`), 'rule', 'grids' (after widening), 'widened' [{group, field, value}], 'seeds',
      'trained' (runs trained by this invocation), 'wall_seconds', 'run_seconds', 'table'}``; a run
      record is the trainer's result (test metrics if evaluated, ``validation``) with ``seed``,
      ``params``, ``workdir`` and ``wall_seconds``, or ``diverged`` and ``error``.
    """
    os.makedirs(out, exist_ok=True)
    seeds = [int(s) for s in seeds]
    grids = {group: {field: list(values) for field, values in fields.items()} for group, fields in grid.items()}
    runner = _Runner(make_config, out=out, evaluate_test=evaluate_test,
                     validation_every_steps=validation_every_steps, describe=describe, log=log)
    runner.total = len(seeds) * sum(len(points(f)) for f in grids.values())
    for seed in seeds:
        for group, fields in grids.items():
            for params in points(fields):
                runner.run(group, params, seed)
    widened = []
    for _ in range(max_widenings if widen else 0):
        added = []
        for group, choice in choose(runner.results, grids, seeds, select).items():
            for field, factor in widen.items():
                beyond = beyond_edge(grids[group].get(field, ()), choice["params"].get(field), factor)
                if beyond is not None:
                    grids[group][field].append(beyond)
                    added.append({"group": group, "field": field, "value": beyond})
        if not added:
            break
        widened += added
        new = [(g, p, s) for g in dict.fromkeys(a["group"] for a in added) for p in points(grids[g]) for s in seeds
               if not any(r["params"] == p and r["seed"] == s for r in runner.results[g]["metrics"])]
        runner.total += len(new)
        log("widening: " + ", ".join(f"{a['group']} {a['field']} += {a['value']:g}" for a in added)
            + f" ({len(new)} more runs)")
        for group, params, seed in new:
            runner.run(group, params, seed)
    for fields in grids.values():  # values in ascending order for the tables and figures
        for field, values in fields.items():
            if all(isinstance(v, (int, float)) for v in values):
                values.sort()
    result = {
        "results": runner.results,
        "selected": choose(runner.results, grids, seeds, select),
        "rule": dataclasses.asdict(select),
        "grids": grids,
        "widened": widened,
        "seeds": seeds,
        "trained": runner.trained,
        "wall_seconds": time.time() - runner.start,
        "run_seconds": sum(r["wall_seconds"] for runs in runner.results.values() for r in runs["metrics"]),
    }
    result["table"] = (table or sweep_table)(result)
    write_json(os.path.join(out, "results.json"), {
        "results": runner.results, "wall_seconds": result["wall_seconds"], "run_seconds": result["run_seconds"],
        "complete": True})
    write_json(os.path.join(out, "summary.json"), {
        "rule": result["rule"], "seeds": seeds, "grids": grids, "widened": widened,
        "selected": result["selected"], "evaluate_test": evaluate_test, "runs": runner.done,
        "trained": runner.trained, "wall_seconds": result["wall_seconds"], "run_seconds": result["run_seconds"]})
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(result["table"] + "\n")
    figures = [plot_sweep(result, os.path.join(out, "sweep.png"), title=title),
               plot_curves(selected_curves(result, out), os.path.join(out, "curves.png"),
                           title=f"{title}: validation top-1 at the chosen values".lstrip(": "))]
    shown = ", ".join(os.path.basename(p) for p in figures if p)
    log(f"sweep of {runner.done} runs ({runner.trained} trained now) in {format_seconds(result['wall_seconds'])}; "
        f"wrote {out}/results.json, summary.json, table.md" + (f", {shown}" if shown else ""))
    return result


# --------------------------------------------------------------------------------------------------
# Tables and figures.
# --------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float], scale: float, digits: int) -> str:
    values = np.asarray(values, np.float64) * scale
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def sweep_table(result: dict) -> str:
    """Markdown: every point of every group with its validation metrics (mean ± std over seeds), the choice marked."""
    fields = list(dict.fromkeys(f for fs in result["grids"].values() for f in fs))
    seeds = result["seeds"]
    lines = ["| group | " + " | ".join(fields) + " | val top-1 (%) | val NLL | val ECE (%) | val t* | chosen |",
             "|---|" + "---|" * len(fields) + "---|---|---|---|---|"]
    for group, grid in result["grids"].items():
        chosen = result["selected"][group]["params"]
        for params in points(grid):
            vals = validations(result["results"], group, params, seeds)
            cells = [f"{params[f]:g}" if isinstance(params.get(f), float) else str(params.get(f, "–")) for f in fields]
            if any(v is None for v in vals):
                diverged = any(r.get("diverged") for r in result["results"][group]["metrics"] if r["params"] == params)
                cells += ["diverged" if diverged else "n/a"] * 4
            else:
                cells += [_mean_std([v[k] for v in vals], s, d) for k, s, d in
                          (("top1", 100, 2), ("nll", 1, 4), ("ece", 100, 2), ("t_star", 1, 2))]
            lines.append(f"| {group} | " + " | ".join(cells) + f" | {'**yes**' if params == chosen else ''} |")
    rule = "; ".join(f"{k} = {v}" for k, v in result.get("rule", {}).items())
    footer = f"\n\n{len(seeds)} seed(s) {seeds}" + (f"; rule: {rule}" if rule else "")
    if result["widened"]:
        footer += "; widened: " + ", ".join(f"{w['group']} {w['field']} {w['value']:g}" for w in result["widened"])
    runs = sum(len(group["metrics"]) for group in result["results"].values())
    footer += f"; {runs} runs, {format_seconds(result['run_seconds'])} of training summed over them."
    return "\n".join(lines) + footer


def plot_sweep(result: dict, path: str, *, title: str = "") -> Optional[str]:
    """Validation top-1 against each group's first swept field (log scale for a wide range), one line per
    value of its other fields, the choice starred; ``None`` (nothing written) when no group sweeps a field."""
    swept = {g: [f for f, vs in fields.items() if len(vs) > 1] for g, fields in result["grids"].items()}
    groups = [g for g in swept if swept[g]]
    if not groups:
        return None
    from softnce import plotting

    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.4), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        grid, x_field = result["grids"][group], swept[group][0]
        others = {f: vs for f, vs in grid.items() if f != x_field}
        chosen = result["selected"][group]["params"]
        for rest in points(others):
            xs, ys = [], []
            for x in grid[x_field]:
                params = {f: (x if f == x_field else rest[f]) for f in grid}
                vals = validations(result["results"], group, params, result["seeds"])
                if all(v is not None for v in vals):
                    xs.append(x)
                    ys.append(100 * np.mean([v["top1"] for v in vals]))
            label = ", ".join(f"{f.rsplit('.', 1)[-1]} {v:g}" for f, v in rest.items()) or None
            ax.plot(xs, ys, "o-", label=label)
            if all(chosen[f] == v for f, v in rest.items()):
                vals = validations(result["results"], group, chosen, result["seeds"])
                if all(v is not None for v in vals):
                    ax.plot([chosen[x_field]], [100 * np.mean([v["top1"] for v in vals])], "k*", ms=12)
        numeric = [float(v) for v in grid[x_field]]
        if min(numeric) > 0 and max(numeric) / min(numeric) >= 3:
            ax.set_xscale("log")
        ax.set_title(group, fontsize=9)
        ax.set_xlabel(x_field)
        if others:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation top-1 (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_curve(workdir: str) -> Optional[list[dict]]:
    """The learning curve (``history.json``: ``[{step, top1, nll, ...}]``) of a run, or ``None``."""
    return read_json(os.path.join(workdir, "history.json"))


def mean_curve(curves: Sequence[Sequence[dict]], key: str = "top1") -> list[tuple[int, float]]:
    """``[(step, mean of key)]`` over the steps every curve has."""
    steps = sorted(set.intersection(*(set(p["step"] for p in c) for c in curves))) if curves else []
    by_step = [{p["step"]: p[key] for p in c} for c in curves]
    return [(s, float(np.mean([c[s] for c in by_step]))) for s in steps]


def selected_curves(result: dict, out: str) -> dict[str, list[tuple[int, float]]]:
    """``{group (its chosen point): mean validation top-1 curve over seeds}`` of the groups whose runs have curves."""
    curves = {}
    for group, choice in result["selected"].items():
        runs = [r for r in result["results"][group]["metrics"] if r["params"] == choice["params"]]
        found = [read_curve(os.path.join(out, r["workdir"])) for r in runs if not r.get("diverged")]
        if found and all(found):
            curves[f"{group} {point_name(choice['params'])}".strip()] = mean_curve(found)
    return curves


def plot_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str, *, title: str = "",
                panels: Optional[Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]] = None) -> Optional[str]:
    """Validation top-1 (%) against training steps: one line per entry of ``curves`` ``{label: [(step, top1)]}``;
    or ``panels`` ``{panel title: curves}`` side by side. ``None`` (nothing written) when there is no curve."""
    panels = dict(panels) if panels is not None else {title: curves}
    panels = {name: c for name, c in panels.items() if c}
    if not panels:
        return None
    from softnce import plotting

    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (name, group) in zip(axes[0], panels.items()):
        for label, curve in group.items():
            steps, top1 = zip(*curve)
            ax.plot(steps, 100 * np.asarray(top1), ".-", ms=4, label=label)
        ax.set_xlabel("training step")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation top-1 (%)")
    if len(panels) > 1 and title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
