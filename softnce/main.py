"""Command-line entry point: ``python -m softnce.main --config configs/<name>.py[:variant] --workdir DIR``.

``--config.<field>=<value>`` overrides any config field. For multi-process jobs on one machine or
without auto-detection, pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``;
Cloud TPU pods, SLURM and Open MPI are detected automatically.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py:loss=nll.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process only).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process only).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process only).")
_IMPORTS = flags.DEFINE_list("import_modules", [], "Modules to import first, e.g. ones that register losses.")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None, "Simulate this many CPU devices (testing).")
flags.mark_flags_as_required(["config", "workdir"])


@flags.multi_flags_validator(
    ["coordinator_address", "num_processes", "process_id"],
    message="--coordinator_address, --num_processes and --process_id go together (see --helpfull).",
)
def _check_multiprocess_flags(values) -> bool:
    from softnce.distributed import check_initialize_args

    try:
        check_initialize_args(values["coordinator_address"], values["num_processes"], values["process_id"])
    except ValueError as error:
        raise flags.ValidationError(str(error)) from None
    return True


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # progress lines are printed; keep library INFO logs out
    import jax

    if _NUM_CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
        if _COORDINATOR.value:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; never give it the accelerator.

    import importlib

    from softnce import distributed, train

    for module in _IMPORTS.value:
        importlib.import_module(module)  # e.g. a module of the user's that calls losses.register_loss

    from softnce.config_checks import ConfigError

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as error:  # a bad config: one line, before any work was done
        print(f"softnce: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
