"""Signals: SIGTERM/SIGINT end a command in one line and exit status 130, wherever they land.

Inside an `interrupt_guard` (a training loop between steps, a sweep's parent between polls) the
first signal becomes a flag the loop checks at a safe point; elsewhere (start-up, the final
evaluation, a sweep's report) `stop_on_signal`'s handler raises `Signalled` where the program is,
as Ctrl-C raises KeyboardInterrupt. Either way a second signal exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Signalled(BaseException):
  """SIGTERM/SIGINT outside a loop's safe points. A BaseException, as KeyboardInterrupt, so that
  no `except Exception` on the way up swallows it or reports it as another error."""

  def __init__(self, signame: str):
    super().__init__(f"interrupted by {signame} before the command finished; what the workdir "
                     f"holds (finished runs, checkpoints) is kept: rerun the same command to go "
                     f"on from there.")
    self.signame = signame


def _exit_now(signum: int) -> None:
  """The second signal: do what the user asks, now (the default action: exit by the signal)."""
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)


_caught: list[int] = []  # Signals `stop_on_signal`'s handler has raised as `Signalled`.


def signalled_as(error: BaseException) -> Signalled | None:
  """`error` if it is `Signalled`, or the `Signalled` it replaced: a signal raised inside an
  import can come out as the ImportError the imported package raises instead (numpy does)."""
  if isinstance(error, Signalled):
    return error
  if _caught:
    return Signalled(signal.Signals(_caught[0]).name)
  return None


def stop_on_signal() -> None:
  """Makes the first SIGTERM/SIGINT raise `Signalled` in the main thread (a command line's entry
  point calls it once, then prints the exception as its one line), the second exit at once.
  A signal that lands in a long call into C (an XLA compilation) takes effect when it returns."""
  caught = _caught

  def handler(signum, frame):
    if caught:
      _exit_now(signum)
    caught.append(signum)
    raise Signalled(signal.Signals(signum).name)

  for s in SIGNALS:
    signal.signal(s, handler)


@contextlib.contextmanager
def interrupt_guard():
  """Turns the first SIGTERM/SIGINT into a flag the loop checks between steps; a second one
  exits at once. Yields a dict whose "signal" is the signal's name once one arrived."""
  caught: dict[str, Any] = {"signal": None}
  if threading.current_thread() is not threading.main_thread():
    yield caught
    return

  def handler(signum, frame):
    if caught["signal"]:
      _exit_now(signum)
    caught["signal"] = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler) for s in SIGNALS}
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
