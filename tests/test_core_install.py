"""The light core: ``softnce.losses`` and ``softnce.targets`` import without the ``train`` extra, and every
other module, in an installation without it, fails at once with one line that names the extra."""

import subprocess
import sys
import textwrap

import pytest

HEAVY = ("grain", "tensorflow_datasets", "flax", "orbax", "matplotlib", "sklearn", "ml_collections", "tensorboardX")

# Makes the train extra's packages (HEAVY) look uninstalled in a fresh interpreter: a ``None`` entry in
# ``sys.modules`` makes ``import`` raise ModuleNotFoundError and ``importlib.util.find_spec`` return None.
HIDE_TRAIN = f"import sys\nfor name in {HEAVY!r}:\n    sys.modules[name] = None\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_modules_import_nothing_heavy():
    proc = _python(textwrap.dedent(f"""
        import sys
        import softnce, softnce.losses, softnce.targets
        loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
        assert not loaded, loaded
        print(softnce.losses.soft_target_infonce.__name__)
    """))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "soft_target_infonce"


def test_core_works_with_the_train_extra_hidden():
    proc = _python(HIDE_TRAIN + textwrap.dedent("""
        import jax.numpy as jnp
        from softnce import losses, targets
        t = targets.mix_batch(__import__("jax").random.key(0), jnp.zeros((4, 3)), jnp.array([0, 1, 2, 1]),
                              num_classes=3, config=targets.MixConfig(label_smoothing=0.1))[1]
        print(float(losses.soft_target_infonce(jnp.zeros((4, 3)), t.dense).mean()))
    """))
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == pytest.approx(__import__("math").log(4), rel=1e-5)


@pytest.mark.parametrize("module", ["softnce.train", "softnce.main", "softnce.data", "softnce.models",
                                    "softnce.metrics", "softnce.checkpointing", "softnce.experiments.toy"])
def test_a_module_of_the_train_extra_names_the_extra(module):
    proc = _python(HIDE_TRAIN + f"import {module}")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and 'pip install "softnce[train]"' in last, proc.stderr
    assert "flax" in last
