"""Stress: SIGTERM at random moments to a 2-process run; prints how many trials failed.

A thin command line over :mod:`softnce.experiments.stress_preemption`; ``--help`` lists the options.
"""

from softnce.experiments import stress_preemption

if __name__ == "__main__":
    stress_preemption.main()
