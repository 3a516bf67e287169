"""A small convolutional network for 28x28 greyscale images (Fashion-MNIST) on a laptop CPU."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
    """``x [B, H, W, c] -> logits [B, num_classes]``: strided conv stages, then an MLP head.

    Stage ``k`` (width ``w_k = channels[k]``) is ``Conv(w_k, 3x3, stride 2, SAME) -> ReLU``
    followed by ``convs_per_stage - 1`` x ``Conv(w_k, 3x3, stride 1, SAME) -> ReLU``, so
    ``[B, H, W, c] -> [B, ceil(H/2), ceil(W/2), w_k]``; with ``channels=(32, 64)`` a
    ``[B, 28, 28, 1]`` batch becomes ``[B, 7, 7, 64]``. It is flattened (``[B, 3136]``), then
    ``Dense(hidden) -> ReLU -> Dropout(dropout_rate) -> Dense(num_classes)``.

    The down-sampling is a strided convolution, not max pooling: on CPU the backward pass of XLA's
    max pool costs more than the convolutions themselves. There are no batch statistics (the
    trainer's state holds parameters only).

    Attributes:
      num_classes: ``C``.
      channels: widths of the convolutional stages (each halves the spatial size).
      convs_per_stage: convolutions per stage (the first one strided).
      hidden: width of the hidden dense layer.
      dropout_rate: dropout before the classifier (uses the ``'dropout'`` rng when ``train``).
    """

    num_classes: int
    channels: Sequence[int] = (32, 64)
    convs_per_stage: int = 2
    hidden: int = 128
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool):
        if x.ndim != 4:
            raise ValueError(f"SmallCNN expects images [B, H, W, c], got shape {x.shape}.")
        if self.convs_per_stage < 1:
            raise ValueError(f"SmallCNN needs convs_per_stage >= 1, got {self.convs_per_stage}.")
        for k, width in enumerate(self.channels):
            for j in range(self.convs_per_stage):
                stride = 2 if j == 0 else 1
                x = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride), padding="SAME", name=f"conv{k}_{j}")(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)
