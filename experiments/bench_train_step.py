"""Benchmark: the sharded ViT train step, per loss.

A thin command line over :mod:`softnce.experiments.bench_train_step`; ``--help`` lists the options.
"""

from softnce.experiments import bench_train_step

if __name__ == "__main__":
    bench_train_step.main()
