"""Baselines without convolutions, on flattened pixels.

`MLP`: flatten -> DenseBlocks of widths `hidden` -> Dense(num_classes). Each hidden layer is
Dense -> (BN) -> act -> (BN) -> dropout (the shared `options`), so the MLP takes part in the same
ablations as the conv nets. With `hidden=()` it is the linear classifier (registered as `linear`):
one weight template per class, as in the lecture's first model.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnlab.nets import layers
from cnnlab.nets.models import common


class MLP(nn.Module):
  """Multi-layer perceptron: x [N,H,W,C] -> logits [N, num_classes] (float32).
  Params: hidden{i} (DenseBlock), head."""
  num_classes: int
  hidden: tuple[int, ...] = (256, 256)
  options: layers.BlockOptions = layers.BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = common.check_widths("model.hidden", self.hidden)
    x = common.flatten(x).astype(self.options.dtype)
    for i, width in enumerate(hidden):
      x = layers.DenseBlock(width, self.options, name=f"hidden{i}")(x, train)
    return common.logits(self.num_classes, x)
