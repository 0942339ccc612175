"""Tests for cnnlab.nets.layers: dropout kinds, BatchNorm conventions, ConvBlock order, pooling.

Expected numbers are worked out by hand in the comments (seed 002's examples included).
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_helpers import KEY, NP, conv_block, eval_apply, init_np, normal, rng, train_apply

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers


def _positive(shape):
  """Distinct positive values 1, 2, 3, ... so a kept element is never 0."""
  return np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Dropout.

@functools.partial(jax.jit, static_argnames=("kind", "rate"))
def _dropout(x, rngs, kind, rate):
  """Train-mode Dropout, jitted once per (kind, rate, shape)."""
  return layers.Dropout(kind, rate).apply({}, x, train=True, rngs=rngs)


def test_spatial_dropout_drops_whole_channels_per_example():
  x = _positive((16, 4, 5, 8))
  y = np.asarray(_dropout(x, {"channel_dropout": rng(3)}, "spatial", 0.25))
  kept = np.zeros((16, 8), bool)
  for n in range(16):
    for c in range(8):
      s, xs = y[n, :, :, c], np.asarray(x[n, :, :, c])
      if np.all(s == 0):
        continue
      np.testing.assert_allclose(s, xs / 0.75, rtol=1e-6)  # Survivors scaled by 1 / (1 - p).
      kept[n, c] = True
  # About 75% of the 128 (example, channel) pairs survive (binomial sd ~ 4%).
  assert 0.55 < kept.mean() < 0.95
  # Different examples get different channel masks.
  assert len({tuple(row) for row in kept}) > 1
  # The masks come from the `channel_dropout` stream, not `dropout`.
  with pytest.raises(flax.errors.InvalidRngError, match="channel_dropout"):
    layers.Dropout("spatial", 0.25).apply({}, x, train=True, rngs={"dropout": rng(3)})


def test_standard_dropout_does_not_share_masks_within_a_channel():
  x = _positive((8, 4, 4, 4))
  y = np.asarray(_dropout(x, {"dropout": rng(5)}, "standard", 0.5))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] * 2.0, rtol=1e-6)
  per_channel = kept.transpose(0, 3, 1, 2).reshape(32, 16)  # (n, c) x (h, w)
  mixed = per_channel.any(axis=1) & ~per_channel.all(axis=1)
  assert mixed.sum() > 16  # Most (n, c) slices are part kept, part dropped.


@pytest.mark.parametrize("kind", layers.DROPOUT_KINDS)
def test_dropout_identity_in_eval_and_at_rate_zero(kind):
  x = _positive((2, 3, 3, 4))
  # No RNG streams given: none are drawn from.
  assert layers.Dropout(kind, 0.5).apply({}, x, train=False) is x
  assert layers.Dropout(kind, 0.0).apply({}, x, train=True) is x


def test_spatial_dropout_on_2d_is_elementwise():
  x = _positive((32, 8))
  y = np.asarray(_dropout(x, {"channel_dropout": rng(6)}, "spatial", 0.5))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] * 2.0)
  assert 0 < kept.sum() < kept.size


@pytest.mark.parametrize("keep_prob", [0.8, 0.5, 0.1])
def test_keep_mask_rate_and_independence(keep_prob):
  """layers.keep_mask (the hash every dropout kind draws from): the keep rate, and no
  dependence between neighbours, channels or successive keys, each within 5 binomial sd."""
  n = 64 * 28 * 28 * 16  # The ablation net's first activation: 802,816 decisions.
  key = jax.random.key(11)
  keep = np.asarray(layers.keep_mask(key, (64, 28, 28, 16), keep_prob)).reshape(-1)
  sd = np.sqrt(keep_prob * (1 - keep_prob) / n)
  assert abs(keep.mean() - keep_prob) < 5 * sd
  # P(both kept) of pairs at flat distance d (1 = next channel, 16 = next column, 448 = next row,
  # 12544 = next example) is keep_prob^2 as for independent draws.
  for d in (1, 2, 16, 448, 12544):
    both = (keep[:-d] & keep[d:]).mean()
    assert abs(both - keep_prob**2) < 5 * np.sqrt(keep_prob**2 * (1 - keep_prob**2) / (n - d))
  # Successive steps' keys (fold_in, as train.step_rngs) give independent masks; a key repeats.
  for step in (1, 2):
    other = np.asarray(layers.keep_mask(jax.random.fold_in(key, step), (64, 28, 28, 16),
                                        keep_prob)).reshape(-1)
    assert abs((keep & other).mean() - keep_prob**2) < 5 * np.sqrt(
        keep_prob**2 * (1 - keep_prob**2) / n)
  np.testing.assert_array_equal(keep, np.asarray(layers.keep_mask(key, (64, 28, 28, 16),
                                                                  keep_prob)).reshape(-1))


def test_keep_mask_edges():
  assert np.asarray(layers.keep_mask(jax.random.key(0), (3, 5), 1.0)).all()
  assert not np.asarray(layers.keep_mask(jax.random.key(0), (3, 5), 0.0)).any()


def test_dropout_bad_values():
  with pytest.raises(ConfigError, match="gaussian"):
    layers.Dropout("gaussian", 0.5).apply({}, jnp.ones((2, 2)), train=False)
  with pytest.raises(ConfigError, match="1.0"):
    layers.Dropout("standard", 1.0).apply({}, jnp.ones((2, 2)), train=False)


# ----------------------------------------------------------------------------------------------
# BatchNorm.

# x [2, 1, 2, 2]: channel 0 holds 1, 3, 5, 7; channel 1 holds 2, 2, 2, 6.
X_BN = np.array([[[[1., 2.], [3., 2.]]], [[[5., 2.], [7., 6.]]]])
# Channel 0: mean 4, biased var (9+1+1+9)/4 = 5, unbiased 20/3.
# Channel 1: mean 3, biased var (1+1+1+9)/4 = 3, unbiased 4.
# The second batch is 2 * X_BN: means 8, 6; biased vars 20, 12; unbiased 80/3, 16.


def _bn_updates(convention, batches):
  bn = layers.BatchNorm(convention)
  variables = jax.jit(lambda x: bn.init(KEY, x, train=True))(X_BN)
  # init does not update the running stats, even in train mode.
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], [0., 0.])
  np.testing.assert_array_equal(variables["batch_stats"]["var"], [1., 1.])
  stats = []
  for x in batches:
    _, upd = train_apply(bn, variables, x)
    variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    stats.append((np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd["batch_stats"]["var"])))
  return stats


def test_bn_pytorch_running_stats_by_hand():
  (m1, v1), (m2, v2) = _bn_updates("pytorch", [X_BN, 2 * X_BN])
  # ra = 0.9 ra + 0.1 batch, unbiased variance.
  np.testing.assert_allclose(m1, [0.4, 0.3], rtol=1e-6)                # 0.1 * [4, 3]
  np.testing.assert_allclose(v1, [1.5666667, 1.3], rtol=1e-6)          # 0.9 + 0.1 * [20/3, 4]
  np.testing.assert_allclose(m2, [1.16, 0.87], rtol=1e-6)              # 0.36 + 0.8, 0.27 + 0.6
  np.testing.assert_allclose(v2, [4.0766667, 2.77], rtol=1e-6)         # 1.41 + 8/3, 1.17 + 1.6


def test_bn_flax_running_stats_by_hand():
  (m1, v1), (m2, v2) = _bn_updates("flax", [X_BN, 2 * X_BN])
  # ra = 0.99 ra + 0.01 batch, biased variance.
  np.testing.assert_allclose(m1, [0.04, 0.03], rtol=1e-6)
  np.testing.assert_allclose(v1, [1.04, 1.02], rtol=1e-6)              # 0.99 + 0.01 * [5, 3]
  np.testing.assert_allclose(m2, [0.1196, 0.0897], rtol=1e-6)          # 0.0396 + 0.08, ...
  np.testing.assert_allclose(v2, [1.2296, 1.1298], rtol=1e-6)          # 1.0296 + 0.2, ...


def test_bn_training_output_by_hand():
  bn = layers.BatchNorm()
  y, _ = train_apply(bn, init_np(bn, X_BN, train=False), X_BN)
  # Channel 0: (x - 4) / sqrt(5) = [-3, -1, 1, 3] / 2.2360680.
  np.testing.assert_allclose(np.asarray(y[..., 0]).ravel(),
                             [-1.3416408, -0.4472136, 0.4472136, 1.3416408], rtol=1e-4)
  # Channel 1: (x - 3) / sqrt(3) = [-1, -1, -1, 3] / 1.7320508.
  np.testing.assert_allclose(np.asarray(y[..., 1]).ravel(),
                             [-0.5773503, -0.5773503, -0.5773503, 1.7320508], rtol=1e-4)


def test_bn_normalises_per_channel_over_n_h_w():
  x = normal(4, 5, 5, 3) * jnp.array([1., 10., 0.5]) + jnp.array([0., 5., -3.])
  bn = layers.BatchNorm()
  y, _ = train_apply(bn, init_np(bn, x, train=False), x)
  np.testing.assert_allclose(np.asarray(y).mean((0, 1, 2)), 0., atol=1e-5)
  np.testing.assert_allclose(np.asarray(y).var((0, 1, 2)), 1., atol=1e-3)


def test_bn_eval_uses_running_stats_and_does_not_update():
  bn = layers.BatchNorm()
  variables = {"params": {"scale": jnp.array([2., 1.]), "bias": jnp.array([0.5, 0.])},
               "batch_stats": {"mean": jnp.array([1., 2.]), "var": jnp.array([4., 0.25])}}
  y, upd = bn.apply(variables, X_BN, train=False, mutable=["batch_stats"])
  # Channel 0: 2 * (x - 1) / 2 + 0.5 = x - 0.5; channel 1: (x - 2) / 0.5.
  np.testing.assert_allclose(np.asarray(y[..., 0]).ravel(), [0.5, 2.5, 4.5, 6.5], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(y[..., 1]).ravel(), [0., 0., 0., 8.], atol=1e-3)
  np.testing.assert_array_equal(upd["batch_stats"]["mean"], [1., 2.])
  np.testing.assert_array_equal(upd["batch_stats"]["var"], [4., 0.25])


def test_bn_on_2d_and_bfloat16():
  x = jnp.array([[1., 2.], [3., 6.]], jnp.bfloat16)
  bn = layers.BatchNorm("pytorch", dtype=jnp.bfloat16)
  y, upd = train_apply(bn, init_np(bn, x, train=False), x)
  assert y.dtype == jnp.bfloat16
  assert upd["batch_stats"]["var"].dtype == jnp.float32
  # N = 2: means [2, 4]; biased vars [1, 4]; unbiased [2, 8].
  np.testing.assert_allclose(upd["batch_stats"]["mean"], [0.2, 0.4], rtol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], [1.1, 1.7], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32), [[-1., -1.], [1., 1.]], atol=1e-2)


def test_bn_bad_convention():
  with pytest.raises(ConfigError, match="'keras'.*flax, pytorch"):
    layers.BatchNorm("keras").init(KEY, X_BN, train=False)


# ----------------------------------------------------------------------------------------------
# ConvBlock.

def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: a.shape, tree)


def test_conv_block_param_tree_per_placement():
  x = jnp.ones((2, 6, 6, 3))
  tree = lambda p: _shapes(jax.eval_shape(
      lambda: conv_block(4, bn_placement=p).init(KEY, x, train=False)))
  assert tree("none") == {"params": {"conv": {"kernel": (3, 3, 3, 4), "bias": (4,)}}}
  assert tree("before_act") == {"params": {"conv": {"kernel": (3, 3, 3, 4)},
                                           "bn": {"scale": (4,), "bias": (4,)}},
                                "batch_stats": {"bn": {"mean": (4,), "var": (4,)}}}
  assert tree("after_act")["params"] == {"conv": {"kernel": (3, 3, 3, 4), "bias": (4,)},
                                         "bn": {"scale": (4,), "bias": (4,)}}


def test_conv_block_bn_order_functional():
  x = normal(8, 6, 6, 3)
  for placement in ("before_act", "after_act"):
    block = conv_block(4, bn_placement=placement)
    variables = init_np(block, x, train=False)
    variables["params"]["bn"]["bias"] = np.full((4,), 0.7, np.float32)
    y, _ = train_apply(block, variables, x)
    y = np.asarray(y)
    if placement == "before_act":   # BN (mean 0.7, var 1) then relu: clipped at exactly 0.
      assert y.min() == 0 and (y == 0).any()
      assert np.all(np.abs(y.mean((0, 1, 2)) - 0.7) > 0.05)
    else:                           # relu then BN: per-channel mean = bias, var = scale^2 = 1.
      np.testing.assert_allclose(y.mean((0, 1, 2)), 0.7, atol=1e-5)
      np.testing.assert_allclose(y.var((0, 1, 2)), 1.0, atol=1e-3)
      assert not (y == 0).any()


def test_conv_block_applies_dropout_last():
  x = jnp.ones((4, 5, 5, 2))
  block = conv_block(8, dropout="spatial", dropout_rate=0.5, activation="identity")
  variables = init_np(block, x, train=False)
  y, _ = train_apply(block, variables, x, {"channel_dropout": KEY})
  y, y_eval = np.asarray(y), np.asarray(eval_apply(block, variables, x))
  dropped = (y == 0).all(axis=(1, 2), keepdims=True)            # [4, 1, 1, 8]
  assert dropped.any() and not dropped.all()
  np.testing.assert_allclose(y, np.where(dropped, 0., 2 * y_eval), rtol=1e-5)


@pytest.mark.parametrize("field, value", [("bn_placement", "middle"), ("dropout", "gaussian"),
                                          ("bn_convention", "keras"), ("activation", "swish2"),
                                          ("dropout_rate", 1.5), ("padding", "FULL"),
                                          ("padding", -1), ("kernel_size", 0)])
def test_conv_block_bad_values(field, value):
  with pytest.raises(ConfigError, match=field) as err:
    conv_block(4, **{field: value}).init(KEY, jnp.ones((1, 4, 4, 1)), train=False)
  assert repr(value) in str(err.value) or str(value) in str(err.value)


# Seed 002's worked example: input 1x3x4 (C x H x W), kernel [[a, b], [c, d]], stride (1, 2).
# [[1..4], [5..8], [9..12]] in NHWC.
X_SEED = np.arange(1., 13., dtype=np.float32).reshape(1, 3, 4, 1)


def test_seed_002_convolution_stride_1_2():
  a, b, c, d = 1., 0.5, -1., 2.
  block = conv_block(1, kernel_size=2, strides=(1, 2), padding=0, activation="identity")
  params = {"conv": {"kernel": jnp.array([[a, b], [c, d]]).reshape(2, 2, 1, 1),
                     "bias": jnp.zeros((1,))}}
  assert _shapes(init_np(block, X_SEED, train=False)["params"]) == _shapes(params)
  y = eval_apply(block, {"params": params}, X_SEED)
  # [[a*1 + b*2 + c*5 + d*6, a*3 + b*4 + c*7 + d*8],
  #  [a*5 + b*6 + c*9 + d*10, a*7 + b*8 + c*11 + d*12]]
  # = [[1 + 1 - 5 + 12, 3 + 2 - 7 + 16], [5 + 3 - 9 + 20, 7 + 4 - 11 + 24]]
  np.testing.assert_allclose(y[0, :, :, 0], [[9., 14.], [19., 24.]])


def test_seed_002_pooling_stride_1_2():
  y = layers.max_pool(X_SEED, (2, 2), strides=(1, 2))
  # [[max(1, 2, 5, 6), max(3, 4, 7, 8)], [max(5, 6, 9, 10), max(7, 8, 11, 12)]]
  np.testing.assert_array_equal(y[0, :, :, 0], [[6., 8.], [10., 12.]])
  y = layers.avg_pool(X_SEED, 2, strides=(1, 2))
  # [[(1+2+5+6)/4, (3+4+7+8)/4], [(5+6+9+10)/4, (7+8+11+12)/4]]
  np.testing.assert_array_equal(y[0, :, :, 0], [[3.5, 5.5], [7.5, 9.5]])


@pytest.mark.parametrize("kernel, strides, padding, expected_hw", [
    (3, 1, 1, (7, 9)),                  # int p: p on both sides keeps the size for k = 2p + 1.
    (3, 1, 0, (5, 7)),                  # (7 - 3) + 1, (9 - 3) + 1
    (3, 1, (1, 2), (7, 11)),            # W: 9 + 2*2 - 3 + 1
    (3, 1, ((0, 1), (2, 0)), (6, 9)),   # H: 7 + 1 - 3 + 1; W: 9 + 2 - 3 + 1
    (3, 2, "SAME", (4, 5)),             # ceil(7 / 2), ceil(9 / 2)
    (3, 2, "valid", (3, 4)),            # (7 - 3) // 2 + 1, (9 - 3) // 2 + 1
    (3, 2, 1, (4, 5)),                  # (7 + 2 - 3) // 2 + 1, (9 + 2 - 3) // 2 + 1
    ((3, 1), 1, "VALID", (5, 9)),
])
def test_conv_block_padding_shapes(kernel, strides, padding, expected_hw):
  x = jnp.ones((1, 7, 9, 2))
  block = conv_block(3, kernel_size=kernel, strides=strides, padding=padding)
  y = jax.eval_shape(lambda: block.init_with_output(KEY, x, train=False)[0])
  assert y.shape == (1, *expected_hw, 3)


def test_table_conv_reads_only_its_connections():
  # Input channel i holds 10**i everywhere; with 1x1 all-ones kernels, output map j = sum of
  # 10**i over connections[j], so the digits spell out the table.
  table = ((0, 2), (1,), (0, 1, 2), (2, 1))
  x = jnp.broadcast_to(jnp.array([1., 10., 100.]), (1, 2, 2, 3))
  block = conv_block(4, kernel_size=1, connections=table, activation="identity")
  variables = init_np(block, x, train=False)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: np.zeros_like(p) if path[-1].key == "bias" else np.ones_like(p),
      variables["params"])
  y = eval_apply(block, {"params": params}, x)
  np.testing.assert_allclose(y[0, 0, 0], [101., 10., 111., 110.])
  n = sum(p.size for p in jax.tree_util.tree_leaves(variables["params"]))
  assert n == 2 + 1 + 3 + 2 + 4  # weights + biases


# ----------------------------------------------------------------------------------------------
# Pooling.

@functools.partial(jax.jit, static_argnums=(0, 1))
def _pool_value_and_grad(pool, window, x, w):
  """pool(x, window) and the gradient of sum(pool(x) * w) with respect to x."""
  y, vjp = jax.vjp(lambda x: pool(x, window), x)
  return y, vjp(w)[0]


@pytest.mark.parametrize("shape, window", [((2, 8, 6, 3), 2), ((2, 7, 9, 3), 3),
                                           ((2, 8, 6, 3), (2, 3))])
def test_fast_max_pool_matches_flax_values_and_gradient(shape, window):
  x = normal(*shape)  # Continuous values: no tied maxima.
  win = layers.to_tuple(window, 2, "window")
  # The fast path is taken: no reduce_window (whose gradient is select-and-scatter).
  assert "reduce_window" not in str(jax.make_jaxpr(lambda x: layers.max_pool(x, window))(x))
  w = normal(*jax.eval_shape(lambda x: layers.max_pool(x, window), x).shape)
  y, g = _pool_value_and_grad(layers.max_pool, window, x, w)
  y_ref, g_ref = _pool_value_and_grad(
      lambda x, win: nn.max_pool(x, win, win, "VALID"), win, x, w)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)
  assert (np.asarray(g) != 0).sum() == w.size  # One gradient entry per window.


def test_fast_max_pool_gradient_splits_ties_as_autodiff_does():
  # Small integers: many windows hold tied maxima (ReLU zeros are the common case in a net).
  x = jnp.asarray(NP.integers(-2, 3, (2, 6, 4, 3)), jnp.float32)
  w = normal(2, 3, 2, 3)
  blocks = lambda x: x.reshape(2, 3, 2, 2, 2, 3)
  plain = lambda x, win: blocks(x).max(axis=(2, 4))
  ties = (blocks(x) == blocks(x).max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4))
  assert (ties > 1).any()
  y, g = _pool_value_and_grad(layers.max_pool, 2, x, w)
  y_ref, g_ref = _pool_value_and_grad(plain, 2, x, w)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize("shape, window", [((2, 6, 3), (2,)), ((2, 4, 6, 3), (2, 3)),
                                           ((1, 4, 2, 4, 2), (2, 1, 2))])
def test_fast_max_pool_backward_is_elementwise_with_autodiff_ties(shape, window):
  """The custom VJP: no tie count (autodiff of max keeps a full-size mask and a summed count from
  the forward pass), and autodiff's gradient bit for bit, ties included (1-3-D)."""
  x = jnp.asarray(NP.integers(-1, 2, shape), jnp.float32)
  out = tuple(s // w for s, w in zip(shape[1:-1], window))
  blocked = (shape[0], *(v for o, w in zip(out, window) for v in (o, w)), shape[-1])
  plain = lambda x, win: x.reshape(blocked).max(axis=tuple(range(2, 2 * len(window) + 1, 2)))
  w = normal(shape[0], *out, shape[-1])
  grad = jax.make_jaxpr(lambda x: jax.vjp(lambda x: layers.max_pool(x, window), x)[1](w))(x)
  assert "reduce_sum" not in str(grad)   # Autodiff of max counts the ties with one.
  y, g = _pool_value_and_grad(layers.max_pool, window, x, w)
  y_ref, g_ref = _pool_value_and_grad(plain, window, x, w)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(g, g_ref)


def test_fast_avg_pool_matches_flax():
  x = normal(2, 7, 9, 3)
  np.testing.assert_allclose(layers.avg_pool(x, 3), nn.avg_pool(x, (3, 3), (3, 3), "VALID"),
                             rtol=1e-6)


def test_pool_padding_and_strides_fall_back_to_flax():
  x = normal(1, 5, 5, 2)
  np.testing.assert_array_equal(layers.max_pool(x, 2, padding="SAME"),
                                nn.max_pool(x, (2, 2), (2, 2), "SAME"))
  np.testing.assert_array_equal(layers.max_pool(x, 3, 1, padding=1),
                                nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))))


def test_global_avg_pool():
  x = jnp.arange(16.).reshape(2, 2, 2, 2)
  # Example 0, channel 0: mean(0, 2, 4, 6) = 3; channel 1: mean(1, 3, 5, 7) = 4; example 1: +8.
  np.testing.assert_array_equal(layers.global_avg_pool(x), [[3., 4.], [11., 12.]])


def test_bn_axis_name_averages_over_devices():
  # X_BN split into 2 "devices" of one example each (vmap stands in for pmap / shard_map): the
  # statistics are those of the whole batch, so the pytorch-convention numbers above hold.
  bn = layers.BatchNorm("pytorch", axis_name="device")
  variables = init_np(bn, X_BN[:1], train=False)
  f = jax.vmap(lambda x: bn.apply(variables, x, train=True, mutable=["batch_stats"]),
               axis_name="device")
  _, upd = jax.jit(f)(X_BN[:, None])
  np.testing.assert_allclose(upd["batch_stats"]["mean"], [[0.4, 0.3]] * 2, rtol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], [[1.5666667, 1.3]] * 2, rtol=1e-6)
