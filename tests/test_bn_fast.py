"""The closed-form gradient of `batch_norm_train` against autodiff of the plain formula.

The reference is jax.grad of y = (x - mean) / sqrt(var + eps) * scale + bias in float64; the
custom VJP computes in float32, so the tolerances are float32 rounding. The loss also reads the
returned batch mean and variance, so their cotangents (zero in a model, where only the running
averages read them) are checked too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.nets.layers.core import batch_norm_train

EPS = 1e-5
RNG = np.random.default_rng(0)


def _plain_bn(x, scale, bias, axis_name=None):
  """Autodiff reference: the textbook formula, statistics over all but the last axis."""
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.square(x - mean).mean(axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return (x - mean) * jax.lax.rsqrt(var + EPS) * scale + bias, mean, var


def _loss(bn, weights, x, scale, bias):
  """A loss that reads all three outputs with fixed random weights, so no cotangent is zero."""
  y, mean, var = bn(x, scale, bias)
  wy, wm, wv = weights
  return (y * wy).sum() + (mean * wm).sum() + (var * wv).sum()


def _inputs(shape):
  c = shape[-1]
  # Channels with a large offset and different scales: the two-pass variance must stay exact.
  x = RNG.standard_normal(shape) * RNG.uniform(0.5, 3, c) + RNG.uniform(-10, 10, c)
  scale, bias = RNG.uniform(0.5, 2, c), RNG.standard_normal(c)
  weights = (RNG.standard_normal(shape), RNG.standard_normal(c), RNG.standard_normal(c))
  # float32 values, so the float64 reference sees exactly the inputs the float32 code sees.
  as32 = lambda a: np.asarray(a, np.float32).astype(np.float64)
  return tuple(map(as32, weights)), as32(x), as32(scale), as32(bias)


def _reference_grads(weights, x, scale, bias):
  with jax.enable_x64(True):
    f = functools.partial(_loss, _plain_bn, tuple(map(jnp.float64, weights)))
    return jax.tree_util.tree_map(np.asarray, jax.jit(jax.grad(f, argnums=(0, 1, 2)))(
        jnp.float64(x), jnp.float64(scale), jnp.float64(bias)))


def _assert_grads_close(got, want):
  for g, w, name in zip(got, want, ("dx", "dscale", "dbias")):
    scale = np.abs(w).max()
    np.testing.assert_allclose(np.asarray(g, np.float64) / scale, w / scale, atol=2e-6,
                               err_msg=name)


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (6, 7), (2, 3, 4, 2, 5)])
def test_custom_vjp_matches_autodiff_of_the_formula(shape):
  weights, x, scale, bias = _inputs(shape)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  bn = lambda x, s, b: batch_norm_train(x, s, b, EPS)
  got = jax.jit(jax.grad(functools.partial(_loss, bn, tuple(map(f32, weights))),
                         argnums=(0, 1, 2)))(f32(x), f32(scale), f32(bias))
  _assert_grads_close(got, _reference_grads(weights, x, scale, bias))
  # The forward values are the formula's too.
  y, mean, var = batch_norm_train(f32(x), f32(scale), f32(bias), EPS)
  with jax.enable_x64(True):
    y_ref, mean_ref, var_ref = map(np.asarray, _plain_bn(jnp.float64(x), scale, bias))
  np.testing.assert_allclose(y, y_ref, atol=2e-5)
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-6)
  np.testing.assert_allclose(var, var_ref, rtol=1e-5)


def test_custom_vjp_with_axis_name_matches_autodiff():
  # 3 "devices" (vmap stands in for pmap / shard_map) of 4 examples each.
  weights, x, scale, bias = _inputs((3, 4, 3, 3, 2))
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def per_device(bn, x, w):
    loss = lambda x, s, b: _loss(bn, w, x, s, b)
    return jax.grad(loss, argnums=(0, 1, 2))(x, f32(scale), f32(bias))

  def grads(bn, dtype):
    w = tuple(jnp.asarray(a, dtype) for a in weights)
    w = (w[0], jnp.broadcast_to(w[1], (3, 2)) / 3, jnp.broadcast_to(w[2], (3, 2)) / 3)
    f = jax.vmap(functools.partial(per_device, bn), axis_name="d")
    return jax.jit(f)(jnp.asarray(x, dtype), w)

  fast = lambda x, s, b: batch_norm_train(x, s, b, EPS, "d")
  got = grads(fast, jnp.float32)
  with jax.enable_x64(True):
    plain = lambda x, s, b: _plain_bn(x, s.astype(x.dtype), b.astype(x.dtype), "d")
    want = jax.tree_util.tree_map(np.asarray, grads(plain, jnp.float64))
  _assert_grads_close(got, want)


def test_bfloat16_input_gets_a_bfloat16_gradient():
  x = jnp.asarray(RNG.standard_normal((8, 4, 4, 3)), jnp.bfloat16)
  ones, zeros = jnp.ones(3), jnp.zeros(3)
  dx = jax.grad(lambda x: (batch_norm_train(x, ones, zeros, EPS)[0] ** 3).sum())(x)
  assert dx.dtype == jnp.bfloat16
  want = jax.grad(lambda x: (_plain_bn(x.astype(jnp.float32), ones, zeros)[0] ** 3).sum())(x)
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2)
