"""Stress test: the real CLI on simulated CPU devices, N times in a row; prints ``runs: N, failed: F``.

Each run is ``python -m softnce.main --config configs/digits.py --num_cpu_devices=8`` with its default
600 steps (checkpoints and evaluations at steps 300 and 600) in a fresh workdir. A run fails if it
exits non-zero (e.g. 134, XLA's ``Termination timeout for all gather`` abort) or exceeds
``--timeout`` seconds (a hang). The failing runs' last output lines are printed.

Usage::

    python experiments/stress_devices.py --runs 20            # the record in BENCHMARKS.md
    python experiments/stress_devices.py --runs 3 --devices 4 -- --config.optim.base_lr=1e-3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from softnce import cli


def run_once(index: int, args, extra: list[str]) -> tuple[bool, str, float]:
    """One CLI run; returns ``(ok, reason, seconds)``."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with tempfile.TemporaryDirectory(prefix=f"stress{index}_") as workdir:
        command = [sys.executable, "-m", "softnce.main", f"--config={args.config}",
                   f"--num_cpu_devices={args.devices}", f"--workdir={workdir}", *extra]
        start = time.time()
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {args.timeout} s (a hang)", time.time() - start
        seconds = time.time() - start
        if proc.returncode != 0:
            tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            return False, f"exit code {proc.returncode}:\n    {tail}", seconds
        if not os.path.exists(os.path.join(workdir, "metrics.json")):
            return False, "exit 0 but no metrics.json", seconds
        return True, "", seconds


def main(argv=None) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run counts as hung")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    failed, times = 0, []
    t0 = time.time()
    for i in range(args.runs):
        ok, reason, seconds = run_once(i, args, extra)
        times.append(seconds)
        failed += not ok
        done = i + 1
        eta = (time.time() - t0) / done * (args.runs - done)
        status = "ok" if ok else f"FAILED: {reason}"
        print(
            f"run {done}/{args.runs}: {status} ({seconds:.1f} s) | failed so far {failed} | ETA {eta:.0f} s", flush=True
        )
    print(
        f"median run {sorted(times)[len(times) // 2]:.1f} s, total {time.time() - t0:.0f} s, "
        f"python {sys.version.split()[0]}, jax {__import__('jax').__version__}"
    )
    print(f"runs: {args.runs}, failed: {failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
