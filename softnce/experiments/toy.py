"""The toy experiment: how well does each loss recover a known posterior from annotator votes?

This design is the project's own (the paper's toy example is not public). Data: the 2-D, 3-class
Gaussian problem of :mod:`softnce.data.toy` with a balanced and an imbalanced (0.6/0.3/0.1) prior.
Every loss trains the MLP of ``configs/toy.py`` with the project's train step
(:func:`softnce.steps.train_step`, ``axis_name=None``), optimiser and registered loss:

* hard-label losses (``nll``, ``infonce``) train on one annotator's vote per example;
* soft-target losses (``soft_target_cross_entropy``, ``soft_target_infonce``,
  ``soft_distribution_infonce``, which draws ``y ~ Categorical(a)`` every step) train on the vote
  histogram of ``m`` annotators, ``m`` in {1, 3, 10} or ``inf`` (the true posterior);
* on the imbalanced prior, ``soft_target_infonce`` also runs with a uniform noise distribution
  (no prior correction), ``soft_target_infonce_uniform``.

Each seed draws its own data, initialisation and batch order. All seeds (and all ``m``) of one loss
train in one ``jax.jit(jax.vmap(...))`` call over a ``lax.scan`` of steps, and the data are
arguments, so each loss compiles once and is reused for both priors and every ``m``.

Metrics on the test split (``p_true`` known): ``kl`` = mean ``KL(p_true(.|x) || softmax(z(x)/t))``
at the training temperature ``t = 1``; ``kl_calibrated`` after fitting one temperature per model
on the validation NLL (hard labels): with ``beta = 1/t`` the NLL ``mean_i [logsumexp(beta z_i) -
beta z_i[y_i]]`` is convex in ``beta``, so scipy's bounded Brent search on ``beta in [1e-3, 50]``
finds its minimum; ``top1``, ``nll``, ``ece`` (and ``*_calibrated``) from
:mod:`softnce.metrics` on labels drawn from ``p_true``; ``expected_top1`` = ``mean_x
p_true(argmax z(x) | x)``; references: the Bayes classifier's accuracy and NLL, and the KL of the
constant predictor ``p(y) = pi``.

Run: ``make demo`` or ``python experiments/toy_experiment.py [--setting full|quick|tiny] [--out DIR]``. Writes
``metrics.json``, ``summary.md``, ``posteriors_<prior>.png``, ``kl_vs_m.png`` and
``reliability_<prior>.png`` to ``runs/toy-<timestamp>/``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from scipy.special import log_softmax

from softnce import assembly, metrics, plotting, train
from softnce.configs import toy as toy_config
from softnce.data import toy
from softnce.experiments import cli, vmapped

# --------------------------------------------------------------------------------------------------
# What runs.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of the results: a registered ``loss`` with a noise distribution, on hard or soft labels."""

    name: str
    loss: str
    noise: str = "class_prior"
    hard_labels: bool = False
    priors: tuple[str, ...] = tuple(toy.PRIORS)


