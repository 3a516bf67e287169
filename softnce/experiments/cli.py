"""The command line of every experiment that runs a named protocol: ``--setting`` (``--quick``), ``--out``,
``--data_dir`` and ``--config.<field>=<value>`` overrides, built once (:func:`parse_protocol`).

    python experiments/<name>.py                       # the protocol (--setting full)
    python experiments/<name>.py --setting quick       # the whole pipeline in 1-2 minutes (a check)
    python experiments/<name>.py --quick               # the same: --quick is --setting quick everywhere

The benchmarks take the same ``--quick`` (their short check). Errors are :mod:`softnce.cli`'s one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable, Optional, Sequence

from softnce import cli

QUICK = "quick"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A parsed experiment command line: the chosen setting, where it writes, and the rest of its flags."""

    setting: Any  # settings[name], with the given setting-field flags applied
    out: Optional[str]  # --out, or the default folder of the setting (None: the experiment picks one)
    data_dir: Optional[str]  # --data_dir (None: ~/tensorflow_datasets) when the experiment reads tfds data
    overrides: dict  # {config field: value} of the --config.<field>=<value> flags, applied to every run
    args: argparse.Namespace  # every flag, including the experiment's own (add_arguments)


def parse_protocol(
    argv: Optional[Sequence[str]],
    *,
    description: str,
    settings: dict[str, Any],
    out: Optional[str] = None,
    out_help: Optional[str] = None,
    setting_fields: Optional[dict[str, dict]] = None,
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
    config_overrides: bool = False,
    fashion_mnist: bool = False,
) -> Protocol:
    """Parses an experiment's command line (module docstring).

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).
      description: the first line of ``--help``.
      settings: ``{name: setting}``, with ``'full'`` (the default) and ``'quick'``.
      out: the default output folder of ``'full'``; another setting writes to ``<out>_<setting>``
        (``None``: no default, the experiment picks one and says which in ``out_help``).
      setting_fields: ``{field: argparse keyword arguments}`` of fields of a (frozen dataclass) setting that
        a flag ``--<field>`` replaces, e.g. ``{'seeds': dict(type=int)}``.
      add_arguments: adds the experiment's own flags to the parser.
      config_overrides: whether ``--config.<field>=<value>`` overrides are taken (the experiments built on the
        trainer; the values are read as Python literals, see :func:`softnce.experiments.comparison.config_overrides`).
      fashion_mnist: whether the experiment reads Fashion-MNIST: adds ``--data_dir`` and checks, before any
        training, that the data are prepared (else one line that says how).
    """
    from softnce.experiments import comparison

    parser = cli.ArgumentParser(description=description, epilog=comparison.OVERRIDES_HELP if config_overrides else None)
    parser.add_argument("--setting", choices=sorted(settings), default=None,
                        help=f"the protocol's size: {', '.join(sorted(settings))} (default full)")
    parser.add_argument("--quick", action="store_true", help="the same as --setting quick: the whole pipeline in "
                                                             "1-2 minutes (a check, not a result)")
    if out_help is None:
        out_help = f"output folder (default {out}, or {out}_<setting> for another setting)" if out else "output folder"
    parser.add_argument("--out", default=None, help=out_help)
    if fashion_mnist:
        parser.add_argument("--data_dir", default=None, help="tfds data directory (default ~/tensorflow_datasets)")
    for field, kwargs in (setting_fields or {}).items():
        parser.add_argument(f"--{field}", default=None, **kwargs)
    if add_arguments is not None:
        add_arguments(parser)
    overrides, rest = comparison.config_overrides(argv) if config_overrides else ({}, argv)
    args = parser.parse_args(rest)
    if args.quick and args.setting not in (None, QUICK):
        parser.error(f"--quick is --setting quick; it does not go with --setting {args.setting}.")
    name = QUICK if args.quick else (args.setting or "full")
    setting = settings[name]
    given = {field: getattr(args, field) for field in (setting_fields or {}) if getattr(args, field) is not None}
    if given:
        setting = dataclasses.replace(setting, **given)
    if fashion_mnist:
        _check_fashion_mnist_prepared(args.data_dir)
    folder = args.out or (None if out is None else out if name == "full" else f"{out}_{name}")
    return Protocol(setting=setting, out=folder, data_dir=getattr(args, "data_dir", None),
                    overrides=overrides, args=args)


def _check_fashion_mnist_prepared(data_dir: Optional[str]) -> None:
    """An unprepared ``data_dir`` fails here, in one line, before any training."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # tfds's warning about the missing folder would come before the line
    from softnce.data import fashion_mnist

    try:
        fashion_mnist.load_split(data_dir, "train")
    except FileNotFoundError as error:
        cli.fail(error)
    logging.set_verbosity(logging.WARNING)


def write_results(out_dir: str, result: dict, summary: str, log=print) -> None:
    """Writes ``summary`` (Markdown) and ``result`` (JSON) to ``out_dir`` under the names in
    ``result['files']`` (``'summary'``, ``'metrics'``), then logs where they are."""
    with open(os.path.join(out_dir, result["files"]["summary"]), "w") as f:
        f.write(summary)
    with open(os.path.join(out_dir, result["files"]["metrics"]), "w") as f:
        json.dump(result, f, indent=1)
    seconds = result["seconds"]["total"] if isinstance(result["seconds"], dict) else result["seconds"]
    log(f"done in {seconds:.1f} s; results in {out_dir}")
