"""softnce: soft target InfoNCE (Hugger & Uhlmann, arXiv 2404.14076) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="softnce",
    version="0.1.0",
    description="Soft target InfoNCE and its baselines in JAX/Flax, data-parallel over device meshes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ (the launchable configs, loaded by path with --config) installs as softnce.configs, so the
    # package and the tests import them by name.
    packages=find_packages(include=["softnce", "softnce.*"]) + ["softnce.configs"],
    package_dir={"softnce.configs": "configs"},
    # The tested matrix (README "Tested versions"): `make test` on Python 3.11, 3.12 and 3.13 (.ci/run)
    # resolves exactly these. Where the newest release differs by Python, a marker picks the
    # tested one (jax 0.11+, flax 0.12.9+ and numpy 2.5 need Python 3.12).
    python_requires=">=3.11,<3.14",
    install_requires=[
        'jax==0.10.2; python_version < "3.12"',
        'jax==0.12.0.1; python_version >= "3.12"',
        'flax==0.12.8; python_version < "3.12"',
        'flax==0.12.12; python_version >= "3.12"',
        'numpy==2.4.6; python_version < "3.12"',
        'numpy==2.5.5; python_version >= "3.12"',
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml_collections==1.1.0",
        "tensorflow-cpu==2.21.0",
        "tensorflow-datasets==4.9.10",
        "importlib_resources==7.1.0",  # tfds imports it to prepare builders defined outside tfds
        "clu==0.0.12",
        "absl-py==2.5.1",
        "scikit-learn==1.9.1",
        "matplotlib==3.11.2",
        "Pillow==13.0.0",  # the host half of the image pipeline (softnce/data/image_augment.py)
        "tensorboard==2.21.0",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "chex==0.1.92",
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
        ],
        # Accelerators: jax's own extras at the jax pinned above (README, "Running at scale").
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12]"],
        # The reference's PyTorch algorithm (benchmarks) and MAE checkpoint conversion.
        # On this project's CPU machines torch==2.13.0 is the CPU build on disk.
        "torch": ["torch>=2.5"],
    },
)
