"""Helpers for ``configs/*.py``: the ``name.py:key=value,key=value`` variant syntax."""

from __future__ import annotations

import ast
from typing import Any


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses ``'a=1,b=foo'`` into ``{'a': 1, 'b': 'foo'}`` over ``defaults``.

    Values are read as Python literals where possible (``1``, ``0.5``, ``True``), else kept as
    strings; a key that is not in ``defaults`` is an error that lists the valid keys.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"config argument {item!r} must look like key=value (valid keys: {', '.join(defaults)}).")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid keys: {', '.join(defaults)}.")
        try:
            values[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            values[key] = raw.strip()
    return values
