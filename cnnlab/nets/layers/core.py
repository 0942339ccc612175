"""What every block shares: option names and their checks, `BlockOptions`, BatchNorm.

Layout is channels-last throughout ([N, *spatial, C]; NHWC for images). `dtype` is the activation
dtype; parameters are always float32. Bad option values raise `ConfigError` when the module is
called (or the function runs), naming the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.base.errors import ConfigError

BN_PLACEMENTS = ("none", "before_act", "after_act")
DROPOUT_KINDS = ("none", "standard", "spatial", "dropblock")
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

# BatchNorm's epsilon where a model states none (PyTorch's and most papers' value).
BN_EPSILON = 1e-5

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


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def to_tuple(value, n: int, key: str) -> tuple[int, ...]:
  """An int or a length-`n` sequence of positive ints -> tuple of `n` ints (kernel, stride)."""
  if is_int(value):
    value = (value,) * n
  if (not isinstance(value, Sequence) or len(value) != n
      or not all(is_int(v) and v >= 1 for v in value)):
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
  if is_int(padding):
    padding = (padding,) * n
  if not isinstance(padding, Sequence) or len(padding) != n:
    raise bad
  pairs = []
  for p in padding:
    pair = (p, p) if is_int(p) else p
    if (not isinstance(pair, Sequence) or len(pair) != 2
        or not all(is_int(v) and v >= 0 for v in pair)):
      raise bad
    pairs.append(tuple(pair))
  return tuple(pairs)


def spatial_dims(x: jax.Array, what: str, allowed=(1, 2, 3)) -> int:
  """Number of spatial axes of a channels-last input [N, *spatial, C]; ConfigError if not
  allowed."""
  n = x.ndim - 2
  if n not in allowed:
    shapes = " or ".join({1: "[N, L, C]", 2: "[N, H, W, C]", 3: "[N, D, H, W, C]"}[k]
                         for k in allowed)
    raise ConfigError(f"{what} expects channels-last input {shapes}; got shape {x.shape}.")
  return n


def channels_last_dims(n: int) -> tuple[str, str, str]:
  """lax.conv dimension numbers for `n` spatial axes, channels last: 2 -> NHWC, HWIO, NHWC."""
  if n not in (1, 2, 3):
    raise ConfigError(f"convolutions take 1, 2 or 3 spatial axes; got {n}.")
  spatial = "DHW"[3 - n:]
  return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


# ----------------------------------------------------------------------------------------------
# The options every block shares.

@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """How every conv/dense block of a model is built: the knobs cnnlab's ablations turn.

  bn_placement: `none` = layer (bias) -> act; `before_act` = layer (no bias) -> BN -> act (Ioffe
    & Szegedy); `after_act` = layer (bias) -> act -> BN.
  bn_convention: running-statistics convention of BatchNorm (`pytorch` | `flax`).
  dropout / dropout_rate: `none` | `standard` (element-wise) | `spatial` (whole channels) |
    `dropblock` (contiguous `dropblock_size` squares per channel), applied last in a block.
  activation: a name in ACTIVATIONS.
  conv_bias: None = a bias only where no BN directly follows (the usual choice); True/False force
    it (torchvision's VGG-BN keeps its conv biases).
  bn_epsilon: BatchNorm's epsilon; None = the model's default (BN_EPSILON = 1e-5; GoogLeNet 1e-3,
    as torchvision's).
  dtype: activation dtype (parameters stay float32).
  Frozen and hashable, so modules holding it stay hashable for jit caching.
  """
  bn_placement: str = "none"
  bn_convention: str = "pytorch"
  dropout: str = "none"
  dropout_rate: float = 0.0
  dropblock_size: int = 3
  activation: str = "relu"
  conv_bias: bool | None = None
  bn_epsilon: float | None = None
  dtype: Any = jnp.float32

  def check(self, prefix: str = "") -> None:
    """ConfigError naming `prefix + field` for the first bad option."""
    check_choice(f"{prefix}bn_placement", self.bn_placement, BN_PLACEMENTS)
    check_choice(f"{prefix}bn_convention", self.bn_convention, BN_CONVENTIONS)
    check_choice(f"{prefix}dropout", self.dropout, DROPOUT_KINDS)
    check_rate(f"{prefix}dropout_rate", self.dropout_rate)
    if not is_int(self.dropblock_size) or self.dropblock_size < 1:
      raise ConfigError(f"{prefix}dropblock_size={self.dropblock_size!r} must be a positive int.")
    check_choice(f"{prefix}activation", self.activation, tuple(ACTIVATIONS))
    if self.conv_bias not in (None, True, False):
      raise ConfigError(f"{prefix}conv_bias={self.conv_bias!r} is not allowed; choose one of: "
                        "None (automatic), True, False.")
    eps = self.bn_epsilon
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not 0 < eps < math.inf):
      raise ConfigError(f"{prefix}bn_epsilon={eps!r} is not allowed; use None (the model's "
                        "default) or a positive finite number.")

  @property
  def use_bn(self) -> bool:
    return self.bn_placement != "none"

  def layer_bias(self, bn_follows: bool) -> bool:
    """Whether a conv/dense layer gets a bias: forced by `conv_bias`, else not when BN follows."""
    return (not bn_follows) if self.conv_bias is None else self.conv_bias

  def act(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.activation](x)

  def norm(self, name: str | None = None) -> BatchNorm:
    epsilon = BN_EPSILON if self.bn_epsilon is None else self.bn_epsilon
    return BatchNorm(self.bn_convention, epsilon, dtype=self.dtype, name=name)

  def replace(self, **changes) -> BlockOptions:
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# BatchNorm.

def _channel_sum(x2d: jax.Array) -> jax.Array:
  """Column sums of x2d [M, C] -> [C] as the matrix product ones [M] @ x2d (XLA:CPU runs it as
  a GEMV), in full float32 precision whatever `jax_default_matmul_precision` says."""
  ones = jnp.ones((x2d.shape[0],), x2d.dtype)
  return jnp.dot(ones, x2d, precision=jax.lax.Precision.HIGHEST)


def _channel_mean(x2d: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean over the rows of x2d [M, C] -> [C], and over the devices of `axis_name`."""
  mean = _channel_sum(x2d) / x2d.shape[0]
  return mean if axis_name is None else jax.lax.pmean(mean, axis_name)


def _bn_forward(x, scale, bias, epsilon, axis_name):
  x2d = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  mean = _channel_mean(x2d, axis_name)
  var = _channel_mean(jnp.square(x2d - mean), axis_name)  # Two-pass: exact for large means too.
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x2d - mean) * (scale * inv) + bias
  return (y.reshape(x.shape), mean, var), (x, mean, inv, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm: x [..., C] (any float dtype) -> (y float32 [..., C], batch mean
  [C], biased batch variance [C]), statistics over every axis but the last (and over the devices
  of `axis_name`).

  y = (x - mean) / sqrt(var + epsilon) * scale + bias. Its VJP is the closed form (Ioffe &
  Szegedy 2015, section 3), with xhat = (x - mean) * inv and inv = 1/sqrt(var + epsilon):
    dx = scale * inv * (dy - mean(dy) - xhat * mean(dy * xhat)) + dmean / M + 2 dvar (x - mean) / M
  (M = reduced elements), dscale = sum(dy * xhat), dbias = sum(dy): two per-channel sums and one
  elementwise pass, where autodiff of the formula stores and re-reads several [..., C] tensors.
  """
  return _bn_forward(x, scale, bias, epsilon, axis_name)[0]


def _bn_backward(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  dy, dmean, dvar = cotangents
  x2d = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  dy2d = dy.reshape(x2d.shape).astype(jnp.float32)
  xhat = (x2d - mean) * inv
  local = x2d.shape[0]
  dbias, dscale = _channel_sum(dy2d), _channel_sum(dy2d * xhat)
  gain = scale * inv
  # dx = gain * dy - slope * xhat - shift; per device, then averaged over `axis_name`.
  shift = gain * dbias / local - dmean / local
  slope = gain * dscale / local - 2 * dvar / (inv * local)
  if axis_name is not None:
    shift, slope = jax.lax.pmean((shift, slope), axis_name)
  dx = gain * dy2d - slope * xhat - shift
  return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_bn_forward, _bn_backward)


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last: x [..., C] -> [..., C] (NHWC: stats over N,H,W).

  Params `scale`, `bias` [C]; running `mean`, `var` [C] in `batch_stats`. Training uses the batch
  mean and biased batch variance (`batch_norm_train`, closed-form gradient) and updates the
  running stats (not during `init`); eval uses the running stats. `convention`:
    flax:    ra = 0.99 ra + 0.01 batch, running variance biased;
    pytorch: ra = 0.9 ra + 0.1 batch, running variance unbiased (x N/(N-1), N = reduced elements
             per channel; N = 1 leaves the biased value, where PyTorch raises).
  Statistics are computed in float32 whatever `dtype` (the output dtype) is. With `axis_name`
  set, statistics are averaged over that mapped axis (pmap / shard_map); under plain `jit` the
  batch statistics are global already.
  """
  convention: str = "pytorch"
  epsilon: float = BN_EPSILON
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
    if not train:
      mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
      return ((x.astype(jnp.float32) - ra_mean.value) * mul + bias).astype(self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, float(self.epsilon), self.axis_name)
    if not self.is_initializing():
      n = x.size // c
      if self.axis_name is not None:
        n = n * jax.lax.psum(1, self.axis_name)
      momentum, unbiased = _BN_MOMENTUM[self.convention]
      batch_var = var * (n / (n - 1)) if unbiased and n > 1 else var
      ra_mean.value = momentum * ra_mean.value + (1 - momentum) * mean
      ra_var.value = momentum * ra_var.value + (1 - momentum) * batch_var
    return y.astype(self.dtype)
