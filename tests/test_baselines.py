"""The baselines and attribution study (softnce/experiments/baselines.py): the quick setting end to end on the
small fake Fashion-MNIST of test_fashion_mnist.py, against a stand-in of the fair comparison's summary; the two
selection rules; the summary's test values read back as paired results."""

import json

import pytest
from test_fashion_mnist import prepared  # noqa: F401  (the fake IDX fixture)

from softnce.experiments import baselines, comparison


def comparison_stand_in():
    """The fair comparison's summary, reduced: selection points (NLL's best by top-1 and by NLL differ), test values."""
    def point(lr, top1, nll):
        return {"params": {"optim.base_lr": lr}, "validation": {"top1": top1, "nll": nll}, "diverged": False}

    def test(top1, nll):
        metrics = {"top1": top1, "nll": nll, "nll_calibrated": nll - 0.01, "ece": 0.02, "ece_calibrated": 0.01}
        return {k: {"mean": v, "std": 0.0, "values": [v], "seeds": [1]} for k, v in metrics.items()}

    return {"selection": {"points": {"nll": [point(2e-3, 0.80, 0.70), point(8e-3, 0.82, 0.90)],
                                     "soft_target_infonce": [point(2e-3, 0.81, 0.60)]}},
            "test": {"nll": test(0.81, 0.8), "soft_target_infonce": test(0.815, 0.65)}}


def test_quick_baselines_end_to_end(prepared, tmp_path):  # noqa: F811
    data_dir, _ = prepared
    summary_path = tmp_path / "comparison.json"
    summary_path.write_text(json.dumps(comparison_stand_in()))
    out = tmp_path / "baselines"
    sets = ["data.batch_size=32", "data.eval_batch_size=16", "model.channels=(4, 8)", "model.hidden=16"]
    summary = baselines.main(["--quick", "--comparison", str(summary_path), "--data_dir", data_dir, "--out", str(out),
                              *[f"--config.{s}" for s in sets]])
    groups = baselines.SETTINGS["quick"].groups
    # Stage 1: every group's learning rate; stage 2: the weight decay at that learning rate (validation only).
    first = json.load(open(out / "selection_lr" / "results.json"))["results"]
    assert sorted(first) == sorted(groups) and all(len(first[g]["metrics"]) == 2 for g in groups)
    second = json.load(open(out / "selection_second" / "results.json"))["results"]
    assert list(second) == ["nll_weight_decay"]
    decays = sorted(r["params"]["optim.weight_decay"] for r in second["nll_weight_decay"]["metrics"])
    assert decays == [0.05, 0.2, 0.8]
    chosen_lr = {r["params"]["optim.base_lr"] for r in second["nll_weight_decay"]["metrics"]}
    assert len(chosen_lr) == 1
    # The two rules; the comparison's NLL is chosen by top-1 at 8e-3 and by NLL at 2e-3, so it is rerun.
    assert summary["chosen"]["top1"]["nll"] == {"optim.base_lr": 8e-3}
    assert summary["chosen"]["nll"]["nll"] == {"optim.base_lr": 2e-3}
    assert summary["chosen"]["top1"]["soft_target_infonce"] == summary["chosen"]["nll"]["soft_target_infonce"]
    assert "nll" in summary["nll_choice_differs"] and "soft_target_infonce" not in summary["nll_choice_differs"]
    rerun = json.load(open(out / "final_by_nll" / "results.json"))["results"]["nll"]["metrics"]
    assert [r["params"] for r in rerun] == [{"optim.base_lr": 2e-3}] and "top1" in rerun[0]
    assert summary["test"]["nll"]["nll"]["top1"]["values"] == [rerun[0]["top1"]]
    assert summary["test"]["top1"]["nll"]["top1"]["values"] == [0.81]  # the comparison's own runs
    # Every group's final runs at its top-1 choice, with test metrics; the mixed-input group trains with MixUp.
    final = json.load(open(out / "final" / "results.json"))["results"]
    assert sorted(final) == sorted(groups)
    assert final["mixed_inputs_sampled_ce"]["targets"] == "smoothing 0.1 + MixUp/CutMix"
    config = json.load(open(out / "final" / final["mixed_inputs_sampled_ce"]["metrics"][0]["workdir"] / "config.json"))
    assert config["loss"]["name"] == "soft_distribution_cross_entropy"
    for rule in ("top1", "nll"):
        assert {row["loss"] for row in summary["tables"][rule]} == {"nll", "soft_target_infonce", *groups}
        assert summary["findings"][rule].startswith(f"Chosen by validation {rule}: the lowest test NLL is ")
    report = (out / "report.md").read_text()
    assert "## Chosen by validation top1" in report and "## Chosen by validation nll" in report
    assert "| nll | base_lr 0.008 | base_lr 0.002 |" in report  # the chosen values under both rules
    selection_seconds = sum(r["wall_seconds"] for stage in ("selection_lr", "selection_second")
                            for runs in json.load(open(out / stage / "results.json"))["results"].values()
                            for r in runs["metrics"])
    assert summary["run_seconds"] > selection_seconds > 0  # selection and final runs both counted


def test_summary_test_values_pair_by_seed():
    sti = {"mean": 0.5, "std": 0.0, "values": [0.50, 0.52, 0.48], "seeds": [1, 2, 3]}
    tests = {"soft_target_infonce": {"top1": sti},
             "nll": {"top1": {"mean": 0.5, "std": 0.0, "values": [0.47, 0.50, 0.46], "seeds": [2, 1, 3]}}}
    results = baselines.as_results(tests)
    d = comparison.paired_differences(results, "soft_target_infonce", "nll", "top1")
    assert list(d) == pytest.approx([0.50 - 0.50, 0.52 - 0.47, 0.48 - 0.46])
    row = next(r for r in baselines.rule_table(tests) if r["loss"] == "nll")
    assert row["sti_minus_top1"]["mean"] == pytest.approx((0.0 + 0.05 + 0.02) / 3)
    assert row["sti_minus_nll"] is None  # no NLL values


def test_the_rules_choose_by_top1_and_by_nll():
    points = comparison_stand_in()["selection"]["points"]["nll"]
    assert baselines.choose(points, baselines.BY_TOP1) == {"optim.base_lr": 8e-3}
    assert baselines.choose(points, baselines.BY_NLL) == {"optim.base_lr": 2e-3}
    committed = json.load(open("docs/fair_comparison_summary.json"))
    for loss, loss_points in committed["selection"]["points"].items():  # the comparison's own rule, reproduced
        assert baselines.choose(loss_points, baselines.BY_TOP1) == committed["selection"]["chosen"][loss]["params"]
