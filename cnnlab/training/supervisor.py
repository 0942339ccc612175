"""One process of a multi-process run, supervised: however it ends, its terminal shows one line.

When a peer of a multi-process run dies, JAX and XLA end the others from C++: a FATAL log line,
a C++ stack and Python's fault handler's dump of every thread (`client.h:80] Terminating
process`, within a second of losing the coordinator); a port already in use ends the process
with a segmentation fault. Neither can be caught inside the process. So launch.py runs each
process of a multi-process run as a child of a small parent that starts no JAX backend:

- the child's stdout and stderr pass through, except XLA's and gloo's own log lines (C++
  `[IWEF]mmdd ... file.cc:N]` lines with what follows them, `[Gloo]` lines, fatal stacks and
  thread dumps), which go to a log file, kept only when the one line below names it;
- SIGTERM and SIGINT to the parent reach the child once (it runs in its own session, so a
  terminal's Ctrl-C comes only through the parent), which saves a checkpoint with its peers and
  says so; a second signal stops it at once (exit 130); `kill -9` of the parent kills the child
  (PR_SET_PDEATHSIG);
- a child that ends without its own `error:` line, killed by a signal or aborted by XLA, is
  reported in one line naming why and the log file, with exit status 2.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from cnnlab.base.errors import ConfigError

SUPERVISED_ENV = "CNNLAB_SUPERVISED"
# How long a process waits for the others to join, and after how long a silent peer is taken as
# gone; the environment variables set other limits (a slow scheduler; tests).
START_TIMEOUT_S = int(os.environ.get("CNNLAB_START_TIMEOUT_S", "120"))
PEER_TIMEOUT_S = float(os.environ.get("CNNLAB_PEER_TIMEOUT_S", "30"))
# The child's lines to its parent (not shown): start-up is over; the status it exits with.
_JOINED = b"cnnlab-supervisor: joined\n"
RESUME_HINT = ("start all processes again with the same commands to resume from the last "
               "checkpoint")
_EXITING = b"cnnlab-supervisor: exit "
# XLA/absl C++ log lines (not Python's absl logging, whose source is a .py file), gloo's
# connection lines, and what a fatal error prints after them.
_NOISE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?![^\]]*\.py:)[^\]]*:\d+\]"
                    r"|\[Gloo\] |\*\*\* Check failure|\s+@\s+0x|Fatal Python error"
                    r"|terminate called after)")
_FATAL = re.compile(r"^F\d{4} [^\]]*\] (.*)")
# What cnnlab itself prints: never swallowed as a continuation of a C++ message.
_OURS = re.compile(r"^(error: |wrote |resuming |the checkpoint |\S+ already holds |Traceback "
                   r"|WARNING|\S+\.py:\d+: )")

# Started by a fresh interpreter that asks Linux to kill the child when the parent dies, then
# execs it (no Python runs between fork and exec in the parent). argv: parent pid, command.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
try:
  ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux only).
except (AttributeError, OSError):
  pass
if os.getppid() != int(sys.argv[1]):
  sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def requested(coordinator_address, num_processes, process_id) -> bool:
  """Whether a command asks for a multi-process run: launch.py's multi-host flags, or one task
  of a multi-task SLURM step (srun), whose settings JAX reads from SLURM."""
  slurm_tasks = os.environ.get("SLURM_NTASKS", "1").strip() or "1"
  return (any(v is not None for v in (coordinator_address, num_processes, process_id))
          or (bool(os.environ.get("SLURM_JOB_ID")) and slurm_tasks.isdigit()
              and int(slurm_tasks) > 1))


def parse_coordinator(address: str) -> tuple[str, int]:
  """`host:port` -> (host, port), or a ConfigError naming what is wrong."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ConfigError(f"--coordinator_address={address!r} must be host:port with a port in "
                      f"1-65535 (process 0 listens there), e.g. 127.0.0.1:12345.")
  return host.strip("[]"), int(port)


def check_port_free(address: str, port: int) -> None:
  """Process 0 hosts the coordinator on `port` of every interface: a port already taken makes
  JAX crash (a segmentation fault), so it is refused first."""
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, port))
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise ConfigError(f"--coordinator_address={address}: port {port} is in use on this host "
                          f"(another run's coordinator?); choose a free port for every "
                          f"process.") from None
      if family == socket.AF_INET:  # Neither family can bind: leave it to JAX to say why.
        return


def check_arguments(coordinator_address: str | None, num_processes: int | None,
                    process_id: int | None) -> None:
  """Refuses incomplete or invalid multi-host flags, or (on process 0) a port in use."""
  given = (coordinator_address, num_processes, process_id)
  if all(v is None for v in given) and "SLURM_STEP_NUM_TASKS" not in os.environ:
    raise ConfigError(  # The batch script itself: no step, so no coordinator to find.
        f"this SLURM job has {os.environ.get('SLURM_NTASKS')} tasks (SLURM_NTASKS) but runs "
        f"outside srun: start one process per task with `srun python launch.py ...`, or ask "
        f"for -n 1.")
  if any(v is None for v in given) and not all(v is None for v in given):
    raise ConfigError(
        "--coordinator_address, --num_processes and --process_id go together (got "
        f"{coordinator_address!r}, {num_processes!r}, {process_id!r}); give all three, or none "
        "for a single process (or under SLURM).")
  if num_processes is not None and (num_processes < 1 or not 0 <= process_id < num_processes):
    raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
  if coordinator_address is not None:
    _, port = parse_coordinator(coordinator_address)
    if process_id == 0:
      check_port_free(coordinator_address, port)


