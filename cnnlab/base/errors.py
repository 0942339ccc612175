"""Errors a user can act on.

Everything raised as a `CnnlabError` is printed by `launch.py` as one line, without a traceback,
and the process exits non-zero. The message must name the offending value and what is allowed.
"""

import errno
import os
import re


class CnnlabError(Exception):
  """Base class: a problem in the user's config, data, or workdir (not a bug in cnnlab)."""


class ConfigError(CnnlabError, ValueError):
  """A config value is invalid; the message names the key, the value and the allowed values."""


class DatasetError(CnnlabError):
  """A dataset is unknown, missing, not prepared, or malformed."""


class CheckpointError(CnnlabError):
  """A checkpoint is corrupt or belongs to a different config."""


class TrainingDivergedError(CnnlabError):
  """The loss became NaN or infinite; the message names the step."""


class Interrupted(CnnlabError):
  """SIGTERM or SIGINT stopped training at a step boundary after saving a checkpoint."""
  exit_code = 130


class WorkdirError(CnnlabError):
  """A file in the workdir cannot be written (disk full, read-only, no permission)."""

  @classmethod
  def from_os_error(cls, path: str, errno_code: int | None, reason: str,
                    resume_step: int | None) -> "WorkdirError":
    """The one-line error for a failed write of `path`: the OS reason, what to do, and the step a
    rerun of the same command resumes from (`resume_step`; None when that is not a run's)."""
    if errno_code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      fix = f"free space on the disk holding {path} or use another --workdir"
    elif errno_code in (errno.EROFS, errno.EACCES, errno.EPERM):
      fix = f"make {os.path.dirname(path) or path} writable or use another --workdir"
    else:
      fix = f"fix {path} or use another --workdir"
    resume = f" to resume from step {resume_step}" if resume_step is not None else ""
    return cls(f"cannot write {path} ({reason}); {fix}; then rerun the same command{resume}.")


class OutOfMemoryError(CnnlabError):
  """XLA could not allocate what a computation needs (a model, batch or image too large)."""


def user_error(error: Exception) -> CnnlabError | None:
  """`error` as the one-line error a user can act on: itself if it is a CnnlabError, an
  OutOfMemoryError if XLA ran out of memory (JAX's JaxRuntimeError "Out of memory allocating N
  bytes" or RESOURCE_EXHAUSTED); None for anything else, which keeps its traceback (it may be a
  bug)."""
  if isinstance(error, CnnlabError):
    return error
  text = str(error)
  if type(error).__name__ != "JaxRuntimeError" or not (
      "Out of memory" in text or "RESOURCE_EXHAUSTED" in text):
    return None
  detail = text.splitlines()[0].split("Error dispatching computation: ")[-1].removeprefix(
      "INTERNAL: ").rstrip(".")
  allocating = re.search(r"allocating (\d+) bytes", detail)
  if allocating:
    detail += f" = {int(allocating.group(1)) / 2**30:.1f} GiB"
  return OutOfMemoryError(f"XLA ran out of memory ({detail}); use a smaller model, batch size or "
                          f"image size. What the workdir holds is kept: once it fits, the same "
                          f"command resumes.")
