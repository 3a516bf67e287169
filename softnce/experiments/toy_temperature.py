"""Why STI's fitted temperature grows with the number of annotators m: predicted and measured on the toy.

On the toy problem (:mod:`softnce.data.toy`) soft target InfoNCE learns logits that are too sharp,
and the temperature ``t*`` fitted on the validation NLL grows with the number of annotators ``m``
whose vote histogram is the target. ``docs/method.md`` ("The toy finding") derives what STI's
population optimum is; this script computes that optimum for the toy (no training: the toy knows
``p(y|x)`` and the marginal of the targets) and measures ``t*`` of trained models against ``m``, the
batch size ``M`` and the number of training steps.

Prediction (``M = inf``): for each input, the score vector ``s(x)`` solves
``min_s  -p(y|x) . s + K(s)``, ``K(s) = log E_{a'~p(a)} exp(a' . s)``, i.e. the exponential tilt of the
targets' marginal ``p(a)`` by ``s`` has mean ``p(y|x)`` (:func:`population_scores`; Newton's method,
float64). ``p(a)`` is exact on the lattice of ``m``-vote histograms (multinomial probabilities
averaged over a Monte Carlo sample of inputs) and a Monte Carlo sample of posteriors for ``m = inf``.
For a finite batch the same loss with ``M - 1`` sampled negatives and the positive in the
denominator is minimised on sampled batches (:func:`finite_batch_scores`). The logits are
``z = s + log(eta)``; ``t*`` is fitted by :func:`softnce.metrics.fit_temperature`, as for a
trained model, on 16 labels ``y ~ p(y|x)`` per test input (one label per input leaves a label-noise
error of several hundredths in ``t*``).

Measurement: the toy experiment's own machinery (:func:`softnce.experiments.toy.make_train_fn`,
``stack_runs``, ``batch_rows``, ``run_metrics``): STI with ``eta`` = class prior, every ``m`` and seed
of one ``(M, steps)`` cell in one ``jit(vmap(scan))`` call. The peak learning rate is kept at that
of ``configs/toy.py`` (batch 128) for every ``M`` (``--lr scaled`` applies the trainer's
``base_lr * M / 256`` rule instead). Besides ``t*`` each run reports ``slope``, the least-squares
slope of the per-row-centred logits on the per-row-centred ``log p(y|x)`` (``slope = 1`` for
calibrated logits, ``b`` for ``z = b log p + c(x)``).

Run: ``python -m softnce.experiments.toy_temperature [--setting full|quick] [--out DIR]``; writes
``metrics.json``, ``summary.md`` and ``temperature_study.png`` to ``runs/toy-temperature-<timestamp>/``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from scipy.special import gammaln, logsumexp

from softnce import metrics, plotting
from softnce.data import toy
from softnce.experiments import cli, vmapped
from softnce.experiments import toy as te

INF = math.inf
REPORTED = ("t_star", "kl", "kl_calibrated", "top1", "nll", "ece", "ece_calibrated")  # per trained run


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The sweep. ``cells`` are ``(M, steps)`` pairs; every cell trains every ``m`` and seed."""

    seeds: int = 5
    prior: str = "balanced"
    annotators: tuple = (1, 3, 10, 30, INF)
    cells: tuple = ((128, 800), (64, 800), (256, 800), (1024, 800), (128, 3200), (128, 12800))
    lr: str = "fixed"  # 'fixed': peak lr of configs/toy.py at batch 128 for every M; 'scaled': base_lr * M / 256
    num_train: Optional[int] = None  # None: configs/toy.py
    num_val: Optional[int] = None
    num_test: Optional[int] = None
    # The population prediction.
    population_annotators: tuple = (1, 2, 3, 5, 10, 30, INF)
    population_inputs: int = 200_000  # Monte Carlo inputs for the targets' marginal p(a)
    population_atoms_inf: int = 3000  # posterior samples standing for p(a) at m = inf
    population_queries: int = 2000  # test inputs at which s*(x) is solved (M = inf)
    finite_batches: tuple = (16, 64, 256)  # M of the finite-batch optimum
    finite_annotators: tuple = (10,)
    finite_queries: int = 100
    finite_replicates: int = 32  # sampled batches per query
    label_draws: int = 16  # labels y ~ p(y|x) per query for the fitted temperature of a prediction


