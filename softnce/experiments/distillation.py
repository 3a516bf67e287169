"""Knowledge distillation on Fashion-MNIST: a teacher CNN, and the small CNN trained on its targets.

    python -m softnce.data.fashion_mnist          # once: prepare the data (see configs/fashion_mnist.py)
    python experiments/distillation_fashion.py --seeds 3 --out runs/fashion_distillation

1. **Teacher** (trained once, seed 0, into ``OUT/teacher``): ``small_cnn`` with two 3x3 convolutions
   per stage, 48 and 96 channels and a 256-wide hidden layer (:data:`TEACHER_MODEL`, 1.35 M
   parameters, against the student's 0.42 M), trained with NLL on the hard labels (no smoothing, no
   mixing) for ``--teacher_steps`` (3,000) steps of batch 128; otherwise ``configs/fashion_mnist.py``.
2. **Students**: the config's ``small_cnn`` for ``--steps`` (the config's 2,000), seeds ``0 ..
   seeds-1``, through the real trainer (:func:`softnce.experiments.comparison.run_grid`):

   - ``nll``: the baseline, NLL on the hard labels (no teacher);
   - ``soft_target_cross_entropy`` (classic distillation), ``soft_target_infonce`` (STI) and
     ``soft_distribution_infonce``, each trained on the teacher's targets
     ``a = (1 - beta) a_recipe + beta softmax(z_teacher / tau)`` (``config.distill``; defaults
     ``beta = 1``: the teacher's distribution alone, ``tau = 1``: its probabilities as they are).
     ``--augment off`` (the default) trains them on the same un-mixed images as the baseline, so
     the targets are the only difference; ``--augment auto`` adds the config's label smoothing +
     MixUp/CutMix recipe (the teacher then labels each mixed image).

   Every run holds out the same 6,000 training images (``validation_seed`` 0: the teacher never
   trained on them) to fit the post-hoc temperature ``t*``; the test set is the official 10,000.

Outputs in ``OUT``: the grid's ``results.json``, ``table.md`` and reliability figures (see
:mod:`softnce.experiments.comparison`), and ``distillation.md`` / ``distillation.json``: the teacher's
test metrics, mean ± std over seeds of top-1, NLL and ECE at t = 1 and at ``t*``, each distilled
student minus the NLL student paired by seed (``mean ± std (wins/seeds)``), the measured run times,
and ``reliability_with_teacher.png`` (the teacher beside the students, seeds pooled). Running the
same command again continues: a finished teacher and finished student runs are kept.

Run time: about 28 minutes on a 2-core CPU for 3 seeds (BENCHMARKS.md, "Run times").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

from softnce import cli
from softnce.experiments import comparison, sweep

STUDENT_LOSSES = ("nll", "soft_target_cross_entropy", "soft_target_infonce", "soft_distribution_infonce")
BASELINE = "nll"  # the student trained on the hard labels, without the teacher
TEACHER_MODEL = dict(name="small_cnn", channels=(48, 96), convs_per_stage=2, hidden=256, dropout_rate=0.0)
TEACHER_STEPS = 3000
TEACHER_SEED = 0
TITLE = "Fashion-MNIST test set"


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, with ``config`` (``--config.<field>=<value>``: every run) and ``teacher_config``
    (``--teacher_config.<field>=<value>``: the teacher's run only) overrides."""
    parser = cli.ArgumentParser(description="Knowledge distillation on Fashion-MNIST (softnce.experiments."
                                     "distillation): a teacher CNN, then the small CNN on its targets over seeds.",
                                     epilog=comparison.OVERRIDES_HELP + " Any --teacher_config.<field>=<value> "
                                     "overrides a field of the teacher's config only, e.g. "
                                     "--teacher_config.model.hidden=128.")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="student training steps (default: the config's)")
    parser.add_argument("--teacher_steps", type=int, default=TEACHER_STEPS, help="teacher steps (default %(default)s)")
    parser.add_argument("--losses", default=",".join(STUDENT_LOSSES),
                        help="student losses; 'nll' (hard labels, no teacher) is always the baseline")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the teacher's distribution (default 1)")
    parser.add_argument("--tau", type=float, default=1.0, help="teacher temperature (default 1)")
    parser.add_argument("--augment", choices=("off", "auto"), default="off",
                        help="the distilled students' recipe: off (default) or auto (smoothing + MixUp/CutMix)")
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default ~/tensorflow_datasets)")
    parser.add_argument("--out", default="runs/fashion_distillation", help="output folder")
    teacher_overrides, rest = comparison.config_overrides(argv, "teacher_config")
    overrides, rest = comparison.config_overrides(rest)
    args = parser.parse_args(rest)
    args.config, args.teacher_config = overrides, teacher_overrides
    return args


