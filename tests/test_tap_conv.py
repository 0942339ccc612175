"""Tests for cnnlab.nets.layers.tap_conv: the sum-of-shifted-views conv against lax's conv.

The forward pass must equal `lax.conv_general_dilated` up to float rounding, the gradients must be
lax's own bit for bit (the backward pass is lax's VJP), and every conv outside the fast case must
be lax's call unchanged.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnlab.nets import layers
from cnnlab.nets.layers import tap_conv

NHWC = {n: layers.channels_last_dims(n) for n in (1, 2, 3)}


def _data(spatial, channels, kernel, features=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, *spatial, channels)).astype(np.float32)
  w = rng.normal(size=(*kernel, channels, features)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w)


def _both(x, w, padding="SAME", dilation=None, strides=None):
  n = x.ndim - 2
  kwargs = dict(window_strides=strides or (1,) * n, padding=padding, rhs_dilation=dilation,
                dimension_numbers=NHWC[n])
  return (tap_conv.conv_general_dilated(x, w, **kwargs), lax.conv_general_dilated(x, w, **kwargs))


@pytest.mark.parametrize("spatial,channels,kernel,padding,dilation", [
    ((9, 8), 1, (3, 3), "SAME", None),
    ((9, 8), 1, (3, 3), "VALID", None),
    ((10, 10), 1, (5, 5), ((2, 2), (2, 2)), None),
    ((10, 10), 1, (5, 5), ((0, 3), (1, -1)), None),      # asymmetric and negative (crop) pads
    ((9, 9), 2, (3, 3), "SAME", (2, 1)),                  # dilation, two channels (18 taps)
    ((11,), 3, (5,), "SAME", None),                       # 1-D
    ((5, 6, 4), 1, (3, 3, 2), "SAME", None),              # 3-D
])
def test_forward_equals_lax_conv(spatial, channels, kernel, padding, dilation):
  x, w = _data(spatial, channels, kernel)
  n = len(spatial)
  assert tap_conv.takes_taps(x, w, (1,) * n, padding, None, dilation, NHWC[n], 1, 1, None, None)
  ours, theirs = _both(x, w, padding, dilation)
  assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_gradients_are_lax_bit_for_bit():
  """With a fixed cotangent g, d/dx and d/dW of sum(conv(x, W) * g) are lax's VJP exactly."""
  x, w = _data((8, 7), 1, (3, 3))
  g = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 7, 5)).astype(np.float32))
  conv = lambda fn: lambda x, w: jnp.sum(
      fn(x, w, (1, 1), "SAME", dimension_numbers=NHWC[2]) * g)
  ours = jax.jit(jax.grad(conv(tap_conv.conv_general_dilated), argnums=(0, 1)))(x, w)
  theirs = jax.jit(jax.grad(conv(lax.conv_general_dilated), argnums=(0, 1)))(x, w)
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


