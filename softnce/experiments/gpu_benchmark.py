"""GPU benchmark: images/s of the full ViT-B/16 train step with STI and with soft CE (issue 6).

Meant to be run in one go on a single NVIDIA GPU::

    python experiments/gpu_benchmark.py                 # ViT-B/16, 224 px, batch 128, bfloat16, C = 1000
    python experiments/gpu_benchmark.py --quick         # tiny sizes; also runs on CPU (smoke test)

JAX part: the project's train step (``softnce.steps.make_sharded_train_step`` on a 1-device mesh:
label smoothing 0.1 + MixUp 0.8 / CutMix 1.0 on device, forward, backward, AdamW with layer-wise lr
decay, as ``configs/vit_finetune.py``) with ``soft_target_cross_entropy`` and with
``soft_target_infonce`` on structured targets (and on dense targets), built by the helpers of
``experiments/bench_train_step.py``. One fixed random batch stays on the device (the input pipeline
is not timed).

PyTorch part (when ``timm`` and a CUDA ``torch`` are importable; otherwise it says why it is skipped;
``--torch-device cpu`` forces a CPU run): timm's ``VisionTransformer`` of the same shape (global
average pooling + fc_norm, drop path 0.1), ``timm.data.Mixup`` with the same settings, fused AdamW,
``torch.autocast(bfloat16)``, and the reference's loss algorithm: the ``[N, M, C]`` broadcast
``S = (a[None, :, :] * s[:, None, :]).sum(-1)``, ``L_i = logsumexp_j S[i, j] - S[i, i]``, next to
soft-target CE.

Timing: ``--warmup`` steps per variant, then ``--rounds`` rounds in which every variant runs
``--steps`` consecutive steps (synchronised at the end of the round); images/s is the median over
rounds. The device's name is printed (``jax.devices()[0].device_kind``,
``torch.cuda.get_device_name()``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from softnce import cli, distributed
from softnce.experiments import bench_train_step

LABEL_SMOOTHING, MIXUP_ALPHA, CUTMIX_ALPHA, MIX_PROB, SWITCH_PROB = 0.1, 0.8, 1.0, 0.8, 0.5


# --------------------------------------------------------------------------------------------------
# JAX: the project's step.
# --------------------------------------------------------------------------------------------------


def jax_benchmark(args) -> dict:
    """Images/s per JAX variant (median over rounds of ``args.steps`` consecutive steps)."""
    mesh = distributed.make_mesh(jax.devices()[:1])
    steps, states, batch, log_eta = bench_train_step.prepare(args, mesh)
    rng = jax.random.key(1)
    for name in args.variants:
        for _ in range(args.warmup):
            states[name], _ = steps[name](states[name], batch, rng, log_eta)
        jax.block_until_ready(states[name])
    rates = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            start = time.perf_counter()
            for _ in range(args.steps):
                states[name], metrics = steps[name](states[name], batch, rng, log_eta)
            jax.block_until_ready((states[name], metrics))
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


# --------------------------------------------------------------------------------------------------
# PyTorch: timm's ViT with the reference's loss algorithm.
# --------------------------------------------------------------------------------------------------


def reference_sti_torch(logits, targets, log_eta, temperature: float = 1.0):
    """The reference's STI: ``[N, M, C]`` broadcast, ``mean_i (logsumexp_j S[i, j] - S[i, i])``."""
    import torch

    s = logits.float() / temperature - log_eta
    scores = (targets[None, :, :] * s[:, None, :]).sum(-1)  # [N, M]
    return (torch.logsumexp(scores, dim=1) - torch.diagonal(scores)).mean()


def soft_ce_torch(logits, targets, log_eta, temperature: float = 1.0):
    """Soft-target CE ``mean_i -sum_c a_i[c] log_softmax(z_i / t)[c]`` (``log_eta`` unused)."""
    import torch

    del log_eta
    return torch.sum(-targets * torch.log_softmax(logits.float() / temperature, dim=-1), dim=-1).mean()


TORCH_LOSSES = {"soft CE": soft_ce_torch, "STI (reference broadcast)": reference_sti_torch}


