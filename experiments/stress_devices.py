"""Stress: many 8-device CLI runs; prints how many failed.

A thin command line over :mod:`softnce.experiments.stress_devices`; ``--help`` lists the options.
"""

from softnce.experiments import stress_devices

if __name__ == "__main__":
    stress_devices.main()
