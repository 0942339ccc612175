"""Cell locks that hold on a shared filesystem (NFS), so sweep workers on many hosts share cells.

A held lock is the file `<cell dir>/.lock`, created with `O_CREAT | O_EXCL` (atomic on local
filesystems and on NFSv3 and later) and holding one JSON record: host, machine key, pid, process
start, SLURM job id, a random token and the time. No `flock`/`fcntl` locks: on NFS they go through
a separate lock manager that some mounts lack (`nolock`), and a lock held by a dead client can
outlive it. A heartbeat thread touches the file every `heartbeat_s` while the lock is held.

A lock is stale, and taken over, when its holder ran on this machine and is dead (its pid is gone
or belongs to a newer process), or when its heartbeat is older than `stale_after_s` (a host that
crashed or lost the network). The age is the file's mtime against a probe file written just now
on the same filesystem, so the hosts' clocks need not agree with the file server's. Takeovers go
one at a time: a taker creates `.lock.break` (O_EXCL, the same record; itself taken over when
stale), reads the lock again, and only if it is still stale renames it to a name of its own, checks
that it moved the very file it read (else puts it back), deletes it and creates its own lock with
O_EXCL. Without the `.break` file, a taker that judged the old file stale could delete the lock a
faster taker had just made. Release deletes the lock only if it still holds our token.

Fencing: a holder stopped for longer than `stale_after_s` (SIGSTOP, a frozen node, a long GC)
loses its lock to a taker, which trains the same run. Every write into a locked directory (a
run's checkpoints, metrics, results: rundir's writes and checkpoint.Checkpointer's) first calls
`fence(path)`, which reads the lock file again and raises `LockLost` (one line) once our token is
gone, so the old holder stops writing at once and the run is trained once, by the taker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import threading
import time

from cnnlab.base.errors import ConfigError, WorkdirError

LOCK_NAME = ".lock"
HEARTBEAT_S = 5.0
# Twelve missed heartbeats: long enough for an NFS hiccup or a stalled host, short enough that a
# crashed worker's cell is trained again within a minute.
STALE_AFTER_S = 60.0

_HELD: set[CellLock] = set()  # The locks this process holds (acquired, not yet released).


class LockLost(WorkdirError):
  """This process's lock on a directory was taken over: it must not write there any more."""


def fence(path: str) -> None:
  """Raises LockLost if `path` lies in a directory whose lock this process holds and has lost.
  Called before every write of a run's files; a no-op where this process holds no lock."""
  if not _HELD:
    return
  path = os.path.abspath(path)
  for lock in list(_HELD):
    if path == lock.directory or path.startswith(lock.directory + os.sep):
      lock.confirm()


