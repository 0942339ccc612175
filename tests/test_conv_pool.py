"""Tests for conv and pooling beyond 2-D basics: 1-D/3-D, groups, dilation, bias, blur and
adaptive pooling, translation equivariance, and "a conv with kernel = input size is a dense
layer" (seed 001). Expected numbers are worked out by hand in the comments.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_helpers import KEY, conv_block, eval_apply, init_np, normal

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers


def _shape(block, x, train=False):
  return jax.eval_shape(lambda: block.init_with_output(
      {"params": KEY, "channel_dropout": KEY, "dropout": KEY}, x, train=train)[0]).shape


@pytest.mark.parametrize("shape, kernel, strides, padding, expected", [
    ((2, 10, 3), 3, 2, 1, (2, 5, 4)),                 # 1-D: (10 + 2 - 3) // 2 + 1 = 5.
    ((2, 9, 3), (4,), 1, "VALID", (2, 6, 4)),         # 9 - 4 + 1.
    ((1, 4, 6, 6, 2), 3, 1, "SAME", (1, 4, 6, 6, 4)),  # 3-D, SAME keeps D, H, W.
    ((1, 4, 6, 6, 2), (1, 3, 3), (1, 2, 2), 0, (1, 4, 2, 2, 4)),
])
def test_conv_block_1d_and_3d_with_bn_and_dropout(shape, kernel, strides, padding, expected):
  block = conv_block(4, kernel_size=kernel, strides=strides, padding=padding,
                     bn_placement="before_act", dropout="spatial", dropout_rate=0.5)
  assert _shape(block, jnp.ones(shape)) == expected
  assert _shape(block, jnp.ones(shape), train=True) == expected


def test_conv_block_rejects_4d_spatial_and_table_on_1d():
  with pytest.raises(ConfigError, match=r"\[N, H, W, C\]"):
    _shape(conv_block(2), jnp.ones((1, 2, 2, 2, 2, 1)))
  with pytest.raises(ConfigError, match="shape"):
    _shape(conv_block(1, connections=((0,),)), jnp.ones((1, 5, 1)))


def test_groups_split_channels():
  x = normal(1, 3, 3, 4)
  block = conv_block(6, kernel_size=1, groups=2, activation="identity")
  variables = init_np(block, x, train=False)
  assert variables["params"]["conv"]["kernel"].shape == (1, 1, 2, 6)   # C/groups = 2 inputs.
  y = np.asarray(eval_apply(block, variables, x))
  x2 = x.at[..., 3].add(100.0)                 # Input channel 3 is in group 1 ...
  y2 = np.asarray(eval_apply(block, variables, x2))
  np.testing.assert_array_equal(y[..., :3], y2[..., :3])   # ... so outputs 0-2 don't see it.
  assert np.abs(y[..., 3:] - y2[..., 3:]).min() > 0
  with pytest.raises(ConfigError, match="groups=3"):
    _shape(conv_block(6, groups=3), x)


def test_dilation_by_hand():
  # 1-D, kernel [a, b, c] dilated by 2: y[i] = a x[i] + b x[i+2] + c x[i+4]; 7 - 5 + 1 = 3 outputs.
  x = jnp.arange(1.0, 8.0).reshape(1, 7, 1)
  block = conv_block(1, kernel_size=3, dilation=2, padding="VALID", activation="identity")
  params = {"conv": {"kernel": jnp.array([1.0, 10.0, 100.0]).reshape(3, 1, 1),
                     "bias": jnp.zeros(1)}}
  y = eval_apply(block, {"params": params}, x)
  # i=0: 1 + 30 + 500; i=1: 2 + 40 + 600; i=2: 3 + 50 + 700.
  np.testing.assert_allclose(y[0, :, 0], [531.0, 642.0, 753.0])


def test_bias_on_off():
  x = jnp.ones((1, 4, 4, 2))
  params = lambda block: init_np(block, x, train=False)["params"]["conv"]
  assert "bias" in params(conv_block(3))
  assert "bias" not in params(conv_block(3, use_bias=False))
  assert "bias" not in params(conv_block(3, bn_placement="before_act"))
  assert "bias" in params(conv_block(3, bn_placement="before_act", use_bias=True))
  assert "bias" in params(conv_block(3, bn_placement="before_act", conv_bias=True))


def test_conv_with_kernel_equal_to_input_is_a_dense_layer():
  """Seed 001: a conv whose kernel covers the whole 3x3x4 input computes Dense(36 -> 5) on the
  flattened input, weight for weight; and a 2x2x1 image is a 1x1 image with 4 channels."""
  x = normal(2, 3, 3, 4)
  w, b = np.asarray(normal(36, 5)), np.asarray(normal(5))
  dense = nn.Dense(5).apply({"params": {"kernel": w, "bias": b}}, x.reshape(2, 36))
  conv = nn.Conv(5, (3, 3), padding="VALID").apply(
      {"params": {"kernel": w.reshape(3, 3, 4, 5), "bias": b}}, x)
  assert conv.shape == (2, 1, 1, 5)
  np.testing.assert_allclose(conv[:, 0, 0], dense, rtol=1e-5, atol=1e-5)
  img = normal(2, 2, 2, 1)
  k = np.asarray(normal(2, 2, 1, 3))
  conv2x2 = nn.Conv(3, (2, 2), padding="VALID", use_bias=False).apply({"params": {"kernel": k}},
                                                                       img)
  conv1x1 = nn.Conv(3, (1, 1), use_bias=False).apply({"params": {"kernel": k.reshape(1, 1, 4, 3)}},
                                                      img.reshape(2, 1, 1, 4))
  np.testing.assert_allclose(conv2x2, conv1x1, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Pooling.

def test_pooling_1d_and_3d_int_or_tuple():
  x = jnp.arange(8.0).reshape(1, 8, 1)
  np.testing.assert_array_equal(layers.max_pool(x, 2)[0, :, 0], [1, 3, 5, 7])
  np.testing.assert_array_equal(layers.avg_pool(x, (4,), 2)[0, :, 0], [1.5, 3.5, 5.5])
  x3 = jnp.arange(64.0).reshape(1, 4, 4, 4, 1)
  assert layers.max_pool(x3, (2, 2, 2)).shape == (1, 2, 2, 2, 1)
  assert float(layers.max_pool(x3, 2)[0, 0, 0, 0, 0]) == 21.0   # max of x[0:2, 0:2, 0:2] = 16+4+1.
  assert layers.avg_pool(x3, (1, 2, 2), (1, 2, 2)).shape == (1, 4, 2, 2, 1)
  assert layers.global_avg_pool(x3).shape == (1, 1)


def test_blur_pool_by_hand():
  x = jnp.array([0., 0., 0., 1., 0., 0., 0., 0.]).reshape(1, 8, 1)
  # 3 taps (1, 2, 1)/4, reflect pad 1 each side, stride 2: outputs centred on 0, 2, 4, 6:
  # centre 2 sees x[1:4] = (0, 0, 1) -> 1/4; centre 4 sees x[3:6] = (1, 0, 0) -> 1/4.
  np.testing.assert_allclose(layers.blur_pool(x, 2, 3)[0, :, 0], [0, .25, .25, 0])
  # 4 taps (1, 3, 3, 1)/8, pad (1, 2): output p sees x[2p-1 : 2p+3]: p=1 -> (0, 0, 1, 0) = 3/8;
  # p=2 -> (1, 0, 0, 0) = 1/8.
  np.testing.assert_allclose(layers.blur_pool(x, 2, 4)[0, :, 0], [0, .375, .125, 0])
  assert layers.binomial_filter(5) == (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def test_max_blur_pool_by_hand_and_shape():
  x = jnp.array([1., 3., 2., 5., 4., 0., 0., 0.]).reshape(1, 8, 1)
  # Max over 2 at stride 1: (3, 3, 5, 5, 4, 0, 0); reflect pad (1, 2): (3 | 3 3 5 5 4 0 0 | 0 4);
  # (1, 3, 3, 1)/8 at 0, 2, 4, 6: (3+9+9+5)/8, (3+15+15+4)/8, (5+12+0+0)/8, (0+0+0+4)/8.
  y = layers.Pool("blur", 2).apply({}, x)
  np.testing.assert_allclose(y[0, :, 0], [3.25, 4.625, 2.125, 0.5])
  for hw in (7, 8, 32):   # Same output size as the max pool it replaces.
    x2 = jnp.ones((1, hw, hw, 2))
    assert layers.Pool("blur", 2).apply({}, x2).shape == layers.max_pool(x2, 2).shape
    assert (layers.Pool("blur", 3, 2, 1).apply({}, x2).shape
            == layers.max_pool(x2, 3, 2, 1).shape)


def test_blur_pool_is_more_shift_stable_than_max_pool():
  """Zhang 2019's point: a one-pixel shift of the input changes a blur-pooled output less."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 8)), jnp.float32)
  shifted = jnp.roll(x, 1, axis=2)

  def change(kind):
    pool = layers.Pool(kind, 2)
    a, b = pool.apply({}, x), pool.apply({}, shifted)
    return float(jnp.abs(a - b)[:, 4:-4, 4:-4].mean() / jnp.abs(a).mean())
  assert change("blur") < 0.7 * change("max")


