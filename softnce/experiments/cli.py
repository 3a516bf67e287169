"""The command line shared by the experiments that run a named grid: ``--setting``, ``--out`` and overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from softnce import cli


def parse_settings(
    argv: Optional[list[str]],
    *,
    description: str,
    settings: dict[str, Any],
    out_help: str,
    overrides: dict[str, dict],
) -> tuple[Any, Optional[str]]:
    """Parses ``--setting NAME --out DIR`` plus one flag per field of ``overrides``.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).
      settings: ``{name: frozen dataclass}``; ``--setting`` picks one (default ``'full'``).
      overrides: ``{field: argparse keyword arguments}``; a given ``--field`` replaces that field.

    Returns:
      ``(settings with the overrides applied, --out or None)``.
    """
    parser = cli.ArgumentParser(description=description)
    parser.add_argument("--setting", choices=sorted(settings), default="full", help="grid size (default full)")
    parser.add_argument("--out", default=None, help=out_help)
    for field, kwargs in overrides.items():
        parser.add_argument(f"--{field}", default=None, **kwargs)
    args = parser.parse_args(argv)
    chosen = settings[args.setting]
    given = {field: getattr(args, field) for field in overrides if getattr(args, field) is not None}
    return dataclasses.replace(chosen, **given), args.out


def write_results(out_dir: str, result: dict, summary: str, log=print) -> None:
    """Writes ``summary`` (Markdown) and ``result`` (JSON) to ``out_dir`` under the names in
    ``result['files']`` (``'summary'``, ``'metrics'``), then logs where they are."""
    with open(os.path.join(out_dir, result["files"]["summary"]), "w") as f:
        f.write(summary)
    with open(os.path.join(out_dir, result["files"]["metrics"]), "w") as f:
        json.dump(result, f, indent=1)
    seconds = result["seconds"]["total"] if isinstance(result["seconds"], dict) else result["seconds"]
    log(f"done in {seconds:.1f} s; results in {out_dir}")
