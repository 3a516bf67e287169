"""softnce: soft target InfoNCE (Hugger & Uhlmann, arXiv 2404.14076) in JAX/Flax.

``pip install softnce`` installs the light core (``softnce.losses``, ``softnce.targets``: jax, optax,
numpy); ``pip install "softnce[train]"`` adds the trainer, the data pipelines, checkpoints and plots.
Each range starts at the lowest version tested: for the core, ``.ci/run``'s lowest-versions job; for
the extras, the Python 3.11 matrix. There are no upper bounds (none is known to be needed). The exact
tested matrix is ``requirements/constraints-py3.*.txt``, which ``make`` passes to pip with ``-c``.
"""

import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("softnce/__init__.py", encoding="utf-8").read()).group(1)

CORE = [
    "jax>=0.8.0",
    "optax>=0.2.5",
    "numpy>=2.0",
]
TRAIN = [
    "flax>=0.12.8",
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.1.0",
    "grain>=0.2.18",  # the input pipelines (global index shuffle, checkpointable iterators); no TensorFlow
    "array-record>=0.8.6",  # the file format tfds prepares and grain reads
    "tensorflow-datasets>=4.9.10",  # prepares and reads array_record without TensorFlow
    "importlib_resources>=7.1.0",  # tfds imports it to prepare builders defined outside tfds
    "tensorboardX>=2.6.5",  # TensorBoard event files without TensorFlow
    "absl-py>=2.5.1",
    "etils[epath]>=1.15.0",
    "scipy>=1.17.1",
    "scikit-learn>=1.9.1",
    "matplotlib>=3.11.2",
    "Pillow>=13.0.0",  # the host half of the image pipeline (softnce/data/image_augment.py)
    "flatbuffers>=25.12.19",  # jax.export's serialisation (python -m softnce.export)
    "tensorboard>=2.21.0",  # `tensorboard --logdir` (and its event reader, softnce.metric_writer.read_scalars)
]

setup(
    name="softnce",
    version=VERSION,
    description="Soft target InfoNCE and its baselines in JAX/Flax, data-parallel over device meshes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # configs/ (the launchable configs, loaded by path with --config) installs as softnce.configs, so the
    # package and the tests import them by name.
    packages=find_packages(include=["softnce", "softnce.*"]) + ["softnce.configs"],
    package_dir={"softnce.configs": "configs"},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "train": TRAIN,
        "test": TRAIN + ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "chex>=0.1.92", "nbclient>=0.11.0", "nbformat>=5.11.1",
                         "ipykernel>=7.4.0", "ruff>=0.17.6"],
        # The loss and target tests only (the lowest-versions job of .ci/run).
        "test-core": ["pytest>=9.2.0"],
        "docs": TRAIN + ["sphinx>=7.2.6", "myst-parser>=3.0.1"],  # autodoc imports every module
        # Accelerators: jax's own extras at the installed jax (README, "Running at scale").
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12]"],
        # The reference's PyTorch algorithm (benchmarks) and MAE checkpoint conversion.
        "torch": ["torch>=2.5"],
    },
)
