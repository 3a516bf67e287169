"""STI against soft-target CE (and InfoNCE against NLL) on Fashion-MNIST k-tuples as the classes C and the batch M grow.

A thin command line over :mod:`softnce.experiments.many_class`; ``--help`` lists the options.
"""

from softnce.experiments import many_class

if __name__ == "__main__":
    many_class.main()
