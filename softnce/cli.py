"""The command-line convention of every entry point: argparse, one-line errors and ``--config.<path>=<value>``.

Every entry point (``softnce.main``, ``softnce.evaluate``, ``softnce.export``, data preparation, the
experiments and benchmarks) parses its flags with :class:`ArgumentParser`: ``--help`` in one format,
flags as ``--name=value`` or ``--name value``, and a command line it cannot run reported as exactly one
line on stderr, ``softnce: error: <message>``, with exit code 2 (:func:`fail`). The checks here need no
jax and no data library, so such an error comes before they are imported (in well under 2 s) and before
any of their start-up log lines.

- :func:`config_from_command_line` reads ``softnce.main``'s ``--config=<file>[:<variant>]`` (the
  ml_collections config-file convention: the file's ``get_config(variant)``) and applies its
  ``--config.<path>=<value>`` overrides: a config file that does not exist (with the nearest file name as a
  suggestion), a bad variant key (``configs/digits.py:los=nll``), an override of a field the config does
  not have (with the nearest field name), or a value that does not parse as the field's type.
- :func:`apply_overrides` applies the same overrides to a config read from a run's ``config.json``
  (``softnce.evaluate``), and :func:`split_overrides` separates them from the other flags.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import sys
from typing import Any, NoReturn, Optional, Sequence

PROG = "softnce"
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command line that cannot run; :func:`fail` prints its message as one line."""


def one_line(text: Any) -> str:
    """``text`` with all whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def fail(message: Any) -> NoReturn:
    """Prints ``softnce: error: <message>`` (one line) to stderr and exits with code 2."""
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """The ``argparse`` parser of every command line but ``softnce.main``: an error is one line,
    ``softnce: error: <message>``, and exit code 2 (:func:`fail`), as ``softnce.main``'s are."""

    def error(self, message):  # argparse's own prints the usage first
        fail(message)


def add_run_flags(parser: argparse.ArgumentParser, import_help: str = "") -> None:
    """The flags that ``softnce.main`` and ``softnce.evaluate`` share: ``--import_modules`` and the process flags
    (``--coordinator_address``, ``--num_processes``, ``--process_id``, ``--num_cpu_devices``)."""
    add_import_modules_flag(parser, import_help)
    parser.add_argument("--coordinator_address", help="host:port of process 0 (multi-process only)")
    parser.add_argument("--num_processes", type=int, help="number of processes (multi-process only)")
    parser.add_argument("--process_id", type=int, help="this process's index (multi-process only)")
    parser.add_argument("--num_cpu_devices", type=int, help="simulate this many CPU devices (testing)")


def add_import_modules_flag(parser: argparse.ArgumentParser, why: str = "") -> None:
    """``--import_modules``: comma-separated modules to import first (:func:`import_modules`)."""
    parser.add_argument("--import_modules", default="", help="comma-separated modules to import first, e.g. ones "
                        "that register losses, models or datasets" + (f" ({why})" if why else ""))


def import_modules(names: str) -> None:
    """Imports each module of ``--import_modules`` (comma-separated), e.g. a user's module whose import calls
    ``softnce.losses.register_loss``."""
    import importlib

    for module in filter(None, names.split(",")):
        importlib.import_module(module)


def check_process_args(
    coordinator_address: Optional[str], num_processes: Optional[int], process_id: Optional[int]
) -> None:
    """Raises :class:`UsageError` (a ``ValueError``) unless the explicit multi-process arguments are all given
    and consistent; needs no jax (``softnce.distributed.initialize`` checks its arguments with it too).

    Either none of them (single process, or auto-detection on TPU pods / SLURM / Open MPI), or all
    three with ``0 <= process_id < num_processes``.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        return
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if missing:
        raise UsageError(
            f"multi-process start-up needs --coordinator_address, --num_processes and --process_id together; "
            f"missing {', '.join(missing)}. Give all three on every process (the same address and count, "
            "process ids 0..num_processes-1), or none of them to run one process or to let JAX auto-detect "
            "a Cloud TPU pod, SLURM or Open MPI."
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UsageError(
            f"--process_id={process_id} must be in [0, --num_processes={num_processes}) and num_processes >= 1."
        )


def check_process_flags(args: argparse.Namespace) -> None:
    """:func:`check_process_args` of the parsed process flags (:func:`add_run_flags`); needs no jax."""
    check_process_args(args.coordinator_address, args.num_processes, args.process_id)


# --------------------------------------------------------------------------------------------------
# The config of a run: a config file and its --config.<path> overrides.
# --------------------------------------------------------------------------------------------------


def check_config_file(spec: str) -> None:
    """Raises :class:`UsageError` when the file of ``path[:variant]`` is missing (naming the closest file)."""
    path = spec.split(":", 1)[0]
    if not path:
        raise UsageError("--config is empty; give a config file, e.g. --config=configs/digits.py.")
    if os.path.isfile(path):
        return
    directory = os.path.dirname(path) or "."
    message = f"config file {path!r} does not exist"
    if os.path.isdir(directory):
        candidates = sorted(f for f in os.listdir(directory) if f.endswith(".py") and not f.startswith("_"))
        close = difflib.get_close_matches(os.path.basename(path), candidates, n=1, cutoff=0.5)
        if close:
            message += f"; did you mean {os.path.join(os.path.dirname(path), close[0])!r}"
        elif candidates:
            message += f"; configs in {directory}: {', '.join(candidates)}"
    else:
        message += f" (no directory {directory!r})"
    raise UsageError(message + ".")


COMPONENT_SECTIONS = ("loss", "model")
"""The config sections whose fields are the named component's (:mod:`softnce.config_checks`): a
``--config.<section>.<field>`` override may add a field that the config file does not have."""

CONFIG_HELP = ("A config file and its variant, e.g. configs/digits.py:loss=nll,seed=1 (the part after ':' "
               "is passed to the file's get_config).")
OVERRIDES_HELP = ("Any --config.<field>=<value> (or --config.<field> <value>) overrides that config field, e.g. "
                  "--config.data.batch_size=64 --config.loss.temperature=2; the value is read as the field's type. "
                  "Once the loss or the model is named, its own fields are config fields too: "
                  "--config.loss.name=my_focal --config.loss.gamma=1.5.")


def load_config_file(spec: str) -> Any:
    """The ``ConfigDict`` of ``--config=<path>[:<variant>]``, read by ml_collections' ``config_flags`` (the
    file's ``get_config(variant)``, ``get_config()`` without a variant), unlocked.

    A missing file (with the nearest file name as a suggestion), a bad variant key, or a file that fails to
    run raise :class:`UsageError`, before anything heavy is imported.
    """
    from absl import flags
    from ml_collections import config_flags

    check_config_file(spec)
    holder = flags.FlagValues()  # a private set of flags: only the file is read here, not sys.argv
    argv = [PROG, f"--config={spec}"]
    flag = config_flags.DEFINE_config_file("config", None, flag_values=holder, lock_config=False, sys_argv=argv)
    try:
        holder(argv)
        config = flag.value
        is_config = hasattr(config, "unlocked")  # a file that failed to load raises its OSError here
    except flags.Error as error:
        text = str(error)
        raise UsageError(f"--config={spec}: {_last_line_of_traceback(text) if 'Traceback' in text else text}") from None
    except Exception as error:  # noqa: BLE001  (a config file that does not run: its error, on one line)
        raise UsageError(f"--config={spec}: {type(error).__name__}: {error}") from None
    if not is_config:
        raise UsageError(f"--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict.")
    return config


def _last_line_of_traceback(text: str) -> str:
    """The last line of the traceback ml_collections puts in its error, without the exception's class."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return re.sub(r"^(\w+\.)*\w*(Error|Exception): ", "", lines[-1] if lines else text)


