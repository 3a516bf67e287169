"""Command-line entry point: ``python -m softnce.main --config configs/<name>.py[:variant] --workdir DIR``.

``--config.<field>=<value>`` overrides any config field. For multi-process jobs on one machine or
without auto-detection, pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``;
Cloud TPU pods, SLURM and Open MPI are detected automatically. ``--import_modules=my_module`` imports
a module of the user's first, so the config may name the losses, models and datasets it registers
(``softnce.losses.register_loss``, ``softnce.models.register_model``, ``softnce.data.register_dataset``).
The flags follow the convention of every entry point (:mod:`softnce.cli`).
"""

from __future__ import annotations

if __name__ == "__main__":  # first of all: a SIGTERM from now on saves a step (softnce.preemption)
    from softnce import preemption

    preemption.catch_early_sigterm()

from softnce import _extras  # noqa: E402

if _extras.MISSING_TRAIN:
    raise _extras.missing_extra("train", __name__)

import argparse  # noqa: E402
import os  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ start-up logging (jaxlib reads this variable)

from softnce import cli  # noqa: E402  (no jax)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, Any]:
    """``(the flags, the run's locked config)`` of the command line; a bad one is one line (exit 2), before jax."""
    import sys

    parser = cli.ArgumentParser(prog="python -m softnce.main", description="Trains, evaluates and checkpoints "
                                "one run of a config (softnce.main).", epilog=cli.OVERRIDES_HELP)
    parser.add_argument("--config", required=True, help=cli.CONFIG_HELP)
    parser.add_argument("--workdir", required=True, help="directory for checkpoints, logs and results")
    cli.add_run_flags(parser)
    try:
        raw_overrides, rest = cli.split_overrides(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(rest)
        config = cli.config_from_command_line(args.config, raw_overrides)
        cli.check_process_flags(args)
    except cli.UsageError as error:
        cli.fail(error)
    return args, config


def main(argv: Optional[Sequence[str]] = None) -> None:
    # Everything that can be checked without jax is checked first, so a bad command
    # line is one line on stderr (exit 2) before any of their start-up log lines.
    args, config = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # progress lines are printed; keep library INFO logs out
    from softnce import failures

    failures.quiet_background_errors()  # a failure is one line of ours, not library threads' tracebacks
    import jax

    if args.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
        if args.coordinator_address:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")

    from softnce import assembly, distributed, train
    from softnce.checkpointing import CheckpointError
    from softnce.config_checks import ConfigError
    from softnce.data.base import DataError, DataNotPreparedError

    cli.import_modules(args.import_modules)  # e.g. a module of the user's that calls losses.register_loss
    try:
        assembly.validate_config(config)  # names and numbers: before any data is read
    except ConfigError as error:
        cli.fail(error)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    try:
        mesh = distributed.make_mesh()
        distributed.check_batch_size(config.data.batch_size, mesh)
        distributed.check_batch_size(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")
    except ConfigError as error:
        cli.fail(error)

    failures.watch_for_failures()  # several processes: one that fails stops all (softnce.failures)
    try:
        train.train_and_evaluate(config, args.workdir)
    except (ConfigError, DataError, DataNotPreparedError) as error:  # bad config or data
        failures.exit_run(cli.one_line(error), cli.EXIT_USAGE)
    except (failures.RunFailure, FloatingPointError, CheckpointError) as error:  # disk, processes, loss, checkpoint
        failures.exit_run(str(error))
    except Exception as error:  # noqa: BLE001  (a bug: its traceback, then every process stops)
        failures.exit_run(f"{type(error).__name__}: {error}", error=error)
    failures.all_finished()


if __name__ == "__main__":
    main()
