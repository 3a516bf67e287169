"""Export a trained classifier as a self-contained artefact that needs only jax to run.

::

    python -m softnce.export --workdir W --out DIR [--step S] [--platforms cpu,cuda,tpu]

writes to ``DIR`` the model's variables (``variables.npz``: the parameters and the model's state, e.g.
BatchNorm's statistics), the checkpoint metadata (``metadata.json``: class
names, ``t*``, the training temperature, the class prior, the input shape and dtype, the run's
config), ``logits`` and ``predict_proba`` serialised with ``jax.export`` (StableHLO with a symbolic
batch dimension; the dataset's evaluation input transform included), and ``load.py``, a loader that
imports only jax and numpy (:mod:`softnce.export_loader`). Loading and predicting need neither
softnce nor Flax; ``load`` is imported as a plain module, with ``DIR`` on the import path
(the working directory of ``python -c`` or an interactive python, or ``PYTHONPATH=DIR``)::

    cd DIR && python -c "import load; model = load.load('.'); ..."
    PYTHONPATH=DIR python my_script.py      # in it: import load; model = load.load()  (load.py's directory)

    model.predict_proba(x)             # softmax(z / t*)

``--platforms`` (default: this machine's backend) lowers the functions for several backends, e.g.
``cpu,cuda,tpu``, so the artefact runs there too. :func:`export_classifier` exports any
:class:`softnce.inference.Classifier`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from softnce import cli  # noqa: E402  (no jax)

EXPORT_VERSION = 2  # 2: the model's variables (params and state), no longer the params alone
LOADER_NAME = "load.py"
FILES = ("metadata.json", "variables.npz", "logits.jax", "predict_proba.jax", LOADER_NAME)


def _check_out_dir(out) -> None:
    """``out`` must be absent, empty, or hold an earlier export (which is replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise cli.UsageError(f"--out={out} exists and is not a directory.")
    others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    if others:
        raise cli.UsageError(f"--out={out} holds other files ({', '.join(others[:5])}); give a new or empty directory.")


def export_classifier(classifier, out_dir, *, platforms: Optional[Sequence[str]] = None):
    """Writes ``classifier`` (a :class:`softnce.inference.Classifier`) to ``out_dir``; returns its path.

    ``platforms``: the backends to lower for (``None``: the default backend).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from softnce import checkpointing, export_loader

    out = checkpointing.resolve(out_dir)
    _check_out_dir(out)
    (batch,) = jax.export.symbolic_shape("b")
    x_spec = jax.ShapeDtypeStruct((batch, *classifier.example_shape), classifier.input_dtype)
    variables = jax.device_get(classifier.variables)
    variables_spec = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), np.asarray(p).dtype), variables)
    t_spec = jax.ShapeDtypeStruct((), jnp.float32)
    kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
    functions = {
        "logits": jax.export.export(jax.jit(classifier.logits_fn), **kwargs)(variables_spec, x_spec),
        "predict_proba": jax.export.export(jax.jit(classifier.proba_fn), **kwargs)(variables_spec, x_spec, t_spec),
    }
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if any(not isinstance(k, str) for k in keys):
            raise TypeError(f"export needs variables that are nested dicts with string keys, got the path {path}.")
        paths.append(keys)
        leaves.append(np.asarray(leaf))
    metadata = dict(classifier.metadata)
    metadata["export"] = {
        "format": export_loader.FORMAT,
        "version": EXPORT_VERSION,
        "variables": "variables.npz",
        "variable_paths": paths,
        "functions": {name: f"{name}.jax" for name in functions},
        "platforms": list(functions["logits"].platforms),
        "jax_version": jax.__version__,
        "signatures": {"logits": "(variables, x [b, *input.shape] input.dtype) -> float32 [b, C]",
                       "predict_proba": "(variables, x, temperature float32 []) -> float32 [b, C]"},
    }
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{f"p{i}": leaf for i, leaf in enumerate(leaves)})
    (out / "variables.npz").write_bytes(buffer.getvalue())
    for name, exported in functions.items():
        (out / f"{name}.jax").write_bytes(bytes(exported.serialize()))
    with open(export_loader.__file__, encoding="utf-8") as f:
        (out / LOADER_NAME).write_text(f.read())
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return out




def make_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m softnce.export", description=__doc__.split("::")[0].strip())
    parser.add_argument("--workdir", required=True, help="the run's workdir (or one checkpoint directory)")
    parser.add_argument("--out", required=True, help="directory to write the export to (new, empty or an export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--platforms", default=None, help="comma-separated backends, e.g. cpu,cuda,tpu")
    cli.add_import_modules_flag(parser, "a run of a user's model needs the module that registers it")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from softnce import checkpointing

    try:
        _check_out_dir(checkpointing.resolve(args.out))
    except cli.UsageError as error:
        cli.fail(error)

    from softnce import checkpoint_metadata, inference

    cli.import_modules(args.import_modules)
    try:
        classifier = inference.load(args.workdir, args.step)
    except (FileNotFoundError, checkpoint_metadata.MetadataError) as error:
        cli.fail(error)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()] if args.platforms else None
    out = export_classifier(classifier, args.out, platforms=platforms)
    t_star = "none" if classifier.t_star is None else f"{classifier.t_star:.4g}"
    print(f"exported step {classifier.step} ({classifier.num_classes} classes, inputs {classifier.example_shape} "
          f"{classifier.input_dtype}, t* {t_star}) to {out}: {', '.join(FILES)}")


if __name__ == "__main__":
    main()
