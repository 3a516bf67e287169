"""Every test sees 8 CPU devices (set before the JAX backend starts).

Compiled programs go to JAX's persistent compilation cache in ``.pytest_cache/`` (one directory per
jaxlib version, so Pythons with the same jaxlib share it), shared by the xdist workers and the CLI
subprocesses the tests start: the suite compiles the same train and eval steps many times, and the
cache roughly halves its run time. The cache key covers the program, the jax/jaxlib version, the
flags and the devices, so a hit runs exactly the program a fresh compilation would build.

A test that fails (or times out) while processes it started still run ends them: every
``subprocess.Popen`` is recorded, and those a test started are killed when it ends.
"""
import importlib.metadata
import os
import subprocess

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                 "jax-compilation-cache-jaxlib-" + importlib.metadata.version("jaxlib")),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

_started: list = []  # every subprocess.Popen of this pytest process, until it has ended


class _RecordedPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _started.append(self)


subprocess.Popen = _RecordedPopen  # subprocess.run and the tests' launchers look it up there


@pytest.fixture(autouse=True)
def _end_the_processes_a_test_started():
    """Kills (SIGKILL) the processes a test started that still run when it ends, passed or failed."""
    before = set(_started)
    yield
    for process in _started:
        if process not in before and process.poll() is None:
            process.kill()
            process.wait()
    _started[:] = [p for p in _started if p.poll() is None]


@pytest.fixture
def cli_env():
    """Environment for subprocesses that run the CLI: without the 8-device XLA flag (they choose
    their device count with --num_cpu_devices) and with TensorFlow's start-up logs silenced."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


@pytest.fixture
def register_for_test():
    """``register_for_test(registry, name, obj)``: ``registry.register(name, obj)``, undone after the test
    (``registry`` is e.g. ``softnce.data.DATASETS`` or ``softnce.models.MODELS``)."""
    added = []

    def register(registry, name, obj):
        registry.register(name, obj)
        added.append((registry, name))
        return obj

    yield register
    for registry, name in reversed(added):
        registry.unregister(name)


@pytest.fixture
def user_module():
    """tests/user_registrations.py, imported as ``--import_modules=user_registrations`` would; its entries are
    removed after the test."""
    import importlib
    import sys

    from softnce.data import DATASETS
    from softnce.losses import LOSSES
    from softnce.models import MODELS

    module = importlib.import_module("user_registrations")
    module.CALLS.clear()
    yield module
    for registry, names in ((MODELS, ("user_linear", "user_mlp", "user_nnx")), (LOSSES, ("user_focal",)),
                            (DATASETS, ("user_blobs", "user_soft_blobs"))):
        for name in names:
            registry.unregister(name)
    sys.modules.pop("user_registrations")
