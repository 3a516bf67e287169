"""The five losses on Fashion-MNIST over several seeds: raw and calibrated metrics, paired differences, plots.

    python -m softnce.data.fashion_mnist          # once: prepare the data (see configs/fashion_mnist.py)
    python experiments/fashion_comparison.py --seeds 5 --out runs/fashion_comparison

Every run is the real trainer on ``configs/fashion_mnist.py`` (``augment=auto``): NLL and InfoNCE
with hard labels; soft-target CE, STI and soft-distribution InfoNCE with label smoothing 0.1 +
MixUp 0.8 / CutMix 1.0, as in the paper's comparison. Each run holds out 6,000 training images,
fits one temperature on them at the end and reports the official 10,000 test images at t = 1 and
at the fitted t*. Writes ``results.json``, ``table.md`` (mean ± std per loss and STI minus each
other loss, paired by seed) and ``reliability.png`` to ``--out`` (see ``comparison_grid.py``).
Rerunning the same command after an interruption continues the grid.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

import comparison_grid  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds per loss")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    parser.add_argument("--losses", default=",".join(comparison_grid.LOSSES), help="comma-separated loss names")
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default ~/tensorflow_datasets)")
    parser.add_argument("--out", default="runs/fashion_comparison", help="output folder")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set data.batch_size=64 (repeatable; for quick checks)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from configs import fashion_mnist as fashion_config
    from softnce.data import fashion_mnist

    fashion_mnist.load_split(args.data_dir, "train")  # an unprepared data_dir fails here, before any training
    overrides = {}
    for item in args.set:
        field, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r} must look like FIELD=VALUE.")
        try:
            overrides[field] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            overrides[field] = raw

    def make_config(loss: str, seed: int):
        variant = f"loss={loss},seed={seed}" + (f",steps={args.steps}" if args.steps else "")
        config = fashion_config.get_config(variant)
        config.data.data_dir = args.data_dir
        config.update_from_flattened_dict(overrides)
        return config

    losses = [name for name in args.losses.split(",") if name]
    return comparison_grid.run_grid(make_config, losses=losses, seeds=args.seeds, out=args.out,
                                    title="Fashion-MNIST test set")


if __name__ == "__main__":
    main()
