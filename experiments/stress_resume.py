"""Stress: exact resume of the image pipeline, stopped at random steps; prints how many trials failed.

A thin command line over :mod:`softnce.experiments.stress_resume`; ``--help`` lists the options.
"""

from softnce.experiments import stress_resume

if __name__ == "__main__":
    stress_resume.main()
