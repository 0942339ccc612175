"""Network in Network (Lin, Chen & Yan 2014), the paper's CIFAR-10 model.

Three "mlpconv" layers, each a spatial conv followed by two 1x1 convs (a small MLP applied at
every position): 192 5x5 -> 160 -> 96, 3x3/2 max pool; 192 5x5 -> 192 -> 192, 3x3/2 average
pool; 192 3x3 -> 192 -> num_classes. The last 1x1 conv makes one map per class and global
average pooling turns the maps into logits: no dense layer at all. Every conv but the last is a
ConvBlock (BN placement, dropout per `options`; the paper's dropout after the first two
mlpconvs is `dropout=standard, dropout_rate=0.5` here applied after every conv). Pools use SAME
padding (ceil mode, 32 -> 16 -> 8) and are skipped on axes shorter than their window.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.nets import layers

MLPCONVS = (((192, 5), 160, 96), ((192, 5), 192, 192), ((192, 3), 192))


class NiN(nn.Module):
  """x [N,H,W,C] -> logits [N, num_classes] (float32). Params: mlpconv{i}_{j}, class_maps."""
  num_classes: int
  options: layers.BlockOptions = layers.BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.spatial_dims(x, "NiN", (2,))
    x = x.astype(self.options.dtype)
    for i, ((width, kernel), *ones) in enumerate(MLPCONVS, start=1):
      x = layers.ConvBlock(width, kernel, 1, "SAME", options=self.options,
                           name=f"mlpconv{i}_0")(x, train)
      for j, w in enumerate(ones, start=1):
        x = layers.ConvBlock(w, 1, 1, "VALID", options=self.options,
                             name=f"mlpconv{i}_{j}")(x, train)
      if i < len(MLPCONVS):
        x = layers.Pool("max" if i == 1 else "avg", 3, 2, "SAME", fit_small=True,
                        name=f"pool{i}")(x)
    x = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, param_dtype=jnp.float32,
                name="class_maps")(x)
    return layers.GlobalAvgPool(name="gap")(x)