def test_vmapped_gradient_matches_lax():
  """Seeds run vmapped: a batch of kernels through jax.vmap(jax.grad(...))."""
  x, _ = _data((6, 6), 1, (3, 3))
  ws = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 3, 1, 4)).astype(np.float32))
  loss = lambda fn: lambda w: jnp.sum(fn(x, w, (1, 1), "SAME", dimension_numbers=NHWC[2]) ** 2)
  ours = jax.vmap(jax.grad(loss(tap_conv.conv_general_dilated)))(ws)
  theirs = jax.vmap(jax.grad(loss(lax.conv_general_dilated)))(ws)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_bfloat16_accumulates_in_float32():
  x, w = _data((8, 8), 1, (5, 5))
  ours, _ = _both(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  _, exact = _both(x.astype(jnp.bfloat16).astype(jnp.float32),
                   w.astype(jnp.bfloat16).astype(jnp.float32))
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(ours, exact.astype(jnp.bfloat16))


@pytest.mark.parametrize("change", ["channels", "strides", "groups", "lhs_dilation", "nchw",
                                    "preferred_element_type"])
def test_other_convs_are_lax_unchanged(change):
  """Outside the fast case the call goes to lax as it is: the same bits, the same checks."""
  channels = 3 if change == "channels" else (2 if change == "groups" else 1)
  x, w = _data((8, 8), channels, (3, 3))
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC[2])
  if change == "groups":
    w, kwargs["feature_group_count"] = w[:, :, :1, :4], 2
  if change == "strides":
    kwargs["window_strides"] = (2, 1)
  if change == "lhs_dilation":
    kwargs["lhs_dilation"], kwargs["padding"] = (2, 2), ((1, 1), (1, 1))
  if change == "nchw":
    x, kwargs["dimension_numbers"] = x.transpose(0, 3, 1, 2), ("NCHW", "HWIO", "NCHW")
  if change == "preferred_element_type":
    kwargs["preferred_element_type"] = jnp.float32
  args = (x, w, kwargs.pop("window_strides"), kwargs.pop("padding"))
  assert not tap_conv.takes_taps(*args, kwargs.get("lhs_dilation"), None,
                                 kwargs["dimension_numbers"], kwargs.get("feature_group_count", 1),
                                 1, None, kwargs.get("preferred_element_type"))
  np.testing.assert_array_equal(tap_conv.conv_general_dilated(*args, **kwargs),
                                lax.conv_general_dilated(*args, **kwargs))


def test_an_empty_output_is_lax_own():
  """A window larger than the padded input: lax's empty result, not a slicing error."""
  x, w = _data((2, 2), 1, (3, 3))
  ours, theirs = _both(x, w, "VALID")
  assert ours.shape == theirs.shape == (2, 0, 0, 5)


def _hlo_ops(block, x):
  params = block.init(jax.random.key(0), x, train=False)
  fn = jax.jit(functools.partial(block.apply, train=False))
  return fn.lower(params, x).as_text()


def test_conv_block_on_one_channel_takes_the_sum():
  """A ConvBlock on an MNIST-like input runs no XLA convolution in its forward pass; on three
  channels (27 taps, past MAX_TAPS) it does."""
  block = layers.ConvBlock(16, options=layers.BlockOptions())
  assert "convolution" not in _hlo_ops(block, jnp.ones((2, 28, 28, 1)))
  assert "convolution" in _hlo_ops(block, jnp.ones((2, 28, 28, 3)))
  params = block.init(jax.random.key(0), jnp.ones((2, 28, 28, 1)), train=False)
  reference = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=True)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 28, 28, 1)).astype(np.float32))
  np.testing.assert_allclose(
      block.apply(params, x, train=False),
      jax.nn.relu(reference.apply({"params": params["params"]["conv"]}, x)), rtol=1e-5, atol=1e-5)


def test_the_sum_stays_out_of_ynnpack_fusions():
  """In an eval forward (BN an affine map) followed by a max pool, XLA:CPU fused the nine views,
  BN, ReLU and the pool into one YNNPACK reduction that took each view and tap as an operand
  (23 operands here) and ran 3x slower; the sum must reach YNNPACK as one stored array."""
  block = layers.ConvBlock(16, options=layers.BlockOptions(bn_placement="before_act"))
  x = jnp.ones((8, 28, 28, 1))
  variables = block.init(jax.random.key(0), x, train=False)
  forward = jax.jit(lambda v, x: layers.max_pool(block.apply(v, x, train=False), 2))
  text = forward.lower(variables, x).compile().as_text()
  for line in text.splitlines():
    if "__ynn_fusion" in line:
      operands = re.search(r"fusion\((.*?)\), kind", line).group(1)
      assert len(re.findall(r"%[\w.\-]+", operands)) < 9, line


def test_nan_and_inf_propagate_as_in_lax():
  x, w = _data((6, 6), 1, (3, 3))
  x = x.at[0, 2, 3, 0].set(jnp.nan).at[1, 0, 0, 0].set(jnp.inf)
  ours, theirs = _both(x, w)
  np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
  assert np.isnan(ours).sum() == 9 * 5
