"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998), with modern options.

Native 32x32 shape: C1 6@5x5 -> 28x28x6, S2 2x2 pool -> 14x14x6, C3 16@5x5 -> 10x10x16,
S4 2x2 pool -> 5x5x16, C5 120@5x5 -> 1x1x120, F6 84 units, output num_classes. Trainable
parameters on one input channel: C1 156, C3 1516 (the paper's Table I connection table;
`c3_table=False` connects every S2 map: 2416), C5 48120, F6 10164, output 85 per class.

Kept from the paper: the layer shapes and C3's connection table. Modernised (the options every
cnnlab model shares): activation (`tanh`/`lecun_tanh` are the 1998 choice, relu the default),
BN placement and dropout in every block, `pool` = `max` (default) or `avg` (the paper's
subsampling without its trainable coefficient), and a Dense output instead of RBF units.

Adapting to the input size (per axis, H and W independently):
  * C1 is VALID on inputs >= 32, otherwise padded by 2 (= SAME for 5x5): on 28x28 MNIST this is
    the usual pad-by-2, giving the classic 28x28x6 and every later shape unchanged;
  * a 2x2 pool is skipped when its output would be smaller than the 5x5 kernel after it;
  * C3 is VALID when its input is >= 5, otherwise padded by 2;
  * C5's kernel is min(5, size) VALID, so it still sees the whole S4 map on small inputs
    (its output is flattened before F6 when larger than 1x1, e.g. for 64x64 inputs).
  8x8 digits thus run C1 8x8x6 -> (S2 skipped) -> C3 4x4x16 -> (S4 skipped) -> C5 1x1x120.

Fully convolutional (`fully_conv=True`, registered as `lenet5_fcn`): C5 already is a conv whose
kernel equals its input (5x5 on 5x5), i.e. a dense layer (lecture seed 001); F6 and the output
become 1x1 convs over C5's map and the logits are averaged over positions. On 32x32 inputs it
computes exactly what `lenet5` computes (F6's Dense kernel [120, 84] is the 1x1 kernel
[1, 1, 120, 84]); on larger inputs it slides the whole 32x32 LeNet-5 over the image with stride 4
in one pass, one logit vector per 32x32 window.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.nets import layers
from cnnlab.nets.models import common

POOLS = layers.POOL_KINDS

# LeCun et al. 1998, Table I: the S2 maps each C3 map reads. Maps 0-5 take 3 contiguous maps,
# 6-11 take 4 contiguous, 12-14 take 4 non-contiguous, 15 takes all 6.
C3_TABLE = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)

_K = 5  # Every LeNet-5 conv is 5x5.


class LeNet5(nn.Module):
  """x [N,H,W,C] -> logits [N, num_classes] (float32). Params: C1, C3, C5, F6, output.

  `pool`: max (default), avg (the paper's subsampling without its trainable coefficient) or
  blur (anti-aliased max pool).
  """
  num_classes: int
  pool: str = "max"
  c3_table: bool = True
  fully_conv: bool = False
  options: layers.BlockOptions = layers.BlockOptions()

  def _block(self, features, kernel, padding, name, connections=None):
    return layers.ConvBlock(features, kernel, 1, padding, connections=connections,
                            options=self.options, name=name)

  def _subsample(self, x, name):
    window = tuple(2 if size // 2 >= _K else 1 for size in x.shape[1:3])
    return layers.Pool(self.pool, window, name=name)(x)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.check_choice("model.pool", self.pool, POOLS)
    layers.spatial_dims(x, "LeNet-5", (2,))
    x = x.astype(self.options.dtype)
    c1_pad = tuple(0 if size >= 32 else 2 for size in x.shape[1:3])
    x = self._block(6, _K, c1_pad, "C1")(x, train)
    x = self._subsample(x, "S2")
    c3_pad = tuple(0 if size >= _K else 2 for size in x.shape[1:3])
    x = self._block(16, _K, c3_pad, "C3", C3_TABLE if self.c3_table else None)(x, train)
    x = self._subsample(x, "S4")
    c5_kernel = tuple(min(_K, size) for size in x.shape[1:3])
    x = self._block(120, c5_kernel, "VALID", "C5")(x, train)
    if self.fully_conv:
      x = self._block(84, 1, "VALID", "F6")(x, train)
      x = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, name="output")(x)
      return layers.GlobalAvgPool(name="average")(x)
    x = layers.DenseBlock(84, self.options, name="F6")(common.flatten(x), train)
    return common.logits(self.num_classes, x, name="output")
