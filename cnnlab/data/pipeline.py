"""The input pipeline over in-memory uint8 splits: seeded grain shuffle, batching, normalisation,
CIFAR augmentation, and a resumable iterator position.

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


def augment_batch(images: np.ndarray, rng: np.random.Generator, pad: int = 4,
                  rows: slice = slice(None), global_rows: int | None = None) -> np.ndarray:
  """Random horizontal flips and `pad`-pixel zero-padded random crops (CIFAR, He et al. 2016):
  uint8 [B, H, W, C] -> same shape.

  `images` may be the `rows` share of a global batch of `global_rows` examples (one process's
  share): the draws are made for the whole global batch and sliced, so every example gets the
  same flip and crop however many processes share the batch.
  """
  b, h, w, _ = images.shape
  n = global_rows or b
  flip = (rng.random(n) < 0.5)[rows]
  dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))[:, rows]
  out = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


class TrainIterator:
  """Yields {"image": float32 [B/P, H, W, C], "label": int32 [B/P]} forever: this process's share
  `rows` of each global batch of B examples (P processes; all of it with one process)."""

  def __init__(self, images, labels, batch_size: int, seed: int, mean, std,
               augment: bool = False, rows: slice = slice(None)):
    self.images, self.labels = images, labels
    self.rows = rows
    self.batch_size, self.seed = batch_size, seed
    self.mean, self.std, self.augment = mean, std, augment
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
    if self.augment:
      rng = np.random.default_rng((self.seed, self.epoch, self.batch))
      images = augment_batch(images, rng, rows=self.rows, global_rows=b)
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
