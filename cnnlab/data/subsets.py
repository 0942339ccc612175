"""Resizing and class-stratified subsets of a split (config.dataset.resize / train_per_class).

Transfer studies need both: a source and a target dataset of one image size (mnist5k's 28x28
digits shrunk to sklearn digits' 8x8), and the target's train split cut to a few examples per
class. Both are pure functions of their arguments, so every process and every rerun sees the
same images.
"""

from __future__ import annotations

import jax
import numpy as np

from cnnlab.base.errors import ConfigError


def check_size(size) -> tuple[int, int]:
  """`config.dataset.resize` -> (H, W), or ConfigError naming the value."""
  ok = (isinstance(size, (tuple, list)) and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size))
  if not ok:
    raise ConfigError(f"config.dataset.resize={size!r} must be None or (height, width), two "
                      "positive ints, e.g. (8, 8).")
  return int(size[0]), int(size[1])


def resize(images: np.ndarray, size) -> np.ndarray:
  """uint8 [N, H, W, C] -> uint8 [N, h, w, C]: antialiased linear resampling (each output pixel
  averages the input pixels it covers when shrinking), rounded to the nearest integer."""
  h, w = check_size(size)
  if images.shape[1:3] == (h, w):
    return images
  n, height, width, channels = images.shape
  # float32 buffers XLA holds at once: the input, the image resized along H, the output. Too
  # large, XLA aborts the process (a CHECK failure), so it is refused first.
  require_memory(f"dataset.resize={size!r}",
                 4 * n * channels * (height * width + h * width + h * w) + n * h * w * channels,
                 f"to resize the {n} images of the split")
  out = jax.image.resize(images.astype(np.float32), (len(images), h, w, images.shape[3]),
                         method="linear", antialias=True)
  return np.clip(np.rint(np.asarray(out)), 0, 255).astype(np.uint8)


def available_memory() -> int | None:
  """Bytes of memory available to a new allocation (Linux's MemAvailable), or None if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def require_memory(setting: str, need: int, purpose: str) -> None:
  """ConfigError naming `config.<setting>` when `need` bytes exceed the available memory (an
  allocation that large ends in a traceback or an abort, not an error line)."""
  free = available_memory()
  if free is not None and need > free:
    raise ConfigError(f"config.{setting} needs {_bytes(need)} {purpose}; {_bytes(free)} of "
                      f"memory is available. Use a smaller size.")


def _bytes(count: int) -> str:
  return f"{count / 2**30:,.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def stratified_subset(labels: np.ndarray, per_class: int, seed: int, key: str) -> np.ndarray:
  """Sorted indices of `per_class` examples of every class, drawn without replacement with
  `seed` (class by class, so the draw of one class does not depend on the others' sizes).

  Raises:
    ConfigError: `per_class` is not a positive int, or a class has fewer examples.
  """
  counts = np.bincount(labels)
  if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
    raise ConfigError(f"config.{key}={per_class!r} must be None (the whole split) or a "
                      "positive int.")
  if per_class > counts.min():
    raise ConfigError(f"config.{key}={per_class} is more than the {counts.min()} examples of "
                      f"class {int(counts.argmin())}; use at most {counts.min()} or None.")
  rng = np.random.default_rng(seed)
  picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for c in range(len(counts))]
  return np.sort(np.concatenate(picked))


def repeat_to(indices: np.ndarray, length: int, seed: int) -> np.ndarray:
  """`indices` in a seeded random order, repeated and cut to `length` entries (so every subset
  size gives an epoch of the same length; the last, partial copy is a random part)."""
  return np.resize(np.random.default_rng(seed).permutation(indices), max(length, 1))