def report_joined() -> None:
  """Tells the parent that this child joined the run (a line the parent does not show)."""
  _tell_parent(_JOINED)


def report_exit(status: int) -> None:
  """Tells the parent the status this child is about to exit with, after its `error:` line: a
  peer that ends first can make XLA abort this process before it exits itself."""
  _tell_parent(_EXITING + f"{status}\n".encode())


def _tell_parent(line: bytes) -> None:
  if is_child():
    sys.stdout.flush()
    sys.stdout.buffer.write(line)
    sys.stdout.flush()


def is_child() -> bool:
  return os.environ.get(SUPERVISED_ENV) == "1"


def run(argv: list[str], process_id: int | str) -> int:
  """Runs `argv` (this launch.py command) as the supervised child; returns the exit status."""
  log_path = os.path.join(tempfile.gettempdir(),
                          f"cnnlab-process{process_id}-{os.getpid()}.log")
  child = subprocess.Popen(
      [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), sys.executable, *argv],
      env=dict(os.environ, **{SUPERVISED_ENV: "1"}), stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda signum, frame: child.send_signal(signum))
  filters = [_Filter(log_path, sys.stdout.buffer), _Filter(log_path, sys.stderr.buffer)]
  readers = [threading.Thread(target=f.copy, args=(stream,), daemon=True)
             for f, stream in zip(filters, (child.stdout, child.stderr))]
  for reader in readers:
    reader.start()
  status = child.wait()
  for reader in readers:
    reader.join()
  exiting = next((f.exiting for f in filters if f.exiting is not None), None)
  if status == 0 or any(f.said_error for f in filters):
    _remove(log_path)  # The terminal said how it ended; the log is kept only when it is named.
    return exiting if exiting is not None else status if status in (0, 2, 130) else 2
  if not any(f.joined for f in filters):
    print(f"error: process {process_id} could not join the other processes within "
          f"{START_TIMEOUT_S} s (CNNLAB_START_TIMEOUT_S); start every process within that time "
          f"with the same --coordinator_address and --num_processes and its own --process_id "
          f"(this process's log: {log_path}).", file=sys.stderr, flush=True)
    return 2
  if -status in (signal.SIGTERM, signal.SIGINT):  # A second signal: the user's, exit at once.
    _remove(log_path)
    print(f"error: process {process_id} stopped at once by a second "
          f"{signal.Signals(-status).name}; {RESUME_HINT}.", file=sys.stderr, flush=True)
    return 130
  why = (f"ended by {signal.Signals(-status).name}" if status < 0
         else f"exited with status {status}")
  fatal = next((f.fatal for f in filters if f.fatal), None)
  if fatal:
    why += f" (XLA: {fatal.split('. ')[0][:200]})"
  print(f"error: process {process_id} {why}; if another process ended first, its line says "
        f"why; {RESUME_HINT} (this process's log: {log_path}).", file=sys.stderr, flush=True)
  return 2


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


class _Filter:
  """Copies a stream of the child's to `out`, and XLA's own lines to a log file opened on first
  use."""

  def __init__(self, log_path: str, out):
    self.log_path, self.out = log_path, out
    self.log = None
    self.said_error = False
    self.fatal: str | None = None
    self.in_noise = False
    self.joined = False
    self.exiting: int | None = None

  def copy(self, stream) -> None:
    """Reads `stream` to its end in pieces that end at a newline or a carriage return (progress
    bars redraw with the latter), passing or keeping each."""
    pending = b""
    while chunk := os.read(stream.fileno(), 65536):
      pieces = re.split(rb"(?<=[\r\n])", pending + chunk)
      pending = pieces.pop()
      for piece in pieces:
        self._one(piece)
    if pending:
      self._one(pending)
    if self.log is not None:
      self.log.close()

  def _one(self, raw: bytes) -> None:
    if raw == _JOINED:
      self.joined = True
      return
    if raw.startswith(_EXITING):
      self.exiting = int(raw[len(_EXITING):])
      return
    text = raw.decode("utf-8", "replace")
    if _NOISE.match(text) or (self.in_noise and not _OURS.match(text)):
      self.in_noise = True
      fatal = _FATAL.match(text)
      if fatal and self.fatal is None:
        self.fatal = fatal.group(1).strip()
      self._keep(raw)
      return
    self.in_noise = False
    self.said_error |= text.startswith("error: ")
    self.out.write(raw)
    self.out.flush()

  def _keep(self, raw: bytes) -> None:
    if self.log is None:
      self.log = open(self.log_path, "ab")
    self.log.write(raw)
    self.log.flush()
