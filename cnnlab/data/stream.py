"""The streaming input pipeline: batches read example by example from a random-access source,
transformed, stacked and normalised in grain worker processes, ahead of the training step.

A source is grain's random-access protocol: `len(source)` and `source[i] -> {"image": uint8
[H, W, C], "label": int}`, picklable (workers get a copy). Order and augmentation are pure
functions of the run's seed: global batch (epoch, batch) holds the examples
`pipeline.epoch_permutation(N, seed, epoch)[batch * B:(batch + 1) * B]` (the order of
`pipeline.TrainIterator`), and example i is transformed with
`transforms.example_rng(seed, epoch, i)`, so a resumed run, another process count or another
worker count reads the same examples with the same augmentations.

The grain pipeline is a `MapDataset` over global step numbers from the iterator's position,
mapped by a batch maker (this process's `rows` of that step's batch), prefetched by a thread
(workers=0) or by `mp_prefetch` worker processes (spawned; each makes every workers-th batch).
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import threading
import time
import weakref

import grain
import numpy as np
from absl import flags
from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

from cnnlab.base.errors import ConfigError, DatasetError
from cnnlab.data.pipeline import epoch_permutation, normalise
from cnnlab.data.transforms import example_rng

_ENDLESS = 2 ** 40        # steps in a training pipeline's range: endless in practice
_PARENT_POLL_S = 0.25     # how often a worker checks that the process it serves is alive
_KEPT = 2                 # batches kept after yielding them, replayed after a peek


class ArraySource:
  """A source over in-memory arrays: images uint8 [N, H, W, C], labels int32 [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...] = ()):
    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.class_names = tuple(class_names)

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of every example: known without reading one."""
    return tuple(self.images.shape[1:])

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": int(self.labels[i])}


def _apply(transform, image: np.ndarray, rng) -> np.ndarray:
  """`transform(image, rng)`; transform None leaves the image as it is."""
  return image if transform is None else transform(image, rng)


def _stack(images: list[np.ndarray], indices) -> np.ndarray:
  """uint8 [H, W, C] examples -> [B, H, W, C]; DatasetError when their shapes differ."""
  shapes = {image.shape for image in images}
  if len(shapes) > 1:
    first = images[0].shape
    i, odd = next((i, image.shape) for i, image in zip(indices, images) if image.shape != first)
    raise DatasetError(f"example {int(i)} is {odd} after the transform but example "
                       f"{int(indices[0])} is {first}; a batch needs one shape: resize or crop "
                       f"the images to one size (config.dataset.image_size).")
  return np.stack(images)


class _TrainBatch:
  """Global step -> this process's `rows` of that step's batch. Runs in grain's workers (hence a
  picklable class); reads only the examples of those rows."""

  def __init__(self, source, batch_size: int, seed: int, transform, mean, std, rows: slice):
    self.source, self.batch_size, self.seed = source, batch_size, seed
    self.transform, self.mean, self.std, self.rows = transform, mean, std, rows
    self.steps_per_epoch = len(source) // batch_size

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, batch = divmod(int(step), self.steps_per_epoch)
    b = self.batch_size
    order = epoch_permutation(len(self.source), self.seed, epoch)
    indices = order[batch * b:(batch + 1) * b][self.rows]
    examples = [self.source[int(i)] for i in indices]
    images = [_apply(self.transform, e["image"],
                     None if self.transform is None else example_rng(self.seed, epoch, int(i)))
              for i, e in zip(indices, examples)]
    return {"image": normalise(_stack(images, indices), self.mean, self.std),
            "label": np.array([e["label"] for e in examples], np.int32)}


def _exit_with_parent(parent_pid: int, worker: int, workers: int) -> None:
  """grain worker init: end this worker soon after the process it serves is gone. A parent
  killed with SIGKILL cannot stop its workers, and a worker blocked on its full output queue
  would otherwise live on."""
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(_PARENT_POLL_S)
    os._exit(1)
  threading.Thread(target=watch, name="cnnlab-parent-watch", daemon=True).start()


def _grain_flag_default() -> None:
  """grain 0.2.18's `mp_prefetch` reads the absl flag --grain_enable_multiprocess_worker_profiling
  directly, which raises UnparsedFlagAccessError unless absl parsed the command line (launch.py
  does; the Python API and tests do not): mark that one flag as given, with its default value."""
  name = "grain_enable_multiprocess_worker_profiling"
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
    flags.FLAGS[name].present = 1


_LIVE = weakref.WeakSet()   # the StreamIterators whose pipelines may be running


def _owned(batch: dict) -> dict:
  """`batch` with arrays of its own: a batch from worker processes arrives in grain's shared
  memory, which must be freed before interpreter exit tears grain down (else "leaked
  shared_memory" warnings and errors in its __del__); copying it out frees it at once."""
  return {k: np.array(v) if isinstance(v, SharedMemoryArray) else v for k, v in batch.items()}


@functools.cache
def _clean_up_at_exit() -> None:
  """At exit, stop the pipelines still running, then free the shared memory grain frees in a
  thread pool (which interpreter exit stops first) and free later ones at once."""
  def clean_up():
    for it in list(_LIVE):
      it.close()
    pool = SharedMemoryArray._del_thread_pool
    SharedMemoryArray._disable_async_del()
    if pool is not None:
      pool.close()
      pool.join()
  atexit.register(clean_up)   # after multiprocessing's exit handler, so it runs before it


def _iterate(dataset: grain.MapDataset, workers: int, prefetch: int):
  """A grain iterator over `dataset`'s elements in order: made `prefetch` ahead by a thread
  (workers=0) or by `workers` processes, each with `prefetch` finished elements queued."""
  if not workers:
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                          prefetch_buffer_size=prefetch)))
  _grain_flag_default()
  _clean_up_at_exit()
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                   per_worker_buffer_size=prefetch),
                      worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  return iter(ds)


