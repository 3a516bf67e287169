"""A 2-D, 3-class toy problem with a known posterior and simulated annotators.

This is the project's own design (the paper's toy example is not public). Inputs ``x in R^2``
come from ``K = 3`` overlapping Gaussian class-conditionals ``N(mu_k, Sigma_k)`` (:data:`MEANS`,
:data:`COVARIANCES`) mixed with a class prior ``pi`` (:data:`PRIORS`: ``balanced`` = (1/3, 1/3, 1/3),
``imbalanced`` = (0.6, 0.3, 0.1)). The true posterior is Bayes' rule, computed in log space::

    log p(y=k | x) = log pi_k + log N(x; mu_k, Sigma_k) - logsumexp_j [log pi_j + log N(x; mu_j, Sigma_j)]

(the Gaussian log density uses a Cholesky factor of ``Sigma_k``; float64 throughout). The Bayes
accuracy ``E_x[max_k p(k | x)]`` is about 0.77 (balanced) and 0.84 (imbalanced).

Labels: ``m`` simulated annotators each vote ``y ~ p(y | x)`` independently. The hard label of an
example is the first vote; its soft target for ``m`` annotators is the vote histogram of the first
``m`` votes (so the targets for ``m = 1, 3, 10`` are nested), and ``m = inf`` is the oracle
posterior itself. Every soft target is an unbiased estimate of ``p(. | x)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import ml_collections
import numpy as np
from scipy.special import logsumexp

from softnce.data.arrays import ArrayDataset

NUM_CLASSES = 3
MEANS = np.array([[0.0, 0.8], [-0.8, -0.48], [0.8, -0.48]])
COVARIANCES = np.array(
    [
        [[1.0, 0.0], [0.0, 0.3]],
        [[0.5, 0.3], [0.3, 0.6]],
        [[0.7, -0.4], [-0.4, 0.8]],
    ]
)
PRIORS = {"balanced": (1 / 3, 1 / 3, 1 / 3), "imbalanced": (0.6, 0.3, 0.1)}
ORACLE = math.inf  # m = inf: the soft target is the true posterior.
MAX_ANNOTATORS = 10  # votes drawn per training example by default (m <= 10 reuse the same draw)

Annotators = Union[int, float]


def class_prior(prior: Union[str, Sequence[float]]) -> np.ndarray:
    """``pi`` ``[K]`` from a name in :data:`PRIORS` or explicit probabilities (checked)."""
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise ValueError(f"unknown toy prior {prior!r}; valid names: {', '.join(PRIORS)}.")
        prior = PRIORS[prior]
    pi = np.asarray(prior, np.float64)
    if pi.shape != (NUM_CLASSES,) or np.any(pi <= 0) or abs(pi.sum() - 1) > 1e-9:
        raise ValueError(f"a toy prior must be {NUM_CLASSES} positive probabilities summing to 1, got {prior}.")
    return pi


def parse_annotators(value) -> Annotators:
    """``m`` as a positive int, or ``math.inf`` for the oracle (accepts ``'inf'``, ``inf``)."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "oracle"):
        return ORACLE
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return ORACLE
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"annotators must be a positive integer or 'inf' (the true posterior), got {value!r}.")


def annotators_name(m: Annotators) -> str:
    """``'1'``, ``'3'``, ... or ``'inf'``."""
    return "inf" if math.isinf(m) else str(int(m))


def class_log_densities(x: np.ndarray) -> np.ndarray:
    """``log N(x; mu_k, Sigma_k)`` for inputs ``[n, 2]``; returns float64 ``[n, K]``."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != MEANS.shape[1]:
        raise ValueError(f"toy inputs must have shape [n, {MEANS.shape[1]}], got {x.shape}.")
    out = np.empty((x.shape[0], NUM_CLASSES))
    d = x.shape[1]
    for k in range(NUM_CLASSES):
        chol = np.linalg.cholesky(COVARIANCES[k])
        white = np.linalg.solve(chol, (x - MEANS[k]).T)  # L^{-1} (x - mu), [d, n]
        log_det = 2.0 * np.sum(np.log(np.diag(chol)))
        out[:, k] = -0.5 * (np.sum(white**2, axis=0) + log_det + d * np.log(2 * np.pi))
    return out


def true_log_posterior(x: np.ndarray, prior: Union[str, Sequence[float]]) -> np.ndarray:
    """``log p(y | x)`` ``[n, K]`` by Bayes' rule in log space (see the module docstring)."""
    joint = class_log_densities(x) + np.log(class_prior(prior))
    return joint - logsumexp(joint, axis=1, keepdims=True)


def true_posterior(x: np.ndarray, prior: Union[str, Sequence[float]]) -> np.ndarray:
    """``p(y | x)`` ``[n, K]`` (rows sum to 1)."""
    return np.exp(true_log_posterior(x, prior))


