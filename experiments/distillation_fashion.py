"""Knowledge distillation on Fashion-MNIST: a teacher CNN trained with NLL, then the small CNN trained on its
targets with soft-target CE, STI and soft-distribution InfoNCE against NLL on hard labels, over seeds.

A thin command line over :mod:`softnce.experiments.distillation`; ``--help`` lists the options.
"""

from softnce.experiments import distillation

if __name__ == "__main__":
    distillation.main()