def test_adaptive_avg_pool_by_hand():
  x = jnp.arange(1.0, 6.0).reshape(1, 5, 1)
  # 5 -> 3 bins: [0, 2), [1, 4), [3, 5) -> 1.5, 3, 4.5 (PyTorch's rule).
  np.testing.assert_allclose(layers.adaptive_avg_pool(x, 3)[0, :, 0], [1.5, 3.0, 4.5])
  # 2 -> 4 repeats each input twice.
  np.testing.assert_allclose(layers.adaptive_avg_pool(x[:, :2], 4)[0, :, 0], [1, 1, 2, 2])
  y = normal(2, 7, 7, 3)
  assert layers.adaptive_avg_pool(y, 7) is y
  np.testing.assert_allclose(layers.adaptive_avg_pool(y, 1)[:, 0, 0],
                             layers.global_avg_pool(y), rtol=1e-5, atol=1e-6)


def test_pool_fit_small_skips_short_axes():
  x = jnp.ones((1, 1, 6, 2))
  assert layers.Pool("max", 2, fit_small=True).apply({}, x).shape == (1, 1, 3, 2)
  with pytest.raises(ConfigError, match="pool='median'"):
    layers.Pool("median", 2).apply({}, x)


# ----------------------------------------------------------------------------------------------
# Translation equivariance (lecture seed 004): shift then op == op then shift, away from borders.