def sample_mixture(rng: np.random.Generator, n: int, prior) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws ``(x, k)`` of the joint: ``k ~ pi``, ``x ~ N(mu_k, Sigma_k)``; float64 ``[n, 2]``, int ``[n]``.

    ``k`` is the generating component; given ``x`` it is distributed as ``p(y | x)``.
    """
    components = rng.choice(NUM_CLASSES, size=n, p=class_prior(prior))
    noise = rng.standard_normal((n, MEANS.shape[1]))
    chols = np.linalg.cholesky(COVARIANCES)  # [K, d, d]
    return MEANS[components] + np.einsum("nij,nj->ni", chols[components], noise), components


def sample_votes(rng: np.random.Generator, posterior: np.ndarray, m: int) -> np.ndarray:
    """``m`` independent votes ``y ~ Categorical(p(. | x_i))`` per row; int32 ``[n, m]``."""
    cdf = np.cumsum(posterior, axis=1)
    u = rng.random((posterior.shape[0], m))
    votes = (u[:, :, None] > cdf[:, None, :-1]).sum(-1)  # inverse-CDF sampling
    return votes.astype(np.int32)


def vote_histogram(votes: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Vote frequencies ``[n, C]`` (rows sum to 1) of ``votes`` ``[n, m]``."""
    counts = np.stack([(votes == c).sum(1) for c in range(num_classes)], axis=1)
    return (counts / votes.shape[1]).astype(np.float32)


def soft_targets(split: "ToySplit", m: Annotators) -> np.ndarray:
    """Soft targets ``[n, K]`` of ``split`` for ``m`` annotators (histogram) or ``inf`` (posterior)."""
    m = parse_annotators(m)
    if math.isinf(m):
        return np.exp(split.log_posterior).astype(np.float32)
    if m > split.votes.shape[1]:
        raise ValueError(f"asked for {m} annotators but the split has only {split.votes.shape[1]} votes per example.")
    return vote_histogram(split.votes[:, :m])


class ToySplit(NamedTuple):
    """One split: ``inputs [n, 2]`` float32, ``log_posterior [n, K]`` float64 (the truth),
    ``votes [n, V]`` int32 annotator votes, ``labels [n]`` int32 (the first vote)."""

    inputs: np.ndarray
    log_posterior: np.ndarray
    votes: np.ndarray
    labels: np.ndarray


class ToyData(NamedTuple):
    """Train / validation / test splits of one draw of the toy problem."""

    prior: str
    train: ToySplit
    val: ToySplit
    test: ToySplit


def make_split(rng: np.random.Generator, n: int, prior, num_votes: int) -> ToySplit:
    """Draws ``n`` inputs, their posterior and ``num_votes`` annotator votes each."""
    x, _ = sample_mixture(rng, n, prior)
    log_post = true_log_posterior(x, prior)
    votes = sample_votes(rng, np.exp(log_post), max(num_votes, 1))
    return ToySplit(x.astype(np.float32), log_post, votes, votes[:, 0].copy())


def make_toy_data(
    prior: str, *, num_train: int, num_val: int, num_test: int, seed: int, max_annotators: int = MAX_ANNOTATORS
) -> ToyData:
    """All three splits, deterministic in ``(prior, seed, max_annotators)``.

    ``prior`` is a name in :data:`PRIORS`; the train split has ``max_annotators`` votes per example.
    """
    class_prior(prior)  # checks the name
    rng = np.random.default_rng([seed, list(PRIORS).index(prior)])
    return ToyData(
        prior=prior,
        train=make_split(rng, num_train, prior, max_annotators),
        val=make_split(rng, num_val, prior, 1),
        test=make_split(rng, num_test, prior, 1),
    )


def bayes_accuracy(log_posterior: np.ndarray, labels: Optional[np.ndarray] = None) -> float:
    """Accuracy of the Bayes classifier ``argmax_k p(k | x)``: expected (``E[max_k p]``) or on ``labels``."""
    if labels is None:
        return float(np.mean(np.exp(log_posterior.max(axis=1))))
    return float(np.mean(log_posterior.argmax(axis=1) == labels))


def to_array_dataset(data: ToyData, m: Annotators, *, process_index: int = 0, process_count: int = 1) -> ArrayDataset:
    """The trainer's view of ``data`` for ``m`` annotators.

    Training batches carry ``label`` (the first vote, used by hard-label losses) and ``targets``
    (the ``m``-annotator soft targets, used by soft-target losses); evaluation is on the test split
    and the post-hoc temperature is fitted on the validation split, both with labels drawn from ``p(y | x)``.
    """
    return ArrayDataset(
        data.train.inputs, data.train.labels, data.test.inputs, data.test.labels,
        num_classes=NUM_CLASSES, train_targets=soft_targets(data.train, m),
        validation=(data.val.inputs, data.val.labels),
        process_index=process_index, process_count=process_count,
    )


def make_toy_dataset(config: ml_collections.ConfigDict, *, process_index: int, process_count: int) -> ArrayDataset:
    """The registered ``toy`` dataset for ``config.data`` (see ``configs/toy.py``).

    Fields: ``prior`` (``balanced``/``imbalanced``), ``annotators`` (1, 3, 10 or ``'inf'``),
    ``num_train``, ``num_val``, ``num_test``, ``seed``; see :func:`to_array_dataset`.
    """
    m = parse_annotators(config.annotators)
    data = make_toy_data(
        config.prior, num_train=config.num_train, num_val=config.num_val, num_test=config.num_test,
        seed=config.seed, max_annotators=MAX_ANNOTATORS if math.isinf(m) else max(m, MAX_ANNOTATORS),
    )
    return to_array_dataset(data, m, process_index=process_index, process_count=process_count)
