"""The processes of a multi-process run: joined with bounded waits, and ended together.

    hosts.initialize(address, num_processes, process_id)  # before the first JAX computation
    ...train...                                            # hosts.agree_to_stop() at log points
    hosts.finish()                                         # every process done: exit together

Left to JAX's defaults, a multi-process run fails slowly and loudly: a process whose peers never
start waits 300 s, then aborts; one whose peer dies blocks in a collective until JAX's heartbeat
timeout aborts it 100 s later with a C++ stack; a signal to one process stops it at a step the
others never reach, so both wait forever. Here:

- start-up: every process must join within START_TIMEOUT_S of the others, else each says so in
  one line (the coordinator's address is checked first, and its port on process 0);
- a watchdog thread in each process bumps a counter in JAX's key-value store every BEAT_S and
  watches its peers' counters: a peer that stops counting for PEER_TIMEOUT_S (killed, stopped,
  its host gone), that ends with an error (it leaves its error line in the store), or a
  coordinator that stops answering ends this process too, with one line, within PEER_TIMEOUT_S;
- a signal is acted on by every process at the same step (`agree_to_stop`, a collective at log
  points), so all save the same checkpoint and stop.

Checkpoints are written by a rename once complete (cnnlab.training.checkpoint), so however a
process ends, the newest complete one is intact and the same commands resume from it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from typing import NoReturn

import jax
import numpy as np

from cnnlab.base.errors import CnnlabError
from cnnlab.training import supervisor
from cnnlab.training.supervisor import PEER_TIMEOUT_S, START_TIMEOUT_S

BEAT_S = min(2.0, PEER_TIMEOUT_S / 5)  # How often each process shows it is alive.
# JAX's own heartbeat must give up later than the watchdog, or it aborts the process first.
JAX_HEARTBEAT_S = int(PEER_TIMEOUT_S * 3)
SHUTDOWN_TIMEOUT_S = 30  # JAX's barrier at exit: how long a process waits for the others.
_RESUME = supervisor.RESUME_HINT
_ending = threading.Lock()  # One line per process, when the watchdog and the main thread both end.
_attempted = False


class HostsError(CnnlabError):
  """A multi-process run lost a process or could not start; the message says which and why."""


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`) with the bounded
  waits above, and starts the watchdog. With no arguments: a single process, unless this is one
  task of a multi-task SLURM step (srun), whose settings JAX reads from SLURM. On CPU the
  collectives run over gloo. Must run before the first JAX computation.

  Raises:
    ConfigError: the arguments are incomplete or invalid, or the port is taken.
    HostsError: the other processes did not join in time.
  """
  if not supervisor.requested(coordinator_address, num_processes, process_id):
    return
  supervisor.check_arguments(coordinator_address, num_processes, process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  global _attempted
  _attempted = True
  started = time.monotonic()
  try:
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=START_TIMEOUT_S,
        heartbeat_timeout_seconds=JAX_HEARTBEAT_S, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  except Exception as e:  # noqa: BLE001 -- JAX raises RuntimeError, ValueError, JaxRuntimeError.
    waited = time.monotonic() - started
    where = coordinator_address or "the coordinator SLURM names"
    raise HostsError(
        f"process {process_id} of {num_processes} could not join the others at {where} "
        f"(after {waited:.0f} s; limit {START_TIMEOUT_S} s: {_first_line(e)}); start every "
        f"process within {START_TIMEOUT_S} s with the same --coordinator_address and "
        f"--num_processes, and a different --process_id.") from None
  _Watchdog.start()
  supervisor.report_joined()


def attempted() -> bool:
  """Whether this process tried to join a multi-process run (it must then end through `fail`)."""
  return _attempted


def agree_to_stop(signal_name: str | None) -> str | None:
  """The signal any process of the run has caught (None if none has): a collective, so every
  process must call it at the same step, and all then stop at that step. A single process gets
  its own `signal_name` back."""
  if jax.process_count() == 1:
    return signal_name
  from jax.experimental import multihost_utils  # Only multi-process runs need it.
  code = np.int32(0 if signal_name is None else _SIGNALS.index(signal_name) + 1)
  codes = np.asarray(multihost_utils.process_allgather(code))
  first = int(codes.max())
  return None if first == 0 else _SIGNALS[first - 1]


_SIGNALS = ("SIGINT", "SIGTERM")


def check_same_config(config) -> None:
  """Ends every process, in one line each, when their configs differ (a --config.* flag given to
  one process only): they would train one model from different settings and record process 0's,
  or wait at different steps. Where each host keeps its data (`dataset.data_dir`, `manual_dir`)
  may differ."""
  watchdog = _Watchdog.instance
  if watchdog is None:
    return
  settings = config.to_dict()
  for key in ("data_dir", "manual_dir"):
    settings.get("dataset", {}).pop(key, None)
  digest = hashlib.sha256(repr(sorted(_flat(settings))).encode()).hexdigest()[:12]
  watchdog.client.key_value_set(f"cnnlab/config/{watchdog.me}", digest)
  differ = [p for p in watchdog.peers if watchdog.client.blocking_key_value_get(
      f"cnnlab/config/{p}", START_TIMEOUT_S * 1000) != digest]
  if differ:
    fail(f"process {watchdog.me}'s config (sha256 {digest}) differs from that of process "
         f"{differ[0]}: give every process the same --config and --config.* flags.", 2)


def _flat(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", repr(value)


def lost_peer(error: BaseException) -> None:
  """A JAX runtime error in a collective or barrier of a multi-process run (gloo's "Connection
  closed by peer", a coordination-service barrier) means a peer ended, not a bug: lets the
  watchdog name the peer (within PEER_TIMEOUT_S), else ends in one line itself."""
  if _Watchdog.instance is None or not isinstance(error, jax.errors.JaxRuntimeError):
    return
  time.sleep(PEER_TIMEOUT_S + 2 * BEAT_S)
  fail(f"process {jax.process_index()}: a collective with the other processes failed "
       f"({_first_line(error)}); {_RESUME}.", 2)


def finish() -> None:
  """Waits until every process has finished its work, then stops the watchdog, so that no
  process reads a finished peer as a lost one. A peer that dies meanwhile is the watchdog's."""
  watchdog = _Watchdog.instance
  if watchdog is None:
    return
  try:
    watchdog.client.wait_at_barrier("cnnlab/finished", _DAY_MS)
  except Exception as e:  # noqa: BLE001 -- the coordinator went away.
    fail(f"process {jax.process_index()} finished, but lost the others before they did "
         f"({_first_line(e)}); {_RESUME}.", 2)
  watchdog.stop()


_DAY_MS = 24 * 3600 * 1000


def fail(message: str, status: int) -> NoReturn:
  """Ends this process of a multi-process run with one `error:` line and `status`, at once:
  the line is left in the key-value store for the peers' watchdogs to quote, and JAX's exit
  handlers (a barrier that would wait for the peers, then a C++ stack) are skipped."""
  _ending.acquire()
  print(f"error: {message}", file=sys.stderr, flush=True)
  supervisor.report_exit(status)
  watchdog = _Watchdog.instance
  if watchdog is not None:
    watchdog.publish_exit(message)
  sys.stdout.flush()
  os._exit(status)


def _first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0][:200]


class _Watchdog:
  """Shows this process is alive and ends it when a peer is gone (see the module docstring)."""
  instance: _Watchdog | None = None

  def __init__(self):
    from jax._src import distributed  # JAX's key-value client: no public handle to it.
    self.client = distributed.global_state.client
    self.me, self.count = jax.process_index(), jax.process_count()
    self.peers = [p for p in range(self.count) if p != self.me]
    self.stopped = threading.Event()
    self.answered = time.monotonic()  # When the coordinator last answered a whole round.
    self.thread = threading.Thread(target=self._run, name="cnnlab-hosts-watchdog", daemon=True)
    self.guard = threading.Thread(target=self._guard, name="cnnlab-hosts-guard", daemon=True)

  @classmethod
  def start(cls) -> None:
    if jax.process_count() > 1 and cls.instance is None:
      cls.instance = cls()
      cls.instance.thread.start()
      cls.instance.guard.start()

  def stop(self) -> None:
    self.stopped.set()
    self.thread.join()
    self.guard.join()
    _Watchdog.instance = None

  def publish_exit(self, message: str) -> None:
    try:
      self.client.key_value_set(f"cnnlab/exit/{self.me}", message, allow_overwrite=True)
    except Exception:  # noqa: BLE001 -- the coordinator is gone: the peers see that instead.
      pass

  def _run(self) -> None:
    seen = {p: (None, time.monotonic()) for p in self.peers}
    while not self.stopped.wait(BEAT_S):
      try:
        self.client.key_value_increment(f"cnnlab/beat/{self.me}", 1)
        for peer in self.peers:
          message = self._try_get(f"cnnlab/exit/{peer}")
          if message is not None:
            self._end(f"process {peer} of {self.count} stopped: {message}", 2)
          beat = self._try_get(f"cnnlab/beat/{peer}")
          if beat != seen[peer][0]:
            seen[peer] = (beat, time.monotonic())
          elif time.monotonic() - seen[peer][1] > PEER_TIMEOUT_S:
            self._end(f"process {peer} of {self.count} has not answered for "
                      f"{PEER_TIMEOUT_S:.0f} s (killed, stopped, or its host is gone)", 2)
        self.answered = time.monotonic()
      except Exception as e:  # noqa: BLE001 -- the key-value store (process 0) is gone.
        if self.stopped.is_set():
          return
        self._end(f"lost the coordinator, process 0 ({_first_line(e)}): it ended or its host "
                  f"is gone", 2)

  def _guard(self) -> None:
    """JAX's key-value calls have no deadline: one to a stopped or frozen process 0 never returns
    and would hold the watchdog until JAX aborts the process (3 x PEER_TIMEOUT_S, C++ stack)."""
    while not self.stopped.wait(BEAT_S):
      if time.monotonic() - self.answered > PEER_TIMEOUT_S + BEAT_S:
        self._end(f"the coordinator, process 0, has not answered for {PEER_TIMEOUT_S:.0f} s "
                  f"(stopped, or its host is gone)", 2)

  def _try_get(self, key: str) -> str | None:
    try:
      return self.client.key_value_try_get(key)
    except Exception as e:  # noqa: BLE001 -- NOT_FOUND is an exception here.
      if "NOT_FOUND" in str(e):
        return None
      raise

  def _end(self, what: str, status: int) -> NoReturn:
    _ending.acquire()
    print(f"error: process {self.me}: {what}; every process stops; {_RESUME}.",
          file=sys.stderr, flush=True)
    supervisor.report_exit(status)
    os._exit(status)
