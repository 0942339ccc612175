"""VGG (Simonyan & Zisserman 2015): stacks of 3x3 convs, a 2x2 pool after each stage.

`VGG` is configurable: `stages` = conv widths per stage, e.g. ((32, 32), (64, 64)) =
conv32-conv32-pool-conv64-conv64-pool. Each conv is a 3x3 SAME ConvBlock (so BN placement and the
dropout kind apply); a pool is skipped along an axis whose size is already 1, so any input from
1x1 up works (8x8 digits, 28x28 MNIST, 32x32 CIFAR, 224x224 ImageNet). `head`:
  gap        global average pool -> Dense (size-independent; cnnlab's `vgg_cnn` sweeps);
  flatten    flatten -> Dense;
  classifier torchvision's: adaptive average pool to 7x7 -> Dense 4096 -> Dense 4096 -> Dense
             (the 4096s are DenseBlocks: activation and dropout per `options`, no BN).
`vgg11/13/16/19` are the paper's configurations A, B, D, E with the classifier head; with
`bn_placement=before_act` and `conv_bias=True` they are torchvision's `vgg*_bn` (138,365,992
parameters for VGG-16-BN), with `bn_placement=none` torchvision's `vgg*` (138,357,544).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers
from cnnlab.nets.models import common

HEADS = ("gap", "flatten", "classifier")

VGG_STAGES = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
CLASSIFIER_POOL, CLASSIFIER_WIDTH = 7, 4096


def _check_stages(stages) -> tuple[tuple[int, ...], ...]:
  ok = isinstance(stages, (tuple, list)) and len(stages) > 0 and all(
      isinstance(s, (tuple, list)) and len(s) > 0 and all(layers.is_int(w) and w >= 1 for w in s)
      for s in stages)
  if not ok:
    raise ConfigError(f"model.stages={stages!r} must be a non-empty tuple of non-empty tuples of "
                      "positive ints, e.g. ((32, 32), (64, 64)).")
  return tuple(tuple(s) for s in stages)


class VGG(nn.Module):
  """x [N,H,W,C] -> logits [N, num_classes] (float32). Params: stage{i}_conv{j}, fc{k}, head."""
  num_classes: int
  stages: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64))
  head: str = "gap"
  pool: str = "max"
  options: layers.BlockOptions = layers.BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    stages = _check_stages(self.stages)
    layers.check_choice("model.head", self.head, HEADS)
    layers.check_choice("model.pool", self.pool, layers.POOL_KINDS)
    layers.spatial_dims(x, "VGG", (2,))
    x = x.astype(self.options.dtype)
    for i, widths in enumerate(stages):
      for j, width in enumerate(widths):
        x = layers.ConvBlock(width, 3, 1, "SAME", options=self.options,
                             name=f"stage{i}_conv{j}")(x, train)
      x = layers.Pool(self.pool, 2, fit_small=True, name=f"pool{i}")(x)
    if self.head == "gap":
      x = layers.GlobalAvgPool(name="gap")(x)
    elif self.head == "flatten":
      x = common.flatten(x)
    else:
      x = common.flatten(layers.AdaptiveAvgPool(CLASSIFIER_POOL, name="avgpool")(x))
      fc_options = self.options.replace(bn_placement="none")  # As torchvision's vgg*_bn.
      for k in range(2):
        x = layers.DenseBlock(CLASSIFIER_WIDTH, fc_options, name=f"fc{k}")(x, train)
    return common.logits(self.num_classes, x)