def _fashion_config(loss: str, seed: int, steps: Optional[int], augment: str, data_dir, overrides: dict):
    from softnce.configs import fashion_mnist

    arg = f"loss={loss},seed={seed},augment={augment}" + (f",steps={steps}" if steps else "")
    config = fashion_mnist.get_config(arg)
    config.data.data_dir = data_dir
    config.update_from_flattened_dict(overrides)
    return config


def teacher_config(args: argparse.Namespace):
    """The teacher's config: NLL on hard labels, :data:`TEACHER_MODEL`, ``--teacher_steps``."""
    import ml_collections

    config = _fashion_config(BASELINE, TEACHER_SEED, args.teacher_steps, "auto", args.data_dir, args.config)
    config.model = ml_collections.ConfigDict(TEACHER_MODEL)
    config.update_from_flattened_dict(args.teacher_config)
    return config


def student_config_fn(args: argparse.Namespace, teacher_workdir: str):
    """``make_config(loss, seed)`` for :func:`~softnce.experiments.comparison.run_grid`."""
    overrides = args.config

    def make_config(loss: str, seed: int):
        augment = "auto" if loss == BASELINE else args.augment
        config = _fashion_config(loss, seed, args.steps, augment, args.data_dir, overrides)
        if loss != BASELINE:
            config.distill.update(teacher_workdir=teacher_workdir, beta=args.beta, tau=args.tau)
        return config

    return make_config


def train_teacher(config, workdir: str, log=print) -> dict:
    """Trains (or, if finished, keeps) the teacher in ``workdir``; returns ``{'metrics', 'wall_seconds'}``."""
    from softnce import train

    record_path = os.path.join(os.path.dirname(workdir), "teacher.json")
    record = sweep.read_json(record_path)
    metrics = sweep.read_json(os.path.join(workdir, "metrics.json"))
    if record is not None and metrics is not None and metrics.get("step") == config.num_train_steps:
        log(f"teacher: finished before ({record['wall_seconds']:.0f} s); kept")
        return record
    start = time.time()
    metrics = train.train_and_evaluate(config, workdir)
    record = json.loads(json.dumps({"metrics": metrics, "wall_seconds": time.time() - start,
                                    "model": config.model.to_dict(), "steps": config.num_train_steps}))
    sweep.write_json(record_path, record)
    log(f"teacher: top-1 {metrics['top1']:.4f}, NLL {metrics['nll']:.4f}, ECE {metrics['ece']:.4f} "
        f"({record['wall_seconds']:.0f} s)")
    return record


