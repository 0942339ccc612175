"""Building blocks: BatchNorm with named conventions, element/spatial dropout, conv and dense
blocks with a configurable BN placement, and pooling with a fast path for CPU.

Layout is NHWC throughout. `dtype` is the activation dtype; parameters are always float32.
One `train` flag drives both BN (batch vs running statistics) and dropout (on vs identity).
RNG streams: `dropout` (element-wise), `channel_dropout` (spatial).
Bad option values raise `ConfigError` when the module is called (or the function runs).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from cnnlab.errors import ConfigError

BN_PLACEMENTS = ("none", "before_act", "after_act")
DROPOUT_KINDS = ("none", "standard", "spatial")
BN_CONVENTIONS = ("flax", "pytorch")
PADDING_MODES = ("SAME", "VALID")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    # LeCun et al. 1998, appendix A: f(a) = 1.7159 tanh(2a/3), so f(+-1) = +-1.
    "lecun_tanh": lambda x: 1.7159 * jnp.tanh(x * (2.0 / 3.0)),
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "silu": nn.silu,
    "leaky_relu": nn.leaky_relu,
    "identity": lambda x: x,
}

# (momentum on the old running value, whether the running variance is unbiased).
_BN_MOMENTUM = {"flax": (0.99, False), "pytorch": (0.9, True)}


# ----------------------------------------------------------------------------------------------
# Validation and argument normalisation.

def check_choice(key: str, value, allowed) -> None:
  """Raises ConfigError unless `value` is one of `allowed`; the message names both."""
  if not isinstance(value, str) or value not in allowed:
    raise ConfigError(f"{key}={value!r} is not allowed; choose one of: "
                      f"{', '.join(map(str, allowed))}.")


def check_rate(key: str, rate) -> None:
  """Raises ConfigError unless 0 <= rate < 1."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise ConfigError(f"{key}={rate!r} is out of range; allowed: [0, 1).")


def check_block_options(bn_placement: str = "none", bn_convention: str = "pytorch",
                        dropout: str = "none", dropout_rate: float = 0.0,
                        activation: str = "relu") -> None:
  """Validates the options every block (and so every model) shares."""
  check_choice("bn_placement", bn_placement, BN_PLACEMENTS)
  check_choice("bn_convention", bn_convention, BN_CONVENTIONS)
  check_choice("dropout", dropout, DROPOUT_KINDS)
  check_rate("dropout_rate", dropout_rate)
  check_choice("activation", activation, tuple(ACTIVATIONS))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def to_tuple(value, n: int, key: str) -> tuple[int, ...]:
  """An int or a length-`n` sequence of positive ints -> tuple of `n` ints (kernel, stride)."""
  if _is_int(value):
    value = (value,) * n
  if (not isinstance(value, Sequence) or len(value) != n
      or not all(_is_int(v) and v >= 1 for v in value)):
    raise ConfigError(f"{key}={value!r} must be a positive int or a tuple of {n} positive ints.")
  return tuple(value)


def normalize_padding(padding, n: int = 2) -> str | tuple[tuple[int, int], ...]:
  """PyTorch/Flax-style padding -> 'SAME', 'VALID' or `n` (lo, hi) pairs (what nn.Conv takes).

  int p -> p on both sides of every spatial axis; (p_h, p_w) -> p_h on both sides of H, ...;
  ((lo_h, hi_h), (lo_w, hi_w)) as is; 'same'/'valid' in any case.
  """
  bad = ConfigError(f"padding={padding!r} is not allowed; use 'SAME', 'VALID', an int, a tuple "
                    f"of {n} ints or a tuple of {n} (lo, hi) pairs (all >= 0).")
  if isinstance(padding, str):
    if padding.upper() not in PADDING_MODES:
      raise bad
    return padding.upper()
  if _is_int(padding):
    padding = (padding,) * n
  if not isinstance(padding, Sequence) or len(padding) != n:
    raise bad
  pairs = []
  for p in padding:
    pair = (p, p) if _is_int(p) else p
    if (not isinstance(pair, Sequence) or len(pair) != 2
        or not all(_is_int(v) and v >= 0 for v in pair)):
      raise bad
    pairs.append(tuple(pair))
  return tuple(pairs)


# ----------------------------------------------------------------------------------------------
# Normalisation and dropout.

