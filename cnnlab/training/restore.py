"""Reading a run's state back: the newest (or a given) checkpoint of a workdir, restored onto
this process's devices whatever topology wrote it, without changing the workdir."""

from __future__ import annotations

import jax
import ml_collections

from cnnlab.training import mesh as mesh_lib
from cnnlab.training import rundir, steps
from cnnlab.training.checkpoint import Checkpointer


def load_trained_state(config: ml_collections.ConfigDict, workdir: str,
                      step: int | None = None) -> steps.TrainState:
  """The state of checkpoint `step` (None: the newest) in `workdir`, on this process's devices
  (replicated), read without changing the workdir.

  Restores into an abstract state (`jax.eval_shape`): nothing is initialised or compiled only to
  be overwritten."""
  s = steps.setup(config)
  streams = steps.split_seed(config.seed)
  abstract = steps.create_train_state(s.model, s.tx, streams, s.info.image_shape, abstract=True)
  sharding = mesh_lib.replicated(mesh_lib.make_mesh(1))
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      steps.checkpointed(abstract))
  # Read-only: `workdir` may belong to a run that is still training (a transfer source).
  checkpointer = Checkpointer(rundir.RunDir(workdir).checkpoint_dir, read_only=True)
  try:
    _, restored, _ = checkpointer.read(target, step)
  finally:
    checkpointer.close()
  return abstract.replace(rngs={n: streams[n] for n in steps.DROPOUT_STREAMS}, **restored)
