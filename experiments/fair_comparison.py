"""Every loss tuned on validation in a regime where soft targets pay off, then compared on the Fashion-MNIST test set.

A thin command line over :mod:`softnce.experiments.fair_comparison`; ``--help`` lists the options.
"""

from softnce.experiments import fair_comparison

if __name__ == "__main__":
    fair_comparison.main()
