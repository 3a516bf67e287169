"""Optional dependencies. The light core (``softnce.losses``, ``softnce.targets``) needs only jax, optax and
numpy; every other module needs the ``train`` extra (``pip install "softnce[train]"``) and starts with::

    from softnce import _extras

    if _extras.MISSING_TRAIN:
        raise _extras.missing_extra("train", __name__)

so that a core-only installation fails at once, in one line that names the fix, rather than deep
inside an import chain.
"""

from __future__ import annotations

import importlib.util

TRAIN = ("flax", "orbax.checkpoint", "ml_collections", "grain", "array_record", "tensorflow_datasets", "tensorboardX",
         "absl", "etils", "scipy", "sklearn", "matplotlib", "PIL", "flatbuffers")


def missing(modules: tuple[str, ...]) -> list[str]:
    """The ``modules`` that are not installed (found without importing them)."""
    absent = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is absent
            found = False
        if not found:
            absent.append(name)
    return absent


MISSING_TRAIN = missing(TRAIN)


def missing_extra(extra: str, module: str) -> ImportError:
    """The one-line ``ImportError`` for ``module``, which needs the ``extra`` (e.g. ``'train'``)."""
    absent = MISSING_TRAIN if extra == "train" else []
    return ImportError(
        f"{module} needs {', '.join(absent) or 'more packages'}, which the core install of softnce leaves out: "
        f'pip install "softnce[{extra}]"'
    )
