"""Signals: the first SIGTERM/SIGINT becomes a flag a loop checks at a safe point (a training
loop between steps, a sweep's parent between polls); a second one exits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any


@contextlib.contextmanager
def interrupt_guard():
  """Turns the first SIGTERM/SIGINT into a flag the loop checks between steps; a second one
  exits at once. Yields a dict whose "signal" is the signal's name once one arrived."""
  caught: dict[str, Any] = {"signal": None}
  if threading.current_thread() is not threading.main_thread():
    yield caught
    return

  def handler(signum, frame):
    if caught["signal"]:  # The second signal: do what the user asks, now.
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    caught["signal"] = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
