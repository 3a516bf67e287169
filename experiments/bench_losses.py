"""Benchmark: STI's time and memory against the reference's (N, M, C) algorithm and optax's CE.

A thin command line over :mod:`softnce.experiments.bench_losses`; ``--help`` lists the options.
"""

from softnce.experiments import bench_losses

if __name__ == "__main__":
    bench_losses.main()
