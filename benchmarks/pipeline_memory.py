"""Peak memory of one epoch of the streaming pipeline over a folder, measured in the process
that runs it (benchmarks/input_pipeline.py's rss section starts one per folder size)."""

from __future__ import annotations

import os
import resource
import time

from image_folders import IMAGENET_MEAN, IMAGENET_STD, open_folder

from cnnlab.data import stream, transforms


def _status_mb(pid: int | str, key: str) -> float:
  """`key` (VmRSS, VmHWM) of /proc/<pid>/status in MB (2**20 bytes); 0 for a process gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return next(int(l.split()[1]) for l in f if l.startswith(f"{key}:")) / 1024
  except (FileNotFoundError, StopIteration):
    return 0.0


def _workers() -> list[int]:
  """This process's children but multiprocessing's resource tracker: the pipeline's workers."""
  pids = []
  for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/children") as f:
      pids += [int(p) for p in f.read().split()]
  def tracker(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return b"resource_tracker" in f.read()
  return [pid for pid in pids if not tracker(pid)]


def epoch_rss(root: str, cache: str, workers: int, batch: int, size: int) -> dict:
  """In a fresh process: one epoch of StreamIterator over the folder's train split; its memory
  facts (MB). getrusage's maxrss counts from the fork this process
  was started by (Linux carries it over exec), so it includes the parent's RSS at that moment;
  VmHWM, the peak of this process's own image, does not."""
  _, source = open_folder(root, cache)
  before = _status_mb("self", "VmRSS")
  it = stream.StreamIterator(source, batch, 0, transforms.train_transform("imagenet", size),
                             IMAGENET_MEAN, IMAGENET_STD, workers=workers)
  start = time.perf_counter()
  for _ in range(it.steps_per_epoch):
    next(it)
  seconds = time.perf_counter() - start
  worker_peaks = [_status_mb(pid, "VmHWM") for pid in _workers()]
  it.close()
  maxrss = lambda who: resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux.
  return {"examples": len(source), "epoch_s": seconds, "rss_before_mb": before,
          "peak_mb": _status_mb("self", "VmHWM"), "worker_peaks_mb": worker_peaks,
          "maxrss_self_mb": maxrss(resource.RUSAGE_SELF),
          "maxrss_children_mb": maxrss(resource.RUSAGE_CHILDREN),
          "decoded_whole_mb": len(source) * size * size * 3 / 2**20}