class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last: x [..., C] -> [..., C] (NHWC: stats over N,H,W).

  Params `scale`, `bias` [C]; running `mean`, `var` [C] in `batch_stats`. Training uses the batch
  mean and biased batch variance and updates the running stats (not during `init`); eval uses the
  running stats. `convention`:
    flax:    ra = 0.99 ra + 0.01 batch, running variance biased;
    pytorch: ra = 0.9 ra + 0.1 batch, running variance unbiased (x N/(N-1), N = reduced elements
             per channel; N = 1 leaves the biased value, where PyTorch raises).
  Statistics are computed in float32 whatever `dtype` (the output dtype) is. With `axis_name`
  set, statistics are averaged over that mapped axis (pmap / shard_map); under plain `jit` the
  batch statistics are global already.
  """
  convention: str = "pytorch"
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_choice("bn_convention", self.convention, BN_CONVENTIONS)
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      n = x.size // c
      mean = x32.mean(axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.square(x32 - mean).mean(axes)  # Two-pass: exact for large means too.
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
        n = n * jax.lax.psum(1, self.axis_name)
      if not self.is_initializing():
        momentum, unbiased = _BN_MOMENTUM[self.convention]
        batch_var = var * (n / (n - 1)) if unbiased and n > 1 else var
        ra_mean.value = momentum * ra_mean.value + (1 - momentum) * mean
        ra_var.value = momentum * ra_var.value + (1 - momentum) * batch_var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((x32 - mean) * mul + bias).astype(self.dtype)


class Dropout(nn.Module):
  """Dropout of kind `none`, `standard` (element-wise) or `spatial` (whole channels).

  x [N, ..., C] -> same shape. `standard` draws from the `dropout` stream, one decision per
  element. `spatial` draws from `channel_dropout`, one decision per (example, channel) shared over
  all spatial axes (NHWC: broadcast over H, W, as PyTorch's Dropout2d). On a 2-D [N, C] input
  each channel is a single element, so `spatial` is element-wise dropout (on `channel_dropout`).
  Survivors are scaled by 1/(1 - rate). Identity when `train` is False or `rate` is 0.
  """
  kind: str = "none"
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_choice("dropout", self.kind, DROPOUT_KINDS)
    check_rate("dropout_rate", self.rate)
    if self.kind == "none" or not train or self.rate == 0:
      return x
    if self.kind == "standard":
      return nn.Dropout(self.rate, deterministic=False)(x)
    spatial_axes = tuple(range(1, x.ndim - 1))
    return nn.Dropout(self.rate, broadcast_dims=spatial_axes, deterministic=False,
                      rng_collection="channel_dropout")(x)


def _norm_act_dropout(module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  """The shared tail of ConvBlock/DenseBlock: (BN) -> act -> (BN) -> dropout."""
  bn = lambda y: BatchNorm(module.bn_convention, dtype=module.dtype, name="bn")(y, train)
  if module.bn_placement == "before_act":
    x = bn(x)
  x = ACTIVATIONS[module.activation](x)
  if module.bn_placement == "after_act":
    x = bn(x)
  return Dropout(module.dropout, module.dropout_rate, name="dropout")(x, train)


class ConvBlock(nn.Module):
  """conv -> (BN) -> act -> (BN) -> dropout; x [N,H,W,C] -> [N,H',W',features].

  `bn_placement`: `none` = conv (bias) -> act; `before_act` = conv (no bias) -> BN -> act (Ioffe
  & Szegedy); `after_act` = conv (bias) -> act -> BN. Dropout (`none`/`standard`/`spatial`) comes
  last. `kernel_size`/`strides` are ints or pairs; `padding` is 'SAME'/'VALID', an int p (p on
  both sides, as PyTorch), a pair of ints, or a pair of (lo, hi) pairs. Params: `conv` (kernel
  [kh,kw,C,features], bias [features]), `bn` when BN is on.

  `connections` (optional) is a connection table: output map j reads only the input channels
  `connections[j]` (LeNet-5's C3); `features` must equal len(connections). It is computed as one
  grouped conv per fan-in size, so the parameters are exactly the connected weights.
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  bn_placement: str = "none"
  bn_convention: str = "pytorch"
  dropout: str = "none"
  dropout_rate: float = 0.0
  activation: str = "relu"
  dtype: Any = jnp.float32
  connections: tuple[tuple[int, ...], ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_block_options(self.bn_placement, self.bn_convention, self.dropout, self.dropout_rate,
                        self.activation)
    if x.ndim != 4:
      raise ConfigError(f"ConvBlock expects NHWC input [N, H, W, C]; got shape {x.shape}.")
    kwargs = dict(kernel_size=to_tuple(self.kernel_size, 2, "kernel_size"),
                  strides=to_tuple(self.strides, 2, "strides"),
                  padding=normalize_padding(self.padding, 2),
                  use_bias=self.bn_placement != "before_act", dtype=self.dtype,
                  param_dtype=jnp.float32)
    if self.connections is None:
      x = nn.Conv(self.features, name="conv", **kwargs)(x)
    else:
      x = TableConv(self.connections, name="conv", **kwargs)(x)
      if x.shape[-1] != self.features:
        raise ConfigError(f"features={self.features} but the connection table has "
                          f"{x.shape[-1]} output maps.")
    return _norm_act_dropout(self, x, train)


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
      w = self.param(f"fanin{k}", lambda key, shape: {"kernel": fan_in(key, shape)},
                     (kh, kw, k, len(outs)))["kernel"]
      ins = [self.connections[j][r] for r in range(k) for j in outs]
      cols = [j for r in range(k) for j in outs]
      vals = w.transpose(2, 3, 0, 1).reshape(k * len(outs), kh, kw)   # [(r, map), kh, kw]
      kernel = kernel.at[:, :, jnp.array(ins), jnp.array(cols)].set(vals.transpose(1, 2, 0))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (maps,), self.param_dtype).astype(
          self.dtype)
    return y


class DenseBlock(nn.Module):
  """Dense -> (BN) -> act -> (BN) -> dropout; x [N, C] -> [N, features] (MLP and FC heads).

  Same options and order as ConvBlock (`before_act` drops the Dense bias). `spatial` dropout on
  [N, features] drops single units (see Dropout). Params: `dense`, `bn` when BN is on.
  """
  features: int
  bn_placement: str = "none"
  bn_convention: str = "pytorch"
  dropout: str = "none"
  dropout_rate: float = 0.0
  activation: str = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_block_options(self.bn_placement, self.bn_convention, self.dropout, self.dropout_rate,
                        self.activation)
    x = nn.Dense(self.features, use_bias=self.bn_placement != "before_act", dtype=self.dtype,
                 param_dtype=jnp.float32, name="dense")(x)
    return _norm_act_dropout(self, x, train)


# ----------------------------------------------------------------------------------------------
# Pooling.

def _pool_args(x, window, strides, padding):
  if x.ndim != 4:
    raise ConfigError(f"pooling expects NHWC input [N, H, W, C]; got shape {x.shape}.")
  window = to_tuple(window, 2, "window")
  strides = window if strides is None else to_tuple(strides, 2, "strides")
  return window, strides, normalize_padding(padding, 2)


def _blocked(x, window, strides, padding):
  """[N,H,W,C] -> [N,H/wh,wh,W/ww,ww,C] for non-overlapping VALID windows, else None.

  VALID drops the rows/columns that do not fill a window, so they are cropped first.
  """
  if strides != window or padding not in ("VALID", ((0, 0), (0, 0))):
    return None
  n, h, w, c = x.shape
  (wh, ww), (oh, ow) = window, (h // window[0], w // window[1])
  if oh == 0 or ow == 0:
    return None  # Let Flax produce its usual empty/error result.
  x = x[:, :oh * wh, :ow * ww, :]
  return x.reshape(n, oh, wh, ow, ww, c)


def max_pool(x: jax.Array, window, strides=None, padding="VALID") -> jax.Array:
  """Max pool, x [N,H,W,C] -> [N,H',W',C]; `window`/`strides` int or pair (strides = window).

  Non-overlapping VALID windows use reshape-then-max, whose backward pass is much cheaper on CPU
  than `nn.max_pool`'s select-and-scatter. Values are identical; gradients are identical unless a
  window holds tied maxima, where this path splits the gradient equally among the ties (also a
  valid subgradient) and `nn.max_pool` gives it to one of them.
  """
  window, strides, padding = _pool_args(x, window, strides, padding)
  blocks = _blocked(x, window, strides, padding)
  if blocks is not None:
    return blocks.max(axis=(2, 4))
  return nn.max_pool(x, window, strides, padding)


def avg_pool(x: jax.Array, window, strides=None, padding="VALID") -> jax.Array:
  """Average pool, x [N,H,W,C] -> [N,H',W',C]; same arguments and fast path as `max_pool`.

  Padded positions count as zeros in the average (nn.avg_pool's count_include_pad=True).
  """
  window, strides, padding = _pool_args(x, window, strides, padding)
  blocks = _blocked(x, window, strides, padding)
  if blocks is not None:
    return blocks.mean(axis=(2, 4))
  return nn.avg_pool(x, window, strides, padding)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over H and W: x [N,H,W,C] -> [N,C] (accumulated in float32, returned in x's dtype)."""
  if x.ndim != 4:
    raise ConfigError(f"global_avg_pool expects NHWC input [N, H, W, C]; got shape {x.shape}.")
  return x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)
