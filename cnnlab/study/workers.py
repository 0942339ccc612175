"""Sweep workers as local processes, each pinned to its CPUs with one XLA thread, and the one
line that says why a worker failed (`WorkerError`).

On a CPU every worker is pinned to one core and runs one XLA thread, whichever launcher starts it:
XLA:CPU sizes its thread pool from the cores a process may use, and the thread count changes the
low bits of the results.

Worker output goes to log files, never to pipes: a pipe that is read only after the worker exits
fills up at 64 KB (one orbax disk-full error is longer) and both processes then wait forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import submitit

from cnnlab.base.errors import CnnlabError, Interrupted
from cnnlab.base.interrupts import interrupt_guard

SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"
LOG_TAIL_BYTES = 65536  # Of a log, only its end is read for the error message...
QUOTED_LINE_CHARS = 500  # ...and of the line it quotes, at most this much.
# The signal submitit sends a SLURM job before its time limit (to requeue it): pinned workers
# ignore it, their job passes it on as SIGTERM.
REQUEUE_SIGNAL = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


class WorkerError(CnnlabError):
  """Sweep workers failed; the message names their logs and what they said last."""


def last_meaningful_line(log_path: str) -> str:
  """The line of a log that says what went wrong: its last cnnlab `error: ...` line, else the
  exception line of its last Python traceback, else its last non-blank line."""
  try:
    with open(log_path, "rb") as f:
      f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
      text = f.read().decode("utf-8", "replace")
  except OSError as e:
    return f"(log unreadable: {e.strerror})"
  # Progress bars redraw with carriage returns: keep what each line showed last.
  lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
  lines = [line for line in lines if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  if errors:
    return errors[-1]
  tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
  if tracebacks:
    after = [line for line in lines[tracebacks[-1] + 1:] if not line[0].isspace()]
    if after:
      return after[0]
  return lines[-1] if lines else "(log is empty)"


def failure(log_path: str, what: str) -> str:
  return f"{what}; {log_path} ends: {last_meaningful_line(log_path)[:QUOTED_LINE_CHARS]}"


def _exit_status(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with status {returncode}"


# A worker is started by a fresh, single-threaded interpreter that pins it to its cores, asks
# Linux to send it SIGTERM when the sweep's process dies (PR_SET_PDEATHSIG: a `kill -9` of the
# sweep then stops its workers at a checkpoint instead of leaving them training unseen), ignores
# SLURM's time-limit warning (REQUEUE_SIGNAL, sent to every process of a job: the job's supervisor
# turns it into one SIGTERM per worker) and execs it; these settings survive the exec. Doing this
# in a preexec_fn would run Python between fork and exec in the sweep's process, whose JAX threads
# make that unsafe (Python's docs: it can deadlock; JAX warns). argv: cpus (comma-separated), the
# sweep's pid, the signal to ignore, the worker's command.
_PIN_AND_EXEC = """
import ctypes, os, signal, sys
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
signal.signal(int(sys.argv[3]), signal.SIG_IGN)
try:
  ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux only).
except (AttributeError, OSError):
  pass
if os.getppid() != int(sys.argv[2]):  # The sweep died before prctl took effect.
  sys.exit(1)
os.execvp(sys.argv[4], sys.argv[4:])
"""


def function_command(worker_fn: Callable[[str], None], workdir: str) -> list[str]:
  """The command that runs `worker_fn(workdir)` (a module-level function) in a new process."""
  code = "import importlib, sys; getattr(importlib.import_module(sys.argv[1]), sys.argv[2])(" \
         "sys.argv[3])"
  return [sys.executable, "-c", code, worker_fn.__module__, worker_fn.__qualname__, workdir]


def pinned(cpus: Sequence[int], command: Sequence[str]) -> list[str]:
  """`command` started through `_PIN_AND_EXEC`, on `cpus`, by this process (start it in a
  session of its own, `start_new_session=True`)."""
  return [sys.executable, "-c", _PIN_AND_EXEC, ",".join(map(str, cpus)), str(os.getpid()),
          str(int(REQUEUE_SIGNAL)), *command]


def run_local_workers(workdir: str, workers: int, on_progress: Callable[[], None] | None = None,
                      *, command: Sequence[str], poll_s: float = 0.25,
                      cpu_sets: Sequence[Sequence[int]] | None = None,
                      log_paths: Sequence[str] | None = None,
                      signalled_too: Callable[[], bool] | None = None,
                      stop: Callable[[], str | None] | None = None) -> None:
  """Runs `workers` processes of `command` (e.g. `function_command(worker_main, workdir)`), each
  pinned to its `cpu_sets` entry (default: one core each, in turn) and one XLA thread, with its
  output in its `log_paths` entry (default `<workdir>/logs/worker_<i>.log`); returns when all
  have exited and raises WorkerError (one line) if any failed.

  SIGTERM/SIGINT (Ctrl-C) to this process reach each worker as one SIGTERM, on which it saves
  a checkpoint and exits; then this raises `Interrupted` (one line). The workers run in their
  own session, so a terminal's Ctrl-C reaches them only this way (a second signal to a worker
  would stop it before its checkpoint is written); where the signal may have reached the workers
  as well (a SLURM job), `signalled_too()` says whether it did. Once `stop()` returns a reason,
  each worker gets one SIGTERM too. If this process is killed outright (kill -9), Linux sends
  each worker SIGTERM (`_PIN_AND_EXEC`)."""
  command = list(command)
  cpus = sorted(os.sched_getaffinity(0))
  cpu_sets = cpu_sets or [[cpus[i % len(cpus)]] for i in range(workers)]
  if log_paths is None:
    log_paths = [os.path.join(workdir, "logs", f"worker_{i}.log") for i in range(workers)]
  for log_dir in {os.path.dirname(p) for p in log_paths}:
    os.makedirs(log_dir, exist_ok=True)
  flags = os.environ.get("XLA_FLAGS", "")
  if SINGLE_THREAD_XLA_FLAGS not in flags.split():
    flags = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()
  env = dict(os.environ, XLA_FLAGS=flags, PYTHONUNBUFFERED="1")
  procs = []
  with interrupt_guard() as interrupt:
    try:
      for cpu_set, log_path in zip(cpu_sets, log_paths):
        with open(log_path, "wb") as log:  # The child keeps its own descriptor.
          procs.append(subprocess.Popen(
              pinned(cpu_set, command), env=env, stdin=subprocess.DEVNULL, stdout=log,
              stderr=subprocess.STDOUT, start_new_session=True))
      stopping = None
      while any(p.poll() is None for p in procs):
        reason = interrupt["signal"] or (stop() if stop else None)
        if reason and not stopping:
          if not (interrupt["signal"] and signalled_too and signalled_too()):
            for p in procs:
              if p.poll() is None:
                p.send_signal(signal.SIGTERM)
          stopping = reason
        if on_progress:
          on_progress()
        time.sleep(poll_s)
    finally:  # An error here, or failed to start one: stop the others.
      for p in procs:
        if p.poll() is None:
          p.terminate()
      for p in procs:
        p.wait()
  if on_progress:
    on_progress()
  stopping = interrupt["signal"] or stopping
  if stopping:
    raise Interrupted(f"interrupted by {stopping}: each worker saved a checkpoint of the run it "
                      f"was training; rerun the same command to resume.")
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    first = failed[0]
    raise WorkerError(failure(
        log_paths[first], f"{len(failed)} of {len(procs)} sweep workers failed (worker {first} "
        f"{_exit_status(procs[first].returncode)})"))
