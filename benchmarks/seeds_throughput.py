"""Throughput of S seeds trained one after another vs as one vmapped program (`sweep.vmap_seeds`).

    python benchmarks/seeds_throughput.py --seeds=4 --batch_size=128 --steps=50

Trains the VGG-style CNN of experiments/ablation.py (cell bn=before_act, dropout=spatial) on
random inputs of MNIST's shape, after compiling, and prints images per second for both ways
plus their ratio. The sweep's `vmap_seeds="auto"` default per backend comes from this.
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from cnnlab import cli
from cnnlab.base import environment
from cnnlab.configs import base_config
from cnnlab.nets import models
from cnnlab.training import optim, steps

_SEEDS = flags.DEFINE_integer("seeds", 4, "Seeds per cell.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size per seed.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (after 3 warm-up steps).", lower_bound=1)
_STAGES = flags.DEFINE_string("stages", "16;32", "Conv widths per stage, e.g. '32,32;64,64'.")


def main(_):
  config = base_config()
  environment.apply_numerics(config)
  config.model.name, config.model.bn_placement = "vgg_cnn", "before_act"
  config.model.dropout, config.model.dropout_rate = "spatial", 0.2
  config.model.stages = tuple(tuple(int(w) for w in s.split(",")) for s in _STAGES.value.split(";"))
  model = models.get_model(config.model, 10)
  tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(0.05))
  n, b = _SEEDS.value, _BATCH.value
  states = [steps.create_train_state(model, tx, steps.split_seed(s), (28, 28, 1)) for s in range(n)]
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(n, b, 28, 28, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, (n, b)), jnp.int32)}

  def timed(step, state, batch_of):
    for _ in range(3):
      state, m = step(state, batch_of())
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, m = step(state, batch_of())
    jax.block_until_ready(m)
    return time.perf_counter() - start

  step = functools.partial(steps.train_step, aux_loss_weight=0.0)
  single = jax.jit(step)
  seq_s = sum(timed(single, states[i], lambda i=i: jax.tree_util.tree_map(lambda x: x[i], batch))
              for i in range(n))
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
  vm_s = timed(jax.jit(jax.vmap(step)), stacked, lambda: batch)
  images = n * b * _STEPS.value
  print(json.dumps({
      "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "seeds": n, "batch_size": b, "stages": _STAGES.value,
      "sequential_img_per_s": round(images / seq_s), "vmapped_img_per_s": round(images / vm_s),
      "vmapped_over_sequential": round(seq_s / vm_s, 3)}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
