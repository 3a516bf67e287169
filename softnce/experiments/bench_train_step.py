"""Benchmark: the cost of soft target InfoNCE in a full train step (issue 6), against soft-target CE.

Runs the project's real step, ``softnce.steps.make_sharded_train_step`` (``jit(shard_map(...))``
over a ``('data',)`` mesh of ``--devices`` devices: MixUp/CutMix + label smoothing on device,
forward, backward, ``pmean``, AdamW with layer-wise lr decay from ``configs/vit_finetune.py``), on
random 32 px images with a small ViT, once per loss:

* ``soft_target_cross_entropy`` (the baseline);
* ``soft_target_infonce`` with structured targets (``MixConfig.structured = True``, the default of
  ``configs/vit_finetune.py``: gathers, ``O(M k)`` communication);
* ``soft_target_infonce`` with dense targets (``structured = False``: ``S = s @ A^T``).

All variants use the same ``MixConfig`` (label smoothing 0.1, MixUp 0.8, CutMix 1.0, mix prob 0.8,
switch prob 0.5, batch mode), the same non-uniform ``log(eta)`` and the same initial state and
optimiser (the STI recipe's). After one warm-up (compiling)
step each, ``--repeats`` rounds run one step of every variant in turn (interleaved, so that all see
the same background load). Reported: median step time, images/s, and the overhead of each STI
variant over CE as the median over rounds of the paired ratio ``t_STI / t_CE - 1`` and as the ratio
of the fastest steps (the least disturbed by other load) ``min t_STI / min t_CE - 1``.

Usage::

    python experiments/bench_train_step.py             # ViT (D=192, 4 blocks) at 32 px, batch 128
    python experiments/bench_train_step.py --quick     # tiny smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from softnce import assembly, cli, distributed, losses, steps
from softnce.configs import vit_finetune
from softnce.experiments.machine import markdown_table, run_header
from softnce.models import vit

VARIANTS = {  # name -> (registered loss, structured targets)
    "soft CE": ("soft_target_cross_entropy", True),
    "STI structured": ("soft_target_infonce", True),
    "STI dense": ("soft_target_infonce", False),
}
BASELINE = "soft CE"


def make_config(loss_name: str, batch: int):
    """``configs/vit_finetune.py`` (CIFAR-100 recipe) for ``loss_name`` at global batch ``batch``."""
    config = vit_finetune.get_config(f"dataset=cifar100,model=vit_tiny,loss={loss_name},batch={batch}")
    config.num_train_steps = 1000
    config.optim.warmup_steps = 10
    return config


def make_model(args) -> vit.VisionTransformer:
    """ViT with ``args.patch``, ``hidden`` (MLP ``4 hidden``), ``depth``, ``heads``, drop path 0.1, ``args.dtype``."""
    return vit.VisionTransformer(
        num_classes=args.classes, patch_size=args.patch, hidden_size=args.hidden, depth=args.depth,
        num_heads=args.heads, mlp_dim=4 * args.hidden, drop_path_rate=0.1, dtype=jnp.dtype(args.dtype),
    )


def make_batch(mesh, args) -> tuple[dict, jax.Array]:
    """Random images ``[B, S, S, 3]`` and labels sharded on ``'data'``; ``log(eta)`` of the labels."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.batch).astype(np.int32)
    images = rng.standard_normal((args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    prior_labels = np.concatenate([np.arange(args.classes), rng.integers(0, args.classes, 10 * args.classes)])
    log_eta = losses.log_class_prior(prior_labels, args.classes)
    return distributed.global_batch(mesh, {"inputs": images, "label": labels}), log_eta


def make_state(mesh, model, args):
    """The replicated initial state (optimiser of the STI recipe, shared by all variants)."""
    config = make_config("soft_target_infonce", args.batch)
    example_shape = (args.image_size, args.image_size, 3)
    state, _ = assembly.create_train_state(config, model, example_shape, jax.random.key(0), mesh, args.batch)
    return state


def make_step(name: str, mesh, args):
    """The sharded train step of variant ``name`` (its loss and its ``MixConfig``)."""
    loss_name, structured = VARIANTS[name]
    config = make_config(loss_name, args.batch)
    config.augment.structured = structured
    return steps.make_sharded_train_step(mesh, **assembly.train_step_kwargs(config, args.classes))


def prepare(args, mesh) -> tuple[dict, dict, dict, jax.Array]:
    """Per variant in ``args.variants``: the compiled (warmed-up) step and its state; the batch, ``log(eta)``."""
    model = make_model(args)
    batch, log_eta = make_batch(mesh, args)
    initial = make_state(mesh, model, args)
    steps, states = {}, {}
    for name in args.variants:
        steps[name] = make_step(name, mesh, args)
        states[name] = jax.tree.map(jnp.copy, initial)  # own buffers: the step donates its state
        states[name], metrics = steps[name](states[name], batch, jax.random.key(1), log_eta)  # compile
        jax.block_until_ready((states[name], metrics))
    return steps, states, batch, log_eta


def run(args) -> dict:
    """Interleaved timed steps of every variant; returns per-variant step times in seconds."""
    mesh = distributed.make_mesh(jax.devices()[: args.devices])
    steps, states, batch, log_eta = prepare(args, mesh)
    rng = jax.random.key(1)
    times = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name in args.variants:
            start = time.perf_counter()
            states[name], metrics = steps[name](states[name], batch, rng, log_eta)
            jax.block_until_ready((states[name], metrics))
            times[name].append(time.perf_counter() - start)
        if not all(np.isfinite(float(m)) for m in jax.device_get(metrics).values()):
            raise FloatingPointError(f"non-finite metrics in the benchmark: {jax.device_get(metrics)}")
    return times


def format_table(times: dict, batch: int) -> str:
    base = times[BASELINE]
    columns = ["loss", "median step ms", "images/s", "overhead vs soft CE: median paired ratio - 1",
               "overhead vs soft CE: min / min - 1", "min / max ms"]
    rows = []
    for name, runs in times.items():
        median = statistics.median(runs)
        overhead = statistics.median(t / b for t, b in zip(runs, base)) - 1.0
        overhead_min = min(runs) / min(base) - 1.0
        cells = ["-", "-"] if name == BASELINE else [f"{100 * overhead:+.1f}%", f"{100 * overhead_min:+.1f}%"]
        rows.append([name, f"{1e3 * median:.1f}", f"{batch / median:.0f}", *cells,
                     f"{1e3 * min(runs):.1f} / {1e3 * max(runs):.1f}"])
    return markdown_table(columns, rows)


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100, help="C (100: CIFAR-100)")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192, help="ViT width D (MLP 4 D)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="ViT compute dtype")
    parser.add_argument("--devices", type=int, default=1, help="devices of the data mesh")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (one step per variant each)")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
        help=f"losses to time ({BASELINE!r} is always included as the baseline)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (D=16, 1 block, batch 16, C=10)")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.batch, args.hidden, args.depth, args.heads, args.repeats = 10, 16, 16, 1, 2, 2
    args.variants = [BASELINE] + [v for v in args.variants if v != BASELINE]
    if args.devices > jax.device_count():
        parser.error(f"--devices {args.devices} but only {jax.device_count()} device(s) are visible.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print(run_header("bench_train_step.py", argv, f"{args.devices} device(s) in the mesh"))
    print(
        f"Model: ViT patch {args.patch}, D={args.hidden}, {args.depth} blocks, {args.heads} heads, {args.dtype}, "
        f"{args.image_size} px, C={args.classes}; global batch {args.batch}; {args.repeats} rounds\n"
    )
    load_before = os.getloadavg()
    times = run(args)
    load_after = os.getloadavg()
    print(format_table(times, args.batch))
    print(
        f"\nLoad average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)}."
    )


if __name__ == "__main__":
    main()