METHODS = (
    Method("nll", "nll", hard_labels=True),
    Method("infonce", "infonce", hard_labels=True),
    Method("soft_target_cross_entropy", "soft_target_cross_entropy"),
    Method("soft_target_infonce", "soft_target_infonce"),
    Method("soft_distribution_infonce", "soft_distribution_infonce"),
    Method("soft_target_infonce_uniform", "soft_target_infonce", noise="uniform", priors=("imbalanced",)),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The grid. ``None`` sizes and steps come from ``configs/toy.py``."""

    seeds: int = 5
    annotators: tuple = (1, 3, 10, math.inf)
    priors: tuple[str, ...] = tuple(toy.PRIORS)
    methods: tuple[str, ...] = tuple(m.name for m in METHODS)
    steps: Optional[int] = None
    num_train: Optional[int] = None
    num_val: Optional[int] = None
    num_test: Optional[int] = None
    grid_size: int = 81
    grid_limit: float = 3.0


FULL = Settings()
# Every method and both priors with fewer seeds, m and steps (about a third of the full run time).
QUICK = Settings(seeds=2, annotators=(1, math.inf), steps=300, num_train=1000, num_val=1000, num_test=2000,
                 grid_size=41)
# The smallest run that exercises every step (the notebook under the test suite).
TINY = Settings(seeds=1, annotators=(1, math.inf), priors=("imbalanced",), methods=("nll", "soft_target_infonce"),
                steps=60, num_train=500, num_val=500, num_test=1000, grid_size=21)
SETTINGS = {"full": FULL, "quick": QUICK, "tiny": TINY}


def method_by_name(name: str) -> Method:
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown toy method {name!r}; valid: {', '.join(m.name for m in METHODS)}.")


def make_config(settings: Settings, method: Method, prior: str, m=10, seed: int = 0):
    """``configs/toy.py`` for one run, with the sizes of ``settings``."""
    arg = (f"prior={prior},annotators={toy.annotators_name(m)},loss={method.loss},"
           f"noise={method.noise},seed={seed}")
    config = toy_config.get_config(arg + (f",steps={settings.steps}" if settings.steps else ""))
    for field in ("num_train", "num_val", "num_test"):
        if getattr(settings, field):
            config.data[field] = getattr(settings, field)
    return config


# --------------------------------------------------------------------------------------------------
# Training: every run of one method, vmapped, one compile per loss.
# --------------------------------------------------------------------------------------------------


def make_train_fn(config) -> Callable:
    """:func:`softnce.experiments.vmapped.make_train_fn` for the toy's MLP and data."""
    return vmapped.make_train_fn(config, toy.NUM_CLASSES, (toy.MEANS.shape[1],))


def make_apply_fn(config) -> Callable:
    """:func:`softnce.experiments.vmapped.make_apply_fn` for the toy's MLP."""
    return vmapped.make_apply_fn(config, toy.NUM_CLASSES)


def stack_runs(config, method: Method, datas: Sequence[toy.ToyData], annotators: Sequence) -> tuple[dict, np.ndarray]:
    """Training arrays ``[R, ...]`` and ``log(eta)`` ``[R, K]`` for runs ``(m, seed)`` (``m`` major).

    Each run's dataset is :func:`softnce.data.toy.to_array_dataset` (what ``softnce.main`` trains
    on) and its ``log(eta)`` is :func:`softnce.assembly.log_noise_probs` (zeros where it is ``None``).
    """
    data = {"inputs": [], "label": [], "targets": []}
    log_etas = []
    for m in annotators:
        for d in datas:
            dataset = toy.to_array_dataset(d, m)
            data["inputs"].append(dataset.train_inputs)
            data["label"].append(dataset.train_labels)
            data["targets"].append(dataset.train_targets)
            log_eta = assembly.log_noise_probs(config, dataset)
            log_etas.append(np.zeros(toy.NUM_CLASSES, np.float32) if log_eta is None else np.asarray(log_eta))
    return {k: np.stack(v) for k, v in data.items()}, np.stack(log_etas)


# --------------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------------


def mean_kl(log_p: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> float:
    """``mean_i KL(p_i || softmax(z_i / t))`` in float64 from ``log p`` ``[n, K]`` and logits ``[n, K]``."""
    log_q = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


_metric_sums = jax.jit(lambda z, y, t: metrics.metric_sums(z, y, temperature=t))


def run_metrics(data: toy.ToyData, val_logits: np.ndarray, test_logits: np.ndarray) -> tuple[dict, dict, dict]:
    """Metrics of one trained model; returns ``(metrics, sums at t=1, sums at the fitted t)``."""
    t_fit = metrics.fit_temperature(val_logits, data.val.labels)
    log_p = data.test.log_posterior
    sums = {t: jax.device_get(_metric_sums(test_logits, data.test.labels, t)) for t in (1.0, t_fit)}
    raw, cal = metrics.summarize(sums[1.0]), metrics.summarize(sums[t_fit])
    found = {
        "kl": mean_kl(log_p, test_logits),
        "kl_calibrated": mean_kl(log_p, test_logits, t_fit),
        "t_star": t_fit,
        "top1": raw["top1"],
        "expected_top1": float(np.mean(np.exp(np.take_along_axis(log_p, test_logits.argmax(1)[:, None], 1)))),
        "nll": raw["nll"],
        "ece": raw["ece"],
        "nll_calibrated": cal["nll"],
        "ece_calibrated": cal["ece"],
    }
    return found, sums[1.0], sums[t_fit]


def reference_metrics(data: toy.ToyData) -> dict:
    """The Bayes classifier's accuracy (expected and on the test labels) and NLL; KL of ``p(y) = pi``."""
    log_p = data.test.log_posterior
    log_pi = np.log(toy.class_prior(data.prior))
    return {
        "bayes_expected_top1": toy.bayes_accuracy(log_p),
        "bayes_top1": toy.bayes_accuracy(log_p, data.test.labels),
        "bayes_nll": float(-np.mean(np.take_along_axis(log_p, data.test.labels[:, None], 1))),
        "prior_predictor_kl": float(np.mean(np.sum(np.exp(log_p) * (log_p - log_pi), axis=1))),
    }


def mean_std(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per ``(prior, method, m)``."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["prior"], row["method"], row["m"]), []).append(row)
    out = []
    for (prior, method, m), group in groups.items():
        names = [k for k in group[0] if k not in ("prior", "method", "m", "seed")]
        out.append({"prior": prior, "method": method, "m": m, "seeds": len(group),
                    **{k: mean_std([g[k] for g in group]) for k in names}})
    return out


# --------------------------------------------------------------------------------------------------
# Figures and tables.
# --------------------------------------------------------------------------------------------------


def input_grid(settings: Settings) -> np.ndarray:
    """The ``grid_size**2`` points ``[G, 2]`` of the square ``[-limit, limit]^2``, row-major from the top."""
    axis = np.linspace(-settings.grid_limit, settings.grid_limit, settings.grid_size)
    xx, yy = np.meshgrid(axis, axis[::-1])
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)


def plot_posteriors(path: str, prior: str, true_probs: np.ndarray, learned: dict, settings: Settings) -> str:
    """RGB images of ``p(y|x)`` (red, green, blue = classes 0, 1, 2): the truth, then one panel per
    method, one row per ``m`` (hard-label methods do not depend on ``m``)."""
    plt = plotting.pyplot()
    side = settings.grid_size
    rows, methods = list(learned), list(next(iter(learned.values())))
    fig, axes = plt.subplots(len(rows), len(methods) + 1, figsize=(1.9 * (len(methods) + 1), 2.0 * len(rows)),
                             squeeze=False)
    extent = [-settings.grid_limit, settings.grid_limit] * 2
    for r, m in enumerate(rows):
        panels = {"true p(y|x)": true_probs, **learned[m]}
        for c, (name, probs) in enumerate(panels.items()):
            ax = axes[r][c]
            ax.imshow(probs.reshape(side, side, 3), extent=extent, interpolation="nearest")
            hard = c > 0 and method_by_name(name).hard_labels
            label = name.replace("soft_target_", "ST-").replace("soft_distribution_", "SD-")
            label = label.replace("cross_entropy", "CE")
            ax.set_title(label + ("\n(1 vote)" if hard else f"\nm={m}" if c else ""), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"toy posterior p(y|x), {prior} prior (RGB = classes 0/1/2), seed 0", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_kl_vs_m(path: str, summary: list[dict], settings: Settings) -> str:
    """Mean +- std over seeds of the KL to the truth against ``m`` (raw and after temperature scaling)."""
    plt = plotting.pyplot()
    ms = [toy.annotators_name(m) for m in settings.annotators]
    fig, axes = plt.subplots(2, len(settings.priors), figsize=(5.2 * len(settings.priors), 7), squeeze=False)
    for col, prior in enumerate(settings.priors):
        for row, key in enumerate(("kl", "kl_calibrated")):
            ax = axes[row][col]
            for i, method in enumerate(settings.methods):
                color = f"C{i}"
                entries = {s["m"]: s[key] for s in summary if s["prior"] == prior and s["method"] == method}
                if not entries:
                    continue
                if method_by_name(method).hard_labels:
                    value = entries["hard"]
                    y, err = [value["mean"]] * len(ms), [value["std"]] * len(ms)
                    ax.errorbar(range(len(ms)), y, yerr=err, ls="--", marker="", capsize=2, color=color,
                                label=f"{method} (1 vote)")
                else:
                    y = [entries[m]["mean"] for m in ms]
                    err = [entries[m]["std"] for m in ms]
                    ax.errorbar(range(len(ms)), y, yerr=err, marker="o", capsize=2, color=color, label=method)
            ax.set_xticks(range(len(ms)), ms)
            ax.set_yscale("log")
            ax.set_xlabel("annotators m")
            ax.set_ylabel("KL(p_true || model)" + (" after T-scaling" if row else ""))
            ax.set_title(f"{prior} prior", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def summary_markdown(summary: list[dict], references: dict, settings: Settings, seconds: float) -> str:
    """One table per prior: KL, KL after temperature scaling, fitted t, accuracy, NLL, ECE."""
    lines = [
        "# Toy experiment: recovering p(y|x) from annotator votes",
        "",
        f"{settings.seeds} seeds (mean ± std); test metrics; KL = mean KL(p_true(.|x) || softmax(z(x)/t)); "
        "'calibrated' = after fitting one temperature on the validation NLL; hard-label methods train on one vote "
        f"(m does not apply). Run time {seconds:.0f} s.",
    ]
    ms = [toy.annotators_name(m) for m in settings.annotators]
    lines += ["", "## KL to the true posterior against m (raw / after temperature scaling)", "",
              "| prior | method | " + " | ".join(f"m = {m}" for m in ms) + " |", "|---|---|" + "---|" * len(ms)]
    for prior in settings.priors:
        for method in settings.methods:
            entries = {s["m"]: s for s in summary if s["prior"] == prior and s["method"] == method}
            if entries:
                cells = [entries.get("hard", entries.get(m)) for m in ms]
                lines.append(f"| {prior} | {method} | " + " | ".join(
                    f"{c['kl']['mean']:.4f} / {c['kl_calibrated']['mean']:.4f}" for c in cells) + " |")
    for prior in settings.priors:
        ref = references[prior]
        lines += [
            "",
            f"## {prior} prior ({', '.join(f'{p:.2f}' for p in toy.PRIORS[prior])})",
            "",
            f"Bayes classifier: accuracy {_cell(ref['bayes_top1'], 3)} on the test labels "
            f"(expected {_cell(ref['bayes_expected_top1'], 3)}), NLL {_cell(ref['bayes_nll'], 3)}; "
            f"constant predictor p(y) = prior: KL {_cell(ref['prior_predictor_kl'], 3)}.",
            "",
            "| method | m | KL | KL calibrated | t | top-1 | NLL | ECE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in summary:
            if s["prior"] != prior:
                continue
            lines.append(
                f"| {s['method']} | {s['m'] if s['m'] != 'hard' else '1 vote'} | {_cell(s['kl'])} | "
                f"{_cell(s['kl_calibrated'])} | "
                f"{_cell(s['t_star'], 2)} | {_cell(s['top1'], 3)} | {_cell(s['nll'], 3)} | {_cell(s['ece'], 3)} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The whole experiment.
# --------------------------------------------------------------------------------------------------


def make_data(settings: Settings, prior: str, config) -> list[toy.ToyData]:
    """One draw of the toy problem per seed (``seed`` = 0 .. seeds - 1)."""
    max_m = max([toy.MAX_ANNOTATORS] + [int(m) for m in settings.annotators if not math.isinf(m)])
    return [
        toy.make_toy_data(prior, num_train=config.data.num_train, num_val=config.data.num_val,
                          num_test=config.data.num_test, seed=seed, max_annotators=max_m)
        for seed in range(settings.seeds)
    ]


def run_experiment(settings: Settings = FULL, out_dir: Optional[str] = None,
                   log: Callable[[str], None] = print) -> dict:
    """Trains and evaluates the whole grid; writes figures, ``metrics.json`` and ``summary.md`` to
    ``out_dir`` (default ``runs/toy-<timestamp>``) and returns the metrics dict (with ``out_dir``)."""
    t0 = time.time()
    annotators = tuple(toy.parse_annotators(m) for m in settings.annotators)
    settings = dataclasses.replace(settings, annotators=annotators)
    methods = [method_by_name(name) for name in settings.methods]
    if settings.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {settings.seeds}.")
    out_dir = out_dir or os.path.join("runs", time.strftime("toy-%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)

    base = make_config(settings, methods[0], settings.priors[0])
    num_steps = base.num_train_steps
    jobs = [(method, prior) for prior in settings.priors for method in methods if prior in method.priors]
    runs_of = {m.name: settings.seeds * (1 if m.hard_labels else len(annotators)) for m in methods}
    total = sum(runs_of[method.name] * num_steps for method, _ in jobs)
    log(f"toy experiment: {len(jobs)} jobs, {sum(runs_of[m.name] for m, _ in jobs)} runs x {num_steps} steps "
        f"(progress counts run-steps) -> {out_dir}")
    progress = train.Progress(total, 0)
    done = 0
    train_fns, apply_fn = {}, make_apply_fn(base)
    grid = input_grid(settings)
    rows, references, learned, reliability = [], {}, {}, {}
    for prior in settings.priors:
        datas = make_data(settings, prior, base)
        references[prior] = {k: mean_std([reference_metrics(d)[k] for d in datas]) for k in reference_metrics(datas[0])}
        learned[prior] = {toy.annotators_name(m): {} for m in annotators}
        reliability[prior] = {}
        for method in [m for m, p in jobs if p == prior]:
            config = make_config(settings, method, prior)
            run_ms = (annotators[0],) if method.hard_labels else annotators
            data, log_etas = stack_runs(config, method, datas, run_ms)
            if method.loss not in train_fns:
                train_fns[method.loss] = make_train_fn(config)
            seeds = np.tile(np.arange(settings.seeds), len(run_ms))
            rngs = jax.vmap(jax.random.PRNGKey)(seeds)
            rows_ = vmapped.stacked_batch_rows(seeds, config.data.num_train, config.data.batch_size, num_steps)
            params, loss_curves = train_fns[method.loss](rngs, data, rows_, log_etas)
            inputs = [np.concatenate([d.val.inputs, d.test.inputs, grid]) for d in datas] * len(run_ms)
            logits = np.asarray(apply_fn(params, np.stack(inputs)), np.float64)
            done += len(rngs) * num_steps
            final_loss = float(np.mean(np.asarray(loss_curves)[:, -max(1, num_steps // 10):]))
            log(f"[{prior}] {method.name:<28} " + progress.line(done, {"final loss": final_loss}))
            pooled = None
            for r in range(len(rngs)):
                m, seed = run_ms[r // settings.seeds], r % settings.seeds
                d = datas[seed]
                nv, nt = len(d.val.labels), len(d.test.labels)
                found, sums, _ = run_metrics(d, logits[r, :nv], logits[r, nv : nv + nt])
                m_name = "hard" if method.hard_labels else toy.annotators_name(m)
                rows.append({"prior": prior, "method": method.name, "m": m_name, "seed": seed, **found})
                if seed == 0:
                    probs = np.exp(log_softmax(logits[r, nv + nt :], axis=1))
                    for name in learned[prior] if method.hard_labels else [m_name]:
                        learned[prior][name][method.name] = probs
                if method.hard_labels or m == annotators[-1]:
                    pooled = metrics.add_sums(pooled, sums)
            reliability[prior][method.name] = pooled

    summary = aggregate(rows)
    files = {"metrics": "metrics.json", "summary": "summary.md", "kl_vs_m": "kl_vs_m.png"}
    for prior in settings.priors:
        true_probs = toy.true_posterior(grid, prior)
        files[f"posteriors_{prior}"] = os.path.basename(
            plot_posteriors(os.path.join(out_dir, f"posteriors_{prior}.png"), prior, true_probs, learned[prior],
                            settings))
        files[f"reliability_{prior}"] = os.path.basename(metrics.plot_reliability_diagram(
            reliability[prior], os.path.join(out_dir, f"reliability_{prior}.png"),
            title=f"toy, {prior} prior, t = 1, test set pooled over seeds "
                  f"(soft targets: m = {toy.annotators_name(annotators[-1])})"))
    plot_kl_vs_m(os.path.join(out_dir, files["kl_vs_m"]), summary, settings)
    result = {
        "settings": {**dataclasses.asdict(settings), "annotators": [toy.annotators_name(m) for m in annotators],
                     "steps": num_steps, "num_train": base.data.num_train, "num_val": base.data.num_val,
                     "num_test": base.data.num_test, "batch_size": base.data.batch_size},
        "references": references, "summary": summary, "runs": rows, "files": files,
        "seconds": time.time() - t0, "out_dir": out_dir,
    }
    cli.write_results(out_dir, result, summary_markdown(summary, references, settings, result["seconds"]), log)
    return result


def main(argv=None) -> None:
    protocol = cli.parse_protocol(
        argv, description=__doc__.split("\n")[0], settings=SETTINGS,
        out_help="run folder (default runs/toy-<timestamp>)",
        setting_fields={"seeds": dict(type=int, help="number of seeds (default: the setting's)")},
    )
    run_experiment(protocol.setting, protocol.out)


if __name__ == "__main__":
    main()
