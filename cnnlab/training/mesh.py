"""Devices -> a `Mesh(seed, data)`, the shardings of states and batches, and host<->global arrays.

cnnlab trains data-parallel with `jax.jit` and shardings (not `pmap`): parameters, BatchNorm
statistics and optimizer state are replicated; every global batch [B, ...] is split over the
`data` axis. Because the step is one jitted program over the *global* batch, BatchNorm's batch
mean and variance are reduced over all B examples on all devices (XLA inserts the all-reduce):
the statistics are global, exactly as on one device with the whole batch — not per-device as
under `pmap`/`shard_map` without an `axis_name` (flax issue 319). tests/test_mesh.py shows it.

When K seeds train as one vmapped program (cnnlab.training.seeds), their stacked states [K, ...] are
split over the `seed` axis, so K seeds on K devices each get a device of their own; the batch [K, B,
...] is split over both axes.

Multi-host: every process holds the same mesh over all processes' devices; each process feeds its
own share of every global batch (`global_batch` builds the global array from process-local rows,
`jax.make_array_from_process_local_data`), and reads replicated results back with `to_host`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnnlab.base import digests
from cnnlab.base.errors import ConfigError

AXES = ("seed", "data")


def make_mesh(num_seeds: int = 1, devices=None) -> Mesh:
  """A (seed, data) mesh over `devices` (default: all devices of all processes).

  The `seed` axis gets gcd(num_seeds, #devices) devices, the rest go to `data`: 8 seeds on 8
  devices -> (8, 1); 1 seed on 4 devices -> (1, 4); 2 seeds on 4 devices -> (2, 2).
  """
  devices = list(jax.devices() if devices is None else devices)
  seed_size = math.gcd(num_seeds, len(devices))
  grid = np.asarray(devices, dtype=object).reshape(seed_size, len(devices) // seed_size)
  return Mesh(grid, AXES)


def data_size(mesh: Mesh) -> int:
  return mesh.shape["data"]


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (a single run's state)."""
  return NamedSharding(mesh, P())


def seed_stacked(mesh: Mesh) -> NamedSharding:
  """Leading axis K (seeds) split over `seed`; replicated over `data`."""
  return NamedSharding(mesh, P("seed"))


def batch_sharding(mesh: Mesh, stacked_seeds: bool = False) -> NamedSharding:
  """A batch [B, ...] split over `data`; stacked [K, B, ...] also over `seed`."""
  return NamedSharding(mesh, P("seed", "data") if stacked_seeds else P("data"))


def check_batch_size(key: str, batch_size: int, mesh: Mesh) -> None:
  """A global batch must split evenly over the data devices and over the processes."""
  n, procs = data_size(mesh), jax.process_count()
  if batch_size % n or batch_size % procs:
    raise ConfigError(
        f"config.{key}={batch_size} does not divide over the {n} data-parallel devices"
        + (f" of {procs} processes" if procs > 1 else "") + f"; use a multiple of "
        f"{math.lcm(n, procs)} (the batch is global: each device gets {key} / {n}).")


def process_slice(global_rows: int) -> slice:
  """The rows of a global batch [global_rows, ...] this process feeds (contiguous shares)."""
  per = global_rows // jax.process_count()
  start = jax.process_index() * per
  return slice(start, start + per)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
                 row_axis: int = 0) -> dict[str, jax.Array | np.ndarray]:
  """The global array of each field from this process's rows (axis `row_axis` is the batch);
  on a one-device mesh the host arrays themselves, for the jitted step to place."""
  if jax.process_count() == 1:
    local = {k: np.asarray(v) for k, v in local.items()}
    if sharding.mesh.size == 1:  # A jitted step places host arrays itself: 35 us, not 120.
      return local
    return jax.device_put(local, sharding)

  def build(x):
    shape = list(x.shape)
    shape[row_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))
  return {k: build(np.asarray(v)) for k, v in local.items()}


def to_host(tree: Any) -> Any:
  """Numpy copies of every array of `tree`, on every process (`digests.host_copy`)."""
  return jax.tree_util.tree_map(digests.host_copy, tree)


def describe(mesh: Mesh) -> dict[str, Any]:
  """The topology a result was computed on (recorded as a bit-determining setting)."""
  return {"device_count": mesh.devices.size, "process_count": jax.process_count(),
          "mesh": {name: int(size) for name, size in mesh.shape.items()}}
