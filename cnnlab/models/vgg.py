"""VGG-style conv nets (Simonyan & Zisserman 2015): stacks of 3x3 convs, 2x2 max-pool per stage.

`VGG` (registered as `vgg_cnn`) is configurable: `stages` = conv widths per stage, e.g.
((32, 32), (64, 64)) = conv32-conv32-pool-conv64-conv64-pool. Each conv is a 3x3 SAME ConvBlock
(so `bn_placement` and the dropout kind apply); a pool is skipped along an axis whose size is
already 1, so any input from 1x1 up works (8x8 digits, 28x28 MNIST, 32x32 CIFAR). `head`:
`gap` = global average pool -> Dense (size-independent), `flatten` = flatten -> Dense.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import layers
from cnnlab.errors import ConfigError

HEADS = ("gap", "flatten")


def _check_stages(stages) -> tuple[tuple[int, ...], ...]:
  ok = isinstance(stages, (tuple, list)) and len(stages) > 0 and all(
      isinstance(s, (tuple, list)) and len(s) > 0
      and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in s)
      for s in stages)
  if not ok:
    raise ConfigError(f"model.stages={stages!r} must be a non-empty tuple of non-empty tuples of "
                      "positive ints, e.g. ((32, 32), (64, 64)).")
  return tuple(tuple(s) for s in stages)


class VGG(nn.Module):
  """x [N,H,W,C] -> logits [N, num_classes] (float32). Params: stage{i}_conv{j}, head."""
  num_classes: int
  stages: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64))
  head: str = "gap"
  bn_placement: str = "none"
  bn_convention: str = "pytorch"
  dropout: str = "none"
  dropout_rate: float = 0.0
  activation: str = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    stages = _check_stages(self.stages)
    layers.check_choice("model.head", self.head, HEADS)
    x = x.astype(self.dtype)
    for i, widths in enumerate(stages):
      for j, width in enumerate(widths):
        x = layers.ConvBlock(width, 3, 1, "SAME", self.bn_placement, self.bn_convention,
                             self.dropout, self.dropout_rate, self.activation, self.dtype,
                             name=f"stage{i}_conv{j}")(x, train)
      window = tuple(2 if size >= 2 else 1 for size in x.shape[1:3])
      if window != (1, 1):
        x = layers.max_pool(x, window)
    x = layers.global_avg_pool(x) if self.head == "gap" else x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x).astype(jnp.float32)
