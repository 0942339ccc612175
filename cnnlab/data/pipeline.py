"""The input pipeline over in-memory uint8 splits: seeded grain shuffle, batching, normalisation,
per-example augmentation (cnnlab.data.transforms), and a resumable iterator position.

Why in memory: cnnlab's bundled datasets are small (mnist5k is 3 MB, CIFAR-10 150 MB), so each
split is read once through `tfds.data_source` and batches are gathered with numpy; per-example
reads cost ~15 us each, which would rival a small CNN's step on CPU.

Order: grain's `MapDataset.range(N).shuffle(seed).repeat()` gives a fresh permutation every
epoch, a pure function of (seed, epoch). Each epoch yields N // B full batches (the remainder is
dropped, so every step has the same shape and one compilation). The iterator's position is
(epoch, batch in epoch): `get_state()` / `set_state()` resume bit-for-bit.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from cnnlab.data.transforms import example_rng


@functools.lru_cache(maxsize=64)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order [N] of `epoch`: grain's `MapDataset.range(N).shuffle(seed).repeat()`.

  Cached per process (read-only): grain draws it one index at a time (~15 us each, 60 ms for
  mnist5k), and a sweep's cells share their seeds' orders.
  """
  order = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
  start = epoch * num_examples
  perm = np.fromiter((order[start + i] for i in range(num_examples)), np.int64, num_examples)
  perm.flags.writeable = False
  return perm


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, C] -> float32 (x / 255 - mean) / std, per channel."""
  return ((images.astype(np.float32) / np.float32(255.0) - mean) / std).astype(np.float32)


class TrainIterator:
  """Yields {"image": float32 [B/P, H, W, C], "label": int32 [B/P]} forever: this process's share
  `rows` of each global batch of B examples (P processes; all of it with one process)."""

  def __init__(self, images, labels, batch_size: int, seed: int, mean, std,
               transform=None, rows: slice = slice(None)):
    self.images, self.labels = images, labels
    self.transform = transform   # Per example: (uint8 [H, W, C], rng) -> uint8 [H, W, C].
    self.rows = rows
    self.batch_size, self.seed = batch_size, seed
    self.mean, self.std = mean, std
    self.num_examples = len(labels)
    self.steps_per_epoch = self.num_examples // batch_size
    self.epoch, self.batch = 0, 0

  def permutation(self, epoch: int) -> np.ndarray:
    """The example order of `epoch` [N]."""
    return epoch_permutation(self.num_examples, self.seed, epoch)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = self.batch_size
    idx = self.permutation(self.epoch)[self.batch * b:(self.batch + 1) * b][self.rows]
    images = self.images[idx]
    if self.transform is not None:
      images = np.stack([self.transform(image, example_rng(self.seed, self.epoch, i))
                         for image, i in zip(images, idx)])
    self.batch += 1
    if self.batch == self.steps_per_epoch:
      self.epoch, self.batch = self.epoch + 1, 0
    return {"image": normalise(images, self.mean, self.std), "label": self.labels[idx]}

  def get_state(self) -> dict:
    return {"seed": self.seed, "epoch": self.epoch, "batch": self.batch}

  def set_state(self, state: dict) -> None:
    if state["seed"] != self.seed:
      raise ValueError(f"iterator state of seed {state['seed']} restored into seed {self.seed}")
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def eval_batches_from_arrays(images, labels, batch_size: int, mean, std, multiple_of: int = 1,
                             rows: slice = slice(None)):
  """Yields the split in order as {"image", "label", "mask": float32 [B]}; each batch holds
  `batch_size` examples and is zero-padded with mask 0 to B = `batch_size` rounded up to a
  multiple of `multiple_of` (the devices it is split over), so every batch has one shape and
  every example counts exactly once. `rows` selects this process's share of each padded batch."""
  n = len(labels)
  padded = -(-batch_size // multiple_of) * multiple_of
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    pad = padded - len(idx)
    image = normalise(images[idx], mean, std)
    label = labels[idx]
    mask = np.ones(len(idx), np.float32)
    if pad:
      image = np.concatenate([image, np.zeros((pad, *image.shape[1:]), np.float32)])
      label = np.concatenate([label, np.zeros(pad, label.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    yield {"image": image[rows], "label": label[rows], "mask": mask[rows]}
