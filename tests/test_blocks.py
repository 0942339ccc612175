"""Tests for DropBlock, the residual units (He 2016b's five orderings, both shortcuts) and the
Inception module. Expected values are worked out by hand in the comments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_helpers import KEY, init_np, normal, rng, train_apply
from scipy import ndimage

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers

# ----------------------------------------------------------------------------------------------
# DropBlock.

def test_dropblock_drops_whole_squares_inside_the_map():
  keep = np.asarray(layers.dropblock_keep_mask(rng(1), (8, 12, 12, 3), 0.3, 3))
  dropped = keep == 0
  assert dropped.any() and not dropped.all()
  square = np.ones((3, 3), bool)
  for n in range(8):
    for c in range(3):
      d = dropped[n, :, :, c]
      # A union of 3x3 squares that fit in the map survives an opening by a 3x3 square.
      np.testing.assert_array_equal(ndimage.binary_opening(d, square), d)
  # Channels (and examples) draw their own blocks.
  assert not (dropped[..., 0] == dropped[..., 1]).all()


def test_dropblock_rate_is_about_the_requested_fraction():
  # gamma = 0.1 / 9 * 32^2 / 30^2: about 10% of units dropped (a little less: blocks overlap).
  keep = np.asarray(layers.dropblock_keep_mask(rng(2), (64, 32, 32, 4), 0.1, 3))
  assert 0.08 < 1 - keep.mean() < 0.105


def test_dropblock_layer_scales_survivors_and_is_identity_in_eval():
  x = jnp.ones((4, 10, 10, 3))
  block = layers.Dropout("dropblock", 0.2, block_size=3)
  y = np.asarray(block.apply({}, x, train=True, rngs={"channel_dropout": rng(3)}))
  keep = y > 0
  # count(mask) / count_ones(mask), as Ghiasi et al.'s Algorithm 1.
  np.testing.assert_allclose(y[keep], keep.size / keep.sum(), rtol=1e-5)
  assert (y[~keep] == 0).all() and (~keep).any()
  assert block.apply({}, x, train=False) is x
  with pytest.raises(Exception, match="channel_dropout"):
    block.apply({}, x, train=True, rngs={"dropout": rng(3)})


def test_dropblock_small_maps_and_2d_inputs():
  y = layers.Dropout("dropblock", 0.5, 7).apply({}, jnp.ones((2, 2, 3, 4)), train=True,
                                                  rngs={"channel_dropout": rng(4)})
  assert y.shape == (2, 2, 3, 4)   # The block shrinks to the 2x3 map.
  y = np.asarray(layers.Dropout("dropblock", 0.5).apply({}, jnp.ones((64, 32)), train=True,
                                                        rngs={"channel_dropout": rng(5)}))
  assert set(np.unique(y)) == {0.0, 2.0}   # Element-wise on [N, C], survivors x 1/(1-rate).


# ----------------------------------------------------------------------------------------------
# Residual units.

UNIT_PARAMS = {
    "original": {"conv1", "bn1", "conv2", "bn2"},
    "bn_after_add": {"conv1", "bn1", "conv2", "bn_out"},
    "relu_before_add": {"conv1", "bn1", "conv2", "bn2"},
    "relu_only_preact": {"conv1", "bn1", "conv2", "bn2"},
    "full_preact": {"bn0", "conv1", "bn1", "conv2"},
}
BN = layers.BlockOptions(bn_placement="before_act")


def _unit(unit, features=3, strides=1, **kwargs):
  return layers.ResidualUnit(features, strides, unit=unit, options=BN, **kwargs)


def test_every_unit_has_its_papers_layers():
  x = jnp.ones((2, 6, 6, 3))
  for unit, names in UNIT_PARAMS.items():
    assert set(init_np(_unit(unit), x, train=False)["params"]) == names, unit


@pytest.mark.parametrize("unit, expected", [
    # With the last conv zeroed the branch is BN(0) = beta (or 0 where no BN follows it), so
    # the unit's output shows where BN and ReLU sit around the addition (beta = 0.5 below):
    ("original", lambda x: np.maximum(x + 0.5, 0)),        # relu(x + BN(F))
    ("relu_before_add", lambda x: x + 0.5),                # x + relu(BN(F))
    ("relu_only_preact", lambda x: x + 0.5),               # x + BN(F)
    ("full_preact", lambda x: x),                          # x + F
    ("bn_after_add", lambda x: np.maximum(                 # relu(BN(x + F)), batch statistics
        (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5) + 0.5, 0)),
])
def test_unit_ordering_around_the_addition(unit, expected):
  x = normal(4, 5, 5, 3)
  variables = init_np(_unit(unit), x, train=False)
  params = variables["params"]
  params["conv2"]["kernel"] = np.zeros_like(params["conv2"]["kernel"])
  for bn in ("bn2", "bn_out"):
    if bn in params:
      params[bn]["bias"] = np.full(3, 0.5, np.float32)
  y, _ = train_apply(_unit(unit), variables, x)
  np.testing.assert_allclose(y, expected(np.asarray(x)), rtol=1e-4, atol=1e-4)


def test_zero_pad_shortcut_is_option_a():
  # Strided unit, branch zeroed: the output is x subsampled by 2 with 3 zero channels added.
  x = normal(2, 6, 6, 3)
  unit = _unit("full_preact", features=6, strides=2, shortcut="zero_pad")
  variables = init_np(unit, x, train=False)
  assert "proj" not in variables["params"]
  variables["params"]["conv2"]["kernel"] *= 0
  y, _ = train_apply(unit, variables, x)
  assert y.shape == (2, 3, 3, 6)
  np.testing.assert_allclose(y[..., :3], x[:, ::2, ::2, :], rtol=1e-6)
  assert (np.asarray(y[..., 3:]) == 0).all()


def test_projection_shortcut_and_bottleneck_shapes():
  x = jnp.ones((2, 8, 8, 16))
  params = init_np(_unit("original", 8, 2, bottleneck=True), x, train=False)["params"]
  assert params["proj"]["kernel"].shape == (1, 1, 16, 32)           # 4 x 8 outputs, 1x1.
  assert params["conv2"]["kernel"].shape == (3, 3, 8, 8) and "proj_bn" in params
  assert params["conv3"]["kernel"].shape == (1, 1, 8, 32)
  preact = init_np(_unit("full_preact", 8, 2), x, train=False)["params"]
  assert "proj" in preact and "proj_bn" not in preact   # He 2016b: projects BN-ReLU(x).
  y = jax.eval_shape(lambda: _unit("original", 8, 2, bottleneck=True).init_with_output(
      KEY, x, train=False)[0])
  assert y.shape == (2, 4, 4, 32)


def test_residual_unit_errors():
  x = jnp.ones((1, 4, 4, 2))
  with pytest.raises(ConfigError, match="unit='middle'"):
    init_np(_unit("middle"), x, train=False)
  after = layers.ResidualUnit(2, options=layers.BlockOptions(bn_placement="after_act"))
  with pytest.raises(ConfigError, match="after_act"):
    init_np(after, x, train=False)
  with pytest.raises(ConfigError, match="zero_pad"):
    init_np(_unit("original", 1, shortcut="zero_pad"), x, train=False)


def test_unit_without_bn_has_biases_and_no_bn():
  x = jnp.ones((1, 4, 4, 2))
  params = init_np(layers.ResidualUnit(2, unit="full_preact"), x, train=False)["params"]
  assert set(params) == {"conv1", "conv2"} and "bias" in params["conv1"]


# ----------------------------------------------------------------------------------------------
# Inception.

def test_inception_module_branches():
  x = jnp.ones((2, 7, 7, 16))
  module = layers.Inception(4, 3, 5, 2, 6, 7, options=BN)
  variables = init_np(module, x, train=False)
  p = variables["params"]
  assert set(p) == {"b1_1x1", "b3_reduce", "b3_3x3", "b5_reduce", "b5_5x5", "pool_proj"}
  assert p["b3_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 5)
  assert p["b5_5x5"]["conv"]["kernel"].shape == (5, 5, 2, 6)
  assert p["pool_proj"]["conv"]["kernel"].shape == (1, 1, 16, 7)
  y, _ = train_apply(module, variables, normal(2, 7, 7, 16))
  assert y.shape == (2, 7, 7, 4 + 5 + 6 + 7)
  torch_like = init_np(layers.Inception(4, 3, 5, 2, 6, 7, c5_kernel=3), x, train=False)
  assert torch_like["params"]["b5_5x5"]["conv"]["kernel"].shape == (3, 3, 2, 6)
