"""Benchmark: the ImageNet input pipeline's host side against timm's.

A thin command line over :mod:`softnce.experiments.bench_input_pipeline`; ``--help`` lists the options.
"""

from softnce.experiments import bench_input_pipeline

if __name__ == "__main__":
    bench_input_pipeline.main()
