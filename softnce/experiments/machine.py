"""What the benchmarks report about the machine they ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Optional


def mem_available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_description() -> str:
    """``'<n> CPUs (nproc), <CPU model>, <OS> <arch>'``."""
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return f"{os.cpu_count()} CPUs (nproc), {model}, {platform.system()} {platform.machine()}"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header ``columns``, a rule, then one line per row of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def run_header(script: str, argv: Optional[list[str]], devices: str) -> str:
    """``Machine: ...; jax ... on <platform>, <devices>`` and ``Command: python experiments/<script> <args>``."""
    import jax

    args = " ".join(sys.argv[1:] if argv is None else argv)
    return (f"Machine: {machine_description()}; jax {jax.__version__} on {jax.devices()[0].platform}, {devices}\n"
            f"Command: python experiments/{script} {args}")
