"""Strong baselines and attribution in the fair comparison's regime, each loss chosen by validation top-1 and NLL.

A thin command line over :mod:`softnce.experiments.baselines`; ``--help`` lists the options.
"""

from softnce.experiments import baselines

if __name__ == "__main__":
    baselines.main()
