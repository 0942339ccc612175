"""Pieces every model family shares: the stem choice for small vs ImageNet-sized inputs, the
float32 classifier layer, and checks of model-specific config fields."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers

# `imagenet`: the paper's stem for 224x224 inputs (large strided kernels, early pooling);
# `small`: a 3x3 stride-1 stem without early pooling (the usual CIFAR adaptation), so 8x8-32x32
# inputs keep their resolution; `auto`: imagenet when the smaller input side is >= 64.
STEMS = ("auto", "imagenet", "small")
LARGE_INPUT = 64


def imagenet_stem(stem: str, x: jax.Array) -> bool:
  """Whether a model with `stem` uses its ImageNet stem on input x [N,H,W,C]."""
  layers.check_choice("model.stem", stem, STEMS)
  return stem == "imagenet" or (stem == "auto" and min(x.shape[1:-1]) >= LARGE_INPUT)


def logits(num_classes: int, x: jax.Array, name: str = "head") -> jax.Array:
  """The final Dense layer, computed and returned in float32: x [N, F] -> [N, num_classes]."""
  return nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name=name)(
      x.astype(jnp.float32))


def flatten(x: jax.Array) -> jax.Array:
  """[N, ...] -> [N, prod(...)]."""
  return x.reshape(x.shape[0], -1)


def check_widths(key: str, widths, allow_empty: bool = True) -> tuple[int, ...]:
  """A tuple of positive ints (layer widths), or ConfigError naming `key`."""
  widths = tuple(widths) if isinstance(widths, (tuple, list)) else widths
  if (not isinstance(widths, tuple) or (not widths and not allow_empty)
      or not all(layers.is_int(w) and w >= 1 for w in widths)):
    raise ConfigError(f"{key}={widths!r} must be a tuple of positive ints.")
  return widths
