"""Baselines without convolutions.

`MLP`: flatten pixels -> DenseBlocks of widths `hidden` -> Dense(num_classes). Each hidden layer
is Dense -> (BN) -> act -> (BN) -> dropout (the shared `bn_placement` / `dropout` options), so the
MLP takes part in the same ablations as the conv nets; `spatial` dropout on [N, features] drops
single units.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import layers
from cnnlab.errors import ConfigError


class MLP(nn.Module):
  """Multi-layer perceptron: x [N,H,W,C] -> logits [N, num_classes] (float32)."""
  num_classes: int
  hidden: tuple[int, ...] = (256, 256)
  bn_placement: str = "none"
  bn_convention: str = "pytorch"
  dropout: str = "none"
  dropout_rate: float = 0.0
  activation: str = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = tuple(self.hidden)
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden):
      raise ConfigError(f"model.hidden={self.hidden!r} must be a tuple of positive ints.")
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(hidden):
      x = layers.DenseBlock(width, self.bn_placement, self.bn_convention, self.dropout,
                            self.dropout_rate, self.activation, self.dtype,
                            name=f"hidden{i}")(x, train)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x).astype(jnp.float32)
