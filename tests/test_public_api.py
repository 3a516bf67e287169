"""The package's public names: the light core (softnce.losses, softnce.targets), and a light ``import softnce``."""

import os
import pkgutil
import re
import subprocess
import sys

import pytest

import softnce

HEAVY = ("tensorflow_datasets", "grain", "flax", "orbax", "matplotlib")


def _modules_after(code: str) -> list[str]:
    """Runs ``code`` in a fresh interpreter; returns which of jax and the heavy packages it imported."""
    probe = code + "\nimport sys\nprint([m for m in ('jax',) + %r if m in sys.modules])\n" % (HEAVY,)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval(proc.stdout.strip().splitlines()[-1])


def test_import_softnce_imports_no_heavy_package():
    # Not even jax: the public names load on first use, so `import softnce.cli` stays fast too.
    assert _modules_after("import softnce\nassert softnce.__version__") == []


def test_the_public_names_import_only_the_light_core():
    code = "import softnce\nfor name in softnce.__all__:\n    getattr(softnce, name)"
    assert _modules_after(code) == ["jax"]


def test_all_names_are_the_light_cores_objects():
    from softnce import losses, targets

    assert softnce.__all__[0] == "__version__" and len(set(softnce.__all__)) == len(softnce.__all__)
    for name in softnce.__all__[1:]:
        obj = getattr(softnce, name)
        assert obj.__module__ in ("softnce.losses", "softnce.targets"), (name, obj.__module__)
        assert obj is getattr(losses if obj.__module__ == "softnce.losses" else targets, name)
        assert name in dir(softnce)
    for name in ("soft_target_infonce", "log_class_prior", "register_loss", "get_loss", "LossInputs",
                 "MixConfig", "mix_batch", "Targets"):
        assert name in softnce.__all__
    from softnce import MixConfig, soft_target_infonce  # noqa: F401


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'train_and_evaluate'"):
        softnce.train_and_evaluate  # noqa: B018
    assert not hasattr(softnce, "not_a_name")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_DOCS = os.path.join(REPO, "docs", "api")


def _api_docs() -> str:
    return "\n".join(open(os.path.join(API_DOCS, f), encoding="utf-8").read()
                     for f in sorted(os.listdir(API_DOCS)) if f.endswith(".rst"))


def test_the_api_reference_lists_every_public_name():
    text = _api_docs()
    for name in softnce.__all__[1:]:
        module = softnce._EXPORTS[name].removeprefix("softnce.")
        assert re.search(rf"^   {module}\.{name}$", text, re.M), f"docs/api/core.rst: add {module}.{name} to the table"


def test_the_api_reference_documents_every_module():
    """Every module of the package (but the experiments and private modules) has an automodule entry."""
    documented = set(re.findall(r"^\.\. automodule:: (\S+)$", _api_docs(), re.M))
    modules = {"softnce"} | {
        info.name for info in pkgutil.walk_packages(softnce.__path__, "softnce.", onerror=lambda name: None)
        if not info.name.startswith("softnce.experiments") and "._" not in info.name
    }
    assert not modules - documented, f"docs/api/*.rst: add an automodule for {sorted(modules - documented)}"
