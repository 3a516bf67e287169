"""The toy experiment (``make demo``): how well each loss recovers a known posterior from annotator votes.

A thin command line over :mod:`softnce.experiments.toy`; ``--help`` lists the options.
"""

from softnce.experiments import toy

if __name__ == "__main__":
    toy.main()