def distilled_minus_baseline(results: dict, baseline: str = BASELINE) -> str:
    """Markdown: each distilled student minus the ``baseline`` student, paired by seed, per metric."""
    metrics = [m for m in comparison.METRICS if m[4] is not None]
    others = [loss for loss in results if loss != baseline]
    lines = [f"| student minus {baseline} (hard labels) | " + " | ".join(
        f"Δ {m[1]}".replace("(%)", "(points)") for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for other in others:
        cells = []
        for key, _, scale, digits, higher_better in metrics:
            d = comparison.paired_differences(results, other, baseline, key)
            if d is None:
                cells.append("n/a")
                continue
            wins = int((d > 0).sum() if higher_better else (d < 0).sum())
            spread = d.std(ddof=1) * scale if len(d) > 1 else 0.0
            cells.append(f"{d.mean() * scale:+.{digits}f} ± {spread:.{digits}f} ({wins}/{len(d)})")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_table(record: dict) -> str:
    m = record["metrics"]
    cells = [f"{m[key] * scale:.{digits}f}" if key in m else "n/a" for key, _, scale, digits, _ in comparison.METRICS]
    model = record["model"]
    lines = ["| teacher | steps | " + " | ".join(t for _, t, *_ in comparison.METRICS) + " |",
             "|---|---|" + "---|" * len(comparison.METRICS),
             f"| {model['name']} {tuple(model.get('channels', ()))} x{model.get('convs_per_stage', '')}, hidden "
             f"{model.get('hidden', '')}, NLL | {record['steps']} | " + " | ".join(cells) + " |"]
    return "\n".join(lines)


def _pooled_sums(results: dict, out: str, name: str = "eval_sums.json") -> dict:
    """``{loss: the runs' calibration-bin sums (file name in their workdirs) pooled over seeds}``."""
    from softnce import metrics

    pooled = {}
    for loss, runs in results.items():
        for record in runs["metrics"]:
            sums = sweep.read_json(os.path.join(out, record.get("workdir", f"{loss}_seed{record['seed']}"), name))
            if sums is not None:
                pooled[loss] = metrics.add_sums(pooled.get(loss), sums)
    return pooled


def main(argv=None, log=print) -> dict:
    """Trains the teacher, then the students; writes and returns the results (see the module docstring)."""
    args = parse_args(argv)  # --help answers before jax is imported
    from absl import logging

    from softnce import metrics
    from softnce.data import fashion_mnist

    logging.set_verbosity(logging.WARNING)
    fashion_mnist.load_split(args.data_dir, "train")  # an unprepared data_dir fails here, before any training
    losses = [BASELINE] + [loss for loss in args.losses.split(",") if loss and loss != BASELINE]
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    teacher_dir = os.path.abspath(os.path.join(args.out, "teacher"))
    teacher = train_teacher(teacher_config(args), teacher_dir, log=log)
    grid = comparison.run_grid(student_config_fn(args, teacher_dir), losses=losses, seeds=args.seeds,
                               out=args.out, title=TITLE, log=log)
    results = grid["results"]

    teacher_sums = {}
    for name in ("eval_sums.json", "eval_sums_calibrated.json"):
        sums = sweep.read_json(os.path.join(teacher_dir, name))
        if sums is not None:
            teacher_sums[name] = sums
    pooled = _pooled_sums(results, args.out)
    panels = ({"teacher": teacher_sums["eval_sums.json"]} if "eval_sums.json" in teacher_sums else {}) | pooled
    metrics.plot_reliability_diagram(panels, os.path.join(args.out, "reliability_with_teacher.png"),
                                        title=f"{TITLE}, t = 1, students' {args.seeds} seeds pooled")
    wall = time.time() - start
    run_seconds = teacher["wall_seconds"] + grid["run_seconds"]
    targets = {loss: results[loss]["targets"] for loss in losses}
    summary = "\n\n".join([
        f"# Knowledge distillation on Fashion-MNIST ({args.seeds} seed{'s' if args.seeds != 1 else ''})",
        teacher_table(teacher),
        "Students (small_cnn); targets: " + "; ".join(f"{k}: {v}" for k, v in targets.items()) + ".",
        comparison.metrics_table(results),
        distilled_minus_baseline(results),
        f"Run time: teacher {sweep.format_seconds(teacher['wall_seconds'])}, students "
        f"{sweep.format_seconds(grid['run_seconds'])} (sum of the runs), this invocation "
        f"{sweep.format_seconds(wall)}.",
    ]) + "\n"
    with open(os.path.join(args.out, "distillation.md"), "w") as f:
        f.write(summary)
    result = {"teacher": teacher, "results": results, "beta": args.beta, "tau": args.tau, "augment": args.augment,
              "wall_seconds": wall, "run_seconds": run_seconds, "summary": summary}
    sweep.write_json(os.path.join(args.out, "distillation.json"), result)
    log(summary)
    log(f"wrote {args.out}/distillation.md, distillation.json, reliability_with_teacher.png")
    return result


if __name__ == "__main__":
    main()
