"""Conv and dense blocks: layer -> (BN) -> act -> (BN) -> dropout, as `BlockOptions` says.

ConvBlock takes 1, 2 or 3 spatial axes (x [N, L, C], [N, H, W, C], [N, D, H, W, C]), with
stride, padding, dilation, groups and bias chosen per call; TableConv is LeNet-5's sparsely
connected conv.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.base.errors import ConfigError
from cnnlab.nets.layers import tap_conv
from cnnlab.nets.layers.core import (
  BlockOptions,
  channels_last_dims,
  is_int,
  normalize_padding,
  spatial_dims,
  to_tuple,
)
from cnnlab.nets.layers.dropout import Dropout


def dropout_layer(options: BlockOptions, name: str | None = "dropout") -> Dropout:
  """The block-final dropout `options` asks for."""
  return Dropout(options.dropout, options.dropout_rate, options.dropblock_size, name=name)


def norm_act_dropout(options: BlockOptions, x: jax.Array, train: bool) -> jax.Array:
  """The shared tail of ConvBlock/DenseBlock: (BN) -> act -> (BN) -> dropout (inside a compact
  method: its submodules are named `bn` and `dropout`)."""
  if options.bn_placement == "before_act":
    x = options.norm("bn")(x, train)
  x = options.act(x)
  if options.bn_placement == "after_act":
    x = options.norm("bn")(x, train)
  return dropout_layer(options)(x, train)


class ConvBlock(nn.Module):
  """conv -> (BN) -> act -> (BN) -> dropout; x [N,*S,C] -> [N,*S',features] (1-3 spatial axes).

  `kernel_size`/`strides`/`dilation` are ints or one int per spatial axis; `padding` is
  'SAME'/'VALID', an int p (p on both sides, as PyTorch), one int per axis, or (lo, hi) pairs.
  `groups` splits input and output channels into that many independent groups (both must
  divide). `use_bias` None follows `options` (no bias when BN directly follows the conv).
  Params: `conv` (kernel [*kernel_size, C/groups, features], bias [features]), `bn` when on.

  `connections` (optional, 2-D only) is a connection table: output map j reads only the input
  channels `connections[j]` (LeNet-5's C3, see TableConv); `features` must equal its length.
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  dilation: int | Sequence[int] = 1
  groups: int = 1
  use_bias: bool | None = None
  connections: tuple[tuple[int, ...], ...] | None = None
  options: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    self.options.check()
    n = spatial_dims(x, "ConvBlock", (2,) if self.connections is not None else (1, 2, 3))
    if not is_int(self.groups) or self.groups < 1 or x.shape[-1] % self.groups or (
        self.features % self.groups):
      raise ConfigError(f"groups={self.groups!r} must be a positive int dividing both the input "
                        f"channels ({x.shape[-1]}) and features ({self.features}).")
    use_bias = (self.options.layer_bias(self.options.bn_placement == "before_act")
                if self.use_bias is None else self.use_bias)
    kwargs = dict(kernel_size=to_tuple(self.kernel_size, n, "kernel_size"),
                  strides=to_tuple(self.strides, n, "strides"),
                  padding=normalize_padding(self.padding, n), use_bias=use_bias,
                  dtype=self.options.dtype, param_dtype=jnp.float32)
    if self.connections is None:
      x = nn.Conv(self.features, kernel_dilation=to_tuple(self.dilation, n, "dilation"),
                  feature_group_count=self.groups, name="conv",
                  conv_general_dilated=tap_conv.conv_general_dilated, **kwargs)(x)
    else:
      x = TableConv(self.connections, name="conv", **kwargs)(x)
      if x.shape[-1] != self.features:
        raise ConfigError(f"features={self.features} but the connection table has "
                          f"{x.shape[-1]} output maps.")
    return norm_act_dropout(self.options, x, train)


class TableConv(nn.Module):
  """Sparsely connected conv: output map j sums over input channels `connections[j]` only.

  x [N,H,W,C] -> [N,H',W',len(connections)]. The trainable weights are stored per fan-in k as
  `fanin{k}/kernel` [kh,kw,k,maps] (so the parameter count is the paper's), then scattered into
  one dense [kh,kw,C,len(connections)] kernel whose other entries are zero and applied as a single
  ordinary conv: grouped convs (one group per map) ran ~100x slower on XLA's CPU backend.
  """
  connections: tuple[tuple[int, ...], ...]
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels, maps = x.shape[-1], len(self.connections)
    by_fanin: dict[int, list[int]] = {}
    for j, inputs in enumerate(self.connections):
      if not inputs or not all(0 <= i < channels for i in inputs):
        raise ConfigError(f"connections[{j}]={inputs!r} must name input channels in "
                          f"[0, {channels}).")
      by_fanin.setdefault(len(inputs), []).append(j)
    kh, kw = self.kernel_size
    kernel = jnp.zeros((kh, kw, channels, maps), self.param_dtype)
    for k, outs in sorted(by_fanin.items()):
      fan_in = nn.initializers.lecun_normal()  # Scaled by the true fan-in k*kh*kw.
      w = self.param(f"fanin{k}", lambda key, shape, init=fan_in: {"kernel": init(key, shape)},
                     (kh, kw, k, len(outs)))["kernel"]
      ins = [self.connections[j][r] for r in range(k) for j in outs]
      cols = [j for r in range(k) for j in outs]
      vals = w.transpose(2, 3, 0, 1).reshape(k * len(outs), kh, kw)   # [(r, map), kh, kw]
      kernel = kernel.at[:, :, jnp.array(ins), jnp.array(cols)].set(vals.transpose(1, 2, 0))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding,
        dimension_numbers=channels_last_dims(2))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (maps,), self.param_dtype).astype(
          self.dtype)
    return y

  def fan_in(self) -> int:
    """Connected input channels summed over output maps (for multiply-add counts)."""
    return sum(len(c) for c in self.connections)


class DenseBlock(nn.Module):
  """Dense -> (BN) -> act -> (BN) -> dropout; x [N, C] -> [N, features] (MLP and FC heads).

  Same options and order as ConvBlock (`before_act` drops the Dense bias). `spatial` and
  `dropblock` dropout on [N, features] drop single units (see Dropout). Params: `dense`, `bn`.
  """
  features: int
  options: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    self.options.check()
    x = nn.Dense(self.features, use_bias=self.options.bn_placement != "before_act",
                 dtype=self.options.dtype, param_dtype=jnp.float32, name="dense")(x)
    return norm_act_dropout(self.options, x, train)
