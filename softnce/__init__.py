"""softnce: soft target InfoNCE (Hugger & Uhlmann, arXiv 2404.14076) in JAX/Flax."""

__version__ = "0.1.0"