FULL = StudySettings()
QUICK = StudySettings(
    seeds=2, annotators=(1, 10, INF), cells=((128, 800), (1024, 800), (128, 3200)),
    population_annotators=(1, 3, 10, INF),
    population_inputs=50_000, population_atoms_inf=2000, population_queries=1000, finite_batches=(16,),
    finite_annotators=(10,), finite_queries=50, finite_replicates=16,
)
SETTINGS = {"full": FULL, "quick": QUICK}


# --------------------------------------------------------------------------------------------------
# The population optimum of STI's score within its linear family.
# --------------------------------------------------------------------------------------------------


def lattice(m: int, num_classes: int = toy.NUM_CLASSES) -> np.ndarray:
    """All vote counts ``n`` with ``sum(n) = m``: int ``[A, C]``, ``A = binom(m + C - 1, C - 1)``."""
    if num_classes == 1:
        return np.array([[m]])
    rows = [np.concatenate([[k], rest]) for k in range(m, -1, -1) for rest in lattice(m - k, num_classes - 1)]
    return np.array(rows, dtype=np.int64)


def target_marginal(prior: str, m, num_inputs: int, num_atoms_inf: int, rng: np.random.Generator):
    """The marginal ``p(a)`` of the soft targets: ``(atoms [A, C], weights [A])``.

    Finite ``m``: the histograms ``n / m`` of the lattice with ``p(n) = E_x Mult(n; m, p(.|x))``, the
    expectation over ``num_inputs`` draws of ``x``. ``m = inf``: ``num_atoms_inf`` posteriors
    ``p(.|x)`` of independent draws, equally weighted.
    """
    m = toy.parse_annotators(m)
    if math.isinf(m):
        x, _ = toy.sample_mixture(rng, num_atoms_inf, prior)
        return toy.true_posterior(x, prior), np.full(num_atoms_inf, 1.0 / num_atoms_inf)
    x, _ = toy.sample_mixture(rng, num_inputs, prior)
    log_post = toy.true_log_posterior(x, prior)
    counts = lattice(m)
    log_coef = gammaln(m + 1) - gammaln(counts + 1).sum(1)
    log_w = np.stack([logsumexp(log_coef[:, None] + counts @ chunk.T, axis=1)
                      for chunk in np.array_split(log_post, max(1, len(log_post) // 20_000))])
    log_w = logsumexp(log_w, axis=0)
    weights = np.exp(log_w - logsumexp(log_w))
    return counts / m, weights


def _solve_moments(moments: Callable, probs: np.ndarray, max_iter: int, tol: float):
    """Finds ``s`` (``s[:, 0] = 0``) with ``mean(s) = probs`` row by row.

    ``moments(rows, s_rows) -> (mean [r, C], hess [r, C-1, C-1])``: the derivative of the convex
    objective in ``s`` is ``mean(s) - p``, its Hessian ``hess``. Each step tries the Newton step
    (at most 20 per coordinate) and the generalised iterative scaling step ``log(p / mean)`` (a
    descent step here because the targets sum to 1) and keeps the one with the smaller error
    ``max_k |log mean_k - log p_k|``; a row is done when that error is below ``tol``. The error is
    relative per class, so rows deep in the tails (``p_k ~ 1e-30``) converge as well as the bulk.
    """
    n, c = probs.shape
    s = np.zeros((n, c))
    log_p = np.log(probs)
    active = np.arange(n)
    error = np.full(n, np.inf)
    iters = 0

    def err_of(mean, rows):
        return np.abs(np.log(mean) - log_p[rows]).max(1)

    mean, hess = moments(active, s[active])
    for iters in range(1, max_iter + 1):
        error[active] = err_of(mean, active)
        keep = error[active] > tol
        active, mean, hess = active[keep], mean[keep], hess[keep]
        if len(active) == 0:
            break
        s_a, log_mean = s[active], np.log(mean)
        newton = -np.linalg.solve(hess, (mean - probs[active])[:, 1:, None])[..., 0]
        newton *= np.minimum(1.0, 20.0 / np.maximum(np.abs(newton).max(1), 1e-300))[:, None]
        s_newton = s_a + np.concatenate([np.zeros((len(active), 1)), newton], 1)
        gis = log_p[active] - log_mean
        s_gis = s_a + gis - gis[:, :1]
        mean_n, hess_n = moments(active, s_newton)
        mean_g, hess_g = moments(active, s_gis)
        use_newton = err_of(mean_n, active) <= err_of(mean_g, active)
        s[active] = np.where(use_newton[:, None], s_newton, s_gis)
        mean = np.where(use_newton[:, None], mean_n, mean_g)
        hess = np.where(use_newton[:, None, None], hess_n, hess_g)
    return s, {"error_max": float(error.max()), "iterations": iters, "not_converged": int(len(active))}


def _by_leading_class(solve: Callable, probs: np.ndarray) -> tuple[np.ndarray, dict]:
    """Runs ``solve(probs_perm, perm)`` on the rows grouped by their most probable class ``k``, with the
    classes permuted so that ``k`` comes first (the gauge ``s_k = 0`` keeps the small components of
    the moment condition, which carry the tails, exact in float64); returns ``s`` in the original order."""
    n, c = probs.shape
    s = np.zeros((n, c))
    infos = []
    lead = probs.argmax(1)
    for k in range(c):
        rows = np.flatnonzero(lead == k)
        if len(rows) == 0:
            continue
        perm = np.array([k] + [j for j in range(c) if j != k])
        s_perm, info = solve(probs[rows][:, perm], perm)
        s[np.ix_(rows, perm)] = s_perm
        infos.append(info)
    return s, {"error_max": max(i["error_max"] for i in infos), "iterations": max(i["iterations"] for i in infos),
               "not_converged": sum(i["not_converged"] for i in infos)}


def population_scores(probs: np.ndarray, atoms: np.ndarray, weights: np.ndarray, *, tol: float = 1e-7,
                      max_iter: int = 300) -> tuple[np.ndarray, dict]:
    """STI's large-batch optimum ``s(x)`` for each row of ``probs`` = ``p(.|x)`` ``[n, C]``.

    Minimises ``Phi(s) = -p . s + log sum_a w_a exp(a . s)`` (convex; the ``M -> inf`` limit of the
    STI loss of one input, up to ``log M``) in float64 until ``|log mean_k - log p_k| < tol`` for
    every class (:func:`_solve_moments`). Targets sum to 1, so ``s`` is defined up to a constant: the
    returned ``s`` is 0 at each row's most probable class. At the optimum the ``s``-tilted marginal
    of the targets has mean ``p``. Returns ``(s [n, C], info)``.
    """
    probs = np.asarray(probs, np.float64)
    log_w = np.log(np.asarray(weights, np.float64))

    def solve(p, perm):
        a = np.asarray(atoms, np.float64)[:, perm]

        def moments(rows, s_rows):
            logits = s_rows @ a.T + log_w
            q = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
            mean = q @ a
            second = np.einsum("na,ac,ad->ncd", q, a, a, optimize=True)
            hess = (second - mean[:, :, None] * mean[:, None, :])[:, 1:, 1:] + 1e-300 * np.eye(a.shape[1] - 1)
            return mean, hess

        return _solve_moments(moments, p, max_iter, tol)

    return _by_leading_class(solve, probs)


def sample_targets(rng: np.random.Generator, probs: np.ndarray, m, shape: tuple) -> np.ndarray:
    """Independent ``m``-vote histograms of each row of ``probs`` ``[n, C]`` (the row itself for
    ``m = inf``): float64 ``[*shape, n, C]``."""
    if math.isinf(m):
        return np.broadcast_to(probs, shape + probs.shape).astype(np.float64)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = rng.multinomial(int(m), flat, size=shape + (flat.shape[0],))
    return (draws / m).reshape(shape + probs.shape)


def finite_batch_scores(probs: np.ndarray, m, batch_size: int, negatives: np.ndarray, rng: np.random.Generator, *,
                        replicates: int, tol: float = 1e-6, max_iter: int = 200, chunk: int = 16) -> np.ndarray:
    """STI's optimum ``s(x)`` for a finite batch ``M``, each row of ``probs`` ``[n, C]`` on its own.

    Minimises the sample average over ``replicates`` batches of
    ``logsumexp(a+ . s, a'_1 . s, ..., a'_{M-1} . s) - p . s`` (the positive ``a+`` an ``m``-vote
    histogram of ``p``, the ``M - 1`` negatives drawn from ``negatives`` = samples of ``p(a)``; the
    linear term uses its exact mean ``E a+ = p``) with :func:`_solve_moments`, ``s = 0`` at each
    row's most probable class.
    """
    neg = negatives[rng.integers(0, len(negatives), size=(replicates, batch_size - 1))]  # shared [R, M-1, C]
    out = []
    for lo in range(0, len(probs), chunk):
        p_chunk = np.asarray(probs[lo : lo + chunk], np.float64)
        pos_chunk = sample_targets(rng, p_chunk, m, (replicates,)).transpose(1, 0, 2)  # [b, R, C]

        def solve(p, perm, pos_chunk=pos_chunk, p_chunk=p_chunk):
            rows = [int(np.flatnonzero((p_chunk[:, perm] == row).all(1))[0]) for row in p]
            negatives = np.broadcast_to(neg[..., perm], (len(p),) + neg.shape)
            cand = np.concatenate([pos_chunk[rows][:, :, None, perm], negatives], 2)

            def moments(rows, s_rows):
                c_a = cand[rows]
                logits = np.einsum("brmc,bc->brm", c_a, s_rows)
                q = np.exp(logits - logsumexp(logits, axis=2, keepdims=True))
                mean = np.einsum("brm,brmc->brc", q, c_a)
                second = np.einsum("brm,brmc,brmd->bcd", q, c_a, c_a, optimize=True) / replicates
                hess = (second - np.einsum("brc,brd->bcd", mean, mean) / replicates)[:, 1:, 1:]
                return mean.mean(1), hess + 1e-300 * np.eye(len(perm) - 1)

            return _solve_moments(moments, p, max_iter, tol)

        out.append(_by_leading_class(solve, p_chunk)[0])
    return np.concatenate(out)


def logit_slope(logits: np.ndarray, log_p: np.ndarray) -> float:
    """Least-squares slope ``b`` of the per-row-centred ``logits`` on the per-row-centred ``log_p``."""
    z = logits - logits.mean(1, keepdims=True)
    lp = log_p - log_p.mean(1, keepdims=True)
    return float(np.sum(z * lp) / np.sum(lp * lp))


def score_metrics(logits: np.ndarray, log_p: np.ndarray, labels: np.ndarray) -> dict:
    """``t*`` (fitted on ``labels`` ``[n]`` or ``[n, V]``: ``V`` labels per input), the slope, and the KL
    to ``p`` raw and at ``t*``, for logits ``z`` ``[n, C]``."""
    labels = np.asarray(labels).reshape(len(logits), -1)
    t = metrics.fit_temperature(np.repeat(logits, labels.shape[1], axis=0), labels.ravel())
    return {"t_star": t, "slope": logit_slope(logits, log_p), "kl": te.mean_kl(log_p, logits),
            "kl_calibrated": te.mean_kl(log_p, logits, t)}


def population_prediction(settings: StudySettings, data: toy.ToyData, log: Callable = print) -> dict:
    """STI's optimum on the test inputs of ``data``: ``{'inf': {m: metrics}, 'finite': {M: {m: metrics}}}``."""
    rng = np.random.default_rng(12345)
    log_pi = np.log(toy.class_prior(settings.prior))
    nq = min(settings.population_queries, len(data.test.labels))
    log_p = data.test.log_posterior[:nq]
    # t* of a prediction is fitted like a trained model's, on labels y ~ p(y|x), but with
    # settings.label_draws labels per input so that the label noise of the fit stays small.
    labels = toy.sample_votes(rng, np.exp(log_p), settings.label_draws)
    out = {"inf": {}, "finite": {}, "linearised": {}}
    # The small-tilt (Gaussian) approximation: t*(m) ~ 1 / (1 - (1 - 1/m) w), w = within-x share of the label variance.
    x, _ = toy.sample_mixture(rng, settings.population_inputs, settings.prior)
    post = toy.true_posterior(x, settings.prior)
    within = float(np.mean(1 - np.sum(post**2, 1)) / (1 - np.sum(np.exp(2 * log_pi))))
    out["within_share"] = within
    marginals = {}
    for m in sorted(set(settings.population_annotators) | set(settings.finite_annotators)):
        t0 = time.time()
        marginals[m] = target_marginal(settings.prior, m, settings.population_inputs, settings.population_atoms_inf,
                                       rng)
        name = toy.annotators_name(m)
        out["linearised"][name] = 1.0 / (1.0 - (1.0 - 1.0 / m) * within)
        if m in settings.population_annotators:
            s, info = population_scores(np.exp(log_p), *marginals[m])
            out["inf"][name] = {**score_metrics(s + log_pi, log_p, labels), **info,
                                "max_abs_score": float(np.abs(s).max())}
            log(f"population M=inf m={name:>3}: t* {out['inf'][name]['t_star']:.3f}, slope "
                f"{out['inf'][name]['slope']:.2f} ({info['iterations']} Newton steps, {info['not_converged']} rows "
                f"not converged, {time.time() - t0:.1f} s)")
    fq = min(settings.finite_queries, nq)
    for batch in settings.finite_batches:
        out["finite"][str(batch)] = {}
        for m in settings.finite_annotators:
            t0 = time.time()
            atoms, weights = marginals[m]
            negatives = atoms[rng.choice(len(atoms), size=50_000, p=weights)]
            s = finite_batch_scores(np.exp(log_p[:fq]), m, batch, negatives, rng, replicates=settings.finite_replicates)
            name = toy.annotators_name(m)
            out["finite"][str(batch)][name] = score_metrics(s + log_pi, log_p[:fq], labels[:fq])
            # The M = inf optimum on the same queries, for a like-for-like comparison.
            s_inf, _ = population_scores(np.exp(log_p[:fq]), atoms, weights)
            out["finite"][str(batch)][name]["t_star_inf_same_queries"] = score_metrics(
                s_inf + log_pi, log_p[:fq], labels[:fq])["t_star"]
            log(f"population M={batch} m={name:>3}: t* {out['finite'][str(batch)][name]['t_star']:.3f} "
                f"(M=inf on the same queries {out['finite'][str(batch)][name]['t_star_inf_same_queries']:.3f}; "
                f"{time.time() - t0:.1f} s)")
    return out


# --------------------------------------------------------------------------------------------------
# The measurement: STI trained with the toy experiment's machinery.
# --------------------------------------------------------------------------------------------------


def cell_config(settings: StudySettings, batch_size: int, steps: int):
    """``configs/toy.py`` (via :func:`experiments.toy_experiment.make_config`) for STI at ``(M, steps)``."""
    sizes = te.Settings(steps=steps, num_train=settings.num_train, num_val=settings.num_val, num_test=settings.num_test)
    config = te.make_config(sizes, te.method_by_name("soft_target_infonce"), settings.prior)
    base_batch = config.data.batch_size
    if batch_size > config.data.num_train:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({config.data.num_train}).")
    config.data.batch_size = batch_size
    if settings.lr == "fixed":  # keep the peak lr base_lr * batch / 256 of the default batch
        config.optim.base_lr = config.optim.base_lr * base_batch / batch_size
    elif settings.lr != "scaled":
        raise ValueError(f"lr must be 'fixed' or 'scaled', got {settings.lr!r}.")
    return config


def train_cell(settings: StudySettings, datas: Sequence[toy.ToyData], batch_size: int, steps: int) -> list[dict]:
    """Trains STI for every ``m`` and seed at ``(M, steps)`` in one ``jit(vmap(scan))`` call; one row per run."""
    config = cell_config(settings, batch_size, steps)
    method = te.method_by_name("soft_target_infonce")
    ms = tuple(toy.parse_annotators(m) for m in settings.annotators)
    data, log_etas = te.stack_runs(config, method, datas, ms)
    seeds = np.tile(np.arange(len(datas)), len(ms))
    rngs = jax.vmap(jax.random.PRNGKey)(seeds)
    rows = vmapped.stacked_batch_rows(seeds, config.data.num_train, batch_size, steps)
    params, _ = te.make_train_fn(config)(rngs, data, rows, log_etas)
    inputs = np.stack([np.concatenate([d.val.inputs, d.test.inputs]) for d in datas] * len(ms))
    logits = np.asarray(te.make_apply_fn(config)(params, inputs), np.float64)
    out = []
    for r in range(len(seeds)):
        d, m = datas[seeds[r]], ms[r // len(datas)]
        nv = len(d.val.labels)
        metrics, _, _ = te.run_metrics(d, logits[r, :nv], logits[r, nv:])
        out.append({"batch_size": batch_size, "steps": steps, "m": toy.annotators_name(m), "seed": int(seeds[r]),
                    "slope": logit_slope(logits[r, nv:], d.test.log_posterior),
                    **{k: metrics[k] for k in REPORTED}})
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per ``(M, steps, m)``."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["batch_size"], row["steps"], row["m"]), []).append(row)
    keys = ("t_star", "slope", "kl", "kl_calibrated", "top1", "ece")
    return [{"batch_size": b, "steps": t, "m": m, "seeds": len(g), **{k: te.mean_std([r[k] for r in g]) for k in keys}}
            for (b, t, m), g in groups.items()]


# --------------------------------------------------------------------------------------------------
# Figure and table.
# --------------------------------------------------------------------------------------------------


def _lookup(summary, batch_size, steps, m, key="t_star"):
    for s in summary:
        if s["batch_size"] == batch_size and s["steps"] == steps and s["m"] == m:
            return s[key]
    return None


def _trained_t_star(ax, xs, stats: list[dict], population: dict, m: str, i: int, label: str) -> None:
    """Measured ``t*`` (mean +- std over seeds) against ``xs``, with the M = inf optimum of ``m`` dotted."""
    ax.errorbar(xs, [v["mean"] for v in stats], yerr=[v["std"] for v in stats], marker="o", capsize=2,
                color=f"C{i}", label=label)
    if m in population["inf"]:
        ax.axhline(population["inf"][m]["t_star"], color=f"C{i}", ls=":", lw=1)


def _log2_axis(ax, xlabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fitted temperature t*")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_study(path: str, summary: list[dict], population: dict, settings: StudySettings) -> str:
    """Four panels: t* against m; t* against M; t* against steps; the logit slope against m."""
    plt = plotting.pyplot()
    ms = [toy.annotators_name(m) for m in settings.annotators]
    pop_ms = list(population["inf"])
    order = sorted(set(ms) | set(pop_ms), key=lambda v: math.inf if v == "inf" else int(v))
    xpos = {m: i for i, m in enumerate(order)}
    base_b, base_t = settings.cells[0]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))

    ax = axes[0]
    ax.plot([xpos[m] for m in pop_ms], [population["inf"][m]["t_star"] for m in pop_ms], "k-", lw=2,
            label="optimum, M = inf (predicted)")
    lin = [m for m in order if m in population["linearised"]]
    ax.plot([xpos[m] for m in lin], [population["linearised"][m] for m in lin], "k:", label="small-tilt approximation")
    finite_m = [m for m in order if m != "inf"]
    ax.plot([xpos[m] for m in finite_m], [float(m) for m in finite_m], color="0.6", ls="--", label="t = m (hypothesis)")
    for i, (b, t) in enumerate(c for c in settings.cells if c[1] == base_t):
        st = [_lookup(summary, b, t, m) for m in ms]
        ax.errorbar([xpos[m] for m in ms], [v["mean"] for v in st], yerr=[v["std"] for v in st], marker="o", capsize=2,
                    color=f"C{i}", label=f"trained, M = {b}, {t} steps")
    ax.set_ylim(0.8, max(4.0, 1.2 * max(population["inf"][m]["t_star"] for m in pop_ms)))
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("annotators m")
    ax.set_ylabel("fitted temperature t*")
    ax.set_title("t* against m")
    ax.legend(fontsize=7)

    batches = sorted({b for b, t in settings.cells if t == base_t})
    lengths = sorted({t for b, t in settings.cells if b == base_b})
    for i, m in enumerate(ms):
        _trained_t_star(axes[1], batches, [_lookup(summary, b, base_t, m) for b in batches], population, m, i,
                        f"trained, m = {m}")
        fin = [(int(b), population["finite"][b][m]) for b in population["finite"] if m in population["finite"][b]]
        if fin and m in population["inf"]:  # few queries: shown as the change from M = inf on the same queries
            offset = population["inf"][m]["t_star"]
            axes[1].plot([b for b, _ in fin], [v["t_star"] - v["t_star_inf_same_queries"] + offset
                                               for _, v in fin], marker="x", ls="--", color=f"C{i}",
                         label=f"optimum at finite M, m = {m} (offset)")
        _trained_t_star(axes[2], lengths, [_lookup(summary, base_b, t, m) for t in lengths], population, m, i,
                        f"m = {m}")
    _log2_axis(axes[1], f"batch size M ({base_t} steps)", "t* against M (dotted: optimum at M = inf)")
    _log2_axis(axes[2], f"training steps (M = {base_b})", "t* against training length (dotted: optimum)")

    ax = axes[3]
    ax.plot([xpos[m] for m in pop_ms], [population["inf"][m]["slope"] for m in pop_ms], "k-", lw=2,
            label="optimum, M = inf")
    ax.plot([xpos[m] for m in finite_m], [float(m) for m in finite_m], color="0.6", ls="--", label="slope = m")
    for i, (b, t) in enumerate(settings.cells):
        st = [_lookup(summary, b, t, m, "slope") for m in ms]
        ax.plot([xpos[m] for m in ms], [v["mean"] for v in st], marker="o", ms=3, lw=1,
                label=f"trained, M = {b}, {t} steps")
    ax.set_yscale("log")
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("annotators m")
    ax.set_ylabel("slope of centred z on centred log p(y|x)")
    ax.set_title("logit scale against m")
    ax.legend(fontsize=6)
    fig.suptitle(f"STI on the toy ({settings.prior} prior): fitted temperature, predicted and measured "
                 f"(mean ± std over {settings.seeds} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_markdown(summary: list[dict], population: dict, settings: StudySettings, seconds: dict) -> str:
    ms = [toy.annotators_name(m) for m in settings.annotators]
    lines = [
        "# STI's fitted temperature on the toy: predicted and measured",
        "",
        f"{settings.prior} prior, {settings.seeds} seeds (mean ± std), learning rate policy `{settings.lr}`; "
        f"run time {seconds['total']:.0f} s ({seconds['population']:.0f} s prediction, "
        f"{seconds['training']:.0f} s training).",
        "",
        "## Trained: t* (slope of centred logits on centred log p)",
        "",
        "| M | steps | " + " | ".join(f"m = {m}" for m in ms) + " |",
        "|---|---|" + "---|" * len(ms),
    ]
    for b, t in settings.cells:
        cells = [_lookup(summary, b, t, m) for m in ms]
        slopes = [_lookup(summary, b, t, m, "slope") for m in ms]
        lines.append(f"| {b} | {t} | " + " | ".join(
            f"{c['mean']:.2f} ± {c['std']:.2f} ({s['mean']:.2f})" for c, s in zip(cells, slopes)) + " |")
    lines += ["", "## Trained: KL to p(y|x), raw / at t*", "",
              "| M | steps | " + " | ".join(f"m = {m}" for m in ms) + " |",
              "|---|---|" + "---|" * len(ms)]
    for b, t in settings.cells:
        lines.append(f"| {b} | {t} | " + " | ".join(
            f"{_lookup(summary, b, t, m, 'kl')['mean']:.4f} / {_lookup(summary, b, t, m, 'kl_calibrated')['mean']:.4f}"
            for m in ms) + " |")
    pop = population["inf"]
    lines += ["", "## Predicted: STI's optimum at M = inf", "",
              f"Within-input share of the label variance w = {population['within_share']:.3f}.", "",
              "| m | t* | small-tilt t* | slope | KL raw | KL at t* | max abs score | rows not converged |",
              "|---|---|---|---|---|---|---|---|"]
    for m, v in pop.items():
        lines.append(f"| {m} | {v['t_star']:.3f} | {population['linearised'][m]:.3f} | {v['slope']:.2f} | "
                     f"{v['kl']:.4f} | {v['kl_calibrated']:.4f} | {v['max_abs_score']:.0f} | {v['not_converged']} |")
    if population["finite"]:
        fin_ms = list(next(iter(population["finite"].values())))
        lines += ["", "## Predicted: STI's optimum at finite M (sampled batches; t* on the first "
                  f"{settings.finite_queries} queries, M = inf on the same queries in the last row)", "",
                  "| M | " + " | ".join(f"m = {m}" for m in fin_ms) + " |", "|---|" + "---|" * len(fin_ms)]
        for b, row in population["finite"].items():
            lines.append(f"| {b} | " + " | ".join(f"{row[m]['t_star']:.3f}" for m in fin_ms) + " |")
        first = next(iter(population["finite"].values()))
        lines.append("| inf | " + " | ".join(f"{first[m]['t_star_inf_same_queries']:.3f}" for m in fin_ms) + " |")
    return "\n".join(lines) + "\n"


def run_study(settings: StudySettings = FULL, out_dir: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """Prediction and measurement; writes ``metrics.json``, ``summary.md``, ``temperature_study.png``."""
    t0 = time.time()
    settings = dataclasses.replace(settings, annotators=tuple(toy.parse_annotators(m) for m in settings.annotators))
    out_dir = out_dir or os.path.join("runs", time.strftime("toy-temperature-%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    base = cell_config(settings, *settings.cells[0])
    max_m = max([toy.MAX_ANNOTATORS] + [int(m) for m in settings.annotators if not math.isinf(m)])
    datas = [toy.make_toy_data(settings.prior, num_train=base.data.num_train, num_val=base.data.num_val,
                               num_test=base.data.num_test, seed=seed, max_annotators=max_m)
             for seed in range(settings.seeds)]
    population = population_prediction(settings, datas[0], log)
    t1 = time.time()
    rows = []
    for batch_size, steps in settings.cells:
        tc = time.time()
        rows += train_cell(settings, datas, batch_size, steps)
        cell = aggregate([r for r in rows if r["batch_size"] == batch_size and r["steps"] == steps])
        log(f"trained M={batch_size} steps={steps}: t* " + ", ".join(
            f"m={c['m']}: {c['t_star']['mean']:.2f}" for c in cell) + f" ({time.time() - tc:.1f} s)")
    summary = aggregate(rows)
    seconds = {"population": t1 - t0, "training": time.time() - t1, "total": time.time() - t0}
    files = {"metrics": "metrics.json", "summary": "summary.md", "figure": "temperature_study.png"}
    plot_study(os.path.join(out_dir, files["figure"]), summary, population, settings)
    names = {field: [toy.annotators_name(m) for m in getattr(settings, field)]
             for field in ("annotators", "population_annotators", "finite_annotators")}
    result = {"settings": {**dataclasses.asdict(settings), **names,
                           "num_train": base.data.num_train, "num_val": base.data.num_val,
                           "num_test": base.data.num_test},
              "population": population, "summary": summary, "runs": rows, "files": files, "seconds": seconds,
              "out_dir": out_dir}
    cli.write_results(out_dir, result, summary_markdown(summary, population, settings, seconds), log)
    return result


def main(argv=None) -> None:
    protocol = cli.parse_protocol(
        argv, description=__doc__.split("\n")[0], settings=SETTINGS,
        out_help="run folder (default runs/toy-temperature-<timestamp>)",
        setting_fields={"seeds": dict(type=int), "prior": dict(choices=list(toy.PRIORS)),
                        "lr": dict(choices=("fixed", "scaled"))},
    )
    run_study(protocol.setting, protocol.out)


if __name__ == "__main__":
    main()
