"""Dropout kinds: element-wise, spatial (whole channels) and DropBlock (contiguous regions).

RNG streams: `dropout` (element-wise), `channel_dropout` (spatial and DropBlock).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.base.errors import ConfigError
from cnnlab.nets.layers.core import DROPOUT_KINDS, check_choice, check_rate, is_int


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
  """bool [*shape]: each element True with probability `keep_prob` (to 2^-32), independently.

  A counter-based hash of each element's flat index i under two 32-bit words (k0, k1) drawn from
  `key` (threefry): h = fmix(fmix(i ^ k0) ^ k1), with fmix murmur3's 32-bit finaliser (a
  bijection with full avalanche), and keep iff h < round(keep_prob * 2^32). Why not
  `jax.random.bernoulli`: it runs threefry for every element, ~4 ns each on XLA:CPU, which was 7
  of the ~16 ms of the ablation net's train step with standard dropout; this costs ~0.3 ns.
  Same key, same mask; tests/test_layers.py checks the keep rate and the independence of
  neighbours and of successive keys.
  """
  size = math.prod(shape)
  if size >= 2**32:
    raise ConfigError(f"a dropout mask of {size} elements is past the 2^32 the hash counts.")
  threshold = round(keep_prob * 2**32)
  if threshold >= 2**32:
    return jnp.ones(shape, bool)
  k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
  h = _fmix32(_fmix32(jax.lax.iota(jnp.uint32, size).reshape(shape) ^ k0) ^ k1)
  return h < jnp.uint32(threshold)


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's finaliser: a uint32 bijection whose every output bit depends on every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def dropblock_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float,
                        block_size: int) -> jax.Array:
  """DropBlock's keep mask (Ghiasi et al. 2018, Algorithm 1): float32 [N, *spatial, C], 1 = keep.

  Block centres are drawn independently per (example, channel) with probability
  gamma = rate / b^d * prod(S) / prod(S - b + 1)   (d spatial axes of sizes S, block side b),
  only where the whole block fits; each centre zeroes the b^d block around it, so about `rate`
  of the units are dropped (less when blocks overlap). b is clipped to each axis' size.
  """
  spatial = shape[1:-1]
  b = tuple(min(block_size, s) for s in spatial)
  valid = math.prod(s - k + 1 for s, k in zip(spatial, b))
  gamma = min(1.0, rate / math.prod(b) * math.prod(spatial) / valid)
  seeds = keep_mask(key, shape, gamma)
  for axis, (s, k) in enumerate(zip(spatial, b), start=1):
    pos = jnp.arange(s).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    seeds = seeds & (pos >= k // 2) & (pos <= s - k + k // 2)
  blocks = jax.lax.reduce_window(
      seeds.astype(jnp.float32), 0.0, jax.lax.max, (1, *b, 1), (1,) * len(shape),
      ((0, 0), *((k - 1 - k // 2, k // 2) for k in b), (0, 0)))
  return 1.0 - blocks


class Dropout(nn.Module):
  """Dropout of kind `none`, `standard`, `spatial` or `dropblock`; x [N, ..., C] -> same shape.

  `standard` draws from the `dropout` stream, one decision per element, survivors x 1/(1-rate).
  `spatial` draws from `channel_dropout`, one decision per (example, channel) shared over all
  spatial axes (NHWC: as PyTorch's Dropout2d), survivors x 1/(1-rate). `dropblock` draws from
  `channel_dropout` and zeroes `block_size`-sided blocks per (example, channel)
  (`dropblock_keep_mask`), scaling by count(mask)/count_ones(mask) as the paper does. On a 2-D
  [N, C] input each channel is a single element, so `spatial` and `dropblock` drop single units.
  Identity when `train` is False or `rate` is 0.
  """
  kind: str = "none"
  rate: float = 0.0
  block_size: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_choice("dropout", self.kind, DROPOUT_KINDS)
    check_rate("dropout_rate", self.rate)
    if not is_int(self.block_size) or self.block_size < 1:
      raise ConfigError(f"dropblock_size={self.block_size!r} must be a positive int.")
    if self.kind == "none" or not train or self.rate == 0:
      return x
    if self.kind == "dropblock" and x.ndim > 2:
      keep = dropblock_keep_mask(self.make_rng("channel_dropout"), x.shape, self.rate,
                                 self.block_size)
      scale = keep.size / jnp.maximum(keep.sum(), 1.0)
      return (x.astype(jnp.float32) * (keep * scale)).astype(x.dtype)
    keep_prob = 1.0 - self.rate
    if self.kind == "standard":
      keep = keep_mask(self.make_rng("dropout"), x.shape, keep_prob)
    else:  # spatial (and dropblock on [N, C]): one decision per (example, channel).
      shape = (x.shape[0], *(1,) * (x.ndim - 2), x.shape[-1])
      keep = jnp.broadcast_to(keep_mask(self.make_rng("channel_dropout"), shape, keep_prob),
                              x.shape)
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))  # As flax's nn.Dropout.
