"""AlexNet (Krizhevsky, Sutskever & Hinton 2012), in torchvision's single-tower layout.

conv 64 11x11/4 pad 2 -> pool 3/2 -> conv 192 5x5 pad 2 -> pool 3/2 -> conv 384, 256, 256 3x3
pad 1 -> pool 3/2 -> adaptive average pool 6x6 -> Dense 4096 -> Dense 4096 -> Dense num_classes.
61,100,840 parameters for 1000 classes with `bn_placement=none` (torchvision's count). Every
conv and the two 4096 layers are blocks, so BN placement (convs only) and dropout apply (the
paper's 0.5 dropout in the classifier is `dropout=standard, dropout_rate=0.5`).

Small inputs: with `stem=auto` inputs under 64 pixels get a 3x3 stride-1 first conv instead of
11x11/4 (which would leave a 1x1 map from 8x8 digits), and a pool is skipped along an axis
shorter than its 3-pixel window. The 6x6 adaptive pool repeats smaller maps, as torchvision does.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnlab.nets import layers
from cnnlab.nets.models import common

CLASSIFIER_POOL = 6  # The adaptive average pool before the classifier: 6x6.
FEATURES = ((192, 5, 2), (384, 3, 1), (256, 3, 1), (256, 3, 1))  # (width, kernel, pad) after conv1.


class AlexNet(nn.Module):
  """x [N,H,W,C] -> logits [N, num_classes] (float32). Params: conv1..conv5, fc1, fc2, head."""
  num_classes: int
  stem: str = "auto"
  pool: str = "max"
  options: layers.BlockOptions = layers.BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.check_choice("model.pool", self.pool, layers.POOL_KINDS)
    layers.spatial_dims(x, "AlexNet", (2,))
    x = x.astype(self.options.dtype)
    kernel, stride, pad = (11, 4, 2) if common.imagenet_stem(self.stem, x) else (3, 1, 1)
    block = lambda width, k, s, p, name: layers.ConvBlock(width, k, s, p, options=self.options,
                                                          name=name)
    pool = lambda name: layers.Pool(self.pool, 3, 2, fit_small=True, name=name)
    x = pool("pool1")(block(64, kernel, stride, pad, "conv1")(x, train))
    for i, (width, k, p) in enumerate(FEATURES, start=2):
      x = block(width, k, 1, p, f"conv{i}")(x, train)
      if i in (2, 5):
        x = pool(f"pool{i}")(x)
    x = common.flatten(layers.AdaptiveAvgPool(CLASSIFIER_POOL, name="avgpool")(x))
    fc_options = self.options.replace(bn_placement="none")  # BN belongs to the conv layers.
    for i in (1, 2):
      x = layers.DenseBlock(4096, fc_options, name=f"fc{i}")(x, train)
    return common.logits(self.num_classes, x)