def config_from_command_line(spec: str, overrides: dict[str, str]) -> Any:
    """The run's config: the file ``spec`` (:func:`load_config_file`) with the ``--config.<path>`` overrides
    applied in their order (:func:`apply_overrides`; the loss's and the model's sections,
    :data:`COMPONENT_SECTIONS`, and the data section when ``--config.data.name`` names another dataset, may
    gain fields: whether the named component takes them is checked with the rest of the config,
    :mod:`softnce.config_checks`), then locked: no field is added after this."""
    config = load_config_file(spec)
    sections = (*COMPONENT_SECTIONS, "data") if "data.name" in overrides else COMPONENT_SECTIONS
    with config.unlocked():
        apply_overrides(config, overrides, new_fields_in=sections)
    config.lock()
    return config


# --------------------------------------------------------------------------------------------------
# Overrides: of a config file (softnce.main) or of a config read back from config.json (softnce.evaluate).
# --------------------------------------------------------------------------------------------------


def split_overrides(args: Sequence[str], name: str = "config") -> tuple[dict[str, str], list[str]]:
    """``({path: raw value}, other args)`` from ``--config.<path>=<value>`` / ``--config.<path> <value>``."""
    overrides: dict[str, str] = {}
    rest: list[str] = []
    args = list(args)
    i = 0
    while i < len(args):
        match = re.match(rf"^--?{name}\.([\w.]+)(=(.*))?$", args[i], re.S)
        if not match:
            rest.append(args[i])
        elif match.group(2) is not None:
            overrides[match.group(1)] = match.group(3)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            overrides[match.group(1)] = args[i + 1]
            i += 1
        else:
            raise UsageError(f"--{name}.{match.group(1)} needs a value (--{name}.{match.group(1)}=<value>).")
        i += 1
    return overrides, rest


def _parse_value(raw: str, current: Any, flag: str) -> Any:
    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UsageError(f"{flag}={raw}: expected true or false.")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"{flag}={raw}: expected an integer.") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise UsageError(f"{flag}={raw}: expected a number.") from None
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        if isinstance(current, (tuple, list)):
            raise UsageError(f"{flag}={raw}: expected a tuple, e.g. {flag}='(1, 2)'.") from None
        return raw  # a None field: a plain string
    if isinstance(current, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value


def apply_overrides(config: Any, overrides: dict[str, str], name: str = "config",
                    new_fields_in: Sequence[str] = ()) -> dict[str, Any]:
    """Sets each ``path: raw value`` on ``config`` (a ``ConfigDict``), parsed like the field's current type.

    Returns the parsed values ``{path: value}``. A path that does not exist raises
    :class:`UsageError` with the closest field name as a suggestion, except directly inside the
    groups ``new_fields_in`` (e.g. ``('data',)`` when the dataset itself is swapped), where a new
    field is added (its value read as a Python literal, else a string).
    """
    parsed = {}
    for path, raw in overrides.items():
        flag = f"--{name}.{path}"
        node = config
        keys = path.split(".")
        if len(keys) == 2 and keys[0] in new_fields_in and keys[0] in config and keys[1] not in config[keys[0]]:
            value = _parse_value(raw, None, flag)
            config[keys[0]][keys[1]] = value
            parsed[path] = value
            continue
        for depth, key in enumerate(keys):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                where = ".".join([name, *keys[:depth]])
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else (
                    f"; fields of {where}: {', '.join(sorted(fields))}." if fields else f" ({where} is not a group).")
                raise UsageError(f"{flag}: {where} has no field {key!r}{hint}")
            if depth < len(keys) - 1:
                node = node[key]
        value = _parse_value(raw, node[keys[-1]], flag)
        node[keys[-1]] = value
        parsed[path] = value
    return parsed
