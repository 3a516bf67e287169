"""The project's experiments and benchmarks, importable and runnable as ``python -m softnce.experiments.<name>``.

``experiments/*.py`` in the repository are thin command lines over these modules.

* :mod:`~softnce.experiments.toy`: the toy experiment (``make demo``); :mod:`~softnce.experiments.toy_temperature`:
  STI's fitted temperature on the toy, predicted and measured; both train through
  :mod:`~softnce.experiments.vmapped`, the trainer's step vmapped over seeds.
* :mod:`~softnce.experiments.sweep`: hyperparameter sweeps through the real trainer (a config, a grid and a
  selection rule on the validation split in; results, a table and figures out), resumable.
* :mod:`~softnce.experiments.comparison`: losses x seeds through the real trainer, with tables and plots
  (the digits and Fashion-MNIST comparisons; a sweep of one point per loss).
* :mod:`~softnce.experiments.fair_comparison`: every loss tuned on validation in a Fashion-MNIST regime where
  soft targets pay off, then compared on the test split over seeds.
* :mod:`~softnce.experiments.baselines`: strong baselines and attribution (label smoothing alone, a
  weight-decayed NLL, input mixing without soft targets, InfoNCE's temperature) in the fair comparison's
  regime, each loss chosen by validation top-1 and by validation NLL.
* :mod:`~softnce.experiments.many_class`: STI against soft-target CE (and InfoNCE against NLL) on Fashion-MNIST
  k-tuples as the classes (10 to 1,000) and the batch grow, each loss tuned on validation per C.
* :mod:`~softnce.experiments.distillation`: knowledge distillation on Fashion-MNIST, a teacher CNN then the
  small CNN on its targets with several losses, over seeds, through the real trainer.
* ``bench_*``, :mod:`~softnce.experiments.gpu_benchmark`, :mod:`~softnce.experiments.stress_devices`: speed,
  memory and reliability measurements (``BENCHMARKS.md``).
"""

from softnce import _extras

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)
