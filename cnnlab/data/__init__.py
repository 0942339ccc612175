"""Data: TFDS builders (cnnlab.data.builders) prepared on first use, read with `tfds.data_source`,
and a seeded grain index pipeline (cnnlab.data.pipeline).

    info = dataset_info(config.dataset)            # prepares the dataset on first use
    it = train_iterator(config.dataset, batch_size=64, seed=0)
    batch = next(it)    # {"image": float32 [B, H, W, C] normalised, "label": int32 [B]}
    for batch in eval_batches(config.dataset, "test", 500): ...   # + "mask": float32 [B]

`data_config` is the `config.dataset` section: `name`, `data_dir` (None: $TFDS_DATA_DIR or
~/tensorflow_datasets), `manual_dir` (raw files for offline preparation), `augment`, and
`resize`, `train_per_class`, `subset_seed`, `subset_repeat` (cnnlab.data.subsets).
"""

from __future__ import annotations

import functools
import os
import tarfile
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from cnnlab.data import subsets
from cnnlab.data.builders import BUILDERS
from cnnlab.data.pipeline import TrainIterator, eval_batches_from_arrays
from cnnlab.errors import ConfigError, DatasetError

DATASET_NAMES = tuple(BUILDERS)


class DatasetInfo(NamedTuple):
  name: str
  image_shape: tuple[int, int, int]   # (H, W, C)
  num_classes: int
  num_train: int
  num_test: int


class Split(NamedTuple):
  images: np.ndarray   # uint8 [N, H, W, C]
  labels: np.ndarray   # int32 [N]


def _data_dir(data_config) -> str:
  return os.path.expanduser(data_config.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                            or os.path.join("~", "tensorflow_datasets"))


def _check_name(name: str) -> None:
  if name not in BUILDERS:
    raise ConfigError(f"config.dataset.name={name!r} is not allowed; choose one of: "
                      f"{', '.join(DATASET_NAMES)}.")


def prepare(name: str, data_dir: str, manual_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name`, generated into `data_dir` if it is not there yet.

  Raises:
    DatasetError: the raw files are neither in `manual_dir` nor downloadable, or malformed.
  """
  _check_name(name)
  builder = BUILDERS[name](data_dir=data_dir, file_format="array_record")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  try:
    builder.download_and_prepare(download_config=config)
  except (ValueError, OSError, EOFError, KeyError, tarfile.TarError) as e:
    raise DatasetError(f"preparing dataset {name!r} from its raw files failed: {e}. Check "
                       f"them (expected: {', '.join(builder.FILES) or 'package data'}).") from None
  return builder


@functools.lru_cache(maxsize=16)
def _load_split(name: str, data_dir: str, manual_dir: str | None, split: str) -> Split:
  """Every example of a split, read once through `tfds.data_source` into host memory."""
  builder = prepare(name, data_dir, manual_dir)
  source = tfds.data_source(builder.name, split=split, data_dir=data_dir,
                            builder_kwargs={"file_format": "array_record"}, download=False)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([e["image"] for e in examples]).astype(np.uint8)
  labels = np.asarray([e["label"] for e in examples], np.int32)
  return Split(images, labels)


@functools.lru_cache(maxsize=16)
def _sized_split(name: str, data_dir: str, manual_dir: str | None, split: str,
                 size: tuple[int, int] | None) -> Split:
  """A split with its images resized to `size` (None: as stored)."""
  data = _load_split(name, data_dir, manual_dir, split)
  return data if size is None else Split(subsets.resize(data.images, size), data.labels)


def _size(data_config) -> tuple[int, int] | None:
  size = data_config.get("resize")
  return None if size is None else subsets.check_size(size)


def load_split(data_config, split: str) -> Split:
  """A split as the run sees it: resized (`resize`); the train split cut to `train_per_class`
  examples per class (drawn with `subset_seed`; with `subset_repeat`, repeated and cut to the
  whole split's length)."""
  if split not in ("train", "test"):
    raise ConfigError(f"split={split!r} is not allowed; choose one of: train, test.")
  _check_name(data_config.name)
  data = _sized_split(data_config.name, _data_dir(data_config), data_config.get("manual_dir"),
                      split, _size(data_config))
  per_class = data_config.get("train_per_class")
  if split == "test" or per_class is None:
    return data
  seed = data_config.get("subset_seed", 0)
  idx = subsets.stratified_subset(data.labels, per_class, seed, "dataset.train_per_class")
  if data_config.get("subset_repeat", True):
    idx = subsets.repeat_to(idx, len(data.labels), seed)
  return Split(data.images[idx], data.labels[idx])


def dataset_shape(name: str) -> tuple[tuple[int, int, int], int]:
  """(image shape (H, W, C), number of classes) of dataset `name`, without preparing it."""
  _check_name(name)
  return tuple(BUILDERS[name].IMAGE_SHAPE), BUILDERS[name].NUM_CLASSES


def dataset_info(data_config) -> DatasetInfo:
  """Shape and size facts of a dataset (prepares it on first use)."""
  train, test = load_split(data_config, "train"), load_split(data_config, "test")
  num_classes = BUILDERS[data_config.name].NUM_CLASSES
  return DatasetInfo(data_config.name, tuple(train.images.shape[1:]), num_classes,
                     len(train.labels), len(test.labels))


@functools.lru_cache(maxsize=16)
def _stats(name: str, data_dir: str, manual_dir: str | None, size: tuple[int, int] | None):
  train = _sized_split(name, data_dir, manual_dir, "train", size)
  x = train.images.astype(np.float64) / 255.0
  mean = x.mean(axis=(0, 1, 2))
  std = x.std(axis=(0, 1, 2))
  return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def normalisation(data_config) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std [C] of the (resized) train split in [0, 1] units, over the whole
  split even when training on a subset: images are fed as (pixel / 255 - mean) / std."""
  load_split(data_config, "train")
  return _stats(data_config.name, _data_dir(data_config), data_config.get("manual_dir"),
                _size(data_config))


def train_iterator(data_config, batch_size: int, seed: int,
                   rows: slice = slice(None)) -> TrainIterator:
  """Endless shuffled global batches of `batch_size`, of which this process reads `rows`;
  see `cnnlab.data.pipeline.TrainIterator`."""
  train = load_split(data_config, "train")
  if batch_size > len(train.labels):
    raise ConfigError(f"config.batch_size={batch_size} is larger than the {len(train.labels)} "
                      f"training examples of {data_config.name!r}; use at most "
                      f"{len(train.labels)}.")
  augment = bool(data_config.get("augment", False))
  if augment and not data_config.name.startswith("cifar"):
    import logging
    logging.warning("config.dataset.augment applies to CIFAR only; ignored for %r.",
                    data_config.name)
    augment = False
  mean, std = normalisation(data_config)
  return TrainIterator(train.images, train.labels, batch_size, seed, mean, std, augment, rows)


def eval_batches(data_config, split: str, batch_size: int, multiple_of: int = 1,
                 rows: slice = slice(None)):
  """The whole split in a fixed order, in batches of one shape padded to a multiple of
  `multiple_of` (padding has mask 0); this process reads `rows` of each."""
  data = load_split(data_config, split)
  mean, std = normalisation(data_config)
  return eval_batches_from_arrays(data.images, data.labels, batch_size, mean, std, multiple_of,
                                  rows)
