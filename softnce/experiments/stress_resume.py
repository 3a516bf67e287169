"""Stress test: exact resume of the Grain image pipeline, stopped at random steps; prints ``trials: N, failed: F``.

The data: this project's Tiny ImageNet builder prepared as array_record on the photos that installed
packages ship (:func:`softnce.experiments.bench_input_pipeline.build_array_record_dataset`). The run:
``configs/vit_finetune.py`` with ``vit_tiny`` at 32 px, MixUp/CutMix and RandAugment on,
``--steps`` steps, a checkpoint every step, and ``--host_threads`` Grain reader threads reading ahead,
so the iterator state is taken while other batches are being decoded.

One uninterrupted run gives the reference parameters. Each trial then stops a fresh run at a random
step ``k`` (``stop_at_step``, saved as a preemption would save), resumes it in the same workdir, and
fails unless its final parameters equal the reference bit for bit, or if any run raises.

Usage::

    python experiments/stress_resume.py --trials 20          # the record in BENCHMARKS.md
"""

from __future__ import annotations

import tempfile
import time

from softnce import cli


def make_config(data_dir: str, steps: int, host_threads: int):
    """The ViT recipe at toy size on the prepared photos (every part of the augmentation on)."""
    from softnce.configs import vit_finetune

    config = vit_finetune.get_config("dataset=tiny_imagenet,model=vit_tiny,batch=8")
    config.num_train_steps = steps
    config.log_every_steps = config.checkpoint_every_steps = 1
    config.eval_every_steps = steps
    config.data.update(dict(data_dir=data_dir, image_size=32, eval_batch_size=8, host_threads=host_threads))
    config.loss.noise = "uniform"
    config.model.dtype = "float32"
    config.optim.update(dict(warmup_steps=1, base_lr=0.01))
    return config


def final_params(workdir: str):
    """The parameters of the newest checkpoint in ``workdir``."""
    import os

    from softnce import checkpointing

    manager = checkpointing.read_only_manager(os.path.join(workdir, "checkpoints"))
    return checkpointing.restore_on_this_host(manager)["params"]


def equal(a, b) -> bool:
    import jax
    import numpy as np

    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None) -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="interrupted-and-resumed runs")
    parser.add_argument("--steps", type=int, default=12, help="train steps of each run")
    parser.add_argument("--host_threads", type=int, default=4, help="Grain reader threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stop steps")
    args = parser.parse_args(argv)

    import contextlib
    import io

    import numpy as np

    from softnce import train
    from softnce.experiments import bench_input_pipeline

    rng = np.random.default_rng(args.seed)
    failures = []
    with tempfile.TemporaryDirectory(prefix="stress_resume_") as root:
        data_dir = bench_input_pipeline.build_array_record_dataset(
            f"{root}/data", bench_input_pipeline.encoded_photos(), copies=4)
        config = make_config(data_dir, args.steps, args.host_threads)
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            train.train_and_evaluate(config, f"{root}/reference")
        reference = final_params(f"{root}/reference")
        print(f"reference run: {args.steps} steps in {time.time() - start:.1f} s", flush=True)
        for trial in range(args.trials):
            stop = int(rng.integers(1, args.steps))
            workdir = f"{root}/trial{trial}"
            start = time.time()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    stopped = train.train_and_evaluate(config, workdir, stop_at_step=stop)
                    assert stopped == {"preempted_at_step": stop}, stopped
                    train.train_and_evaluate(config, workdir)
                ok = equal(final_params(workdir), reference)
                reason = "" if ok else "parameters differ from the uninterrupted run"
            except Exception as error:  # noqa: BLE001  (any failure counts, with its reason)
                ok, reason = False, f"{type(error).__name__}: {error}"
            if not ok:
                failures.append((trial, stop, reason))
            print(f"trial {trial}: stopped at step {stop}, resumed: {'ok' if ok else 'FAILED ' + reason} "
                  f"({time.time() - start:.1f} s)", flush=True)
    print(f"trials: {args.trials}, failed: {len(failures)}")


if __name__ == "__main__":
    main()
