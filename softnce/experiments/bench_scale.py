"""Benchmark: soft target InfoNCE at many classes and large batches (issue 6), loss level.

Part 1 (measured). For every class count ``C`` and global batch ``M`` (``N = M``, one device) it
times one jitted forward+backward pass (gradient of the mean loss w.r.t. the logits) and reports the
compiled memory of:

* ``optax_ce``: ``optax.softmax_cross_entropy`` on the same logits and dense soft targets;
* ``dense_sti``: ``softnce.losses.soft_target_infonce`` (``S = s @ A^T``, ``O(N M C)`` flops);
* ``structured_sti``: ``softnce.losses.structured_soft_target_infonce`` (gathers,
  ``O(N M k + N C)``);
* ``blockwise_sti``: ``softnce.losses.blockwise_soft_target_infonce`` (streaming logsumexp over
  blocks of ``--block-size`` candidates, ``O(N M C)`` flops, ``O(N * block)`` scores).

Targets are realistic: label smoothing 0.1 then MixUp (alpha 0.8, batch mode, ``k = 2`` classes
per row) made by ``softnce.targets.mix_batch``; ``log(eta)`` is a non-uniform prior.

Time: one warm-up call of every variant, then ``--repeats`` rounds of one call each, interleaved
(so every variant sees the same background load), ``block_until_ready``; the median is reported
with the number of timed calls. A variant whose calls have used up ``--max-seconds`` stops being
timed (at least one timed call). Variants whose estimated time per call (flops divided by a
measured matmul rate) exceeds ``--max-seconds``, or whose compiled memory exceeds the memory
available, are reported as such instead of run. Memory: the compiled executable's
``memory_analysis()``: temporaries, and arguments + outputs + temporaries - aliased.

Part 2 (computed, not measured): bytes each device receives per step to all-gather the targets,
dense ``[M, C]`` float32 against structured ``[M, k]`` int32 + ``[M, k]`` float32 + ``[M]``
float32, next to the ring all-reduce of the ViT-B/16 gradient (float32).

Usage::

    python experiments/bench_scale.py                 # the full grid (C in {1000, 21843}, M up to 16384)
    python experiments/bench_scale.py --quick         # tiny smoke run
    python experiments/bench_scale.py --comm-only     # only the communication table
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softnce import cli, losses, targets
from softnce.experiments.machine import markdown_table, mem_available_bytes, run_header

VARIANTS = ("optax_ce", "dense_sti", "structured_sti", "blockwise_sti")
MIX = targets.MixConfig(label_smoothing=0.1, mixup_alpha=0.8, mode="batch", structured=True)
STRUCTURED_ROW_BYTES_PER_K = 4 + 4  # int32 class id + float32 weight
STRUCTURED_ROW_BYTES = 4  # float32 uniform mass


# --------------------------------------------------------------------------------------------------
# Part 1: loss-level time and memory.
# --------------------------------------------------------------------------------------------------


def make_inputs(m: int, c: int, seed: int = 0) -> dict:
    """Logits ``[m, c]``, smoothed+MixUp targets (dense ``[m, c]`` and structured), ``log(eta)`` ``[c]``."""
    keys = jax.random.split(jax.random.key(seed), 4)
    labels = jax.random.randint(keys[1], (m,), 0, c)
    mix = jax.jit(lambda r, y: targets.mix_batch(r, jnp.zeros((m, 1)), y, num_classes=c, config=MIX)[1])
    batch_targets = mix(keys[2], labels)
    return {
        "logits": jax.random.normal(keys[0], (m, c), jnp.float32),
        "dense": batch_targets.dense,
        "structured": batch_targets.structured,
        "log_eta": jax.nn.log_softmax(jax.random.normal(keys[3], (c,), jnp.float32)),
    }


def variant_functions(block_size: int) -> dict:
    """Name -> (value-and-grad function, names of its inputs in :func:`make_inputs`)."""

    def ce(z, a):
        return optax.softmax_cross_entropy(z, a).mean()

    def dense(z, a, log_eta):
        return losses.soft_target_infonce(z, a, log_noise_probs=log_eta).mean()

    def structured(z, st, log_eta):
        return losses.structured_soft_target_infonce(z, st, log_noise_probs=log_eta).mean()

    def blockwise(z, a, log_eta):
        return losses.blockwise_soft_target_infonce(z, a, log_noise_probs=log_eta, block_size=block_size).mean()

    return {
        "optax_ce": (jax.value_and_grad(ce), ("logits", "dense")),
        "dense_sti": (jax.value_and_grad(dense), ("logits", "dense", "log_eta")),
        "structured_sti": (jax.value_and_grad(structured), ("logits", "structured", "log_eta")),
        "blockwise_sti": (jax.value_and_grad(blockwise), ("logits", "dense", "log_eta")),
    }


def estimated_flops(name: str, m: int, c: int) -> float:
    """Matmul flops of one forward+backward (``N = M``): dense ``4 M^2 C``, blockwise ``6 M^2 C`` (remat)."""
    return {"dense_sti": 4.0, "blockwise_sti": 6.0}.get(name, 0.0) * m * m * c


def matmul_rate(size: int = 1024, calls: int = 3) -> float:
    """Measured float32 matmul flops per second of this machine (best of ``calls``)."""
    x = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    best = min(_timed(f, (x,)) for _ in range(calls))
    return 2.0 * size**3 / best


def _timed(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def memory_of(compiled) -> dict:
    stats = compiled.memory_analysis()
    total = (
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return {"temp_bytes": stats.temp_size_in_bytes, "total_bytes": total}


def bench_size(m: int, c: int, args, rate: float) -> dict:
    """Compiles every variant at ``N = M = m``, ``C = c``; times the ones that fit (interleaved)."""
    inputs = make_inputs(m, c)
    results, runnable = {}, {}
    available = mem_available_bytes()
    for name, (fn, arg_names) in variant_functions(args.block_size).items():
        call_args = tuple(inputs[a] for a in arg_names)
        compiled = jax.jit(fn).lower(*call_args).compile()
        results[name] = memory_of(compiled)
        estimate = estimated_flops(name, m, c) / rate
        if results[name]["total_bytes"] > 0.8 * available:
            need, free = results[name]["total_bytes"] / 2**30, available / 2**30
            results[name]["skip"] = f"does not fit ({need:.1f} GiB > 80% of {free:.1f} GiB free)"
        elif estimate > args.max_seconds:
            results[name]["skip"] = f"not run (~{estimate:.0f} s/call est. > --max-seconds)"
        else:
            runnable[name] = (compiled, call_args)
    spent = {name: _timed(c_, a) for name, (c_, a) in runnable.items()}  # warm-up
    times = {name: [] for name in runnable}
    for _ in range(args.repeats):
        for name, (compiled, call_args) in runnable.items():
            if times[name] and spent[name] > args.max_seconds:
                continue
            times[name].append(_timed(compiled, call_args))
            spent[name] += times[name][-1]
    for name, runs in times.items():
        results[name].update(seconds=statistics.median(runs), runs=len(runs))
    return results


def _time_cell(r: dict) -> str:
    if "seconds" not in r:
        return r.get("skip", "-")
    return f"{1e3 * r['seconds']:.1f} ({r['runs']})"


def _ratio_cell(r: dict, ref: dict) -> str:
    if "seconds" in r and "seconds" in ref:
        return f"{r['seconds'] / ref['seconds']:.2f}"
    return "-"


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f}" if x >= 2**20 else f"{x / 2**20:.2f}"


def format_loss_table(rows) -> str:
    header = "| C | N = M | " + " | ".join(f"{v} ms (runs)" for v in VARIANTS)
    header += " | " + " | ".join(f"{v} / CE time" for v in VARIANTS[1:])
    header += " | " + " | ".join(f"{v} MiB temp / total" for v in VARIANTS) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for c, m, r in rows:
        cells = [str(c), str(m)]
        cells += [_time_cell(r[v]) for v in VARIANTS]
        cells += [_ratio_cell(r[v], r["optax_ce"]) for v in VARIANTS[1:]]
        cells += [f"{_mib(r[v]['temp_bytes'])} / {_mib(r[v]['total_bytes'])}" for v in VARIANTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Part 2: communication per step (computed).
# --------------------------------------------------------------------------------------------------


def all_gather_bytes_received(global_rows: int, row_bytes: int, devices: int) -> float:
    """Bytes one device receives in a tiled all-gather of ``[M, ...]``: ``(D - 1) / D * M * row_bytes``."""
    return (devices - 1) / devices * global_rows * row_bytes


def ring_all_reduce_bytes_received(num_bytes: int, devices: int) -> float:
    """Bytes one device receives in a ring all-reduce (reduce-scatter + all-gather): ``2 (D-1)/D B``."""
    return 2.0 * (devices - 1) / devices * num_bytes


def vit_b16_num_params(num_classes: int) -> int:
    """Parameter count of ``softnce.models.vit.vit_b16(num_classes)`` at 224 px (from shapes only)."""
    from softnce.models import vit

    model = vit.vit_b16(num_classes)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)["params"]
    )
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _bytes(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def format_comm_table(classes, batches, devices, k: int, param_counts: dict) -> str:
    columns = ["C", "M", "devices", "dense [M, C] f32 targets", f"structured targets (k = {k})", "dense / structured",
               "ViT-B/16 grad all-reduce (f32, ring)", "dense targets / grad", "structured targets / grad"]
    structured_row = k * STRUCTURED_ROW_BYTES_PER_K + STRUCTURED_ROW_BYTES
    rows = []
    for c, m, d in itertools.product(classes, batches, devices):
        dense = all_gather_bytes_received(m, 4 * c, d)
        structured = all_gather_bytes_received(m, structured_row, d)
        grads = ring_all_reduce_bytes_received(4 * param_counts[c], d)
        rows.append([str(c), str(m), str(d), _bytes(dense), _bytes(structured), f"{dense / structured:.0f}",
                     _bytes(grads), f"{100 * dense / grads:.3g}%", f"{100 * structured / grads:.2g}%"])
    return markdown_table(columns, rows)


# --------------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 21843], help="C values")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384], help="N = M values")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0,
        help="per variant and size: not run if the estimated call exceeds it; timing stops once spent",
    )
    parser.add_argument("--block-size", type=int, default=losses.BLOCKWISE_BLOCK_SIZE, help="blockwise STI block")
    parser.add_argument("--comm-devices", type=int, nargs="+", default=[8, 64, 256], help="devices (part 2)")
    parser.add_argument("--comm-batches", type=int, nargs="+", default=None,
                        help="M values of part 2 (default --batches)")
    parser.add_argument("--comm-only", action="store_true", help="print only the communication table")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: C = 10, M = 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.batches, args.repeats, args.block_size = [10], [16], 2, 8
    if args.comm_batches is None:
        args.comm_batches = args.batches
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print(run_header("bench_scale.py", argv, f"{jax.device_count()} device(s)") + "\n")
    if not args.comm_only:
        rate = matmul_rate()
        load_before = os.getloadavg()
        rows = []
        for c in args.classes:
            for m in args.batches:
                rows.append((c, m, bench_size(m, c, args, rate)))
                print(f"done C={c} M={m}", file=sys.stderr, flush=True)
        load_after = os.getloadavg()
        print("## Loss level: forward+backward, one device, N = M\n")
        print(format_loss_table(rows))
        print(
            f"\nms: median wall time (timed calls in parentheses) of the jitted gradient of the mean loss "
            f"w.r.t. the logits; MiB: compiled memory_analysis() temporaries / arguments + outputs + "
            f"temporaries. Matmul rate used for the estimates: {rate / 1e9:.0f} GFLOP/s. Load average "
            f"(1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
            f"{tuple(round(x, 2) for x in load_after)}.\n"
        )
    k = 2
    params = {c: vit_b16_num_params(c) for c in args.classes}
    print(f"## Bytes received per device per step (computed), k = {k}\n")
    print(format_comm_table(args.classes, args.comm_batches, args.comm_devices, k, params))
    print(
        "\nTiled all-gather: (D-1)/D * M * row bytes; dense rows 4C bytes, structured rows "
        f"{k * STRUCTURED_ROW_BYTES_PER_K + STRUCTURED_ROW_BYTES} bytes. Gradient: ring all-reduce "
        "2 (D-1)/D * 4 P bytes with P = "
        + ", ".join(f"{params[c] / 1e6:.2f}M (C = {c})" for c in args.classes)
        + " ViT-B/16 parameters."
    )


if __name__ == "__main__":
    main()
