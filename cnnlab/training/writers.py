"""One metric sink for a run: metrics.jsonl (the record of truth) and TensorBoard event files.

    writer = MetricWriter(run, resume_step)      # resume_step: the restored checkpoint's step (0)
    writer.write_scalars(step, "train", {"loss": 0.3, "accuracy": 0.9, "learning_rate": 0.05})
    writer.write_images(step, {"filters": grid})   # uint8 [H, W, C], C in 1, 3, 4
    writer.close()

The event files lie in the run's workdir itself (written with tensorboardX's record writer, no
TensorFlow), so `tensorboard --logdir=<sweep workdir>` shows one run per (cell, seed), named
`cells/<cell dir>/seed_<s>`, and `--logdir=<run workdir>` shows the run as `.`. Scalars are tagged
`<split>/<name>`: train loss/accuracy/learning rate at log points, test metrics per epoch.

Resuming: a run killed at step T+X restarts from its checkpoint at T. The new writer drops the
metrics.jsonl lines after T and starts a new event file with a SessionLog.START event at step
T + 1, which makes TensorBoard's readers purge every event of the earlier files with a step > T
(what tensorboardX's `purge_step` writes). Events are written and flushed synchronously on each
call (tensorboardX's SummaryWriter queues them in a thread, and its `flush` does not wait for the
queue), so at any kill the event files hold every step metrics.jsonl holds, and resuming leaves
neither duplicate nor out-of-order steps. Event file names sort in creation order (nanosecond
suffix): the readers replay the files of a directory in name order, and the seconds-resolution
names tensorboardX makes on its own would make two writers of one second overwrite each other.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnlab.base.errors import WorkdirError
from cnnlab.training.rundir import RunDir


def _import_tensorboardx():
  """tensorboardX's package imports torch whenever torch is installed (4 s on a 2-core CPU) only
  to accept torch tensors; cnnlab writes numpy, so torch is hidden while tensorboardX loads."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects.
  try:
    from tensorboardX import summary
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
  finally:
    if hide:
      del sys.modules["torch"]
  return summary, EventsWriter, Event, SessionLog


tb_summary, EventsWriter, Event, SessionLog = _import_tensorboardx()

IMAGE_CHANNELS = (1, 3, 4)


class MetricWriter:
  """Writes a run's metrics to metrics.jsonl and to a TensorBoard event file in its workdir."""

  def __init__(self, run: RunDir, resume_step: int = 0):
    """Drops metrics.jsonl lines after `resume_step` and opens a new event file whose readers
    hide the earlier files' events after `resume_step` (0 for a fresh run: all of them)."""
    self.run = run
    self.resume_step = int(resume_step)
    run.truncate_metrics(after_step=self.resume_step)
    # "events.out.tfevents.<s>.<host>.<ns>.<pid>": name order = creation order, never reused.
    try:
      os.makedirs(run.workdir, exist_ok=True)
      self._events = EventsWriter(os.path.join(run.workdir, "events"),
                                  f".{time.time_ns():020d}.{os.getpid()}")
    except OSError as e:
      raise self._failed(run.workdir, e) from None
    self._write(Event(step=self.resume_step + 1, wall_time=time.time(),
                      session_log=SessionLog(status=SessionLog.START)))

  @property
  def event_file(self) -> str:
    """The path of the event file this writer appends to."""
    return self._events._file_name

  def write_scalars(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    """One metrics.jsonl line {"step", "split", **scalars} and TensorBoard tags
    `<split>/<name>` at `step` (TensorBoard stores them as float32)."""
    self.run.log({"step": step, "split": split, **scalars})
    values = [tb_summary.scalar(f"{split}/{name}", float(value)).value[0]
              for name, value in scalars.items()]
    self._write(Event(step=step, wall_time=time.time(),
                      summary=tb_summary.Summary(value=values)))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images at `step`, tagged by their keys; each uint8 [H, W, C], C in 1, 3, 4."""
    values = []
    for tag, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(f"image {tag!r} is {image.dtype} {image.shape}; write_images takes "
                         f"uint8 [H, W, C] with C in {IMAGE_CHANNELS}.")
      values.append(tb_summary.image(tag, image, dataformats="HWC").value[0])
    self._write(Event(step=step, wall_time=time.time(),
                      summary=tb_summary.Summary(value=values)))

  def _write(self, event: Event) -> None:
    try:
      self._events.write_event(event)
      self._events.flush()
    except OSError as e:  # A full or read-only disk: one line, as every workdir write.
      raise self._failed(self.event_file, e) from None

  def _failed(self, path: str, e: OSError) -> WorkdirError:
    return WorkdirError.from_os_error(path, e.errno, e.strerror, self.run.resume_step())

  def close(self) -> None:
    try:
      self._events.close()
    except OSError as e:
      raise self._failed(self.event_file, e) from None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
