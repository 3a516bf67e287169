"""Shared command-line plumbing: one-line start-up errors and ``--config.<path>=<value>`` overrides.

Every entry point (``softnce.main``, ``softnce.evaluate``, ``softnce.export``, data preparation and the
experiments: :class:`ArgumentParser`) reports a command line it cannot run as exactly one line on
stderr, ``softnce: error: <message>``, and exits with code 2 (:func:`fail`). The checks here need no jax
and no data library, so such an error comes before they are imported (in well under 2 s) and before any
of their start-up log lines.

- :func:`absl_flags_parser` is the ``flags_parser`` of ``absl.app.run`` for ``softnce.main``: a
  config file that does not exist (with the nearest file name as a suggestion), a bad variant key
  (``configs/digits.py:los=nll``), an override of a field the config does not have (with
  ml_collections' "did you mean" suggestion), a value that does not parse, or any other flag error.
  The loss's and the model's fields may be new (:data:`COMPONENT_SECTIONS`); whether the named
  component takes them is checked with the rest of the config (:mod:`softnce.config_checks`).
- :func:`apply_overrides` applies ``--config.<path>=<value>`` arguments to a config read from a
  run's ``config.json`` (``softnce.evaluate``), with the same kind of errors and suggestions.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import sys
from typing import Any, NoReturn, Sequence

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


# --------------------------------------------------------------------------------------------------
# softnce.main: the absl flags, parsed with one-line errors.
# --------------------------------------------------------------------------------------------------


def config_flag_value(argv: Sequence[str], name: str = "config") -> str | None:
    """The value of ``--<name>`` in ``argv`` (``--config=X`` or ``--config X``), or ``None``."""
    for i, arg in enumerate(argv):
        match = re.match(rf"^--?{name}(=(.*))?$", arg)
        if match:
            if match.group(1) is not None:
                return match.group(2)
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


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


def _did_you_mean(text: str) -> tuple[str | None, str | None]:
    """``(missing key, suggestion)`` from an ml_collections KeyError/AttributeError message."""
    match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if match:
        return match.group(2), match.group(1)
    match = re.match(r"""^\W*([A-Za-z_][\w]*)\W*""", text)
    return (match.group(1) if match else None), None


def _override_args(argv: Sequence[str], name: str = "config") -> list[str]:
    return [a.split("=", 1)[0].lstrip("-") for a in argv if re.match(rf"^--?(no)?{name}\.", a)]


def override_typo_message(error: BaseException, argv: Sequence[str], name: str = "config") -> str:
    """A one-line message for a ``--config.<path>`` override naming a field the config lacks."""
    text = error.args[0] if error.args else str(error)
    key, suggestion = _did_you_mean(str(text))
    flag = None
    for override in _override_args(argv, name):
        if key is not None and key in override.split(".")[1:]:
            flag = override
            break
    where = f"--{flag}" if flag else f"a --{name}.<field> override"
    message = f"{where}: the config has no field {key!r}" if key else f"{where}: {one_line(text)}"
    return message + (f"; did you mean {suggestion!r}?" if suggestion else ".")


def _config_parse_error(text: str) -> str:
    """The last line of ml_collections' 'Error whilst parsing config file' traceback, without the class."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    return re.sub(r"^(\w+\.)*\w*(Error|Exception): ", "", last)


COMPONENT_SECTIONS = ("loss", "model")
"""The config sections whose fields are the named component's (:mod:`softnce.config_checks`): a
``--config.<section>.<field>`` override may add a field that the config file does not have."""


def split_component_overrides(argv: Sequence[str], name: str = "config") -> tuple[list[str], list[str]]:
    """``(the --config.<section>.* arguments of the COMPONENT_SECTIONS (with a separate value), the rest)``."""
    pattern = rf"^--?{name}\.({'|'.join(COMPONENT_SECTIONS)})\.[\w.]+(=.*)?$"
    component, rest = [], []
    i = 0
    while i < len(argv):
        match = re.match(pattern, argv[i], re.S)
        target = component if match else rest
        target.append(argv[i])
        if match and match.group(2) is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            target.append(argv[i + 1])
            i += 1
        i += 1
    return component, rest


def absl_flags_parser(argv: Sequence[str]) -> list[str]:
    """``flags_parser`` for ``absl.app.run``: parses ``argv`` into ``absl.flags.FLAGS``; any error is one line.

    Checks the ``--config`` file exists before ml_collections loads it (its own error would only
    surface when the config is first read, after jax is imported). The overrides of the loss's and
    the model's fields (:data:`COMPONENT_SECTIONS`) are applied after the others, in order, by
    :func:`apply_overrides`, which may add a field: ``--config.loss.name=focal --config.loss.gamma=1.5``
    sets a field of the loss that the config file does not have (whether the named loss takes it is
    checked with the config, once ``--import_modules`` are imported).
    """
    from absl import flags

    argv = list(argv)
    spec = config_flag_value(argv[1:])
    component, rest = split_component_overrides(argv[1:])
    try:
        if spec is not None:
            check_config_file(spec)
        saved_argv, sys.argv = sys.argv, [argv[0], *rest]  # config_flags defines its override flags from sys.argv
        try:
            remaining = flags.FLAGS([argv[0], *rest])
        finally:
            sys.argv = saved_argv
        if component:
            overrides, _ = split_overrides(component)
            config = flags.FLAGS["config"].value
            with config.unlocked():
                apply_overrides(config, overrides, new_fields_in=COMPONENT_SECTIONS)
        return remaining
    except UsageError as error:
        fail(error)
    except flags.Error as error:
        text = str(error)
        if "Error whilst parsing config file" in text:
            fail(f"--config={spec}: {_config_parse_error(text)}")
        fail(text.splitlines()[0] if "Traceback" in text else text)
    except (KeyError, AttributeError) as error:  # ml_collections: an override of a field that does not exist
        fail(override_typo_message(error, argv))
    except (ValueError, TypeError, OSError, SyntaxError, ImportError) as error:
        text = str(error)
        if "Error whilst parsing config file" in text:
            text = _config_parse_error(text)
        fail(f"--config={spec}: {type(error).__name__}: {text}" if spec else text)


def config_value(flag_holder: Any, spec: str | None) -> Any:
    """``flag_holder.value`` (a ``config_flags`` config); a config that failed to load is one line."""
    try:
        return flag_holder.value
    except OSError as error:
        fail(f"--config={spec}: {error}")


# --------------------------------------------------------------------------------------------------
# Overrides of a config read back from config.json (softnce.evaluate).
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