def torch_skip_reason(args) -> str | None:
    """Why the PyTorch part cannot run here, or ``None``."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    try:
        import timm  # noqa: F401
    except ImportError as error:
        return f"timm is not importable ({error}); pip install timm to run it"
    if args.torch_device is None and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (pass --torch-device cpu to force a CPU run)"
    return None


def torch_benchmark(args) -> tuple[str, dict]:
    """Device name and images/s per PyTorch loss (median over rounds)."""
    import numpy as np
    import torch
    from timm.data import Mixup
    from timm.models.vision_transformer import VisionTransformer

    device = args.torch_device or "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    torch.backends.cuda.matmul.allow_tf32 = True
    model = VisionTransformer(
        img_size=args.image_size, patch_size=args.patch, num_classes=args.classes, embed_dim=args.hidden,
        depth=args.depth, num_heads=args.heads, mlp_ratio=4.0, global_pool="avg", fc_norm=True,
        drop_path_rate=0.1,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device == "cuda")
    mixup = Mixup(
        mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, prob=MIX_PROB, switch_prob=SWITCH_PROB,
        mode="batch", label_smoothing=LABEL_SMOOTHING, num_classes=args.classes,
    )
    rng = np.random.default_rng(0)
    images = torch.from_numpy(
        rng.standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    ).to(device)
    labels = torch.from_numpy(rng.integers(0, args.classes, args.batch)).to(device)
    log_eta = torch.log_softmax(torch.from_numpy(rng.standard_normal(args.classes).astype(np.float32)), 0)
    log_eta = log_eta.to(device)

    def step(loss_fn):
        inputs, targets = mixup(images.clone(), labels)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = loss_fn(model(inputs), targets, log_eta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def synchronise():
        if device == "cuda":
            torch.cuda.synchronize()

    model.train()
    for loss_fn in TORCH_LOSSES.values():
        for _ in range(args.warmup):
            loss = step(loss_fn)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"torch benchmark: non-finite loss {loss.item()}")
    synchronise()
    rates = {loss_name: [] for loss_name in TORCH_LOSSES}
    for _ in range(args.rounds):
        for loss_name, loss_fn in TORCH_LOSSES.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(loss_fn)
            synchronise()
            rates[loss_name].append(args.steps * args.batch / (time.perf_counter() - start))
    return name, {loss_name: statistics.median(r) for loss_name, r in rates.items()}


# --------------------------------------------------------------------------------------------------
# Table and entry point.
# --------------------------------------------------------------------------------------------------


def format_table(rows) -> str:
    """``rows``: ``(framework, device, loss, images/s, baseline images/s)``."""
    lines = ["| framework | device | loss | images/s | time vs soft CE |", "|---|---|---|---|---|"]
    for framework, device, loss, rate, base in rows:
        relative = "-" if rate == base else f"{100 * (base / rate - 1):+.1f}%"
        lines.append(f"| {framework} | {device} | {loss} | {rate:.1f} | {relative} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the JAX ViT")
    parser.add_argument("--steps", type=int, default=20, help="consecutive steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (after compiling)")
    parser.add_argument(
        "--variants", nargs="+", default=list(bench_train_step.VARIANTS), choices=list(bench_train_step.VARIANTS),
        help="JAX losses to time (soft CE is always included)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch part")
    parser.add_argument("--torch-device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--quick", action="store_true", help="tiny ViT (D=16, 1 block), 32 px, batch 16, C=10")
    args = parser.parse_args(argv)
    # ViT-B/16 shape; the train-step helpers read these fields.
    args.patch, args.hidden, args.depth, args.heads, args.devices = 16, 768, 12, 12, 1
    if args.quick:
        args.patch, args.hidden, args.depth, args.heads = 4, 16, 1, 2
        args.batch, args.image_size, args.classes, args.steps, args.rounds, args.warmup = 16, 32, 10, 1, 1, 1
    args.variants = [bench_train_step.BASELINE] + [v for v in args.variants if v != bench_train_step.BASELINE]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    jax_device = jax.devices()[0]
    print(f"JAX device: {jax_device.device_kind} ({jax_device.platform}); jax {jax.__version__}")
    print(f"Command: python experiments/gpu_benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"Model: ViT patch {args.patch}, D={args.hidden}, {args.depth} blocks, {args.heads} heads, "
        f"{args.image_size} px, C={args.classes}, batch {args.batch}, {args.dtype}; {args.rounds} rounds of "
        f"{args.steps} steps after {args.warmup} warm-up steps\n",
        flush=True,
    )
    jax_rates = jax_benchmark(args)
    base = jax_rates[bench_train_step.BASELINE]
    rows = [("JAX (softnce)", jax_device.device_kind, name, rate, base) for name, rate in jax_rates.items()]
    skip = "--no-torch given" if args.no_torch else torch_skip_reason(args)
    if skip is None:
        torch_device, torch_rates = torch_benchmark(args)
        base = torch_rates["soft CE"]
        rows += [("PyTorch + timm", torch_device, name, rate, base) for name, rate in torch_rates.items()]
    print(format_table(rows))
    if skip is not None:
        print(f"\nPyTorch part skipped: {skip}.")


if __name__ == "__main__":
    main()
