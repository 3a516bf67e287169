"""softnce: soft target InfoNCE (Hugger & Uhlmann, arXiv 2404.14076) in JAX/Flax.

The package's stable public names are those of its light core, :mod:`softnce.losses` and
:mod:`softnce.targets` (jax, numpy and optax only), listed in ``__all__``::

    import softnce

    loss = softnce.soft_target_infonce(logits, targets, log_noise_probs=softnce.log_class_prior(labels, C))

They are loaded on first use, so ``import softnce`` (and ``import softnce.cli``) imports neither jax
nor Flax, orbax, Grain or matplotlib; ``from softnce import soft_target_infonce`` imports
:mod:`softnce.losses` only. The trainer, the models, the data pipelines and the checkpoints stay in
their modules (:mod:`softnce.train`, :mod:`softnce.models`, :mod:`softnce.data`,
:mod:`softnce.checkpointing`). docs/own_loop.md shows the core in a training loop of one's own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.5.1"

# Public name -> the light-core module that defines it.
_EXPORTS = {
    # softnce.losses: the losses (per example, [N]; the caller reduces), the noise distribution and the registry.
    "soft_target_infonce": "softnce.losses",
    "structured_soft_target_infonce": "softnce.losses",
    "blockwise_soft_target_infonce": "softnce.losses",
    "infonce": "softnce.losses",
    "soft_distribution_infonce": "softnce.losses",
    "soft_distribution_cross_entropy": "softnce.losses",
    "soft_target_cross_entropy": "softnce.losses",
    "nll": "softnce.losses",
    "sample_hard_labels": "softnce.losses",
    "log_class_prior": "softnce.losses",
    "validate_targets": "softnce.losses",
    "LossInputs": "softnce.losses",
    "register_loss": "softnce.losses",
    "get_loss": "softnce.losses",
    # softnce.targets: label smoothing and MixUp/CutMix soft targets.
    "MixConfig": "softnce.targets",
    "mix_batch": "softnce.targets",
    "Targets": "softnce.targets",
    "StructuredTargets": "softnce.targets",
    "smoothed_one_hot": "softnce.targets",
    "to_dense": "softnce.targets",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from softnce.losses import (  # noqa: F401
        LossInputs,
        blockwise_soft_target_infonce,
        get_loss,
        infonce,
        log_class_prior,
        nll,
        register_loss,
        sample_hard_labels,
        soft_distribution_cross_entropy,
        soft_distribution_infonce,
        soft_target_cross_entropy,
        soft_target_infonce,
        structured_soft_target_infonce,
        validate_targets,
    )
    from softnce.targets import MixConfig, StructuredTargets, Targets, mix_batch, smoothed_one_hot, to_dense  # noqa: F401


def __getattr__(name: str) -> Any:
    """Loads a public name from its module on first access (PEP 562) and caches it here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'softnce' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _map_configs() -> None:
    """Makes ``softnce.configs`` the top-level ``configs/`` folder wherever ``softnce`` is imported from.

    In a source tree (``softnce/`` beside ``configs/`` and ``setup.py``: a clone, editable or not) it is
    that ``configs/``, even where a clone's ``softnce/`` imported from its root shadows an installed copy;
    an installed copy has it inside (``package_dir`` in setup.py). A config file's ``from softnce.configs
    import base`` then works from an editable install, a regular install and any working directory.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "configs")
    init = os.path.join(folder, "__init__.py")
    source_tree = os.path.isfile(init) and os.path.isfile(os.path.join(root, "setup.py"))
    if "softnce.configs" in sys.modules or not source_tree:
        return
    spec = importlib.machinery.ModuleSpec("softnce.configs", None, is_package=True)
    spec.submodule_search_locations = [folder]  # what package_dir does: its modules are found there
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "The launchable configs (``--config configs/<name>.py``): the clone's configs/ folder."
    sys.modules["softnce.configs"] = module
    globals()["configs"] = module  # as the import system sets a loaded submodule on its parent


_map_configs()