def _check_workers(workers: int) -> None:
  if workers < 0:
    raise ConfigError(f"workers={workers}; use 0 (read in this process) or a number of worker "
                      f"processes.")


class StreamIterator:
  """Yields {"image": float32 [B/P, h, w, C] normalised, "label": int32 [B/P]} forever: this
  process's `rows` of each global batch, as `pipeline.TrainIterator` (the same interface and,
  over an `ArraySource` with transform None, the same batches)."""

  def __init__(self, source, batch_size: int, seed: int, transform, mean, std,
               rows: slice = slice(None), workers: int = 0, prefetch: int = 2):
    _check_workers(workers)
    self.num_examples = len(source)
    if not 0 < batch_size <= self.num_examples:
      raise ConfigError(f"batch size {batch_size} does not fit the {self.num_examples} "
                        f"examples of the split; use 1 to {self.num_examples}.")
    self.batch_size, self.seed, self.rows = batch_size, seed, rows
    self.workers, self.prefetch = workers, max(1, prefetch)
    self.steps_per_epoch = self.num_examples // batch_size
    self.epoch, self.batch = 0, 0
    self.pipeline_builds = 0          # grain pipelines started (workers started anew each)
    self._maker = _TrainBatch(source, batch_size, seed, transform, mean, std, rows)
    self._iter = None                 # the grain iterator; yields global step `_next_step` next
    self._next_step = 0
    self._kept = collections.deque(maxlen=_KEPT)   # (step, batch) last yielded

  def _step(self) -> int:
    return self.epoch * self.steps_per_epoch + self.batch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step = self._step()
    batch = dict(self._kept).get(step)
    if batch is None:
      if self._iter is None or self._next_step != step:
        self._build(step)
      batch = _owned(next(self._iter))
      self._next_step = step + 1
      self._kept.append((step, batch))
    self.epoch, self.batch = divmod(step + 1, self.steps_per_epoch)
    return batch

  def _build(self, step: int) -> None:
    """Starts the grain pipeline (and its workers) at global step `step`."""
    self._close_pipeline()
    steps = grain.MapDataset.range(step, step + _ENDLESS).map(self._maker)
    self._iter = _iterate(steps, self.workers, self.prefetch)
    _LIVE.add(self)
    self._next_step = step
    self.pipeline_builds += 1

  def get_state(self) -> dict:
    return {"seed": self.seed, "epoch": self.epoch, "batch": self.batch}

  def set_state(self, state: dict) -> None:
    """Moves to `state`'s position. A position kept or next in the pipeline (the training loop
    peeks one batch and puts the position back) keeps the workers; another stops them, and the
    next batch starts them there."""
    if state["seed"] != self.seed:
      raise ValueError(f"iterator state of seed {state['seed']} restored into seed {self.seed}")
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
    step = self._step()
    if step != self._next_step and step not in dict(self._kept):
      self._close_pipeline()

  def _close_pipeline(self) -> None:
    if self._iter is not None:
      self._iter.close()
    self._iter = None
    self._kept.clear()

  def close(self) -> None:
    """Stops the worker processes (a later batch starts them again)."""
    self._close_pipeline()


