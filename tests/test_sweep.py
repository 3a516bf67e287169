"""The sweep runner (softnce.experiments.sweep): the selection rule on hand-made numbers, the runner's
bookkeeping (resume, widening, diverged runs) on a stand-in trainer, and a tiny real sweep on digits."""

import json
import os

import pytest

from softnce import train
from softnce.configs import digits
from softnce.experiments import sweep


def v(top1, nll):
    return {"top1": top1, "nll": nll, "ece": 0.0, "t_star": 1.0}


def test_selection_rule_on_hand_made_numbers():
    rule = sweep.SelectionRule()
    # The best validation top-1 wins, whatever its NLL.
    assert rule.choose([("a", [v(0.90, 0.2)]), ("b", [v(0.91, 0.9)]), ("c", [v(0.89, 0.1)])]) == 1
    # A tie on top-1: the lower NLL wins; a tie on both: the first in grid order.
    assert rule.choose([("a", [v(0.91, 0.30)]), ("b", [v(0.91, 0.25)]), ("c", [v(0.90, 0.1)])]) == 1
    assert rule.choose([("a", [v(0.91, 0.3)]), ("b", [v(0.91, 0.3)])]) == 0
    # Means over seeds: a (0.90, 0.92) -> 0.91 beats b (0.95, 0.85) -> 0.90.
    assert rule.choose([("a", [v(0.90, 0.3), v(0.92, 0.3)]), ("b", [v(0.95, 0.2), v(0.85, 0.2)])]) == 0
    # A diverged run (None) ranks last, even below a poor point.
    assert rule.choose([("a", [v(0.91, 0.3), None]), ("b", [v(0.10, 2.3), v(0.10, 2.3)])]) == 1
    # Within a tolerance, top-1 values count as tied and the NLL decides.
    loose = sweep.SelectionRule(tolerance=0.005)
    assert loose.choose([("a", [v(0.912, 0.30)]), ("b", [v(0.910, 0.25)])]) == 1
    by_nll = sweep.SelectionRule(metric="nll", higher_is_better=False, tie_break="top1",
                                 tie_break_higher_is_better=True)
    assert by_nll.choose([("a", [v(0.9, 0.3)]), ("b", [v(0.8, 0.2)])]) == 1
    with pytest.raises(ValueError):
        rule.choose([])


def test_grid_points_names_and_edges():
    assert sweep.points({}) == [{}]
    assert sweep.points({"optim.base_lr": [1e-3, 2e-3], "loss.temperature": [0.5, 1.0]}) == [
        {"optim.base_lr": 1e-3, "loss.temperature": 0.5}, {"optim.base_lr": 1e-3, "loss.temperature": 1.0},
        {"optim.base_lr": 2e-3, "loss.temperature": 0.5}, {"optim.base_lr": 2e-3, "loss.temperature": 1.0}]
    assert sweep.run_name("nll", {}, 3) == "nll_seed3"
    name = sweep.run_name("sti", {"optim.base_lr": 0.002, "loss.temperature": 0.5}, 0)
    assert name == "sti_base_lr0.002_temperature0.5_seed0"
    assert sweep.beyond_edge([5e-4, 2e-3, 8e-3], 8e-3, 4.0) == 0.032
    assert sweep.beyond_edge([5e-4, 2e-3, 8e-3], 5e-4, 4.0) == 0.000125
    assert sweep.beyond_edge([5e-4, 2e-3, 8e-3], 2e-3, 4.0) is None
    assert sweep.beyond_edge([1.0], 1.0, 2.0) is None


def tiny_digits(group, seed, steps=20):
    config = digits.get_config(f"loss={group},seed={seed},steps={steps}")
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = steps
    return config


@pytest.fixture
def fake_trainer(monkeypatch):
    """Replaces the trainer with one that writes final files at once: validation top-1 peaks at
    lr 1e-2 (falls on both sides), and lr >= 1 diverges. Returns the list of trained workdirs."""
    trained = []

    def fake(config, workdir):
        trained.append(os.path.basename(workdir))
        lr = config.optim.base_lr
        if lr >= 1:
            raise FloatingPointError("non-finite loss at step 3")
        os.makedirs(workdir, exist_ok=True)
        import math

        val = {"top1": 0.9 - 0.01 * abs(math.log10(lr) + 2), "nll": 0.3, "ece": 0.01, "t_star": 1.1,
               "step": config.num_train_steps}
        assert not config.evaluate_test
        json.dump(val, open(os.path.join(workdir, "validation_metrics.json"), "w"))
        return {"step": config.num_train_steps, "validation": val}

    monkeypatch.setattr(train, "train_and_evaluate", fake)
    return trained


