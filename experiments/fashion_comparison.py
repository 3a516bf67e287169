"""The five losses on Fashion-MNIST over several seeds: tables, paired differences, reliability plots.

A thin command line over :mod:`softnce.experiments.comparison`; ``--help`` lists the options.
"""

from softnce.experiments import comparison

if __name__ == "__main__":
    comparison.main("fashion_mnist")
