"""STI's fitted temperature on the toy against m, M and training length: predicted and measured.

A thin command line over :mod:`softnce.experiments.toy_temperature`; ``--help`` lists the options.
"""

from softnce.experiments import toy_temperature

if __name__ == "__main__":
    toy_temperature.main()
