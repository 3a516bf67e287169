"""Evaluate a checkpoint of a finished (or running) run without touching the run's own results.

::

    python -m softnce.evaluate --workdir W [--step S] [--split test|validation] [--refit_temperature]
        [--config.data.<field>=<value> ...] [--name NAME] [--num_cpu_devices N]
        [--coordinator_address HOST:PORT --num_processes P --process_id I]

restores checkpoint ``S`` (default: the latest) with the run's own ``config.json``, evaluates the
split (default: the run's test split, the one the trainer reports; ``validation``: the split ``t*``
was fitted on) at the training temperature and at the checkpoint's ``t*``, and writes
``metrics.json``, ``eval_sums.json``, ``eval_sums_calibrated.json``, ``reliability.png`` and
``eval_config.json`` to ``W/eval/<split>-<step>/``. The numbers are those of the end-of-training
evaluation (the same eval step, :func:`softnce.evaluation.evaluate`, the same batches), on any number
of devices and processes.

``--config.data.<field>=<value>`` evaluates another split or a compatible dataset (the same number
of classes and input shape), e.g. ``--config.data.eval_split=train[:5000]`` on the ImageNet path;
the output directory's name then records the overrides (or give ``--name``).
``--refit_temperature`` fits ``t*`` again on the validation split of the (possibly overridden) data
instead of using the checkpoint's.

Command-line errors are one line, ``softnce: error: ...`` (exit 2), before jax is imported where possible.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from softnce import checkpoint_metadata, cli  # noqa: E402  (neither imports jax)

SPLITS = ("test", "validation")


def output_label(split: str, config, run_config) -> str:
    """``split``, plus ``+field=value`` for each ``config.data`` field that differs from the run's."""
    data, run_data = config.data.to_dict(), run_config.data.to_dict()
    changed = [f"{k}={data.get(k)}" for k in sorted(set(data) | set(run_data)) if data.get(k) != run_data.get(k)]
    label = "+".join([split, *changed])
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label)[:120]


def split_batches(dataset, split: str, local_eval_batch: int):
    """One pass over ``split`` (``test``: the eval split the trainer reports; ``validation``)."""
    from softnce.config_checks import ConfigError

    if split == "test":
        return dataset.eval_batches(local_eval_batch)
    if split == "validation":
        if not dataset.num_validation_examples:
            raise ConfigError("this data has no validation split (config.data.validation_fraction = 0).")
        return dataset.validation_batches(local_eval_batch)
    raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")


