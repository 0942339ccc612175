"""K seeds of one sweep cell trained as one vmapped program: a placement for `loop.train_runs`.

The runs' states are stacked on a leading seed axis K and the train/eval steps are `jax.vmap`-ed
over it; each seed keeps its own data order, workdir, metrics, checkpoints and results.json, laid
out exactly as its single run would lay them out (the loop fans them out with `split`). On a mesh
with several devices the seed axis is split over the mesh's `seed` axis (gcd(K, #devices)
devices) and every seed's batch over `data`: 8 seeds on 8 GPUs train as one program, one seed per
GPU.

Numbers: vmapping turns each convolution into a batched one whose float32 sums run in another
order, so a vmapped seed agrees with its sequential run to ~1e-4 relative, not bit for bit
(tests/test_sweep.py states the tolerance).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cnnlab.training import loop, steps
from cnnlab.training import mesh as mesh_lib
from cnnlab.training.validation import validate_config


class StackedSeeds:
  """K runs' states stacked [K, ...] and split over the mesh's `seed` axis."""
  stacked = True

  def __init__(self, mesh):
    self.mesh = mesh
    self.state_sharding = mesh_lib.seed_stacked(mesh)

  def combine(self, states: list) -> Any:
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
    return loop.put(stacked, self.state_sharding)

  def split(self, tree: Any) -> list:
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(n)]

  def batch(self, local_batches: list[dict]) -> dict[str, jax.Array]:
    local = {k: jnp.stack([b[k] for b in local_batches]) for k in local_batches[0]}
    return mesh_lib.global_batch(local, mesh_lib.batch_sharding(self.mesh, stacked_seeds=True),
                                 row_axis=1)

  def steps(self, aux_loss_weight: float, label_smoothing: float = 0.0):
    return _stacked_steps(self.mesh, aux_loss_weight, label_smoothing)


@functools.cache
def _stacked_steps(mesh, aux_loss_weight: float, label_smoothing: float):
  stacked = mesh_lib.seed_stacked(mesh)
  step = functools.partial(steps.train_step, aux_loss_weight=aux_loss_weight,
                           label_smoothing=label_smoothing)
  train_fn = jax.jit(jax.vmap(step), out_shardings=(stacked, stacked), donate_argnums=0)
  eval_fn = jax.jit(jax.vmap(steps.eval_step, in_axes=(0, None)), out_shardings=stacked)
  return train_fn, eval_fn


def train_seeds(configs: list[ml_collections.ConfigDict], workdirs: list[str], *, overrides=(),
                command: str = "", progress: bool = True,
                pretrain_runs: list[str | None] | None = None) -> list[dict[str, Any]]:
  """Trains configs that differ only in `seed`, each in its own workdir, as one vmapped program.

  Finished seeds are skipped; unfinished ones resume from the latest checkpoint step they all
  hold. Returns every seed's results.json dict, in the order of `configs`. `pretrain_runs`: per
  seed, the workdir `init.source="sweep:pretrain"` names (see `loop.Run`).
  """
  for config in configs:
    validate_config(config)
  pretrain_runs = pretrain_runs or [None] * len(configs)
  runs = [loop.Run(c, w, overrides=overrides, command=command, pretrain_run=p)
          # No learning_curve.png: a sweep's report draws their curves.
          for c, w, p in zip(configs, workdirs, pretrain_runs)]
  for run in runs:
    if run.results is not None:
      print(f"{run.dir.workdir} already holds a finished run of this config: "
            f"{run.dir.results_path}")
  todo = [run for run in runs if run.results is None]
  if len(todo) == 1:
    loop.train_runs(todo, loop.Replicated(mesh_lib.make_mesh(1)), progress=progress)
  elif todo:
    loop.train_runs(todo, StackedSeeds(mesh_lib.make_mesh(len(todo))), progress=progress)
  return [run.results for run in runs]
