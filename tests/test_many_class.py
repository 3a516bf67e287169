"""The many-class study (softnce/experiments/many_class.py): the quick setting end to end through the script on
the small fake Fashion-MNIST of test_fashion_mnist.py, its resume, the paired t-intervals against hand-computed
values, and the M -> steps mapping that keeps the examples seen fixed."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from test_fashion_mnist import REPO, prepared  # noqa: F401  (prepared: the fake IDX fixture)

from softnce.experiments import comparison
from softnce.experiments import many_class as mc

QUICK = mc.SETTINGS["quick"]


def run_script(out, data_dir, env):
    cmd = [sys.executable, "experiments/many_class.py", "--quick", "--data_dir", data_dir, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout.splitlines()


def test_quick_study_end_to_end_then_resumes_without_training(prepared, tmp_path, cli_env):  # noqa: F811
    data_dir, _ = prepared
    out = tmp_path / "study"
    lines = run_script(out, data_dir, cli_env)
    estimate = mc.estimate_seconds(QUICK)
    assert lines[0].startswith(f"many-class study: {sum(estimate['runs'].values())} runs ")
    assert f"about {estimate['seconds'] / 60:.0f} min from measured run times" in lines[0]
    summary = json.load(open(out / "summary.json"))
    assert summary["complete"] and summary["trained"] >= sum(estimate["runs"].values())
    for name in ("report.md", "summary.json", "many_class.png", "C100/final_M64/table.md", "C10/selection_t/sweep.png"):
        assert (out / name).exists(), name

    # Selection: every loss of every C chosen on validation; the selection runs never read the test split.
    for k in QUICK.ks:
        chosen = summary["selection"][f"C{10**k}"]["chosen"]
        assert set(chosen) == set(mc.LOSSES)
        for loss, choice in chosen.items():
            assert ("loss.temperature" in choice["params"]) == (loss in mc.TEMPERATURE_LOSSES)
            assert set(choice["at_edge"]) == set(choice["widened"]) == set(choice["params"])
        for stage in ("selection_lr", "selection_t"):
            for runs in json.load(open(out / f"C{10**k}" / stage / "results.json"))["results"].values():
                for r in runs["metrics"]:
                    assert r["seed"] == QUICK.selection_seed and "top1" in r["validation"] and "top1" not in r
                    assert not (out / f"C{10**k}" / stage / r["workdir"] / "metrics.json").exists()

    # Every cell: its runs at the chosen values, test metrics, the paired differences and the batch statistics.
    k_max = QUICK.ks[-1]
    expected = {f"C{10**k}_M{QUICK.batch_size}" for k in QUICK.ks} | {f"C{10**k_max}_M{m}" for m in QUICK.batch_sizes}
    assert set(summary["cells"]) == expected
    assert summary["against_C"] == [f"C{10**k}_M{QUICK.batch_size}" for k in QUICK.ks]
    assert summary["against_M"] == [f"C{10**k_max}_M{m}" for m in sorted((QUICK.batch_size, *QUICK.batch_sizes))]
    for name, cell in summary["cells"].items():
        c, m = cell["C"], cell["M"]
        assert cell["steps"] * m == QUICK.examples
        losses = mc.LOSSES if m == QUICK.batch_size else mc.BATCH_STUDY_LOSSES
        assert sorted(cell["test"]) == sorted(losses)
        final = json.load(open(out / f"C{c}" / f"final_M{m}" / "results.json"))["results"]
        for loss in losses:
            (record,) = final[loss]["metrics"]
            assert record["params"] == summary["selection"][f"C{c}"]["chosen"][loss]["params"]
            assert record["seed"] == QUICK.seeds[0] and record["step"] == cell["steps"]
            config = json.load(open(out / f"C{c}" / f"final_M{m}" / record["workdir"] / "config.json"))
            assert config["data"]["batch_size"] == m and config["data"]["seed"] == QUICK.data_seed
        pairs = [(a, b) for a, b in mc.PAIRS if a in losses and b in losses]
        assert set(cell["differences"]) == {f"{a} - {b}" for a, b in pairs}
        for a, b in pairs:
            for metric in mc.DIFFERENCE_METRICS:
                interval = cell["differences"][f"{a} - {b}"][metric]
                difference = cell["test"][a][metric]["values"][0] - cell["test"][b][metric]["values"][0]
                assert interval["n"] == 1 and interval["mean"] == pytest.approx(difference, abs=1e-12)
                assert interval["half_width"] is None  # one seed: no interval
        uniform, actual = cell["batch"]["uniform"], cell["batch"]["training_labels"]
        assert uniform["same_class_share"] == pytest.approx(1 / c) and uniform["batch_size"] == m
        assert uniform["absent_share"] == pytest.approx((1 - 1 / c) ** m)
        assert 0 <= actual["same_class_share"] <= 1 and 0 <= actual["absent_share"] <= 1
        assert actual["num_classes"] == c
    report = (out / "report.md").read_text()
    assert "| soft_target_infonce - soft_target_cross_entropy | 100 | 64 | 1 |" in report
    assert "| soft_target_cross_entropy - nll | 10 | 32 | 1 |" in report and "## What a batch holds" in report

    # The same command again keeps every run: nothing is trained, the records stay as they were.
    before = (out / "C100" / "final_M64" / "results.json").read_text()
    again = run_script(out, data_dir, cli_env)
    resumed = json.load(open(out / "summary.json"))
    assert resumed["trained"] == 0 and resumed["cells"] == summary["cells"], again[-5:]
    assert json.loads((out / "C100" / "final_M64" / "results.json").read_text())["results"] == \
        json.loads(before)["results"]
    assert not any(" | run " in line for line in again)  # every run line says "done before"


def test_paired_interval_against_hand_computed_values():
    d = [0.012, -0.004, 0.020]
    mean = (0.012 - 0.004 + 0.020) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)
    interval = comparison.paired_interval(d)
    assert interval["mean"] == pytest.approx(mean, rel=1e-12) and interval["n"] == 3
    assert interval["half_width"] == pytest.approx(t_975_2 * sd / math.sqrt(3), rel=1e-9)
    assert interval["half_width"] == pytest.approx(0.030357, abs=1e-6)  # 4.302653 * 0.0122202 / 1.7320508
    assert (interval["low"], interval["high"]) == pytest.approx((mean - interval["half_width"],
                                                                 mean + interval["half_width"]), rel=1e-12)
    ninety = comparison.paired_interval(d, confidence=0.9)  # t_{0.95, 2} = 2.919986
    assert ninety["half_width"] == pytest.approx(2.919985580355516 * sd / math.sqrt(3), rel=1e-9)
    single = comparison.paired_interval([0.5])
    assert single["mean"] == 0.5 and single["half_width"] is single["low"] is single["high"] is None
    with pytest.raises(ValueError, match="non-empty"):
        comparison.paired_interval([])


def test_cell_differences_pair_by_seed():
    # Records out of order and one unpaired seed (4): d = A(s) - B(s) over seeds 1-3 only.
    results = {
        mc.STI: {"metrics": [{"seed": 3, "top1": 0.50, "nll": 2.0}, {"seed": 1, "top1": 0.40, "nll": 2.5},
                             {"seed": 2, "top1": 0.45, "nll": 2.2}, {"seed": 4, "top1": 0.9, "nll": 0.1}]},
        mc.SOFT_CE: {"metrics": [{"seed": 1, "top1": 0.42, "nll": 2.4}, {"seed": 2, "top1": 0.41, "nll": 2.3},
                                 {"seed": 3, "top1": 0.47, "nll": 2.1}]},
    }
    found = mc.cell_differences(results)
    assert list(found) == [f"{mc.STI} - {mc.SOFT_CE}"]  # the other pairs lack a loss
    top1, nll = found[f"{mc.STI} - {mc.SOFT_CE}"]["top1"], found[f"{mc.STI} - {mc.SOFT_CE}"]["nll"]
    np.testing.assert_allclose(top1["differences"], [-0.02, 0.04, 0.03], atol=1e-12)
    np.testing.assert_allclose(nll["differences"], [0.1, -0.1, -0.1], atol=1e-12)
    assert top1["mean"] == pytest.approx(0.05 / 3, rel=1e-9)
    sd = math.sqrt(((-0.02 - 0.05 / 3) ** 2 + (0.04 - 0.05 / 3) ** 2 + (0.03 - 0.05 / 3) ** 2) / 2)
    assert top1["half_width"] == pytest.approx(4.302652729911275 * sd / math.sqrt(3), rel=1e-9)
    assert "nll_calibrated" not in found[f"{mc.STI} - {mc.SOFT_CE}"]  # not reported by these runs


@pytest.mark.parametrize("name", sorted(mc.SETTINGS))
def test_batch_sizes_keep_the_examples_seen_fixed(name):
    setting = mc.SETTINGS[name]
    k = setting.ks[-1]
    configs = {m: mc.make_config_fn(setting, k, m, data_dir=None, overrides={"data.batch_size": 7, "optim.b1": 0.8})(
        mc.STI, 2) for m in (setting.batch_size, *setting.batch_sizes)}
    for m, config in configs.items():
        assert config.data.batch_size == m and config.num_train_steps * m == setting.examples  # no override changes M
        assert config.eval_every_steps == config.checkpoint_every_steps == config.num_train_steps
        assert abs(config.optim.warmup_steps * m - setting.warmup_fraction * setting.examples) <= m / 2
        assert config.optim.b1 == 0.8 and config.seed == 2 and config.data.seed == setting.data_seed
        assert config.data.tuple_size == k and config.data.pool_size == setting.pool
    assert len({config.optim.base_lr for config in configs.values()}) == 1  # per 256 examples: scaled by the trainer
    assert mc.steps_for(307_200, 64) == 4800 and mc.steps_for(307_200, 512) == 600
    with pytest.raises(ValueError, match="not a whole number of batches of 500"):
        mc.steps_for(307_200, 500)


def test_full_budget_counts_the_runs():
    estimate = mc.estimate_seconds(mc.SETTINGS["full"])
    # Per C: 4 losses x 3 learning rates + 2 losses x 4 temperatures; final: 4 losses x 3 C + 2 losses x 2 M, 3 seeds.
    assert estimate["runs"] == {"selection": 3 * (12 + 8), "final": 3 * (3 * 4 + 2 * 2)}
    steps = mc.steps_for(mc.SETTINGS["full"].examples, 256)
    assert estimate["steps"] == (60 + 36) * steps + 6 * (4 * steps + steps // 2)
