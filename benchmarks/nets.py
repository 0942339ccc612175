"""The nets the speed benchmarks time, on cnnlab's side (torch-free; their PyTorch twins are in
torch_nets.py): BN before the activation, no dropout, 10 classes, cnnlab's default SGD.

  vgg_small  conv32-32-pool-64-64-pool-128-pool-GAP-dense, batch 128, 32x32x3
  resnet20   He et al. 2016a's CIFAR ResNet-20 (zero-padding shortcuts), batch 128, 32x32x3
  main       the main job's vgg_cnn stages (16,),(32,),(64,), batch 64, 28x28x1
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnlab.configs import base_config
from cnnlab.nets import models
from cnnlab.training import optim, steps

NETS = {
    "vgg_small": dict(model=dict(name="vgg_cnn", stages=((32, 32), (64, 64), (128,))),
                      batch=128, shape=(32, 32, 3)),
    "resnet20": dict(model=dict(name="resnet20"), batch=128, shape=(32, 32, 3)),
    "main": dict(model=dict(name="vgg_cnn", stages=((16,), (32,), (64,))), batch=64,
                 shape=(28, 28, 1)),
}
NUM_CLASSES, LEARNING_RATE = 10, 0.01


def cnnlab_config(net: str, dtype: str):
  config = base_config()
  config.model.update(NETS[net]["model"])
  config.model.bn_placement, config.model.dropout = "before_act", "none"
  config.dtype, config.batch_size = dtype, NETS[net]["batch"]
  return config


class CnnlabRunner:
  """cnnlab's `steps.train_step` (jitted, state donated) and `steps.eval_step` on fixed batches,
  traced and run under float32 matmul/conv `precision` (cnnlab's `config.matmul_precision`)."""

  def __init__(self, net: str, dtype: str, images: np.ndarray, labels: np.ndarray,
               precision: str = "highest"):
    self.precision = precision
    config = cnnlab_config(net, dtype)
    self.model = models.get_model(config.model, NUM_CLASSES, dtype=jnp.dtype(dtype))
    tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(LEARNING_RATE))
    self.state = steps.create_train_state(self.model, tx, steps.split_seed(0), images.shape[1:])
    self.batch = {"image": jnp.asarray(images, jnp.dtype(dtype)), "label": jnp.asarray(labels)}
    self.eval_batch = dict(self.batch, mask=jnp.ones(len(labels), jnp.float32))
    self.train_step = functools.partial(steps.train_step, aux_loss_weight=0.0)
    self._train = jax.jit(self.train_step, donate_argnums=0)
    self._eval = jax.jit(steps.eval_step)

  def train(self, steps: int) -> None:
    with jax.default_matmul_precision(self.precision):
      for _ in range(steps):
        self.state, metrics = self._train(self.state, self.batch)
    jax.block_until_ready(metrics)

  def train_from(self, batches, steps: int) -> float:
    """`steps` train steps on host batches {"image": float32, "label": int32} taken from the
    iterator `batches` and passed to the jitted step as the training loop passes them on one
    device: the step plus whatever waiting for data costs. Returns the seconds spent waiting in
    `next(batches)` (the step runs asynchronously meanwhile: time the data was not ready)."""
    waited = 0.0
    with jax.default_matmul_precision(self.precision):
      for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - start
        self.state, metrics = self._train(self.state, {k: batch[k] for k in ("image", "label")})
    jax.block_until_ready(metrics)
    return waited

  def eval(self, steps: int) -> None:
    with jax.default_matmul_precision(self.precision):
      for _ in range(steps):
        metrics = self._eval(self.state, self.eval_batch)
    jax.block_until_ready(metrics)
