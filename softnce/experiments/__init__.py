"""The project's experiments and benchmarks, importable and runnable as ``python -m softnce.experiments.<name>``.

``experiments/*.py`` in the repository are thin command lines over these modules.

* :mod:`~softnce.experiments.toy`: the toy experiment (``make demo``); :mod:`~softnce.experiments.toy_temperature`:
  STI's fitted temperature on the toy, predicted and measured; both train through
  :mod:`~softnce.experiments.vmapped`, the trainer's step vmapped over seeds.
* :mod:`~softnce.experiments.comparison`: losses x seeds through the real trainer, with tables and plots
  (the digits and Fashion-MNIST comparisons).
* ``bench_*``, :mod:`~softnce.experiments.gpu_benchmark`, :mod:`~softnce.experiments.stress_devices`: speed,
  memory and reliability measurements (``BENCHMARKS.md``).
"""

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)