class _EvalBatch:
  """Batch k of the split in order -> this process's `rows` of it, padded as
  `pipeline.eval_batches_from_arrays` pads (picklable, for grain's workers)."""

  def __init__(self, source, batch_size: int, transform, mean, std, multiple_of: int,
               rows: slice):
    self.source, self.batch_size, self.transform = source, batch_size, transform
    self.mean, self.std, self.rows = mean, std, rows
    self.padded = -(-batch_size // multiple_of) * multiple_of
    self._shape = None   # one example's shape after the transform, for all-padding shares

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    start = int(k) * self.batch_size
    count = min(self.batch_size, len(self.source) - start)
    positions = np.arange(self.padded)[self.rows]
    real = positions < count
    indices = start + positions[real]
    examples = [self.source[int(i)] for i in indices]
    if examples:
      images = _stack([_apply(self.transform, e["image"], None) for e in examples], indices)
      self._shape = images.shape[1:]
    elif self._shape is None:
      self._shape = _apply(self.transform, self.source[0]["image"], None).shape
    image = np.zeros((len(positions), *self._shape), np.float32)
    label = np.zeros(len(positions), np.int32)
    if examples:
      image[real] = normalise(images, self.mean, self.std)
      label[real] = [e["label"] for e in examples]
    return {"image": image, "label": label, "mask": real.astype(np.float32)}


def stream_eval_batches(source, batch_size: int, transform, mean, std, multiple_of: int = 1,
                        rows: slice = slice(None), workers: int = 0):
  """Yields the split in order as {"image", "label", "mask": float32 [B]}, the batches of
  `pipeline.eval_batches_from_arrays` (padded with mask 0 to a multiple of `multiple_of`, this
  process's `rows`), each example transformed with `transform(image, None)`; the workers stop
  when the generator ends or is closed."""
  _check_workers(workers)
  batches = -(-len(source) // batch_size)
  maker = _EvalBatch(source, batch_size, transform, mean, std, multiple_of, rows)
  it = _iterate(grain.MapDataset.range(batches).map(maker), workers, prefetch=2)
  try:
    for batch in it:
      yield _owned(batch)
  finally:
    it.close()


def source_stats(source, transform, max_examples: int = 2048,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std [C] float32, in [0, 1] units, of the pixels of up to
  `max_examples` examples after `transform(image, None)` (a sample drawn with `seed` when the
  source is larger); std floored at 1e-3 as `cnnlab.data.normalisation`. Images may differ in
  size: every pixel counts once (Chan et al.'s pairwise merge of per-image moments)."""
  n = len(source)
  if n == 0:
    raise DatasetError("the source has no examples to compute normalisation statistics from.")
  indices = (np.arange(n) if n <= max_examples
             else np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False)))
  count, mean, m2 = 0, 0.0, 0.0
  for i in indices:
    x = _apply(transform, source[int(i)]["image"], None).astype(np.float64) / 255.0
    k = x.shape[0] * x.shape[1]
    m = x.mean(axis=(0, 1))
    delta = m - mean
    mean = mean + delta * k / (count + k)
    m2 = m2 + ((x - m) ** 2).sum(axis=(0, 1)) + delta ** 2 * count * k / (count + k)
    count += k
  std = np.sqrt(m2 / count)
  return np.asarray(mean, np.float32), np.maximum(std, 1e-3).astype(np.float32)
