"""The one thin wrapper over orbax-checkpoint; nothing else in cnnlab imports orbax.

A checkpoint holds the training state arrays (step, params, batch_stats, opt_state) and a small JSON
record of progress (data-iterator position, config fingerprint, elapsed wall time). Saves are
synchronous and atomic (orbax writes a temporary directory and renames it when complete), so a
process killed with SIGKILL at any moment leaves the latest *complete* checkpoint to resume from.

Every save adds to the progress record the step, the SHA-256 of each state array (and of them
all) and of the record itself; a restore recomputes and compares them, and compares the step
with the directory's name, so a flipped bit or a renamed checkpoint is refused, and
`restore_latest` falls back to the newest intact checkpoint, setting the unusable ones aside as
`<step>.corrupt`. A save that fails for want of disk space or permission raises one
`WorkdirError` line and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from cnnlab.base import digests, locks
from cnnlab.base.errors import CheckpointError, WorkdirError

# orbax logs every save at INFO; keep the progress bar readable.
logging.getLogger("absl").setLevel(logging.WARNING)
logger = logging.getLogger(__name__)

STATE_DIGEST_KEY = "state_sha256"     # in the progress record: digests.tree_sha256(state)
RECORD_DIGEST_KEY = "record_sha256"   # in the progress record: json_sha256 of the rest of it
STEP_KEY = "checkpoint_step"          # in the progress record: the step saved, beside its name
CORRUPT_SUFFIX = ".corrupt"
# Where orbax's JsonSave puts a checkpoint's progress record: <step>/progress/metadata.
PROGRESS_FILE = ("progress", "metadata")


class Checkpointer:
  """Saves and restores training checkpoints under `directory` (usually `<workdir>/checkpoints`).

  With `read_only` nothing is created, cleaned, set aside or written: a reader (visualize, a
  transfer source) may open the directory of a run that is still training, whose in-flight
  `*.orbax-checkpoint-tmp` saves a writable manager would delete."""

  def __init__(self, directory: str, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    with _writing(self.directory, self.directory):
      if read_only:  # Reads no step's metadata up front: a writer may prune that step meanwhile.
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, create=False, read_only=True,
            lightweight_initialize=True)
      else:
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.LatestN(max(1, keep)),
            enable_async_checkpointing=False)
        locks.fence(self.directory)
        _remove_incomplete(self.directory)
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=("state", "progress"))

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: dict[str, Any], progress: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and `progress` (JSON-serialisable) as checkpoint `step`,
    with the digests a restore verifies.

    Raises:
      WorkdirError: the checkpoint cannot be written (disk full, read-only); earlier checkpoints
        are intact and the half-written one is removed.
      locks.LockLost: the directory's lock was lost, before or during the save (a taker may
        have deleted the save in flight): nothing is written or removed.
    """
    record = {**progress, STEP_KEY: step, STATE_DIGEST_KEY: digests.tree_sha256(state)}
    record[RECORD_DIGEST_KEY] = digests.json_sha256(record)
    path = os.path.join(self.directory, str(step))
    locks.fence(path)
    with _writing(path, self.directory):
      self._manager.save(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(record)),
          force=True)
      self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restores checkpoint `step` into the structure (and shardings, for leaves given as
    jax.ShapeDtypeStruct) of `abstract_state` and verifies its digests; returns (state,
    progress), progress as it was given to `save`.

    Raises:
      CheckpointError: the checkpoint is unreadable, fails its digests, or does not match the
        model's structure.
    """
    try:
      return self._restore_verified(step, abstract_state)
    except _Unusable as e:
      path = self._step_path(step)
      raise CheckpointError(
          f"checkpoint {path} cannot be restored ({e}). It is corrupt or was written by a "
          f"different model; delete {path} to resume from an earlier checkpoint, or use a "
          f"fresh --workdir.") from None

  def read(self, abstract_state: dict[str, Any], step: int | None = None
           ) -> tuple[int, dict[str, Any], dict]:
    """(step, state, progress) of checkpoint `step`, or of the newest one when None, for a reader
    of a directory that a training run may still be writing: a checkpoint that the writer prunes
    (it keeps its newest few) while it is read is not called corrupt; the newest is read again.

    Raises:
      CheckpointError: there is no checkpoint, checkpoint `step` is gone, or it is unreadable or
        fails its digests.
    """
    while True:
      chosen = max(saved_steps(self.directory), default=None) if step is None else step
      if chosen is None:
        raise CheckpointError(f"{self.directory} holds no checkpoint.")
      try:
        return chosen, *self.restore(chosen, abstract_state)
      except CheckpointError:
        gone = not os.path.isdir(self._step_path(chosen))
        newer = max(saved_steps(self.directory), default=chosen) > chosen
        if step is None and (gone or newer):  # Pruned under us by the run that writes here.
          continue
        if gone:
          raise CheckpointError(
              f"checkpoint {self._step_path(chosen)} was deleted while it was read (the run "
              f"writing {self.directory} keeps only its newest checkpoints); it now holds steps "
              f"{', '.join(map(str, saved_steps(self.directory))) or 'none'}.") from None
        raise

  def restore_latest(self, abstract_state: dict[str, Any]
                     ) -> tuple[int, dict[str, Any], dict] | None:
    """Restores the newest checkpoint that passes its digests: (step, state, progress), or None
    when there is no checkpoint. Newer ones that fail are renamed `<step>.corrupt` (so that
    training can save those steps again) and one warning line says so.

    Raises:
      CheckpointError: every checkpoint fails (one line naming the directory).
      WorkdirError: a corrupt checkpoint cannot be set aside (read-only workdir).
    """
    failed: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        state, progress = self._restore_verified(step, abstract_state)
      except _Unusable as e:
        failed.append((step, str(e)))
        continue
      if failed:
        aside = self._set_aside([s for s, _ in failed])
        logger.warning("checkpoint %s cannot be restored (%s); resuming from step %d, the newest "
                       "intact one (set aside as %s).", self._step_path(failed[0][0]),
                       failed[0][1], step, ", ".join(aside))
      return step, state, progress
    if not failed:
      return None
    steps = ", ".join(str(s) for s, _ in failed)
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored (steps {steps}; newest: "
        f"{failed[0][1]}). They are corrupt or were written by a different model; delete "
        f"{self.directory} to start over, or use a fresh --workdir.")

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore_verified(self, step: int, abstract_state) -> tuple[dict[str, Any], dict]:
    """Restores `step` and checks its digests; raises _Unusable saying why it cannot be used."""
    try:
      with _quiet_orbax():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types (ValueError, KeyError, OSError, ...).
      message = str(e).strip()
      with _quiet_orbax():
        _release(e)
      raise _Unusable(f"{type(e).__name__}: {message.splitlines()[0][:300]}" if message
                      else type(e).__name__) from None
    progress = _verified_record(restored["progress"])
    expected = progress.pop(STATE_DIGEST_KEY)
    bad = digests.differing_leaves(expected, digests.tree_sha256(restored["state"]))
    if bad:
      raise _Unusable(f"{len(bad)} array(s) differ from their saved sha256: {', '.join(bad[:3])}"
                      + (", ..." if len(bad) > 3 else ""))
    held = _held_step(progress.pop(STEP_KEY, None), restored["state"])
    if held is not None and held != step:
      raise _Unusable(f"it holds step {held}, not {step}: renamed or copied from another step")
    return restored["state"], progress

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Renames checkpoints `steps` to `<step>.corrupt` (process 0; the others wait)."""
    if self.read_only:
      raise CheckpointError(
          f"checkpoint {self._step_path(steps[0])} cannot be restored; it is not set aside "
          f"here, since {self.directory} was opened for reading only.")
    targets = [self._step_path(s) + CORRUPT_SUFFIX for s in steps]
    if jax.process_index() == 0:
      locks.fence(self.directory)
      for step, target in zip(steps, targets):
        with _writing(target, self.directory):
          shutil.rmtree(target, ignore_errors=True)
          os.replace(self._step_path(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("cnnlab_checkpoint_set_aside")
    self._manager.reload()
    return targets


class _Unusable(Exception):
  """A checkpoint that cannot be restored; the message says why (internal to this module)."""


def _held_step(recorded: Any, state: Any) -> int | None:
  """The step a checkpoint holds: the one its (digested) progress record names, else, for one
  saved before records named it, its state's scalar `step` array; None if neither says."""
  if recorded is not None:
    return recorded
  leaf = state.get("step") if isinstance(state, dict) else None
  if leaf is None or getattr(leaf, "shape", None) != ():
    return None
  return int(digests.host_copy(leaf))


def _verified_record(record: Any) -> dict:
  """The progress record without its own digest, after checking that digest; raises _Unusable."""
  if not isinstance(record, dict) or STATE_DIGEST_KEY not in record:
    raise _Unusable("its progress record carries no digests (written before cnnlab verified "
                    "checkpoints, or garbled)")
  record = dict(record)
  if record.pop(RECORD_DIGEST_KEY, None) != digests.json_sha256(record):
    raise _Unusable("its progress record does not match its sha256")
  return record


class OsFailure(NamedTuple):
  errno: int | None
  reason: str


_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


def os_failure(error: BaseException) -> OsFailure | None:
  """The operating-system error behind `error`, searched through its causes: an OSError, or
  tensorstore's `... [os_error_code='28']` inside orbax's ValueErrors; None if there is none."""
  for e in _causes(error):
    if isinstance(e, OSError) and e.errno is not None:
      return OsFailure(e.errno, e.strerror or os.strerror(e.errno))
    match = _TENSORSTORE_ERRNO.search(str(e))
    if match:
      return OsFailure(int(match.group(1)), os.strerror(int(match.group(1))))
  return None


def _causes(error: BaseException) -> list[BaseException]:
  """`error` and every exception in its chain (causes, contexts, exception groups' members)."""
  seen, stack = {}, [error]
  while stack:
    e = stack.pop()
    if e is not None and id(e) not in seen:
      seen[id(e)] = e
      stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return list(seen.values())


@contextlib.contextmanager
def _writing(path: str, directory: str):
  """Runs orbax quietly; turns a failed write of `path` (an OS error anywhere in the exception's
  causes) into one WorkdirError line, after removing any half-written checkpoint from
  `directory` and releasing orbax's failed futures, which would log each failure again. A write
  that failed because the directory's lock was lost meanwhile (a taker deleted the save in
  flight) raises locks.LockLost and removes nothing: the saves in flight are the taker's."""
  with _quiet_orbax():
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- re-raised unless an OS error or a lost lock is behind.
      failure, lost = os_failure(e), _lost_lock(path)
      if failure is None and lost is None:
        raise
      _release(e)
      if lost is not None:
        raise lost from None
      with contextlib.suppress(OSError):
        _remove_incomplete(directory)
      raise WorkdirError.from_os_error(path, failure.errno, failure.reason,
                                       max(saved_steps(directory), default=0)) from None


def _lost_lock(path: str) -> locks.LockLost | None:
  try:
    locks.fence(path)
  except locks.LockLost as e:
    return e
  return None


def _release(error: BaseException) -> None:
  """Frees the frames of `error`'s chain, which hold orbax's failed futures and tasks, so that
  asyncio's "Future/Task exception was never retrieved" (once per array, with a traceback) is
  logged now, inside _quiet_orbax, not at some later garbage collection or at exit."""
  for each in _causes(error):
    traceback.clear_frames(each.__traceback__)
  gc.collect()


def _not_from_orbax(record: logging.LogRecord) -> bool:
  return f"{os.sep}orbax{os.sep}" not in record.pathname and record.name != "asyncio"


@contextlib.contextmanager
def _quiet_orbax():
  """Drops the log records orbax emits (through absl's logger, the root logger, and asyncio's for
  its futures), which repeat a failed read or write in up to hundreds of lines; cnnlab reports it
  in one line. Also installs `_drop_closed_loop_errors`."""
  _drop_closed_loop_errors()
  loggers = (logging.getLogger("absl"), logging.getLogger("asyncio"), logging.getLogger())
  for each in loggers:
    each.addFilter(_not_from_orbax)
  try:
    yield
  finally:
    for each in loggers:
      each.removeFilter(_not_from_orbax)


def _drop_closed_loop_errors() -> None:
  """Makes sys.unraisablehook drop `RuntimeError: Event loop is closed`, for the rest of the
  process: orbax's I/O threads raise it, once per array, after a failed read or write has
  returned (a refused visualize printed 17-240 such lines after its one error line). Only
  asyncio raises it, for a loop already closed: never news."""
  report = sys.unraisablehook
  if getattr(report, "drops_closed_loop_errors", False):
    return

  def unraisable(info):
    if not (info.exc_type is RuntimeError and "Event loop is closed" in str(info.exc_value)):
      report(info)

  unraisable.drops_closed_loop_errors = True
  sys.unraisablehook = unraisable


def newest_progress(directory: str) -> tuple[int, dict] | None:
  """(step, progress record) of the newest checkpoint in `directory` whose record is readable and
  intact, read straight from its JSON file, without reading its arrays; None if there is none.

  No orbax manager is opened: constructing one is a barrier of every process of a multi-process
  run, so a check that one process makes alone (RunDir.claim's) must not open one."""
  for step in reversed(saved_steps(directory)):
    try:
      with open(os.path.join(directory, str(step), *PROGRESS_FILE), "rb") as f:
        return step, _verified_record(json.loads(f.read()))
    except (OSError, ValueError, _Unusable):  # Unreadable or garbled: look at the one before.
      continue
  return None


def saved_steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints in `directory` (orbax renames a step's directory to its
  number only once it is complete), oldest first; [] if there is no such directory."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _remove_incomplete(directory: str) -> None:
  """Deletes temporary directories left by a save that was killed before it finished."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
