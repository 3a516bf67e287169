"""A small multilayer perceptron for the toy and digits experiments."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """``x [B, ...] -> logits [B, num_classes]``: flatten, ``len(hidden_sizes)`` x (Dense, GELU, Dropout), Dense.

    Attributes:
      num_classes: ``C``.
      hidden_sizes: widths of the hidden layers.
      dropout_rate: dropout after each hidden layer (uses the ``'dropout'`` rng when ``train``).
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (64, 64)
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden_sizes):
            x = nn.gelu(nn.Dense(width, name=f"hidden_{i}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)
