"""A conv with few input channels as a sum of shifted views (XLA:CPU's own kernel is slow there).

XLA:CPU runs a conv whose input has one or a few channels (a net's first layer on MNIST) at a few
GFLOP/s: the main job's 1->16 3x3 conv on [64,28,28,1] took 1.35 ms on one core, ~13% of its
train step. Written as one elementwise sum over the kernel's taps,

  y[n, p, o] = sum_{k, c} x_padded[n, p + k*dilation, c] * W[k, c, o],

XLA fuses it into a single loop vectorised over the output channels: 0.125 ms. Its own gradient
would be slow, so the backward pass is `lax.conv_general_dilated`'s VJP (dx and dW exactly as
without this module; XLA drops dx where the input needs no gradient, e.g. the image).
Values differ from XLA's conv only in float rounding (summation order, ~1e-6 relative).

`conv_general_dilated` has lax's signature (pass it to `nn.Conv(conv_general_dilated=...)`). It
takes the sum only where measured faster: the default backend is CPU, channels-last layout,
one group, no input dilation, stride 1 and at most `MAX_TAPS` kernel taps x input channels
(3x3 or 5x5 on one channel); everything else is exactly `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cnnlab.nets.layers.core import channels_last_dims

# Kernel taps x input channels up to which the sum is taken. Measured on this repository's 2-core
# CPU, float32, forward alone: 3x3x1 on [64,28,28] 1.35 -> 0.12 ms (one thread), 5x5x1 on
# [64,32,32] 2.9 -> 0.34 ms, 3x3x4 2.0 -> 0.96 ms, but 3x3x8 1.6 -> 2.9 ms and 5x5x3 3.9 -> 4.0 ms.
# In whole train steps the 3x3x3 CIFAR stems lost: VGG-small 4% and ResNet-20 15% slower, as XLA
# fuses (recomputes) the sum into the next conv's weight-gradient transposes, and XLA:CPU drops
# an optimization_barrier before fusion, so it cannot be stopped from here.
MAX_TAPS = 25


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """`jax.lax.conv_general_dilated` (same signature, same result up to float rounding).

  lhs [N, *S, C] and rhs [*K, C, O] in channels-last layout take the sum of shifted views when
  `takes_taps` says so; every other call is passed to lax unchanged.
  """
  args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, precision, preferred_element_type)
  if not takes_taps(lhs, rhs, *args):
    return lax.conv_general_dilated(lhs, rhs, *args)
  n = lhs.ndim - 2
  dilation = tuple(rhs_dilation or (1,) * n)
  window = tuple((k - 1) * d + 1 for k, d in zip(rhs.shape[:n], dilation))
  pads = (lax.padtype_to_pads(lhs.shape[1:-1], window, window_strides, padding)
          if isinstance(padding, str) else padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if any(size + lo + hi < k for size, (lo, hi), k in zip(lhs.shape[1:-1], pads, window)):
    return lax.conv_general_dilated(lhs, rhs, *args)   # An empty output: lax's own error.
  return _tap_conv((pads, dilation, precision), lhs, rhs)


def takes_taps(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, precision,
               preferred_element_type) -> bool:
  """Whether `conv_general_dilated` computes this conv as a sum of shifted views."""
  n = lhs.ndim - 2
  if jax.default_backend() != "cpu" or n not in (1, 2, 3) or rhs.ndim != lhs.ndim:
    return False
  if (feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None
      or any(d != 1 for d in (lhs_dilation or ())) or any(s != 1 for s in window_strides)):
    return False
  if dimension_numbers is None:
    return False   # lax's default layout is NCHW/OIHW.
  channels_last = lax.conv_dimension_numbers(lhs.shape, rhs.shape, channels_last_dims(n))
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != channels_last:
    return False
  return math.prod(rhs.shape[:-1]) <= MAX_TAPS


def _lax_conv(geometry, lhs, rhs):
  pads, dilation, precision = geometry
  n = lhs.ndim - 2
  return lax.conv_general_dilated(lhs, rhs, (1,) * n, pads, rhs_dilation=dilation,
                                  dimension_numbers=channels_last_dims(n), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap_conv(geometry, lhs, rhs):
  return _taps(geometry, lhs, rhs)


def _taps(geometry, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """sum over taps k and channels c of the view x_padded[:, k*dilation + out, c] [N, *S', 1]
  times rhs[k, c] [O], accumulated in float32 (or wider) and cast back to lhs's dtype."""
  pads, dilation, _ = geometry
  acc = jnp.promote_types(lhs.dtype, jnp.float32)
  x = lax.pad(lhs.astype(acc), jnp.zeros((), acc),
              ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
  kernel, channels = rhs.shape[:-2], rhs.shape[-2]
  out = [size - (k - 1) * d for size, k, d in zip(x.shape[1:-1], kernel, dilation)]
  y = None
  for offset in itertools.product(*(range(k) for k in kernel)):
    start = [o * d for o, d in zip(offset, dilation)]
    for c in range(channels):
      view = lax.slice(x, (0, *start, c), (x.shape[0], *(s + o for s, o in zip(start, out)), c + 1))
      term = view * rhs[offset + (c,)].astype(acc)
      y = term if y is None else y + term
  y = y.astype(lhs.dtype)
  # y itself, NaN for NaN: a select, which YNNPACK cannot fuse, so XLA stores the sum. Without
  # it, in an eval step (BN as an affine map), XLA:CPU hands the nine views, BN, ReLU and a
  # following max pool to one YNNPACK reduction, which broadcasts every view to the output's
  # size: the ablation net's evaluation ran 3x slower than with XLA's conv.
  return lax.select(y == y, y, jnp.full_like(y, jnp.nan))


def _tap_conv_fwd(geometry, lhs, rhs):
  return _taps(geometry, lhs, rhs), (lhs, rhs)


def _tap_conv_bwd(geometry, residuals, dy):
  lhs, rhs = residuals
  _, vjp = jax.vjp(functools.partial(_lax_conv, geometry), lhs, rhs)
  return vjp(dy)


_tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)
