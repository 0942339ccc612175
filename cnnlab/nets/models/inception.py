"""GoogLeNet / Inception-v1 (Szegedy et al. 2015), with its two auxiliary classifiers.

Stem (inputs >= 64 pixels): conv 64 7x7/2 -> max pool 3/2 -> conv 64 1x1 -> conv 192 3x3 ->
max pool 3/2; smaller inputs (`stem=auto`) get conv 64 3x3/1 -> 1x1 -> 3x3 and no pools. Then
inception 3a, 3b, pool, 4a-4e, pool, 5a, 5b (Table 1 of the paper), global average pool,
dropout 0.4, Dense. Pools are 3x3/2 max pools without padding, rounding the output size up as
the paper's Caffe model and torchvision do (PyTorch's ceil_mode=True: 224 -> ... -> 7x7, 15 -> 7),
and skip axes shorter than their window. `pool4_window` is the window of the pool between 4e and
5a: 3 (the paper) or 2 (torchvision's MaxPool2d(2, 2, ceil_mode=True)). BatchNorm's epsilon
defaults to 1e-3 here (torchvision's BasicConv2d); `bn_epsilon` in the options overrides it.

Auxiliary classifiers (`aux_classifiers=True`) branch off 4a and 4d: average pool to 4x4 ->
1x1 conv 128 -> Dense 1024 (no BN) -> dropout 0.7 -> Dense num_classes. In training they sow their
logits into the `aux_logits` collection and `train.train_step` adds their cross-entropy times
`config.model.aux_loss_weight` (0.3 in the paper) to the loss; evaluation never runs them.

`c5_kernel=3`, `pool4_window=2`, `bn_placement=before_act`, `stem=imagenet` and no auxiliary
heads is torchvision's googlenet (6,624,904 parameters for 1000 classes; its "5x5" branches use
3x3 kernels); `cnnlab.nets.convert` loads its weights. The paper's 5x5
version has 7,005,832 parameters that way; the two auxiliary heads add 6,379,984 (torchvision's
googlenet(aux_logits=True) has 13,004,888).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers
from cnnlab.nets.models import common

# (c1, c3_reduce, c3, c5_reduce, c5, pool_proj) per module; "pool" = 3x3/2 max pool.
STAGES = (("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)), "pool",
          ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
          ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
          ("4e", (256, 160, 320, 32, 128, 128)), "pool",
          ("5a", (256, 160, 320, 32, 128, 128)), ("5b", (384, 192, 384, 48, 128, 128)))
AUX_AFTER = ("4a", "4d")
AUX_POOL = 4           # Auxiliary heads average-pool to 4x4.
BN_EPSILON = 1e-3      # torchvision's BasicConv2d (BatchNorm2d(eps=0.001)).
POOL4_WINDOWS = (3, 2)  # The paper's 3x3/2 pool between 4e and 5a; torchvision's 2x2/2.


class AuxClassifier(nn.Module):
  """GoogLeNet's auxiliary head: x [N,H,W,C] -> logits [N, num_classes] (float32)."""
  num_classes: int
  options: layers.BlockOptions = layers.BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.AdaptiveAvgPool(AUX_POOL, name="pool")(x)
    x = layers.ConvBlock(128, 1, 1, "VALID", options=self.options, name="conv")(x, train)
    fc_options = self.options.replace(bn_placement="none", dropout="standard", dropout_rate=0.7)
    x = layers.DenseBlock(1024, fc_options, name="fc")(common.flatten(x), train)
    return common.logits(self.num_classes, x)


class GoogLeNet(nn.Module):
  """x [N,H,W,C] -> logits [N, num_classes] (float32).
  Params: conv1-3, inception{3a..5b}, aux1/aux2 (with aux_classifiers), head."""
  num_classes: int
  stem: str = "auto"
  aux_classifiers: bool = True
  c5_kernel: int = 5
  pool4_window: int = 3
  options: layers.BlockOptions = layers.BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.c5_kernel not in (3, 5):
      raise ConfigError(f"model.c5_kernel={self.c5_kernel!r} is not allowed; choose one of: "
                        "5 (the paper), 3 (torchvision).")
    if self.pool4_window not in POOL4_WINDOWS:
      raise ConfigError(f"model.pool4_window={self.pool4_window!r} is not allowed; choose one "
                        "of: 3 (the paper), 2 (torchvision).")
    layers.spatial_dims(x, "GoogLeNet", (2,))
    options = self.options
    if options.bn_epsilon is None:
      options = options.replace(bn_epsilon=BN_EPSILON)
    x = x.astype(options.dtype)
    block = lambda width, k, s, name: layers.ConvBlock(width, k, s, k // 2, options=options,
                                                       name=name)
    pool = lambda name, window=3: layers.Pool("max", window, 2, "VALID", fit_small=True,
                                              ceil_mode=True, name=name)
    if common.imagenet_stem(self.stem, x):
      x = pool("pool1")(block(64, 7, 2, "conv1")(x, train))
      x = pool("pool2")(block(192, 3, 1, "conv3")(block(64, 1, 1, "conv2")(x, train), train))
    else:
      x = block(64, 3, 1, "conv1")(x, train)
      x = block(192, 3, 1, "conv3")(block(64, 1, 1, "conv2")(x, train), train)
    aux, pools = 0, 2
    for stage in STAGES:
      if stage == "pool":
        pools += 1
        x = pool(f"pool{pools}", self.pool4_window if pools == 4 else 3)(x)
        continue
      name, widths = stage
      x = layers.Inception(*widths, c5_kernel=self.c5_kernel, options=options,
                           name=f"inception{name}")(x, train)
      if self.aux_classifiers and name in AUX_AFTER and (train or self.is_initializing()):
        aux += 1
        aux_logits = AuxClassifier(self.num_classes, options, name=f"aux{aux}")(x, train)
        if train:
          self.sow("aux_logits", f"after_{name}", aux_logits)
    x = layers.GlobalAvgPool(name="gap")(x)
    x = layers.Dropout("standard", 0.4, name="dropout")(x, train)
    return common.logits(self.num_classes, x)
