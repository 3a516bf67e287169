"""The toy problem and experiment: the generator's posterior, a reduced run, the notebook, the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from softnce.configs import toy as toy_config
from softnce.data import get_dataset, toy
from softnce.experiments import toy as te
from softnce.experiments import toy_temperature as tts
from softnce.experiments import vmapped

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# The generator.
# --------------------------------------------------------------------------------------------------


def test_class_densities_match_scipy():
    x = np.random.default_rng(0).normal(size=(50, 2)) * 2
    expected = np.stack([multivariate_normal(toy.MEANS[k], toy.COVARIANCES[k]).logpdf(x) for k in range(3)], 1)
    np.testing.assert_allclose(toy.class_log_densities(x), expected, rtol=1e-12, atol=1e-12)


def test_posterior_is_stable_far_from_the_data():
    # Densities underflow to 0 at |x| ~ 60, but the log-space posterior stays a distribution.
    post = toy.true_posterior(np.array([[60.0, -80.0], [0.0, 0.0]]), "imbalanced")
    assert np.all(np.isfinite(post)) and np.allclose(post.sum(1), 1.0)


@pytest.mark.parametrize("prior", ["balanced", "imbalanced"])
def test_posterior_matches_monte_carlo_label_frequencies(prior):
    # Given x, the generating component k is distributed as p(y|x), so in every region B of input
    # space the frequency of k = c equals E[p(c|x) | x in B]. Cells of a 6x6 grid with n >= 2000 draws:
    # the binomial standard error is <= 0.5 / sqrt(n) <= 0.0112; we allow 5 standard errors
    # (~70 comparisons, so a false alarm has probability ~4e-5).
    rng = np.random.default_rng(1)
    x, k = toy.sample_mixture(rng, 400_000, prior)
    post = toy.true_posterior(x, prior)
    cells = np.clip(np.floor((x + 3.0) / 1.0).astype(int), 0, 5)
    cell_id = cells[:, 0] * 6 + cells[:, 1]
    checked = 0
    for cell in np.unique(cell_id):
        inside = cell_id == cell
        n = inside.sum()
        if n < 2000:
            continue
        freq = np.bincount(k[inside], minlength=3) / n
        predicted = post[inside].mean(0)
        se = np.sqrt(np.clip(predicted * (1 - predicted), 1e-4, None) / n)
        assert np.all(np.abs(freq - predicted) < 5 * se), (cell, freq, predicted)
        checked += 1
    assert checked >= 10
    # The Bayes accuracy lies in the range the design asks for.
    assert 0.7 < toy.bayes_accuracy(toy.true_log_posterior(x, prior)) < 0.85


def test_votes_follow_the_posterior_at_fixed_x():
    # 20,000 votes at each of 4 fixed inputs; 5 binomial standard errors (<= 0.018).
    x = np.array([[0.0, 0.0], [1.0, -0.5], [-0.5, 1.0], [0.3, 0.2]])
    post = toy.true_posterior(x, "balanced")
    votes = toy.sample_votes(np.random.default_rng(2), post, 20_000)
    freq = toy.vote_histogram(votes)
    se = np.sqrt(post * (1 - post) / 20_000)
    assert np.all(np.abs(freq - post) < 5 * se + 1e-12)


def test_soft_targets_are_nested_histograms_and_the_oracle():
    data = toy.make_toy_data("imbalanced", num_train=300, num_val=10, num_test=10, seed=3)
    one = toy.soft_targets(data.train, 1)
    np.testing.assert_array_equal(one, np.eye(3)[data.train.labels])
    three = toy.soft_targets(data.train, 3)
    np.testing.assert_allclose(three * 3, np.round(three * 3), atol=1e-5)
    np.testing.assert_allclose(toy.soft_targets(data.train, "inf"), np.exp(data.train.log_posterior), rtol=1e-6)
    for m in (1, 3, 10, "inf"):
        np.testing.assert_allclose(toy.soft_targets(data.train, m).sum(1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="only 10 votes"):
        toy.soft_targets(data.train, 11)


@pytest.mark.parametrize("bad", [0, -1, "many", 2.5, True])
def test_bad_annotator_counts_are_clear_errors(bad):
    with pytest.raises(ValueError, match="positive integer or 'inf'"):
        toy.parse_annotators(bad)


def test_unknown_prior_is_a_clear_error():
    with pytest.raises(ValueError, match="valid names: balanced, imbalanced"):
        toy.make_toy_data("skewed", num_train=10, num_val=10, num_test=10, seed=0)


def test_registered_dataset_carries_the_soft_targets():
    config = toy_config.get_config("prior=imbalanced,annotators=3")
    dataset = get_dataset(config.data)
    batch = next(dataset.train_batches(8, seed=0))
    assert batch["targets"].shape == (8, 3) and batch["inputs"].shape == (8, 2)
    np.testing.assert_allclose(batch["targets"].sum(1), 1.0, atol=1e-6)
    # The hard label is one of the votes that make up the soft target.
    assert np.all(batch["targets"][np.arange(8), batch["label"]] > 0)


# --------------------------------------------------------------------------------------------------
# A reduced run of the experiment.
# --------------------------------------------------------------------------------------------------

REDUCED = te.Settings(
    seeds=2, annotators=(1, math.inf), priors=("balanced",), methods=("nll", "soft_target_cross_entropy"),
    steps=300, num_train=1000, num_val=1000, num_test=2000, grid_size=21,
)


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_run"))
    return te.run_experiment(REDUCED, out, log=lambda line: None)


def test_reduced_run_writes_every_file(reduced_run):
    out = reduced_run["out_dir"]
    expected = {"metrics.json", "summary.md", "kl_vs_m.png", "posteriors_balanced.png", "reliability_balanced.png"}
    assert set(reduced_run["files"].values()) == expected
    for name in expected:
        assert os.path.getsize(os.path.join(out, name)) > 100, name
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert len(saved["runs"]) == 2 * (1 + 2)  # seeds x (nll + soft CE at m = 1 and inf)
    table = open(os.path.join(out, "summary.md")).read()
    assert "| soft_target_cross_entropy | inf |" in table and "| nll | 1 vote |" in table


def _summary(run, method, m):
    (entry,) = [s for s in run["summary"] if s["method"] == method and s["m"] == m]
    return entry


def test_soft_ce_on_one_vote_is_nll(reduced_run):
    # With m = 1 the soft target is one_hot(first vote): soft CE is then the same loss as NLL on the
    # same labels, and the two runs share seeds and batch order, so every metric must agree.
    for key in ("kl", "top1", "nll", "ece", "t_star"):
        a = _summary(reduced_run, "nll", "hard")[key]["mean"]
        b = _summary(reduced_run, "soft_target_cross_entropy", "1")[key]["mean"]
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5), key


def test_oracle_soft_ce_recovers_the_posterior(reduced_run):
    # The constant predictor p(y) = pi has KL ~0.55 here; a model that learned nothing about x would
    # be there. Oracle soft targets give soft CE the whole posterior at every training input, while
    # NLL sees one draw from it, so at equal data and steps soft CE must be both far below the
    # constant predictor (< 5 % of its KL; measured ~1.7 %) and clearly below NLL (< 0.75x; measured
    # ~0.5x on seeds 0-1).
    oracle = _summary(reduced_run, "soft_target_cross_entropy", "inf")["kl"]["mean"]
    hard = _summary(reduced_run, "nll", "hard")["kl"]["mean"]
    constant = reduced_run["references"]["balanced"]["prior_predictor_kl"]["mean"]
    assert oracle < 0.05 * constant
    assert oracle < 0.75 * hard
    # KL and NLL agree: E[NLL_model - NLL_bayes] = KL, up to the label noise of 2,000 test draws.
    bayes_nll = reduced_run["references"]["balanced"]["bayes_nll"]["mean"]
    nll_gap = _summary(reduced_run, "soft_target_cross_entropy", "inf")["nll"]["mean"] - bayes_nll
    assert nll_gap == pytest.approx(oracle, abs=0.03)


# --------------------------------------------------------------------------------------------------
# The notebook and the real entry point.
# --------------------------------------------------------------------------------------------------


def test_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    # A kernelspec for this interpreter in a private JUPYTER_PATH (nothing registered globally).
    kernels = tmp_path / "jupyter" / "kernels"
    kernels.mkdir(parents=True)
    spec_dir = write_kernel_spec(str(kernels / "softnce-toy"))
    assert json.load(open(os.path.join(spec_dir, "kernel.json")))["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SOFTNCE_TOY_SETTING", "tiny")
    monkeypatch.setenv("SOFTNCE_TOY_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "toy_example.ipynb"), as_version=4)
    client = NotebookClient(
        notebook, kernel_name="softnce-toy", timeout=240,
        resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
    )
    client.execute()
    assert (tmp_path / "run" / "summary.md").exists()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Bayes accuracy" in outputs and str(tmp_path / "run") in outputs


def test_config_runs_through_the_entry_point_and_matches_the_vmapped_trainer(tmp_path, cli_env):
    # The real trainer (softnce.main, one device) and the experiment's jit(vmap(scan(train_step)))
    # see the same data, batch order (ArrayDataset's per-epoch permutation), initial params and
    # optimiser, and STI is deterministic, so after 20 steps their params must agree to float
    # round-off. Warm-up 2 steps so the params move by ~1e-2, far above the tolerance.
    arg = "prior=imbalanced,annotators=3,loss=soft_target_infonce,steps=20"
    overrides = ["--config.log_every_steps=10", "--config.data.num_test=2000", "--config.optim.warmup_steps=2"]
    cmd = [sys.executable, "-m", "softnce.main", f"--config=configs/toy.py:{arg}", *overrides, f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 20/20" in proc.stdout and "ETA" in proc.stdout
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["step"] == 20 and metrics["num_examples"] == 2000
    assert 0.0 <= metrics["top1"] <= 1.0 and np.isfinite(metrics["nll"])

    import jax
    import orbax.checkpoint as ocp

    from softnce import assembly, models

    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    cli_params = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())["params"]
    config = toy_config.get_config(arg)
    config.data.num_test = 2000
    config.optim.warmup_steps = 2
    dataset = get_dataset(config.data)
    data = {"inputs": dataset.train_inputs, "label": dataset.train_labels, "targets": dataset.train_targets}
    rows = vmapped.batch_rows(config.seed, dataset.num_train_examples, config.data.batch_size, config.num_train_steps)
    log_eta = np.asarray(assembly.log_noise_probs(config, dataset))
    params, _ = te.make_train_fn(config)(
        jax.random.PRNGKey(config.seed)[None], jax.tree.map(lambda v: v[None], data), rows[None], log_eta[None]
    )
    for ours, cli in zip(jax.tree.leaves(params), jax.tree.leaves(cli_params)):
        np.testing.assert_allclose(np.asarray(ours)[0], np.asarray(cli), rtol=0, atol=2e-5)
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    initial = assembly.initial_variables(config, models.get_model(config.model, 3), (2,), init_rng)["params"]
    pairs = zip(jax.tree.leaves(initial), jax.tree.leaves(cli_params))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs]
    assert max(moved) > 1e-3


def test_batch_rows_are_epoch_permutations():
    rows = vmapped.batch_rows(seed=7, num_examples=100, batch_size=32, num_steps=7)  # 3 steps per epoch
    assert rows.shape == (7, 32)
    for epoch in range(2):
        block = rows[3 * epoch : 3 * epoch + 3].ravel()
        assert len(set(block.tolist())) == 96  # no repeats within an epoch
    assert not np.array_equal(rows[:3], rows[3:6])
    with pytest.raises(ValueError, match="larger than the training set"):
        vmapped.batch_rows(seed=0, num_examples=10, batch_size=32, num_steps=1)


# --------------------------------------------------------------------------------------------------
# The temperature study (softnce/experiments/toy_temperature.py, docs/method.md "The toy finding").
# --------------------------------------------------------------------------------------------------


def test_population_scores_at_one_vote_are_the_log_posterior_ratio():
    # m = 1: the targets are the vertices with weights pi, and the optimum is known in closed form,
    # s = log p(y|x) - log pi (up to a per-row constant), including rows deep in the tails.
    pi = toy.class_prior("imbalanced")
    log_p = toy.true_log_posterior(np.random.default_rng(0).normal(size=(300, 2)) * 3, "imbalanced")
    s, info = tts.population_scores(np.exp(log_p), np.eye(3), pi)
    expected = log_p - np.log(pi)
    centred = lambda v: v - v.mean(1, keepdims=True)  # noqa: E731
    assert info["not_converged"] == 0 and np.exp(log_p).min() < 1e-8
    np.testing.assert_allclose(centred(s), centred(expected), atol=1e-6)


def test_population_scores_minimise_the_large_batch_loss():
    # An independent minimiser (scipy BFGS on the same convex objective) agrees with the solver on a
    # random marginal of soft targets.
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    rng = np.random.default_rng(1)
    atoms = rng.dirichlet(np.ones(3), size=40)
    weights = rng.dirichlet(np.ones(40))
    probs = rng.dirichlet(2 * np.ones(3), size=5)
    s, info = tts.population_scores(probs, atoms, weights)
    assert info["not_converged"] == 0
    for p, row in zip(probs, s):
        phi = lambda v: -p @ np.r_[0.0, v] + logsumexp(atoms @ np.r_[0.0, v], b=weights)  # noqa: E731
        ref = minimize(phi, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
        np.testing.assert_allclose(row[1:] - row[0], ref, atol=1e-4)


def test_lattice_and_marginal_of_histograms():
    counts = tts.lattice(4)
    assert counts.shape == (15, 3) and np.all(counts.sum(1) == 4) and len({tuple(c) for c in counts}) == 15
    atoms, weights = tts.target_marginal("balanced", 4, 20_000, 10, np.random.default_rng(2))
    assert weights.sum() == pytest.approx(1.0) and np.all(weights > 0)
    # The histograms are unbiased: the marginal's mean is the class prior (Monte Carlo, 20,000 inputs).
    np.testing.assert_allclose(weights @ atoms, toy.class_prior("balanced"), atol=0.01)


def test_reduced_temperature_study(tmp_path):
    # Trained: STI on one vote is calibrated (t* ~ 1), on the true posterior it is overconfident.
    # Predicted: the optimum is calibrated at m = 1 and needs t* > 1.6 at m = 10 (full study: 2.07).
    settings = tts.StudySettings(
        seeds=2,
        annotators=(1, math.inf),
        cells=((64, 300),),
        num_train=1000,
        num_val=1000,
        num_test=1000,
        population_annotators=(1, 10),
        population_inputs=20_000,
        population_queries=500,
        finite_batches=(16,),
        finite_annotators=(10,),
        finite_queries=8,
        finite_replicates=8,
    )
    result = tts.run_study(settings, str(tmp_path), log=lambda line: None)
    for name in ("metrics.json", "summary.md", "temperature_study.png"):
        assert os.path.getsize(tmp_path / name) > 100, name
    trained = {s["m"]: s["t_star"]["mean"] for s in result["summary"]}
    assert 0.8 < trained["1"] < 1.25
    assert trained["inf"] > 1.5 and trained["inf"] > trained["1"] + 0.4
    population = result["population"]["inf"]
    assert population["1"]["t_star"] == pytest.approx(1.0, abs=0.1)
    assert population["1"]["slope"] == pytest.approx(1.0, abs=0.02)
    assert population["10"]["t_star"] > 1.6
    assert np.isfinite(result["population"]["finite"]["16"]["10"]["t_star"])
