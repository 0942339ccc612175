"""The one thin wrapper over orbax-checkpoint; nothing else in cnnlab imports orbax.

A checkpoint holds the training state arrays (step, params, batch_stats, opt_state) and a small JSON
record of progress (data-iterator position, config fingerprint, elapsed wall time). Saves are
synchronous and atomic (orbax writes a temporary directory and renames it when complete), so a
process killed with SIGKILL at any moment leaves the latest *complete* checkpoint to resume from.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cnnlab.errors import CheckpointError

# orbax logs every save at INFO; keep the progress bar readable.
logging.getLogger("absl").setLevel(logging.WARNING)


class Checkpointer:
  """Saves and restores training checkpoints under `directory` (usually `<workdir>/checkpoints`)."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    _remove_incomplete(self.directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(max(1, keep)),
        enable_async_checkpointing=False,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "progress"))

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: dict[str, Any], progress: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and `progress` (JSON-serialisable) as checkpoint `step`."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restores checkpoint `step` into the structure of `abstract_state`; returns (state, progress).

    Raises:
      CheckpointError: the checkpoint is unreadable or does not match the model's structure.
    """
    path = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types (ValueError, KeyError, OSError, ...).
      first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {path} cannot be restored ({type(e).__name__}: {first_line}). It is "
          f"corrupt or was written by a different model; delete {path} to resume from an "
          f"earlier checkpoint, or use a fresh --workdir.") from None
    return restored["state"], restored["progress"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _remove_incomplete(directory: str) -> None:
  """Deletes temporary directories left by a save that was killed before it finished."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
