"""softnce: soft target InfoNCE (Hugger & Uhlmann, arXiv 2404.14076) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="softnce",
    version="0.1.0",
    description="Soft target InfoNCE and its baselines in JAX/Flax, data-parallel over device meshes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["softnce", "softnce.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.0,<0.13",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "ml_collections>=1.0,<2",
        "tensorflow-cpu>=2.19,<2.22",
        "tensorflow-datasets>=4.9.8,<5",
        "importlib_resources>=6",  # tfds imports it to prepare builders defined outside tfds
        "clu>=0.0.12,<0.1",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scikit-learn>=1.4",
        "matplotlib>=3.8",
        "tensorboard>=2.19",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "chex>=0.1.89",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # The reference's PyTorch algorithm (benchmarks) and MAE checkpoint conversion.
        # On this project's CPU machines torch==2.13.0 is the CPU build on disk.
        "torch": ["torch>=2.5"],
    },
)
