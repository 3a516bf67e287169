"""Benchmark: soft target InfoNCE (STI) forward+backward against its baselines (issue 2).

For every batch size ``N = M`` and class count ``C`` it times one forward+backward pass (gradient
w.r.t. the logits) and reports the peak memory of:

* **STI**: ``jax.jit(jax.value_and_grad(mean(softnce.losses.soft_target_infonce)))`` with a
  non-uniform ``log(eta)``;
* **(a)** ``optax.softmax_cross_entropy`` on the same logits and soft targets (jitted fwd+bwd);
* **(b)** the bare matrix products STI needs, its floor: ``S = s @ A^T`` (forward) and
  ``dS @ A`` (the one backward product: the targets get no gradient), jitted, with an
  optimisation barrier so XLA cannot reassociate ``(s A^T) A`` into ``s (A^T A)``;
* **(c)** the reference's algorithm in PyTorch on CPU: the targets tiled to ``[N, M, C]``,
  multiplied with the broadcast scores and summed over classes, then cross-entropy on the
  diagonal (run in a subprocess per size when ``torch`` is importable).

Time: median of ``--repeats`` calls (at least 3 for slow sizes, see ``--max-seconds``) after one
warm-up call, ``block_until_ready`` (JAX) / synchronous CPU execution (torch); the JAX columns'
calls are interleaved so that they share the background load of a shared machine.
Memory: JAX columns are the compiled executable's ``memory_analysis()`` (arguments + outputs +
temporaries - aliased); the torch column is the peak resident set size (``VmHWM``, reset after the
imports) of a fresh subprocess during the run minus its RSS before the inputs were created (so it
also counts inputs, outputs and temporaries). Sizes whose ``[N, M, C]`` float32 tensor exceeds
``--torch-budget-gb``, or whose estimated peak (two such tensors) exceeds the memory available,
are reported as "does not fit" instead of run.

Usage::

    python experiments/bench_losses.py            # the full grid (slow on 2 cores)
    python experiments/bench_losses.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from softnce import cli
from softnce.experiments.machine import machine_description, mem_available_bytes

LABEL_SMOOTHING = 0.1


# --------------------------------------------------------------------------------------------------
# Inputs: MixUp-like soft targets (two classes mixed, then label smoothing) and a non-uniform prior.
# --------------------------------------------------------------------------------------------------


def make_inputs(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits ``[n, c]``, soft targets ``[n, c]`` (rows on the simplex) and ``log(eta)`` ``[c]``."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c), dtype=np.float32)
    lam = rng.uniform(size=(n, 1)).astype(np.float32)
    targets = np.full((n, c), LABEL_SMOOTHING / c, np.float32)
    rows = np.arange(n)
    targets[rows, rng.integers(0, c, n)] += (1 - LABEL_SMOOTHING) * lam[:, 0]
    targets[rows, rng.integers(0, c, n)] += (1 - LABEL_SMOOTHING) * (1 - lam[:, 0])
    eta = rng.dirichlet(np.ones(c))
    return logits, targets, np.log(eta).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# JAX columns.
# --------------------------------------------------------------------------------------------------


def _jax_functions():
    import jax
    import jax.numpy as jnp
    import optax

    from softnce.losses import soft_target_infonce

    def sti(logits, targets, log_eta):
        return soft_target_infonce(logits, targets, log_noise_probs=log_eta).mean()

    def optax_ce(logits, targets, log_eta):
        del log_eta
        return optax.softmax_cross_entropy(logits, targets).mean()

    def matmul_floor(logits, targets, log_eta):
        del log_eta
        scores = jax.lax.optimization_barrier(logits @ targets.T)  # forward S = s A^T, [N, M]
        return scores @ targets  # backward dS @ A, [N, C]

    return {
        "sti": jax.value_and_grad(sti),
        "optax_ce": jax.value_and_grad(optax_ce),
        "floor": matmul_floor,
    }, jnp


def _timed_call(compiled, args) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def bench_jax(functions: dict, args, repeats: int, max_seconds: float) -> dict:
    """Compiles every function; returns, per name, median seconds per call and memory in bytes.

    The timed calls are interleaved (one call of each function per round), so all columns see the
    same background load on a shared machine. ``repeats`` rounds follow one warm-up round; when they
    would take longer than ``max_seconds`` (judged by the warm-up), fewer are made, but at least 3.
    """
    import jax

    compiled, results = {}, {}
    for name, fn in functions.items():
        compiled[name] = jax.jit(fn).lower(*args).compile()
        stats = compiled[name].memory_analysis()
        results[name] = {
            "bytes": stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        }
    warm_up = sum(_timed_call(c, args) for c in compiled.values())
    if warm_up * repeats > max_seconds:  # slow sizes: fewer rounds, but at least 3 for a median
        repeats = max(3, int(max_seconds / warm_up))
    times = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, c in compiled.items():
            times[name].append(_timed_call(c, args))
    for name in compiled:
        results[name]["seconds"] = statistics.median(times[name])
    return results


# --------------------------------------------------------------------------------------------------
# Torch column: the reference's broadcast algorithm, one subprocess per size.
# --------------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Sets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0), so the import's peak is forgotten."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def torch_worker(n: int, c: int, repeats: int, threads: int) -> dict:
    """Runs in a fresh process: times the reference's algorithm and measures its peak RSS delta."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)

    def reference_sti(logits, targets, log_eta):
        s = logits - log_eta  # t = 1
        rows, classes = s.shape
        candidates = targets.shape[0]
        tiled = targets.repeat(rows, 1).reshape(rows, candidates, classes)  # [N, M, C]
        scores = (s.unsqueeze(1) * tiled).sum(-1)  # [N, M, C] product, summed over classes
        scores = scores - scores.max(dim=1, keepdim=True)[0].detach()
        return F.cross_entropy(scores, torch.arange(rows))

    _reset_peak_rss()
    rss_before = _proc_status_bytes("VmRSS")
    logits_np, targets_np, log_eta_np = make_inputs(n, c)
    logits = torch.from_numpy(logits_np)
    targets, log_eta = torch.from_numpy(targets_np), torch.from_numpy(log_eta_np)
    del logits_np, targets_np, log_eta_np

    def step():
        z = logits.detach().requires_grad_(True)
        reference_sti(z, targets, log_eta).backward()
        return z.grad

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times),
        "bytes": _proc_status_bytes("VmHWM") - rss_before,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def bench_torch(n: int, c: int, args) -> dict:
    """The torch column for one size: a result, or a reason it was not run."""
    tensor_bytes = 4 * n * n * c
    if tensor_bytes > args.torch_budget_gb * 2**30:
        size, budget = tensor_bytes / 2**30, args.torch_budget_gb
        return {"skip": f"does not fit ({size:.1f} GB tensor > {budget:g} GB budget)"}
    available = mem_available_bytes()
    if 2 * tensor_bytes > 0.9 * available:
        needed, free = 2 * tensor_bytes / 2**30, available / 2**30
        return {"skip": f"does not fit (~{needed:.1f} GB needed, {free:.1f} GB free)"}
    command = [sys.executable, "-m", "softnce.experiments.bench_losses", "--torch-worker", str(n), str(c)]
    command += ["--torch-repeats", str(args.torch_repeats), "--torch-threads", str(args.torch_threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"skip": f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_available() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


# --------------------------------------------------------------------------------------------------
# Table.
# --------------------------------------------------------------------------------------------------


def _ms(result) -> str:
    return f"{1e3 * result['seconds']:.1f}" if "seconds" in result else result.get("skip", "-")


def _mb(result) -> str:
    return f"{result['bytes'] / 2**20:.3g}" if "bytes" in result else "-"


def _ratio(a, b, key) -> str:
    if key in a and key in b and b[key] > 0:
        return f"{a[key] / b[key]:.2f}"
    return "-"


def format_table(rows) -> str:
    header = (
        "| N = M | C | STI ms | (a) optax CE ms | (b) matmul floor ms | (c) torch broadcast ms "
        "| STI/(a) | STI/(b) | (c)/STI | STI MB | (a) MB | (b) MB | (c) MB | (c)/STI memory |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for n, c, r in rows:
        lines.append(
            f"| {n} | {c} | {_ms(r['sti'])} | {_ms(r['optax_ce'])} | {_ms(r['floor'])} | {_ms(r['torch'])} "
            f"| {_ratio(r['sti'], r['optax_ce'], 'seconds')} | {_ratio(r['sti'], r['floor'], 'seconds')} "
            f"| {_ratio(r['torch'], r['sti'], 'seconds')} | {_mb(r['sti'])} | {_mb(r['optax_ce'])} "
            f"| {_mb(r['floor'])} | {_mb(r['torch'])} | {_ratio(r['torch'], r['sti'], 'bytes')} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="N = M values")
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 21843], help="C values")
    parser.add_argument("--repeats", type=int, default=5, help="timed JAX calls per size (median)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="per size, all JAX columns together: fewer repeats (but >= 3) beyond this",
    )
    parser.add_argument("--torch-repeats", type=int, default=3, help="timed torch calls per size")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument(
        "--torch-budget-gb",
        type=float,
        default=8.0,
        help="skip (c) when the [N, M, C] float32 tensor is larger than this",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip column (c)")
    parser.add_argument(
        "--max-jax-tflop",
        type=float,
        default=None,
        help="skip the JAX columns for sizes whose STI matmuls (4 N M C flop) exceed this many TFLOP",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: N in {64, 128}, C in {10, 100}")
    parser.add_argument("--torch-worker", type=int, nargs=2, metavar=("N", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.classes, args.repeats, args.torch_repeats = [64, 128], [10, 100], 2, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.torch_worker:
        n, c = args.torch_worker
        print(json.dumps(torch_worker(n, c, args.torch_repeats, args.torch_threads)))
        return

    import jax

    functions, jnp = _jax_functions()
    torch_version = None if args.no_torch else torch_available()
    if torch_version is None:
        print("(c) skipped: " + ("--no-torch given." if args.no_torch else "torch is not importable."))
    print(f"Machine: {machine_description()}; jax {jax.__version__} on {jax.devices()[0].platform}"
          + (f"; torch {torch_version} (CPU, {args.torch_threads} threads)" if torch_version else ""))
    print(f"Command: python {' '.join(sys.argv)}\n", flush=True)

    rows = []
    for n in args.sizes:
        for c in args.classes:
            result = {}
            tflop = 4 * n * n * c / 1e12
            if args.max_jax_tflop is not None and tflop > args.max_jax_tflop:
                skip = {"skip": f"skipped ({tflop:.2f} TFLOP > --max-jax-tflop)"}
                result.update(sti=skip, optax_ce=skip, floor=skip)
            else:
                inputs = tuple(jnp.asarray(x) for x in make_inputs(n, c))
                result.update(bench_jax(functions, inputs, args.repeats, args.max_seconds))
                del inputs
            if torch_version is None:
                result["torch"] = {"skip": "no torch"}
            else:
                result["torch"] = bench_torch(n, c, args)
            rows.append((n, c, result))
            print(f"done N=M={n} C={c}: " + ", ".join(f"{k} {_ms(v)} ms" for k, v in result.items()),
                  file=sys.stderr, flush=True)
    print(format_table(rows))
    print(
        "\nms: median wall time of one forward+backward (gradient w.r.t. the logits). MB: JAX columns "
        "from the compiled executable's memory_analysis() (arguments + outputs + temporaries); (c) from "
        "the peak RSS (VmHWM) of a fresh subprocess minus its RSS before the inputs were created."
    )


if __name__ == "__main__":
    main()
