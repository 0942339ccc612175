"""Files written so that a reader sees either the old file or the complete new one, and a failed
write is one WorkdirError line that leaves what was saved intact."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from cnnlab.base import locks
from cnnlab.base.errors import WorkdirError


def write_json_atomic(path: str, obj: Any, resume_step: int | None = None) -> None:
  """Writes `obj` to `path` so that a reader sees either the old file or the complete new one.

  Raises:
    WorkdirError: the write failed (the temporary file is removed); `resume_step` is the step a
      rerun resumes from, for the message.
  """
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", resume_step)


def write_text_atomic(path: str, text: str, resume_step: int | None = None) -> None:
  """`write_json_atomic` for text (UTF-8)."""
  write_bytes_atomic(path, text.encode(), resume_step)


def write_bytes_atomic(path: str, data: bytes, resume_step: int | None = None) -> None:
  """`write_json_atomic` for bytes: a temporary file, fsync'ed, then renamed over `path`.
  Raises locks.LockLost if `path` is in a directory whose lock this process lost."""
  locks.fence(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise write_error(path, e, resume_step) from e


def append_bytes(path: str, data: bytes, resume_step: int | None = None) -> None:
  """Appends `data` to `path` with O_APPEND; a failed write is cut back off, so the file never
  ends in half a line.

  Raises:
    WorkdirError: the write failed (locks.LockLost: `path` is in a directory whose lock this
      process lost).
  """
  locks.fence(path)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  except OSError as e:
    raise write_error(path, e, resume_step) from e
  start = None
  try:
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
  except OSError as e:
    if start is not None:
      with contextlib.suppress(OSError):
        os.ftruncate(fd, start)
    raise write_error(path, e, resume_step) from e
  finally:
    os.close(fd)


def write_error(path: str, error: OSError, resume_step: int | None) -> WorkdirError:
  return WorkdirError.from_os_error(path, error.errno, error.strerror or str(error), resume_step)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_json_or_none(path: str) -> Any:
  """The parsed JSON at `path`, or None if it is missing or unreadable."""
  try:
    return read_json(path)
  except (OSError, ValueError):
    return None


def read_text_or_none(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except (OSError, ValueError):
    return None
