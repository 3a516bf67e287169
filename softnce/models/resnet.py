"""ResNets with BatchNorm (He et al. 2016): ResNet-18 (basic blocks) and ResNet-50 (bottleneck blocks).

``inputs [B, H, W, 3] -> logits [B, num_classes]``. The stem is a 7x7 stride-2 convolution and a 3x3
stride-2 max pool (ImageNet), or with ``small_images=True`` a 3x3 stride-1 convolution and no pool
(CIFAR-100 at 32 px, Tiny ImageNet at 64 px). Four stages of ``width * 2^s`` channels (x4 at the output
of a bottleneck block), the first block of stages 2-4 strided; global average pooling and a dense head.

BatchNorm keeps running statistics in the ``batch_stats`` collection: in training (``train=True``) it
normalises with the batch's statistics and updates the running ones with ``momentum``
(``r <- momentum r + (1 - momentum) batch``); in evaluation it uses the running ones. The trainer keeps
``batch_stats`` as the model's state (:class:`softnce.steps.TrainState`): checkpointed, averaged over the
devices after each step, and used by evaluation, ``softnce.inference`` and the export. The last
BatchNorm of each residual branch starts at scale 0, so each block starts as the identity.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from softnce.models.factory import variant


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, ``filters`` channels out."""

    filters: int
    strides: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x, *, conv, norm):
        y = nn.relu(norm()(conv(self.filters, (3, 3), (self.strides, self.strides))(x)))
        y = norm(scale_init=nn.initializers.zeros)(conv(self.filters, (3, 3))(y))
        return nn.relu(y + _shortcut(x, y.shape[-1], self.strides, conv, norm))


class BottleneckBlock(nn.Module):
    """1x1 down to ``filters``, 3x3 (strided), 1x1 up to ``4 * filters`` channels."""

    filters: int
    strides: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x, *, conv, norm):
        y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
        y = nn.relu(norm()(conv(self.filters, (3, 3), (self.strides, self.strides))(y)))
        y = norm(scale_init=nn.initializers.zeros)(conv(self.expansion * self.filters, (1, 1))(y))
        return nn.relu(y + _shortcut(x, y.shape[-1], self.strides, conv, norm))


def _shortcut(x, channels: int, strides: int, conv, norm):
    """``x``, or a strided 1x1 projection and BatchNorm where the shape changes."""
    if x.shape[-1] == channels and strides == 1:
        return x
    return norm(name="shortcut_norm")(conv(channels, (1, 1), (strides, strides), name="shortcut_conv")(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
    """A ResNet: ``stage_sizes`` blocks of kind ``block`` per stage (module docstring)."""

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width: int = 64
    small_images: bool = False
    momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet: unknown block {self.block!r}; valid blocks: {', '.join(BLOCKS)}.")
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.momentum,
                                 epsilon=1e-5, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        if self.small_images:
            x = nn.relu(norm(name="stem_norm")(conv(self.width, (3, 3), name="stem_conv")(x)))
        else:
            x = nn.relu(norm(name="stem_norm")(conv(self.width, (7, 7), (2, 2), name="stem_conv")(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                strides = 2 if stage > 0 and i == 0 else 1
                x = BLOCKS[self.block](self.width * 2**stage, strides, name=f"stage{stage + 1}_block{i + 1}")(
                    x, conv=conv, norm=norm)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


resnet18 = variant(ResNet, "resnet18", "ResNet-18 (11.7M params at 1,000 classes): basic blocks (2, 2, 2, 2).",
                   stage_sizes=(2, 2, 2, 2), block="basic")
resnet50 = variant(ResNet, "resnet50", "ResNet-50 (25.6M params at 1,000 classes): bottleneck blocks (3, 4, 6, 3).",
                   stage_sizes=(3, 4, 6, 3), block="bottleneck")
