"""The GPU benchmark: the project's ViT train step against timm's on one accelerator.

A thin command line over :mod:`softnce.experiments.gpu_benchmark`; ``--help`` lists the options.
"""

from softnce.experiments import gpu_benchmark

if __name__ == "__main__":
    gpu_benchmark.main()