def evaluate_checkpoint(
    workdir: str,
    *,
    step: Optional[int] = None,
    split: str = "test",
    config=None,
    refit_temperature: bool = False,
    name: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> tuple[dict, Any]:
    """Evaluates checkpoint ``step`` of the run in ``workdir`` on ``split``; returns ``(metrics, output dir)``.

    Args:
      workdir: the run's workdir (holds ``config.json`` and ``checkpoints/``).
      step: the checkpoint (``None``: the latest finished one).
      split: ``'test'`` (the run's eval split) or ``'validation'``.
      config: the config to evaluate with (``None``: the run's ``config.json``); only its ``data``
        may differ from the run's, and the dataset must have the checkpoint's classes and input shape.
      refit_temperature: fit ``t*`` on the validation split instead of using the checkpoint's.
      name: the output directory's name without the step (default: :func:`output_label`).

    ``metrics`` has the trainer's keys (``top1``, ``top5``, ``nll``, ``ece``, ``num_examples``,
    ``step`` and, when a ``t*`` is known, ``t_star``, ``nll_calibrated``, ``ece_calibrated``)
    plus ``split`` and ``t_star_source`` (``checkpoint``, ``metrics.json`` or ``refit``).
    The files are written on process 0 only.
    """
    import jax

    from softnce import assembly, checkpointing, distributed, evaluation
    from softnce.config_checks import ConfigError

    run_config = checkpoint_metadata.read_run_config(workdir)
    config = run_config if config is None else config
    for group in set(run_config) | set(config):
        if group != "data" and run_config.get(group) != config.get(group):
            raise ConfigError(f"only config.data can differ from the run's config when evaluating, not config.{group}.")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    assembly.validate_config(config)
    mesh = distributed.make_mesh()
    local_eval_batch = distributed.check_batch_size(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")
    run_dir, ckpt_dir, step = checkpoint_metadata.locate(workdir, step)
    dataset, model = assembly.make_dataset_and_model(config)
    same_data = config.data.to_dict() == run_config.data.to_dict()
    metadata, _ = assembly.checkpoint_info(run_dir, ckpt_dir, step, dataset=dataset if same_data else None)
    saved_shape = tuple(metadata["input"]["shape"])
    if dataset.num_classes != metadata["num_classes"] or tuple(dataset.example_shape) != saved_shape:
        raise ConfigError(
            f"dataset {config.data.name!r} has {dataset.num_classes} classes and inputs "
            f"{tuple(dataset.example_shape)}; "
            f"the checkpoint was trained on {metadata['num_classes']} classes and inputs {saved_shape}."
        )
    variables = checkpointing.restore_variables_only(
        ckpt_dir, step, assembly.abstract_variables(model, dataset.example_shape, distributed.replicated(mesh))
    )
    eval_fn, logits_fn = assembly.make_eval_fns(mesh, model, dataset)
    summary, sums = evaluation.evaluate(eval_fn, variables, split_batches(dataset, split, local_eval_batch), mesh,
                                   config.loss.temperature)
    summary = dict(summary, step=step, split=split)
    t_star, source = metadata.get("t_star"), "checkpoint"
    if t_star is not None and checkpoint_metadata.read(ckpt_dir, step) is None:
        source = "metrics.json"
    if refit_temperature:
        if not dataset.num_validation_examples:
            raise ConfigError("--refit_temperature needs a validation split (config.data.validation_fraction > 0).")
        t_star = evaluation.fit_validation_temperature(logits_fn, variables, dataset, local_eval_batch, mesh)
        source = "refit"
    calibrated_sums = None
    if t_star is not None:
        calibrated, calibrated_sums = evaluation.evaluate(
            eval_fn, variables, split_batches(dataset, split, local_eval_batch), mesh, t_star
        )
        summary.update(t_star=float(t_star), nll_calibrated=calibrated["nll"], ece_calibrated=calibrated["ece"],
                       t_star_source=source)
    out = checkpointing.resolve(workdir) / "eval" / f"{name or output_label(split, config, run_config)}-{step}"
    if jax.process_index() == 0:
        title = f"{config.data.name} {split}, step {step}"
        evaluation.write_results(out, config, summary, sums, calibrated_sums, title=title)
        (out / "eval_config.json").write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2,
                                                         sort_keys=True))
        shown = {k: v for k, v in summary.items() if isinstance(v, float)}
        log(f"step {step} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        log(f"wrote {out}")
    return summary, out


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------




def make_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m softnce.evaluate", description=__doc__.split("::")[0].strip(),
                     epilog="Any --config.data.<field>=<value> overrides that field of the run's config.")
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="test (the run's eval split) or validation")
    parser.add_argument("--refit_temperature", action="store_true", help="fit t* on the validation split again")
    parser.add_argument("--name", default=None, help="output directory name (default: the split and overrides)")
    cli.add_run_flags(parser, "a run of a user's loss, model or dataset needs the module that registers it")
    return parser


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """``(args, effective config)``; every problem is one line and exit 2 (no jax needed)."""
    try:
        overrides, rest = cli.split_overrides(argv)
    except cli.UsageError as error:
        cli.fail(error)
    args = make_parser().parse_args(rest)
    for path in overrides:
        if not path.startswith("data."):
            cli.fail(f"--config.{path}: only config.data fields can be overridden when evaluating (the model, "
                     "loss and temperatures are the checkpoint's).")
    try:
        config = checkpoint_metadata.read_run_config(args.workdir)
        swapped = "data.name" in overrides and overrides["data.name"] != config.data.name
        # Another dataset may have fields the run's had not (e.g. data_dir); otherwise a new field is a typo.
        cli.apply_overrides(config, overrides, new_fields_in=("data",) if swapped else ())
    except (FileNotFoundError, cli.UsageError) as error:
        cli.fail(error)
    try:
        cli.check_process_flags(args)
    except cli.UsageError as error:
        cli.fail(error)
    return args, config


def main(argv: Optional[list[str]] = None) -> None:
    args, config = parse_command_line(sys.argv[1:] if argv is None else argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import jax

    if args.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
        if args.coordinator_address:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")

    from softnce import assembly, distributed
    from softnce.config_checks import ConfigError

    cli.import_modules(args.import_modules)
    try:
        assembly.validate_config(config)
    except ConfigError as error:
        cli.fail(error)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    try:
        evaluate_checkpoint(args.workdir, step=args.step, split=args.split, config=config,
                            refit_temperature=args.refit_temperature, name=args.name)
    except (ConfigError, FileNotFoundError, checkpoint_metadata.MetadataError) as error:
        cli.fail(error)


if __name__ == "__main__":
    main()
