"""What every block shares: option names and their checks, `BlockOptions`, BatchNorm.

Layout is channels-last throughout ([N, *spatial, C]; NHWC for images). `dtype` is the activation
dtype; parameters are always float32. Bad option values raise `ConfigError` when the module is
called (or the function runs), naming the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from cnnlab.errors import ConfigError

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
  """Number of spatial axes of a channels-last input [N, *spatial, C]; ConfigError if not allowed."""
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
                            or not eps > 0):
      raise ConfigError(f"{prefix}bn_epsilon={eps!r} is not allowed; use None (the model's "
                        "default) or a positive number.")

  @property
  def use_bn(self) -> bool:
    return self.bn_placement != "none"

  def layer_bias(self, bn_follows: bool) -> bool:
    """Whether a conv/dense layer gets a bias: forced by `conv_bias`, else not when BN follows."""
    return (not bn_follows) if self.conv_bias is None else self.conv_bias

  def act(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.activation](x)

  def norm(self, name: str | None = None) -> "BatchNorm":
    epsilon = BN_EPSILON if self.bn_epsilon is None else self.bn_epsilon
    return BatchNorm(self.bn_convention, epsilon, dtype=self.dtype, name=name)

  def replace(self, **changes) -> "BlockOptions":
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# BatchNorm.

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
