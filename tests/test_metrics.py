"""Evaluation metrics against hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from softnce import metrics

# Five examples; confidences 0.9 (right), 0.92 (wrong) share bin 13 = floor(0.9 * 15); 0.82 (wrong) is
# in bin 12, 0.62 (right) in bin 9, 0.55 (wrong) in bin 8. A sixth, padded example must not count.
PROBS = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.92, 0.04, 0.04],
        [0.08, 0.82, 0.10],
        [0.62, 0.28, 0.10],
        [0.55, 0.25, 0.20],
        [0.01, 0.01, 0.98],  # padding
    ]
)
LABELS = np.array([0, 1, 0, 0, 2, 0])
MASK = np.array([True] * 5 + [False])
# (No confidence sits on a bin edge, where float32 rounding could move it.)
# ECE = sum_b n_b/n |acc_b - conf_b| = (2 |0.5 - 0.91| + |0 - 0.82| + |1 - 0.62| + |0 - 0.55|) / 5
ECE = (2 * 0.41 + 0.82 + 0.38 + 0.55) / 5
NLL = -np.mean(np.log([0.9, 0.04, 0.08, 0.62, 0.2]))


def test_metrics_match_hand_computed_values():
    sums = metrics.metric_sums(jnp.log(PROBS), jnp.asarray(LABELS), jnp.asarray(MASK))
    summary = metrics.summarize(metrics.add_sums(None, sums))
    assert summary["num_examples"] == 5
    assert summary["top1"] == pytest.approx(2 / 5)
    assert summary["top5"] == pytest.approx(1.0)  # only 3 classes
    assert summary["nll"] == pytest.approx(NLL, rel=1e-5)
    assert summary["ece"] == pytest.approx(ECE, rel=1e-5)
    assert np.flatnonzero(np.asarray(sums["bin_count"])).tolist() == [8, 9, 12, 13]


def test_temperature_divides_the_logits():
    logits = jnp.log(PROBS) * 2.0
    with_t = metrics.summarize(
        metrics.add_sums(None, metrics.metric_sums(logits, LABELS, MASK, temperature=2.0))
    )
    assert with_t["ece"] == pytest.approx(ECE, rel=1e-5)
    assert with_t["nll"] == pytest.approx(NLL, rel=1e-5)


def test_sums_do_not_depend_on_batching():
    whole = metrics.add_sums(None, metrics.metric_sums(jnp.log(PROBS), LABELS, MASK))
    parts = None
    for rows in (slice(0, 2), slice(2, 6)):
        parts = metrics.add_sums(parts, metrics.metric_sums(jnp.log(PROBS[rows]), LABELS[rows], MASK[rows]))
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-6)


def test_five_classes_top5_and_confidence_one_goes_to_last_bin():
    logits = jnp.array([[100.0, 0, 0, 0, 0, 0], [0, 1.0, 2, 3, 4, 5]])
    sums = metrics.metric_sums(logits, jnp.array([0, 0]))
    assert float(sums["bin_count"][-1]) == 1.0  # confidence 1.0 falls in the last bin, not past it
    assert float(sums["correct_top5"]) == 1.0  # class 0 has the lowest logit of the second row


def test_reliability_diagram_png_and_empty_eval_error(tmp_path):
    sums = metrics.add_sums(None, metrics.metric_sums(jnp.log(PROBS), LABELS, MASK))
    path = metrics.plot_reliability_diagram({"a": sums, "b": sums}, str(tmp_path / "r.png"), title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    empty = metrics.add_sums(None, metrics.metric_sums(jnp.log(PROBS), LABELS, np.zeros(6, bool)))
    with pytest.raises(ValueError, match="no examples"):
        metrics.summarize(empty)


def test_fit_temperature_recovers_a_known_temperature():
    # Labels drawn from softmax(z / 2): the NLL-optimal temperature is ~2 (20,000 draws).
    rng = np.random.default_rng(4)
    z = rng.normal(size=(20_000, 3)) * 3
    p = np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)
    labels = (rng.random((20_000, 1)) > p.cumsum(1)[:, :-1]).sum(1)
    assert metrics.fit_temperature(z, labels) == pytest.approx(2.0, rel=0.05)


def test_fit_temperature_warns_when_the_minimum_is_on_the_bound():
    z = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])  # every example right: NLL falls as t -> 0
    with pytest.warns(RuntimeWarning, match="no minimum inside"):
        t = metrics.fit_temperature(z, np.array([0, 1, 0]))
    assert t == pytest.approx(1 / 50.0, rel=1e-3)
