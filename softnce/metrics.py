"""Evaluation metrics: top-1, top-5, NLL, expected calibration error and reliability diagrams.

Prediction follows the reference: the class is ``argmax(z / t)`` and the probabilities are
``softmax(z / t)``; the noise distribution ``log(eta)`` is not subtracted at test time.

Metrics are accumulated as sums over batches (``metric_sums``), so padded examples (``mask`` False)
are left out exactly and the result does not depend on how the data is split into batches or devices.

Expected calibration error (ECE) uses ``B = 15`` equal-width confidence bins: example ``i`` with
confidence ``p_i = max_c softmax(z_i / t)[c]`` falls in bin ``b = min(floor(p_i * B), B - 1)``, and::

    ECE = sum_b (n_b / n) * | acc_b - conf_b |

with ``n_b`` the examples in bin ``b``, ``acc_b`` their accuracy and ``conf_b`` their mean confidence.
"""

from __future__ import annotations

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import io
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

NUM_CALIBRATION_BINS = 15


def metric_sums(
    logits: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    temperature: float = 1.0,
    num_bins: int = NUM_CALIBRATION_BINS,
) -> dict[str, jax.Array]:
    """Per-batch sums from which every evaluation metric is computed (jittable).

    Args:
      logits: ``[N, C]``; labels: int ``[N]``; mask: bool ``[N]`` (False on padding) or ``None``.

    Returns:
      ``count``, ``correct_top1``, ``correct_top5``, ``nll`` (scalars) and ``bin_count``,
      ``bin_confidence``, ``bin_correct`` (``[num_bins]``), all summed over unmasked examples.
    """
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    weight = mask.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    label_log_prob = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(log_probs, k)[1]
    correct1 = (top_k[:, 0] == labels).astype(jnp.float32)
    correct5 = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
    confidence = jnp.exp(jnp.max(log_probs, axis=-1))
    bins = jnp.clip(jnp.floor(confidence * num_bins).astype(jnp.int32), 0, num_bins - 1)
    one_hot_bins = jax.nn.one_hot(bins, num_bins) * weight[:, None]
    return {
        "count": weight.sum(),
        "correct_top1": (correct1 * weight).sum(),
        "correct_top5": (correct5 * weight).sum(),
        "nll": -(label_log_prob * weight).sum(),
        "bin_count": one_hot_bins.sum(0),
        "bin_confidence": (one_hot_bins * confidence[:, None]).sum(0),
        "bin_correct": (one_hot_bins * correct1[:, None]).sum(0),
    }


def add_sums(a: Optional[dict], b: dict) -> dict:
    """Adds two ``metric_sums`` dicts (``a`` may be ``None``), on the host in float64."""
    b = {k: np.asarray(v, np.float64) for k, v in b.items()}
    return b if a is None else {k: a[k] + b[k] for k in a}


def expected_calibration_error(bin_count, bin_confidence, bin_correct) -> float:
    """ECE from per-bin sums (see the module docstring)."""
    bin_count = np.asarray(bin_count, np.float64)
    n = bin_count.sum()
    if n == 0:
        raise ValueError("expected_calibration_error: no examples were counted.")
    gap = np.abs(np.asarray(bin_correct, np.float64) - np.asarray(bin_confidence, np.float64))
    return float(gap.sum() / n)  # sum_b n_b/n * |acc_b - conf_b| = sum_b |correct_b - conf_sum_b| / n


def summarize(sums: dict) -> dict[str, float]:
    """Turns accumulated ``metric_sums`` into ``top1``, ``top5``, ``nll`` (mean) and ``ece``."""
    n = float(sums["count"])
    if n == 0:
        raise ValueError("summarize: the evaluation saw no examples (is the eval split empty?).")
    return {
        "top1": float(sums["correct_top1"]) / n,
        "top5": float(sums["correct_top5"]) / n,
        "nll": float(sums["nll"]) / n,
        "ece": expected_calibration_error(sums["bin_count"], sums["bin_confidence"], sums["bin_correct"]),
        "num_examples": n,
    }


def fit_temperature(logits, labels, *, bounds: tuple[float, float] = (1e-3, 50.0)) -> float:
    """The temperature ``t`` minimising the NLL of ``softmax(z / t)`` on hard ``labels`` (post-hoc scaling).

    With ``beta = 1 / t`` the NLL ``mean_i [logsumexp_c(beta z_ic) - beta z_i,y_i]`` is convex in
    ``beta`` (a log-sum-exp of linear functions minus a linear function), so scipy's bounded Brent
    search on ``beta in bounds`` returns the global minimum there. Computed in float64.

    Args:
      logits: ``[n, C]`` (already divided by nothing: raw model outputs); labels: int ``[n]``.

    Returns:
      ``t = 1 / beta*`` as a Python float. When the minimum lies on a bound (e.g. a validation split
      the model classifies without error, where the NLL keeps falling as ``t -> 0``), the bound is
      returned with a ``RuntimeWarning``.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if z.ndim != 2 or labels.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(
            f"fit_temperature needs logits [n, C] and labels [n] with n > 0, got {z.shape} and {labels.shape}."
        )
    z_label = np.take_along_axis(z, labels[:, None].astype(np.int64), axis=1)[:, 0]

    def nll(beta):
        return float(np.mean(logsumexp(beta * z, axis=1) - beta * z_label))

    result = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-6})
    if min(abs(result.x - bounds[0]), abs(result.x - bounds[1])) < 1e-3 * max(1.0, abs(result.x)):
        import warnings

        warnings.warn(
            f"fit_temperature: the NLL has no minimum inside 1/t in {bounds} (t* = {1.0 / result.x:.4g} is the "
            f"bound); with {len(labels)} examples the fit is unreliable (too few errors or a separable split); "
            "use a larger validation split.",
            RuntimeWarning, stacklevel=2,
        )
    return float(1.0 / result.x)


def plot_reliability_diagram(sums_by_name: dict[str, dict], path: str, *, title: str = "") -> str:
    """Writes a reliability diagram PNG (accuracy and mean confidence per bin, one panel per run).

    Args:
      sums_by_name: ``{label: metric_sums}`` accumulated over the evaluation set.
      path: output ``.png`` path, local or ``gs://`` (written through ``etils.epath``).
    """
    from softnce import plotting

    plt = plotting.pyplot()
    names = list(sums_by_name)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = sums_by_name[name]
        count = np.asarray(s["bin_count"], np.float64)
        num_bins = count.size
        edges = np.linspace(0, 1, num_bins + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(count > 0, np.asarray(s["bin_correct"]) / count, np.nan)
            conf = np.where(count > 0, np.asarray(s["bin_confidence"]) / count, np.nan)
        ax.bar(centers, np.nan_to_num(acc), width=1 / num_bins, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot(centers, conf, "r.", label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ece = expected_calibration_error(s["bin_count"], s["bin_confidence"], s["bin_correct"])
        ax.set_title(f"{name}\nECE {ece:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    from softnce.checkpointing import resolve

    target = resolve(path)  # local or gs://
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png.getvalue())
    return path