def test_resume_widening_and_divergence_with_a_stand_in_trainer(tmp_path, fake_trainer):
    out, lines = str(tmp_path / "sweep"), []
    grid = {"nll": {"optim.base_lr": [1e-4, 1e-3]}, "infonce": {"optim.base_lr": [1e-1, 1.0]}}
    result = sweep.run_sweep(tiny_digits, grid, out=out, widen={"optim.base_lr": 10.0}, max_widenings=2,
                             log=lines.append)
    # nll: 1e-3 at the top edge -> 1e-2 added, again at the edge -> 1e-1 added: 1e-2 is inside, stop.
    assert result["grids"]["nll"]["optim.base_lr"] == [1e-4, 1e-3, 1e-2, 1e-1]
    assert result["selected"]["nll"]["params"] == {"optim.base_lr": 1e-2}
    # infonce: 1.0 diverged, so 0.1 is chosen at the bottom edge -> 1e-2 added, chosen, at the edge
    # again -> 1e-3 added: 1e-2 is inside.
    assert result["grids"]["infonce"]["optim.base_lr"] == [1e-3, 1e-2, 1e-1, 1.0]
    assert result["selected"]["infonce"]["params"] == {"optim.base_lr": 1e-2}
    diverged = [r for r in result["results"]["infonce"]["metrics"] if r.get("diverged")]
    assert [r["params"] for r in diverged] == [{"optim.base_lr": 1.0}] and "non-finite" in diverged[0]["error"]
    assert len(fake_trainer) == result["trained"] == 8
    assert any("widening: nll optim.base_lr += 0.01" in line for line in lines)
    assert all("ETA" in line for line in lines if line.startswith("["))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["selected"]["nll"]["at_edge"] == {"optim.base_lr": False}
    assert "diverged" in open(os.path.join(out, "table.md")).read()
    # Running again trains nothing (the diverged run is kept too); a new seed trains only that seed.
    del fake_trainer[:]
    again = sweep.run_sweep(tiny_digits, grid, out=out, widen={"optim.base_lr": 10.0}, max_widenings=2, log=print)
    assert again["trained"] == 0 and not fake_trainer
    assert again["results"] == json.load(open(os.path.join(out, "results.json")))["results"]
    more = sweep.run_sweep(tiny_digits, {"nll": {"optim.base_lr": [1e-2]}}, seeds=[0, 1], out=out, log=print)
    assert fake_trainer == ["nll_base_lr0.01_seed1"] and more["trained"] == 1


def test_tiny_digits_sweep_selects_on_validation_and_resumes(tmp_path):
    out = str(tmp_path / "digits")
    grid = {loss: {"optim.base_lr": [3e-4, 3e-3]} for loss in ("nll", "soft_target_infonce")}
    result = sweep.run_sweep(tiny_digits, grid, out=out, validation_every_steps=10, title="digits")
    runs = {loss: result["results"][loss]["metrics"] for loss in grid}
    for loss, records in runs.items():
        assert len(records) == 2
        for r in records:
            workdir = os.path.join(out, r["workdir"])
            # Selection runs never evaluate the test split: no test metrics, no metrics.json.
            assert "top1" not in r and not os.path.exists(os.path.join(workdir, "metrics.json"))
            assert r["validation"]["split"] == "validation" and r["validation"]["num_examples"] == 126
            assert [p["step"] for p in json.load(open(os.path.join(workdir, "history.json")))] == [10, 20]
        # The choice: the best validation top-1, ties broken by the lower validation NLL.
        best = max(records, key=lambda r: (r["validation"]["top1"], -r["validation"]["nll"]))
        assert result["selected"][loss]["params"] == best["params"]
    for name in ("results.json", "summary.json", "table.md", "sweep.png", "curves.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "**yes**" in open(os.path.join(out, "table.md")).read()
    again = sweep.run_sweep(tiny_digits, grid, out=out, validation_every_steps=10)
    assert again["trained"] == 0 and again["results"] == result["results"]


def test_trainer_validation_curve_resumes_after_a_stop(tmp_path):
    config = tiny_digits("nll", 0)
    config.validation_every_steps, config.evaluate_test = 5, False
    stopped = str(tmp_path / "stopped")
    assert train.train_and_evaluate(config, stopped, stop_at_step=10) == {"preempted_at_step": 10}
    assert [p["step"] for p in json.load(open(os.path.join(stopped, "history.json")))] == [5, 10]
    resumed = train.train_and_evaluate(config, stopped)
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    curves = [json.load(open(os.path.join(d, "history.json"))) for d in (stopped, str(tmp_path / "whole"))]
    assert [p["step"] for p in curves[0]] == [5, 10, 15, 20]
    for a, b in zip(*curves):
        assert a["top1"] == b["top1"] and abs(a["nll"] - b["nll"]) < 1e-5
    assert set(resumed) == {"step", "validation"} and resumed["validation"]["top1"] == whole["validation"]["top1"]
    saved = json.load(open(os.path.join(stopped, "validation_metrics.json")))
    assert saved["step"] == 20 and saved["top1"] == curves[0][-1]["top1"] and saved["t_star"] > 0
