"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be
set before JAX starts, so it cannot run inside the pytest process). Prints one JSON line.

    python tests/mesh_probe.py step DATA_DIR   one train step + eval on 1 vs 4 devices
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import load_config

from cnnlab import data
from cnnlab.base.errors import ConfigError
from cnnlab.training import loop, steps
from cnnlab.training import mesh as mesh_lib


def tiny(data_dir):
  config = load_config("experiments/default.py")
  config.dataset.name, config.dataset.data_dir = "digits", data_dir
  config.model.name, config.model.stages = "vgg_cnn", ((8,), (16,))
  config.model.bn_placement, config.model.dropout = "before_act", "spatial"
  config.model.dropout_rate, config.batch_size = 0.2, 32
  config.optimizer.schedule, config.optimizer.warmup_epochs = "constant", 0.0
  return config


def skewed_batch(config):
  """A training batch sorted by image brightness, so that each device's quarter of it has other
  statistics than the whole: per-device BatchNorm would show."""
  local = next(data.train_iterator(config.dataset, config.batch_size, 0))
  order = np.argsort(local["image"].mean(axis=(1, 2, 3)))
  return {k: v[order] for k, v in local.items()}


def one_step(config, devices, local):
  """One train step on `local` and a whole-split eval of a fresh state on a data mesh over
  `devices`."""
  s = steps.setup(config)
  placement = loop.Replicated(mesh_lib.make_mesh(1, devices))
  state = placement.combine([steps.create_train_state(s.model, s.tx, steps.split_seed(0),
                                                      s.info.image_shape)])
  train_fn, eval_fn = placement.steps(0.3)
  state, metrics = train_fn(state, placement.batch([local]))
  n = mesh_lib.data_size(placement.mesh)
  totals = None
  for b in data.eval_batches(config.dataset, "test", 250, multiple_of=n):
    sums = eval_fn(state, mesh_lib.global_batch(b, mesh_lib.batch_sharding(placement.mesh)))
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  host = mesh_lib.to_host({"params": state.params, "batch_stats": state.batch_stats,
                           "loss": metrics["loss"], "eval": totals})
  return host


def scaled_diff(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| over the largest |a|: the float32 rounding of statistics near zero (a running
  mean of 1e-4 off by 4e-9) is not mistaken for a difference in kind."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def main():
  data_dir = sys.argv[2]
  config = tiny(data_dir)
  assert len(jax.devices()) == 4, jax.devices()
  local = skewed_batch(config)
  one = one_step(config, jax.devices()[:1], local)
  four = one_step(config, jax.devices(), local)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
  out = {
      "loss": [float(one["loss"]), float(four["loss"])],
      "params_max_abs_diff": float(np.abs(flat(one["params"]) - flat(four["params"])).max()),
      "params_max_abs": float(np.abs(flat(one["params"])).max()),
      "bn_max_rel_diff": scaled_diff(flat(one["batch_stats"]), flat(four["batch_stats"])),
      "eval": [{k: float(v) for k, v in one["eval"].items()},
               {k: float(v) for k, v in four["eval"].items()}],
  }
  # What per-device BatchNorm (pmap without axis_name) would give: each device normalises its
  # quarter with that quarter's statistics; averaging the four devices' running statistics
  # afterwards (as flax's imagenet example does) still differs from the global ones.
  config.batch_size = 8
  steps.setup.__globals__["_SETUPS"].clear()
  shards = [one_step(config, jax.devices()[:1], {k: v[8 * i:8 * (i + 1)] for k, v in
                                                 local.items()}) for i in range(4)]
  per_device = jax.tree_util.tree_map(lambda *xs: np.mean(xs, axis=0),
                                      *[s["batch_stats"] for s in shards])
  out["per_device_bn_max_rel_diff"] = scaled_diff(flat(one["batch_stats"]), flat(per_device))
  try:
    mesh_lib.check_batch_size("batch_size", 30, mesh_lib.make_mesh(1))
    out["bad_batch_error"] = None
  except ConfigError as e:
    out["bad_batch_error"] = str(e)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
