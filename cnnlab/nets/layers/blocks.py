"""Multi-branch blocks: residual units (He et al. 2016a/b) and the Inception module (Szegedy et
al. 2015). Both take channels-last x [N, *spatial, C] with 1-3 spatial axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.base.errors import ConfigError
from cnnlab.nets.layers.conv import ConvBlock, dropout_layer
from cnnlab.nets.layers.core import BlockOptions, check_choice, is_int, spatial_dims
from cnnlab.nets.layers.pooling import Pool

# He et al. 2016b ("Identity Mappings in Deep Residual Networks"), Fig. 4 (a)-(e).
RESIDUAL_UNITS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact",
                  "full_preact")
SHORTCUTS = ("projection", "zero_pad")
RESNET_BN_PLACEMENTS = ("none", "before_act")


class ResidualUnit(nn.Module):
  """A residual unit, x [N,*S,C] -> [N,*S/strides, out] with out = features (basic: two 3x3
  convs) or 4 x features (bottleneck: 1x1, 3x3 carrying the stride, 1x1 -- torchvision's v1.5).

  `unit` orders BN and the activation around the addition (conv = c, BN = b, act = r):
    original          x + c b r c b, then r              (He 2016a; torchvision)
    bn_after_add      x + c b r c,   then b r
    relu_before_add   x + c b r c b r
    relu_only_preact  x + r c b r c b
    full_preact       x + b r c b r c                    (He 2016b's proposal)
  Between convs it is always c -> b -> r -> dropout (the `options` kind and rate).
  `options.bn_placement` = `none` removes every BN (convs get biases) and keeps the order;
  `before_act` keeps BN where `unit` puts it; `after_act` has no meaning here (ConfigError).

  When the shape changes the shortcut is `projection` (1x1 conv with the stride, + BN unless the
  unit normalises after the add or is full_preact, which projects its pre-activated input as
  He 2016b's code does) or `zero_pad` (option A of He 2016a: subsample, pad channels with zeros;
  no parameters). Params: conv{i}, bn{i} (bn0 = pre-activation BN, bn_out = after the add),
  proj, proj_bn.
  """
  features: int
  strides: int = 1
  bottleneck: bool = False
  unit: str = "original"
  shortcut: str = "projection"
  options: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    opts = self.options
    opts.check()
    check_choice("model.unit", self.unit, RESIDUAL_UNITS)
    check_choice("model.shortcut", self.shortcut, SHORTCUTS)
    check_choice("model.bn_placement (residual networks)", opts.bn_placement,
                 RESNET_BN_PLACEMENTS)
    n = spatial_dims(x, "ResidualUnit")
    if not is_int(self.strides) or self.strides < 1:
      raise ConfigError(f"strides={self.strides!r} must be a positive int.")
    out = self.features * (4 if self.bottleneck else 1)
    convs = ([(self.features, 1, 1), (self.features, 3, self.strides), (out, 1, 1)]
             if self.bottleneck else [(self.features, 3, self.strides), (out, 3, 1)])
    bn = lambda name, y: opts.norm(name)(y, train) if opts.use_bn else y

    def conv(i, y, features, kernel, strides):
      return nn.Conv(features, (kernel,) * n, (strides,) * n, padding=((kernel // 2,) * 2,) * n,
                     use_bias=opts.layer_bias(opts.use_bn), dtype=opts.dtype,
                     param_dtype=jnp.float32, name=f"conv{i}")(y)

    y = x
    if self.unit == "full_preact":
      y = opts.act(bn("bn0", y))
    elif self.unit == "relu_only_preact":
      y = opts.act(y)
    shortcut = self._shortcut(x, y if self.unit == "full_preact" else x, out, n, train)
    for i, (features, kernel, strides) in enumerate(convs, start=1):
      y = conv(i, y, features, kernel, strides)
      if i < len(convs):
        y = dropout_layer(opts, f"dropout{i}")(opts.act(bn(f"bn{i}", y)), train)
    if self.unit in ("original", "relu_before_add", "relu_only_preact"):
      y = bn(f"bn{len(convs)}", y)
    if self.unit == "relu_before_add":
      y = opts.act(y)
    y = y + shortcut
    if self.unit == "bn_after_add":
      y = bn("bn_out", y)
    if self.unit in ("original", "bn_after_add"):
      y = opts.act(y)
    return y

  def _shortcut(self, x, source, out: int, n: int, train: bool) -> jax.Array:
    if self.strides == 1 and x.shape[-1] == out:
      return x
    opts = self.options
    if self.shortcut == "zero_pad":
      if x.shape[-1] > out:
        raise ConfigError(f"a zero_pad shortcut cannot reduce {x.shape[-1]} channels to {out}; "
                          "use shortcut=projection.")
      x = x[(slice(None), *(slice(None, None, self.strides),) * n, slice(None))]
      return jnp.pad(x, ((0, 0),) * (n + 1) + ((0, out - x.shape[-1]),))
    with_bn = opts.use_bn and self.unit not in ("bn_after_add", "full_preact")
    y = nn.Conv(out, (1,) * n, (self.strides,) * n, padding="VALID",
                use_bias=opts.layer_bias(with_bn), dtype=opts.dtype, param_dtype=jnp.float32,
                name="proj")(source)
    return opts.norm("proj_bn")(y, train) if with_bn else y


class Inception(nn.Module):
  """The Inception module (GoogLeNet, Szegedy et al. 2015, Fig. 2b): four parallel branches
  concatenated on channels, x [N,*S,C] -> [N,*S, c1 + c3 + c5 + pool_proj]:
    1x1 conv (c1) | 1x1 (c3_reduce) -> 3x3 (c3) | 1x1 (c5_reduce) -> 5x5 (c5) |
    3x3 max pool, stride 1 -> 1x1 (pool_proj).
  Every conv is a ConvBlock (so BN placement and dropout apply); the 1x1 convs cut the channels
  the expensive 3x3/5x5 convs see. `c5_kernel` = 3 reproduces torchvision's GoogLeNet, whose
  "5x5" branch uses 3x3 kernels (a known slip kept for its pretrained weights).
  """
  c1: int
  c3_reduce: int
  c3: int
  c5_reduce: int
  c5: int
  pool_proj: int
  c5_kernel: int = 5
  options: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    spatial_dims(x, "Inception")
    block = lambda features, kernel, name: ConvBlock(features, kernel, padding="SAME",
                                                     options=self.options, name=name)
    b1 = block(self.c1, 1, "b1_1x1")(x, train)
    b3 = block(self.c3, 3, "b3_3x3")(block(self.c3_reduce, 1, "b3_reduce")(x, train), train)
    b5 = block(self.c5, self.c5_kernel, "b5_5x5")(
        block(self.c5_reduce, 1, "b5_reduce")(x, train), train)
    bp = block(self.pool_proj, 1, "pool_proj")(Pool("max", 3, 1, "SAME", name="pool")(x), train)
    return jnp.concatenate([b1, b3, b5, bp], axis=-1)
