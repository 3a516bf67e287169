"""Command-line entry point: ``python -m softnce.main --config configs/<name>.py[:variant] --workdir DIR``.

``--config.<field>=<value>`` overrides any config field. For multi-process jobs on one machine or
without auto-detection, pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``;
Cloud TPU pods, SLURM and Open MPI are detected automatically. ``--import_modules=my_module`` imports
a module of the user's first, so the config may name the losses, models and datasets it registers
(``softnce.losses.register_loss``, ``softnce.models.register_model``, ``softnce.data.register_dataset``).
"""

from __future__ import annotations

if __name__ == "__main__":  # first of all: a SIGTERM from now on saves a step (softnce.preemption)
    from softnce import preemption

    preemption.catch_early_sigterm()

from softnce import _extras  # noqa: E402

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ start-up logging (jaxlib reads this variable)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from softnce import cli  # noqa: E402  (no jax)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/digits.py:loss=nll.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process only).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process only).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process only).")
_IMPORTS = flags.DEFINE_list(
    "import_modules", [], "Modules to import first, e.g. ones that register losses, models or datasets."
)
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None, "Simulate this many CPU devices (testing).")
flags.mark_flags_as_required(["config", "workdir"])


@flags.multi_flags_validator(
    ["coordinator_address", "num_processes", "process_id"],
    message="--coordinator_address, --num_processes and --process_id go together (see --helpfull).",
)
def _check_multiprocess_flags(values) -> bool:
    if all(value is None for value in values.values()):
        return True  # the usual single process: no need to import jax (softnce.distributed) here
    from softnce.distributed import check_initialize_args

    try:
        check_initialize_args(values["coordinator_address"], values["num_processes"], values["process_id"])
    except ValueError as error:
        raise flags.ValidationError(str(error)) from None
    return True


def main(argv) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags look like --name=value).")
    # Everything that can be checked without jax is checked first, so a bad command
    # line is one line on stderr (exit 2) before any of their start-up log lines.
    config = cli.config_value(_CONFIG, cli.config_flag_value(sys.argv[1:]))
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # progress lines are printed; keep library INFO logs out
    from softnce import failures

    failures.quiet_background_errors()  # a failure is one line of ours, not library threads' tracebacks
    import jax

    if _NUM_CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
        if _COORDINATOR.value:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")

    import importlib

    from softnce import assembly, distributed, train
    from softnce.checkpointing import CheckpointError
    from softnce.config_checks import ConfigError
    from softnce.data.base import DataError, DataNotPreparedError

    for module in _IMPORTS.value:
        importlib.import_module(module)  # e.g. a module of the user's that calls losses.register_loss
    try:
        assembly.validate_config(config)  # names and numbers: before any data is read
    except ConfigError as error:
        cli.fail(error)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        mesh = distributed.make_mesh()
        distributed.check_batch_size(config.data.batch_size, mesh)
        distributed.check_batch_size(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")
    except ConfigError as error:
        cli.fail(error)

    failures.watch_for_failures()  # several processes: one that fails stops all (softnce.failures)
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except (ConfigError, DataError, DataNotPreparedError) as error:  # bad config or data
        failures.exit_run(cli.one_line(error), cli.EXIT_USAGE)
    except (failures.RunFailure, FloatingPointError, CheckpointError) as error:  # disk, processes, loss, checkpoint
        failures.exit_run(str(error))
    except Exception as error:  # noqa: BLE001  (a bug: its traceback, then every process stops)
        failures.exit_run(f"{type(error).__name__}: {error}", error=error)
    failures.all_finished()


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser)
