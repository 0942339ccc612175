"""Helpers shared by the layer and model tests: cheap keys, numpy-filled variables, jitted
applies (compiling initialisers and threefry is slow on this CPU)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.nets import layers


def rng(seed: int) -> jax.Array:
  """Keys for tests: `unsafe_rbg` compiles in a fraction of threefry's time here."""
  return jax.random.key(seed, impl="unsafe_rbg")


KEY = rng(0)
NP = np.random.default_rng(0)


def normal(*shape):
  """Test data from numpy: no JAX random program to compile."""
  return jnp.asarray(NP.standard_normal(shape), jnp.float32)


def init_np(module, *args, **kwargs):
  """Variables of `module` without running its initialisers (slow to compile on this CPU):
  shapes from `jax.eval_shape`, BN at its initial state, other weights N(0, 0.5^2) from numpy."""
  shapes = jax.eval_shape(lambda: module.init(KEY, *args, **kwargs))

  def fill(path, s):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(s.shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(s.shape, np.float32)
    return (0.5 * NP.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _train_apply(module, variables, x, rngs):
  return module.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])


def train_apply(module, variables, x, rngs=None):
  """Train-mode apply, jitted once per (module, shapes): (y, {"batch_stats": ...})."""
  return _train_apply(module, variables, x, rngs or {})


@functools.partial(jax.jit, static_argnums=0)
def eval_apply(module, variables, x):
  """Eval-mode apply, jitted once per (module, shapes)."""
  return module.apply(variables, x, train=False)


_OPTION_FIELDS = {f.name for f in dataclasses.fields(layers.BlockOptions)}


def conv_block(features, **fields) -> layers.ConvBlock:
  """ConvBlock with BlockOptions fields given flat: conv_block(4, bn_placement="before_act")."""
  options = {k: fields.pop(k) for k in list(fields) if k in _OPTION_FIELDS}
  return layers.ConvBlock(features, options=layers.BlockOptions(**options), **fields)