def _read_text(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _machine_key() -> str:
  """Which process table a pid refers to: host, boot and pid namespace (containers share a host
  name but not their pids)."""
  try:
    namespace = os.readlink("/proc/self/ns/pid")
  except OSError:
    namespace = ""
  return f"{socket.gethostname()}/{_read_text('/proc/sys/kernel/random/boot_id')}/{namespace}"


def _process_start(pid: int) -> str:
  """The process's start time in clock ticks since boot ('' where /proc is absent), so that a
  reused pid is not mistaken for the lock's holder."""
  stat = _read_text(f"/proc/{pid}/stat")
  return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


def process_alive(pid: int, start: str) -> bool:
  """Whether process `pid` runs (and is the one started at `start`, when given)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return not start or _process_start(pid) in ("", start)


def _job_id() -> str | None:
  env = os.environ
  if "SLURM_ARRAY_JOB_ID" in env:
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
  return env.get("SLURM_JOB_ID")


@dataclasses.dataclass(frozen=True)
class _Holder:
  """What a lock file held when read: its stat and its record ({} if unreadable or half written)."""
  stat: os.stat_result
  record: dict

  def same_file(self, other: os.stat_result) -> bool:
    s = self.stat
    return (s.st_dev, s.st_ino, s.st_mtime_ns) == (other.st_dev, other.st_ino, other.st_mtime_ns)


class CellLock:
  """An exclusive, non-blocking lock on a cell directory that works across hosts on NFS.

  `acquire() -> bool` takes the lock if it is free or stale; `release()` gives it back; `close()`
  releases it if held (so a lock that was not acquired can always be closed). `lost` turns True
  once the heartbeat or `confirm()` finds that another process has replaced the lock file.
  """

  def __init__(self, cell_dir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    if not 0 < heartbeat_s < stale_after_s:
      raise ConfigError(f"lock heartbeat_s={heartbeat_s!r} must be positive and below "
                        f"stale_after_s={stale_after_s!r}.")
    self.directory = os.path.abspath(cell_dir)
    self.path = os.path.join(cell_dir, LOCK_NAME)
    try:
      os.makedirs(cell_dir, exist_ok=True)
    except OSError as e:
      raise WorkdirError.from_os_error(cell_dir, e.errno, e.strerror, None) from None
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self.token = ""
    self.lost = False
    self._taker: dict = {}  # The record of the process that took the lock over.
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  @property
  def held(self) -> bool:
    return self._heartbeat is not None

  def acquire(self) -> bool:
    if self.held:
      raise RuntimeError(f"{self.path} is already held by this CellLock.")
    self.token = secrets.token_hex(16)
    if not self._create(self.path):
      holder = self._read(self.path)
      if holder is not None and not (self._stale(holder) and self._take_over()):
        return False
      if not self._create(self.path):  # Another process was faster in creating a new lock.
        return False
    self.lost = False
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat {self.path}",
                                       daemon=True)
    self._heartbeat.start()
    _HELD.add(self)
    return True

  def release(self) -> None:
    if not self.held:
      return
    _HELD.discard(self)
    self._stop.set()
    self._heartbeat.join()
    self._heartbeat = None
    self._remove_own(self.path)

  def confirm(self) -> None:
    """Raises LockLost unless the lock file still carries our token (read now, not at the last
    heartbeat: a process resumed after a long stop writes before its heartbeat runs)."""
    if not self.lost and not self._ours():
      time.sleep(min(0.1, self.heartbeat_s))  # One miss may be a taker putting our file back.
      self.lost = not self._ours()
    if self.lost:
      taker = self._taker
      raise LockLost(
          f"lost the lock {self.path}: another process (host {taker.get('host')}, pid "
          f"{taker.get('pid')}) took it over, this one having not refreshed it for over "
          f"{self.stale_after_s:g} s (stopped or frozen); this process stops writing in "
          f"{self.directory}, which that one now trains. Rerun the same command to join it.")

  def _ours(self) -> bool:
    holder = self._read(self.path)
    if holder is not None and holder.record.get("token") == self.token:
      return True
    self._taker = holder.record if holder is not None else {}
    return False

  def close(self) -> None:
    self.release()

  def _create(self, path: str) -> bool:
    """Creates `path` holding our record, unless it exists."""
    record = {"host": socket.gethostname(), "machine": _MACHINE, "pid": os.getpid(),
              "start": _process_start(os.getpid()), "job": _job_id(), "token": self.token,
              "time": time.time()}
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    except OSError as e:  # A read-only or full workdir: one line, not a traceback.
      raise WorkdirError.from_os_error(path, e.errno, e.strerror, None) from None
    try:
      os.write(fd, json.dumps(record).encode())
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      os.unlink(path)
      raise WorkdirError.from_os_error(path, e.errno, e.strerror, None) from None
    os.close(fd)
    return True

  def _read(self, path: str) -> _Holder | None:
    """The lock file at `path`, or None if there is none. Opening it (rather than a plain stat)
    makes an NFS client fetch fresh attributes."""
    try:
      with open(path, "rb") as f:
        stat, text = os.fstat(f.fileno()), f.read(65536)
    except FileNotFoundError:
      return None
    except IsADirectoryError:
      raise WorkdirError(f"{path} is a directory, not a cnnlab lock file; remove it (cnnlab "
                         f"never makes one) or use another --workdir.") from None
    except OSError as e:
      raise WorkdirError.from_os_error(path, e.errno, e.strerror, None) from None
    try:
      record = json.loads(text)
    except ValueError:
      record = None
    return _Holder(stat, record if isinstance(record, dict) else {})

  def _stale(self, holder: _Holder) -> bool:
    record = holder.record
    if record.get("machine") == _MACHINE and isinstance(record.get("pid"), int):
      if not process_alive(record["pid"], str(record.get("start") or "")):
        return True
    return self._filesystem_now() - holder.stat.st_mtime > self.stale_after_s

  def _filesystem_now(self) -> float:
    """The current time by the clock that stamps files in the cell directory."""
    probe = f"{self.path}.probe.{self.token}"
    with open(probe, "wb") as f:
      f.write(b".")
    try:
      return os.stat(probe).st_mtime
    finally:
      os.unlink(probe)

  def _take_over(self) -> bool:
    """Removes a stale lock file, one taker at a time (under the `.break` file), after looking
    again: else a taker that judged the old file stale could remove the lock a faster taker has
    just made. True if the lock path is now free."""
    guard = f"{self.path}.break"
    if not self._create(guard):
      holder = self._read(guard)
      if holder is not None and self._stale(holder):  # A taker died in the middle.
        self._remove(holder, guard)
      return False
    try:
      holder = self._read(self.path)
      return holder is None or (self._stale(holder) and self._remove(holder))
    finally:
      self._remove_own(guard)

  def _remove_own(self, path: str) -> None:
    holder = self._read(path)
    if holder is not None and holder.record.get("token") == self.token:
      self._remove(holder, path)

  def _remove(self, holder: _Holder, path: str | None = None) -> bool:
    """Deletes the file at `path` (default: the lock) if it is still the one `holder` describes;
    True if it did."""
    path = path or self.path
    aside = f"{path}.taken.{self.token}"
    try:
      os.rename(path, aside)  # Of several processes, one moves this file.
    except FileNotFoundError:
      return False
    if holder.same_file(os.stat(aside)):
      os.unlink(aside)
      return True
    # Another process replaced the file since `holder` was read: give its file back.
    os.replace(aside, path)
    return False

  def _beat(self) -> None:
    """Touches our lock file every heartbeat; on finding it replaced twice in a row, sets `lost`
    and stops (the next write, through `fence`, reports it)."""
    misses = 0
    while not self._stop.wait(self.heartbeat_s):
      try:
        ours = self._ours()
      except WorkdirError:
        ours = False  # Replaced by something unreadable: not ours.
      if ours:
        misses = 0
        try:
          os.utime(self.path)
        except OSError:
          pass  # Transient (NFS) or just replaced; the next beat reads the file again.
        continue
      misses += 1  # One miss may be a taker that is putting our file back.
      if misses >= 2:
        self.lost = True
        return


_MACHINE = _machine_key()
