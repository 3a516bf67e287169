"""The five losses on scikit-learn digits over several seeds: markdown tables and a reliability plot.

    python experiments/digits_comparison.py --seeds 5 --out runs/digits_comparison

Every run is the real trainer (``softnce.train.train_and_evaluate``) on ``configs/digits.py``:
NLL and InfoNCE with hard labels; soft-target CE, STI and soft-distribution InfoNCE with label
smoothing 0.1 + MixUp/CutMix (``augment=auto``), as in the paper's comparison. Writes
``results.json``, ``table.md`` (mean ± std per loss, and STI minus each other loss paired by seed)
and ``reliability.png`` (calibration bins summed over seeds) to ``--out`` (see ``comparison_grid.py``).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

import comparison_grid  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds per loss")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--losses", default=",".join(comparison_grid.LOSSES), help="comma-separated registered loss names")
    parser.add_argument("--out", default="runs/digits_comparison", help="output folder")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from configs import digits as digits_config

    def make_config(loss: str, seed: int):
        config = digits_config.get_config(f"loss={loss},seed={seed},steps={args.steps}")
        config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = args.steps
        return config

    losses = [name for name in args.losses.split(",") if name]
    return comparison_grid.run_grid(make_config, losses=losses, seeds=args.seeds, out=args.out,
                                    title="digits test set")


if __name__ == "__main__":
    main()
