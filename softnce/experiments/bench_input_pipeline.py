"""Benchmark: the ImageNet input pipeline's host side against timm's, per core and on all cores.

Photos: every real photo an installed package ships (scikit-learn's ``china.jpg`` and ``flower.jpg``,
640 x 427, and matplotlib's ``grace_hopper.jpg``, 512 x 600), re-encoded as JPEG quality 90.

Side by side in one run, on 1 thread and on all cores (``os.cpu_count()``):

Per-core rates are images per CPU-second (``time.process_time`` of every thread of the measuring
process, or of each timm worker): on a shared machine they measure the cost per image and not the
share of the cores that other jobs left; the all-core rates are wall-clock throughput.

* **train transform** (the recipe: decode, random resized crop to 224 bicubic, flip, RandAugment
  ``rand-m9-mstd0.5-inc1``, normalise, random erasing 0.25):
  - softnce host side: the trainer's host work, ``image_augment.random_resized_crop`` (Pillow
    decode + random resized crop, seeded per example), as a Grain pipeline over the JPEG bytes whose
    elements are batches of 16 images (one element = one batch, as in the trainer), read by
    ``grain.ReadOptions(num_threads=1)`` / ``num_threads=os.cpu_count()`` Grain threads; the rest of
    the recipe runs on the accelerator (its cost on this CPU is reported separately);
  - timm: ``create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
    interpolation='bicubic', re_prob=0.25, re_mode='pixel')`` on PIL images decoded from the same
    bytes, one process with ``torch.set_num_threads(1)``, or one such process per core (as DataLoader
    workers do);
* **eval transform**: softnce ``image_augment.resize_and_center_crop`` (resize shorter side to 256
  bicubic, centre crop 224, uint8) in the same Grain pipeline, against timm's ``create_transform(224)``
  (the same plus ToTensor/Normalize);
* **device half on this CPU**: the jitted ``device_train_transform`` (flip, RandAugment, normalise,
  erasing) on a uint8 batch, ms per image, with XLA's default threads (all cores);
* **end to end**: ``ImageDataset.train_batches(32)`` images/s from a real dataset prepared as
  ``array_record`` (this project's Tiny ImageNet builder run on a folder of the photos), read by
  ``host_threads`` 1 and all cores Grain threads.

No TensorFlow is used: the host side is Pillow in Grain's reader threads, as in the trainer.

The last line is ``train transform per core: softnce <X> img/s, timm <Y> img/s, ratio <X/Y>``.

timm needs PyTorch, torchvision and timm (not needed by softnce itself); on this project's CPU
machines::

    pip install -e ".[torch]" torch==2.14.1 torchvision==0.29.1 timm

Without them the timm rows are skipped with a message. Pillow >= 10 refuses ``posterize`` with 0
bits, which timm's ``PosterizeIncreasing`` asks for at magnitudes >= 10 (``mstd0.5`` reaches them);
the timm side is run with the old Pillow behaviour (a black image), as softnce's device op does.

Usage::

    python experiments/bench_input_pipeline.py              # about 2 minutes on the 2-core machine
    python experiments/bench_input_pipeline.py --seconds 1  # quicker, noisier
    python experiments/bench_input_pipeline.py --quick      # smoke run (32 px, no timm)
"""

from __future__ import annotations

import io
import multiprocessing
import os
import tempfile
import time

from PIL import Image

from softnce import cli

SIZE = 224
RECIPE = dict(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25, re_mode="pixel")