def _shift(x, pixels, axis=1):
  return jnp.roll(x, pixels, axis=axis)


_K3, _K5 = np.asarray(normal(3, 3, 3, 4)), np.asarray(normal(5, 5, 3, 4))


@pytest.mark.parametrize("op, margin", [
    (lambda x: nn.Conv(4, (3, 3), padding="SAME").apply(
        {"params": {"kernel": _K3, "bias": np.zeros(4)}}, x), 2),
    (lambda x: nn.Conv(4, (5, 5), padding="SAME", kernel_dilation=2).apply(
        {"params": {"kernel": _K5, "bias": np.zeros(4)}}, x), 10),
    (lambda x: layers.max_pool(x, 3, 1, "SAME"), 2),
    (lambda x: layers.avg_pool(x, 3, 1, "SAME"), 2),
])
def test_conv_and_pool_are_translation_equivariant(op, margin):
  x = normal(1, 24, 24, 3)
  for pixels, axis in ((2, 1), (-3, 2)):
    a = op(_shift(x, pixels, axis))
    b = _shift(op(x), pixels, axis)
    inner = (slice(None), slice(margin + 3, -margin - 3), slice(margin + 3, -margin - 3))
    np.testing.assert_allclose(a[inner], b[inner], rtol=1e-5, atol=1e-5)
  # Not trivially: the output does change when the input moves.
  assert float(jnp.abs(op(_shift(x, 2)) - op(x)).max()) > 0.1


def test_strided_pool_is_equivariant_to_shifts_by_its_stride():
  x = normal(1, 24, 24, 3)
  a = layers.max_pool(_shift(x, 4), 2)              # Shift by 2 strides in ...
  b = _shift(layers.max_pool(x, 2), 2)              # ... is a shift by 2 pixels out.
  np.testing.assert_array_equal(a[:, 3:-3], b[:, 3:-3])
