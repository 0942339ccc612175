"""Residual networks (He et al. 2016a), with the unit orderings of He et al. 2016b.

CIFAR style (`resnet20/32/44/56/110`, depth 6n+2): 3x3 conv 16 -> three stages of n basic units
with 16, 32, 64 channels (stride 2 entering stages 2 and 3) -> global average pool -> Dense;
zero-padding shortcuts (option A), so ResNet-20 has 0.27M parameters (269,722 for 10 classes).
ImageNet style (`resnet18/34` basic units, `resnet50` bottlenecks): stem -> stages of
(2,2,2,2) / (3,4,6,3) units with 64-512 channels -> global average pool -> Dense; projection
shortcuts, matching torchvision's counts (ResNet-18 11,689,512, ResNet-34 21,797,672,
ResNet-50 25,557,032 with `bn_placement=before_act`). Its stem is 7x7/2 conv + 3x3/2 max pool on
inputs >= 64 pixels and a 3x3 stride-1 conv on smaller ones (`stem`: auto | imagenet | small).

`unit` (original | bn_after_add | relu_before_add | relu_only_preact | full_preact) picks where
BN and the activation sit around each addition (see `layers.ResidualUnit`). Pre-activation
networks start with a bare conv and end with the BN/activation their last unit leaves out
(He 2016b): full_preact ends with BN -> act, relu_only_preact stems with conv -> BN and ends
with act. `bn_placement` must be `before_act` (BN as the unit says) or `none` (no BN).
Dropout (any kind) sits between the convs of each unit.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.nets import layers
from cnnlab.nets.models import common

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_DEPTHS = (18, 34, 50)
_IMAGENET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def cifar_resnet(depth: int) -> dict:
  """The fixed fields of CIFAR ResNet-`depth` (He 2016a, section 4.2)."""
  n = (depth - 2) // 6
  return dict(stage_sizes=(n, n, n), widths=(16, 32, 64), bottleneck=False,
              shortcut="zero_pad", cifar_stem=True)


def imagenet_resnet(depth: int) -> dict:
  """The fixed fields of ImageNet ResNet-`depth` (He 2016a, Table 1)."""
  return dict(stage_sizes=_IMAGENET_STAGES[depth], widths=(64, 128, 256, 512),
              bottleneck=depth >= 50, shortcut="projection", cifar_stem=False)


class ResNet(nn.Module):
  """x [N,H,W,C] -> logits [N, num_classes] (float32).
  Params: stem_conv, stem_bn, stage{i}_unit{j}, final_bn (full_preact), head."""
  num_classes: int
  stage_sizes: tuple[int, ...] = (3, 3, 3)
  widths: tuple[int, ...] = (16, 32, 64)
  bottleneck: bool = False
  shortcut: str = "zero_pad"
  cifar_stem: bool = True
  stem: str = "auto"
  unit: str = "original"
  options: layers.BlockOptions = layers.BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    opts = self.options
    layers.check_choice("model.unit", self.unit, layers.RESIDUAL_UNITS)
    layers.check_choice("model.bn_placement (residual networks)", opts.bn_placement,
                        layers.RESNET_BN_PLACEMENTS)
    layers.spatial_dims(x, "ResNet", (2,))
    x = x.astype(opts.dtype)
    large = not self.cifar_stem and common.imagenet_stem(self.stem, x)
    kernel, stride = (7, 2) if large else (3, 1)
    stem_bn = opts.use_bn and self.unit != "full_preact"
    x = nn.Conv(self.widths[0], (kernel,) * 2, (stride,) * 2, padding=((kernel // 2,) * 2,) * 2,
                use_bias=opts.layer_bias(opts.use_bn), dtype=opts.dtype,
                param_dtype=jnp.float32, name="stem_conv",
                conv_general_dilated=layers.tap_conv.conv_general_dilated)(x)
    if stem_bn:
      x = opts.norm("stem_bn")(x, train)
    if self.unit not in ("full_preact", "relu_only_preact"):
      x = opts.act(x)
    if large:
      x = layers.Pool("max", 3, 2, padding=1, name="stem_pool")(x)
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(size):
        x = layers.ResidualUnit(width, 2 if i > 0 and j == 0 else 1, self.bottleneck, self.unit,
                                self.shortcut, opts, name=f"stage{i + 1}_unit{j + 1}")(x, train)
    if self.unit == "full_preact" and opts.use_bn:
      x = opts.norm("final_bn")(x, train)
    if self.unit in ("full_preact", "relu_only_preact"):
      x = opts.act(x)
    return common.logits(self.num_classes, layers.GlobalAvgPool(name="gap")(x))