def photo_paths() -> list[str]:
    """The real photos installed packages ship (JPEG files on disk)."""
    from sklearn import datasets

    folder = os.path.join(os.path.dirname(datasets.__file__), "images")
    paths = [os.path.join(folder, name) for name in ("china.jpg", "flower.jpg")]
    try:
        import matplotlib.cbook

        paths.append(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    except (ImportError, OSError, ValueError):
        pass
    return [p for p in paths if os.path.exists(p)]


def encoded_photos() -> list[bytes]:
    """Each photo re-encoded as RGB JPEG quality 90."""
    out = []
    for path in photo_paths():
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# ----------------------------------------------------------------------------- softnce
def build_array_record_dataset(root: str, jpegs: list[bytes], copies: int) -> str:
    """A data directory with this project's Tiny ImageNet builder prepared as array_record on
    ``copies`` x the photos (one class per photo)."""
    from softnce.data import images

    folder = os.path.join(root, "downloads", "manual", "tiny-imagenet-200")
    wnids = [f"n{i:08d}" for i in range(len(jpegs))]
    os.makedirs(os.path.join(folder, "val", "images"))
    with open(os.path.join(folder, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    annotations = []
    for wnid, data in zip(wnids, jpegs):
        os.makedirs(os.path.join(folder, "train", wnid, "images"))
        for c in range(copies):
            with open(os.path.join(folder, "train", wnid, "images", f"{wnid}_{c}.JPEG"), "wb") as f:
                f.write(data)
        with open(os.path.join(folder, "val", "images", f"val_{wnid}.JPEG"), "wb") as f:
            f.write(data)
        annotations.append(f"val_{wnid}.JPEG\t{wnid}\t0\t0\t1\t1")
    with open(os.path.join(folder, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(annotations) + "\n")
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    images.prepare("tiny_imagenet", root)
    return root


def make_dataset(data_dir: str, host_threads: int | None, size: int = SIZE):
    from softnce.data import images

    config = images.default_image_config()
    config.update(dict(name="tiny_imagenet", data_dir=data_dir, image_size=size, host_threads=host_threads))
    return images.make_image_dataset(config, process_index=0, process_count=1)


def train_transform(size: int):
    """The trainer's host work for example ``index``: decode + random resized crop seeded by ``(7, index)``."""
    from softnce.data import image_augment

    return lambda jpeg, index: image_augment.random_resized_crop(jpeg, (7, index), size)


def eval_transform(size: int):
    """The evaluation host work: decode + resize the shorter side + centre crop."""
    from softnce.data import image_augment

    return lambda jpeg, index: image_augment.resize_and_center_crop(jpeg, size)


def grain_rate(transform, jpegs: list[bytes], size: int, threads: int, seconds: float,
               batch: int = 16) -> tuple[float, float]:
    """``transform(jpeg, index) -> uint8 [S, S, 3]`` over the photos (repeated) as a Grain pipeline whose
    element ``s`` is the batch of examples ``[B s, B (s + 1))`` (one element = one batch, as the
    trainer's), read by ``threads`` Grain threads: (img/s, img/CPU-s)."""
    import grain
    import numpy as np

    from softnce.data import pipeline

    def load(step: int) -> dict:
        inputs = np.empty((batch, size, size, 3), np.uint8)
        labels = np.empty(batch, np.int32)
        for i, index in enumerate(range(int(step) * batch, (int(step) + 1) * batch)):
            labels[i] = index % len(jpegs)
            inputs[i] = transform(jpegs[index % len(jpegs)], index)
        return {"inputs": inputs, "label": labels}

    dataset = grain.MapDataset.range(pipeline.NUM_STEPS).map(load)
    options = pipeline.read_options(threads)
    return _iterate_rate(iter(dataset.to_iter_dataset(options)), batch, seconds)


def _iterate_rate(iterator, batch: int, seconds: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process, all its threads).

    The iterator is closed afterwards (its Grain threads stop reading ahead), so that it does not
    take CPU time from the next measurement.
    """
    try:
        for _ in range(3):  # warm-up (thread start, first batches)
            next(iterator)
        count, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            next(iterator)
            count += batch
        return count / (time.perf_counter() - start), count / (time.process_time() - cpu)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def device_ms_per_image(dataset, batch: int, seconds: float) -> tuple[float, float]:
    """(wall ms, CPU ms) per image of the jitted ``device_train_transform`` on this machine's CPU."""
    import jax

    batches = dataset.train_batches(batch, seed=0)
    crops = next(batches)["inputs"]
    batches.close()
    fn = jax.jit(dataset.device_train_transform)
    keys = jax.random.split(jax.random.key(0), batch)
    fn(keys, crops).block_until_ready()
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        keys = jax.random.split(jax.random.key(count + 1), batch)
        fn(keys, crops).block_until_ready()
        count += batch
    return 1000 * (time.perf_counter() - start) / count, 1000 * (time.process_time() - cpu) / count


# ----------------------------------------------------------------------------- timm
def _patched_timm_transform(is_training: bool, size: int = SIZE):
    from PIL import ImageOps
    from timm.data import auto_augment, create_transform

    def posterize(img, bits_to_keep, **_):  # Pillow < 10 behaviour for 0 bits (a black image).
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))
        return ImageOps.posterize(img, bits_to_keep)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize
    return create_transform(size, is_training=is_training, **RECIPE) if is_training else create_transform(
        size, is_training=False, interpolation="bicubic")


def _timm_worker(args) -> tuple[int, float, float]:
    jpegs, is_training, seconds, size = args
    import torch

    torch.set_num_threads(1)
    transform = _patched_timm_transform(is_training, size)
    run = lambda i: transform(Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert("RGB"))  # noqa: E731
    for i in range(5):
        run(i)
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        run(count)
        count += 1
    return count, time.perf_counter() - start, time.process_time() - cpu


def timm_rate(jpegs: list[bytes], is_training: bool, processes: int, seconds: float,
              size: int = SIZE) -> tuple[float, float]:
    """timm's transform in ``processes`` single-threaded processes: (img/s, img/CPU-s).

    Always in spawned (not forked) processes: this process already runs JAX and Grain threads, which
    a fork does not copy safely.
    """
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_timm_worker, [(jpegs, is_training, seconds, size)] * processes)
    return (sum(count / wall for count, wall, _ in results),
            sum(count for count, _, _ in results) / sum(cpu for _, _, cpu in results))


def have_timm() -> bool:
    import importlib.util

    missing = [m for m in ("torch", "torchvision", "timm") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"timm rows skipped ({', '.join(missing)} not installed); install with: "
              "pip install -e \".[torch]\" torch==2.14.1 torchvision==0.29.1 timm")
    return not missing


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time of each rate")
    parser.add_argument("--device-batch", type=int, default=32, help="batch of the device-half measurement")
    parser.add_argument("--image-size", type=int, default=SIZE, help="crop side S (the recipe: 224)")
    parser.add_argument("--skip-timm", action="store_true", help="measure softnce only")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.3 s per rate, 32 px, no timm")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # XLA's C++ logging (jaxlib reads this variable)
    if args.quick:
        args.seconds, args.image_size, args.device_batch, args.skip_timm = 0.3, 32, 4, True

    cores = os.cpu_count() or 1
    jpegs = encoded_photos()
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    print(f"photos: {len(jpegs)} JPEG q90, sizes (W x H) {', '.join(f'{w}x{h}' for w, h in sizes)}; "
          f"{cores} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    with_timm = not args.skip_timm and have_timm()

    with tempfile.TemporaryDirectory() as root:
        data_dir = build_array_record_dataset(root, jpegs, copies=32)
        dataset = make_dataset(data_dir, None, args.image_size)
        train_fn, eval_fn = train_transform(args.image_size), eval_transform(args.image_size)

        rows = []  # (transform, threads, softnce (img/s, img/CPU-s), timm (img/s, img/CPU-s))
        nan = (float("nan"), float("nan"))
        for threads in sorted({1, cores}):
            for name, fn, is_training in (("train", train_fn, True), ("eval", eval_fn, False)):
                ours = grain_rate(fn, jpegs, args.image_size, threads, args.seconds)
                theirs = timm_rate(jpegs, is_training, threads, args.seconds, args.image_size) if with_timm else nan
                rows.append((name, threads, ours, theirs))
                print(f"  {name} transform, {threads} thread(s): softnce host {ours[0]:.0f} img/s "
                      f"({ours[1]:.0f} img/CPU-s), timm {theirs[0]:.0f} img/s ({theirs[1]:.0f} img/CPU-s)",
                      flush=True)
        device_wall, device_cpu = device_ms_per_image(dataset, args.device_batch, args.seconds)
        end_to_end = {}
        for threads in sorted({1, cores}):
            ds = make_dataset(data_dir, threads, args.image_size)
            end_to_end[threads] = _iterate_rate(ds.train_batches(32, seed=0), 32, args.seconds)

    print()
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    print("img/CPU-s: images per CPU-second of all the pipeline's threads (per-core cost, robust to other load);")
    print("img/s: wall-clock throughput.")
    print()
    print("| transform | threads | softnce host img/CPU-s | timm img/CPU-s | ratio | softnce host img/s "
          "| timm img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, threads, ours, theirs in rows:
        print(
            f"| {name} | {threads} | {ours[1]:.0f} | {theirs[1]:.0f} | {ours[1] / theirs[1]:.2f} "
            f"| {ours[0]:.0f} | {theirs[0]:.0f} | {ours[0] / theirs[0]:.2f} |"
        )
    print()
    print(
        f"device half (flip, RandAugment, normalise, erasing; jitted, batch {args.device_batch}, "
        f"{args.image_size} px) on this "
        f"CPU: {device_wall:.2f} ms/image wall, {device_cpu:.2f} CPU-ms/image"
    )
    for threads, (wall, cpu) in end_to_end.items():
        print(
            f"end to end: ImageDataset.train_batches(32) from array_record, host_threads={threads}: {wall:.0f} img/s "
            f"({cpu:.0f} img/CPU-s)"
        )
    ours, theirs = rows[0][2][1], rows[0][3][1]
    print(f"train transform per core: softnce {ours:.0f} img/s, timm {theirs:.0f} img/s, ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
