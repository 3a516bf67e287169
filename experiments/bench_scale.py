"""Benchmark: dense, structured and blockwise STI against optax CE as C and M grow.

A thin command line over :mod:`softnce.experiments.bench_scale`; ``--help`` lists the options.
"""

from softnce.experiments import bench_scale

if __name__ == "__main__":
    bench_scale.main()
