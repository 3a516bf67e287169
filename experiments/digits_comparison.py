"""The five losses on scikit-learn digits over several seeds: a markdown table and a reliability plot.

    python experiments/digits_comparison.py --seeds 5 --out runs/digits_comparison

Every run is the real trainer (``softnce.train.train_and_evaluate``) on ``configs/digits.py``:
NLL and InfoNCE with hard labels; soft-target CE, STI and soft-distribution InfoNCE with label
smoothing 0.1 + MixUp/CutMix (``augment=auto``), as in the paper's comparison. Writes
``results.json``, ``table.md`` and ``reliability.png`` (calibration bins summed over seeds) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LOSSES = ("nll", "infonce", "soft_target_cross_entropy", "soft_target_infonce", "soft_distribution_infonce")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds per loss")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated registered loss names")
    parser.add_argument("--out", default="runs/digits_comparison", help="output folder")
    return parser.parse_args(argv)


def markdown_table(results: dict) -> str:
    lines = [
        "| loss | targets | top-1 (%) | ECE (%) | NLL |",
        "|---|---|---|---|---|",
    ]
    for loss, runs in results.items():
        cols = []
        for key, scale, digits in (("top1", 100, 2), ("ece", 100, 2), ("nll", 1, 3)):
            values = np.array([r[key] for r in runs["metrics"]]) * scale
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            cols.append(f"{values.mean():.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {loss} | {runs['targets']} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from configs import digits as digits_config
    from softnce import evaluation, train

    losses = [name for name in args.losses.split(",") if name]
    os.makedirs(args.out, exist_ok=True)
    results, sums_by_loss = {}, {}
    start, total, done = time.time(), len(losses) * args.seeds, 0
    for loss in losses:
        config = digits_config.get_config(f"loss={loss},steps={args.steps}")
        config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = args.steps
        soft = config.augment.mixup_alpha > 0
        results[loss] = {"targets": "smoothing 0.1 + MixUp/CutMix" if soft else "hard labels", "metrics": []}
        for seed in range(args.seeds):
            config.seed = seed
            workdir = os.path.join(args.out, f"{loss}_seed{seed}")
            metrics = train.train_and_evaluate(config, workdir)
            results[loss]["metrics"].append(metrics)
            with open(os.path.join(workdir, "eval_sums.json")) as f:
                sums_by_loss[loss] = evaluation.add_sums(sums_by_loss.get(loss), json.load(f))
            done += 1
            elapsed = time.time() - start
            print(f"[{done}/{total}] {loss} seed {seed}: top1 {metrics['top1']:.4f} ece {metrics['ece']:.4f} "
                  f"| {elapsed:.0f}s elapsed, ETA {elapsed / done * (total - done):.0f}s", flush=True)
    table = markdown_table(results)
    wall = time.time() - start
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + f"\n\n{args.seeds} seeds, {args.steps} steps each; total {wall:.0f} s.\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": results, "wall_seconds": wall, "args": vars(args)}, f, indent=2)
    evaluation.plot_reliability_diagram(
        sums_by_loss, os.path.join(args.out, "reliability.png"), title=f"digits test set, {args.seeds} seeds pooled"
    )
    print(table)
    print(f"total {wall:.0f} s; wrote {args.out}/table.md, results.json, reliability.png")
    return results


if __name__ == "__main__":
    main()
