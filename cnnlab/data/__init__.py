"""Data: registered datasets (cnnlab.data.registry: a researcher's `load(data_dir)` function, or
a TFDS builder such as the built-ins of cnnlab.data.builders, prepared on first use and read with
`tfds.data_source`), and a seeded grain index pipeline (cnnlab.data.pipeline).

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
import json
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from cnnlab.base.errors import ConfigError
from cnnlab.data import registry, stream, streamed, subsets, transforms
from cnnlab.data.builders import BUILDERS, _ImageBuilder  # noqa: F401
from cnnlab.data.pipeline import TrainIterator, eval_batches_from_arrays
from cnnlab.data.prepared import Split, _load_split, _open_builder, prepare  # noqa: F401
from cnnlab.data.registry import dataset_names, lookup, register_dataset  # noqa: F401
from cnnlab.data.stream import StreamIterator, stream_eval_batches


def __getattr__(attr: str):
  """`DATASET_NAMES`: a live view of `dataset_names()`, so it includes later registrations."""
  if attr == "DATASET_NAMES":
    return dataset_names()
  raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


class DatasetInfo(NamedTuple):
  name: str
  image_shape: tuple[int, int, int]   # (H, W, C)
  num_classes: int
  num_train: int
  num_test: int
  num_validation: int = 0   # held out of the train split (config.dataset.validation_fraction)
  class_names: tuple[str, ...] = ()   # one per class, for pictures


_data_dir = streamed.data_dir


Where = tuple[str, str, str | None, str | None]


def _where(data_config) -> Where:
  """What an in-memory dataset's splits are read and cached by: (name, data_dir, manual_dir,
  what its load function is called with (`registry.load_settings`))."""
  name = data_config.name
  return (name, _data_dir(data_config), data_config.get("manual_dir"),
          registry.load_settings(name, data_config))


def _sized_split(where: Where, split: str, size: tuple[int, int] | None) -> Split:
  """A split with its images resized to `size` (None: as stored)."""
  if size is None:
    return _load_split(*where, split)
  return _resized_split(where, split, size)


@functools.lru_cache(maxsize=16)
def _resized_split(where: Where, split: str, size: tuple[int, int]) -> Split:
  data = _load_split(*where, split)
  return Split(subsets.resize(data.images, size), data.labels)


def _size(data_config) -> tuple[int, int] | None:
  size = data_config.get("resize")
  return None if size is None else subsets.check_size(size)


SPLITS = ("train", "validation", "test")


def validation_fraction(data_config) -> float:
  """The share of each class of the train split held out as the validation split (0: none)."""
  return float(data_config.get("validation_fraction", 0.0) or 0.0)


def _own_validation(data_config) -> bool:
  """Whether the dataset brings a validation split of its own (its load function returned one)."""
  name = data_config.name
  if streamed.is_streamed(data_config):
    return "validation" in streamed.open_splits(data_config)
  return (lookup(name).builder is None
          and "validation" in registry.read_arrays(name, _data_dir(data_config), data_config)[0])


def split_part(data_config, split: str, own_validation: bool) -> str:
  """Which part of the stored dataset `split` is: "test"; "validation" (the dataset's own, when
  its load function returns one and validation_fraction is 0); or "train" / "carved validation"
  (the train split less / only its held-out share). ConfigError for a split that is not there."""
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is not allowed; choose one of: {', '.join(SPLITS)}.")
  if split == "test":
    return "test"
  fraction = validation_fraction(data_config)
  if own_validation:
    if fraction:
      raise ConfigError(f"config.dataset.validation_fraction={fraction} would carve a validation "
                        f"split out of train, but dataset {data_config.name!r} has its own; set "
                        f"it to 0 to use that one.")
    return split
  if split == "validation" and fraction == 0:
    raise ConfigError("config.dataset.validation_fraction=0: there is no validation split; set "
                      "it in (0, 0.5], e.g. 0.1.")
  return "train" if split == "train" else "carved validation"


def load_split(data_config, split: str) -> Split:
  """`train` (less the validation examples), `validation` (a seeded, class-stratified
  `config.dataset.validation_fraction` of the train split, or the dataset's own when its load
  function returns one and the fraction is 0) or `test`, resized (`resize`); the train split cut
  to `train_per_class` examples per class (`_subset`). A streamed dataset's split comes as a
  `streamed.LazySplit` (labels, and images read on indexing)."""
  lookup(data_config.name)
  if streamed.is_streamed(data_config):
    return streamed.LazySplit(_source(data_config, split), streamed.eval_transform(data_config))
  part = split_part(data_config, split, _own_validation(data_config))
  if part in ("test", "validation"):
    return _sized_split(_where(data_config), part, _size(data_config))
  train, validation = _carve(_where(data_config), _size(data_config),
                             validation_fraction(data_config),
                             int(data_config.get("validation_seed", 0)))
  return _subset(train, data_config) if part == "train" else validation


def _source(data_config, split: str):
  """The source of a streamed dataset's `split`."""
  own = "validation" in streamed.open_splits(data_config)
  return streamed.split_source(data_config, split_part(data_config, split, own))


def _subset(train: Split, data_config) -> Split:
  """`train_per_class` examples per class drawn with `subset_seed` (None: all); with
  `subset_repeat`, repeated and cut to the whole split's length."""
  per_class = data_config.get("train_per_class")
  if per_class is None:
    return train
  seed = data_config.get("subset_seed", 0)
  idx = subsets.stratified_subset(train.labels, per_class, seed, "dataset.train_per_class")
  if data_config.get("subset_repeat", True):
    idx = subsets.repeat_to(idx, len(train.labels), seed)
  return Split(train.images[idx], train.labels[idx])


@functools.lru_cache(maxsize=16)
def _carve(where: Where, size: tuple[int, int] | None, fraction: float,
           seed: int) -> tuple[Split, Split]:
  """(train, validation): round(fraction x n_c) examples of each class c, drawn with `seed`, go to
  validation; both keep the train split's order. The same for every run seed, so the cells and
  seeds of a sweep are compared on one validation split."""
  full = _sized_split(where, "train", size)
  held = streamed.held_out(full.labels, len(full.labels), fraction, seed)
  return (Split(full.images[~held], full.labels[~held]),
          Split(full.images[held], full.labels[held]))


def clear_caches() -> None:
  """Forgets every split read so far (the next load reads and verifies the files again, and
  calls registered load functions again)."""
  for cached in (_load_split, _resized_split, _carve, _stats, _streamed_stats,
                 streamed._builder_splits, registry.read_splits):
    cached.cache_clear()


registry.CACHE_CLEARERS.append(clear_caches)


def dataset_shape(name: str, data_dir: str | None = None,
                  data_config=None) -> tuple[tuple[int, int, int], int]:
  """(image shape (H, W, C), number of classes) of dataset `name` as stored: a builder's,
  without preparing it; a load function's, from what it returns for `data_dir` (None: the
  default) or for `data_config`, if it takes that. A dataset of sources (images of any size)
  has H = W = 0."""
  builder = lookup(name).builder
  data_dir = _data_dir({"data_dir": data_dir})
  if builder is None:
    splits, num_classes = registry.read_arrays(name, data_dir, data_config)
    if registry.is_source(splits["train"]):
      return (0, 0, splits["train"][0]["image"].shape[-1]), num_classes
    return tuple(splits["train"][0].shape[1:]), num_classes
  if issubclass(builder, _ImageBuilder):
    return tuple(builder.IMAGE_SHAPE), builder.NUM_CLASSES
  features = _open_builder(name, data_dir).info.features
  return tuple(features["image"].shape), features["label"].num_classes


def num_classes(data_config) -> int:
  if streamed.is_streamed(data_config):
    return len(class_names(data_config))
  return dataset_shape(data_config.name, _data_dir(data_config), data_config)[1]


def class_names(data_config) -> tuple[str, ...]:
  """One name per class: as registered, else a TFDS builder's ClassLabel names or a source's
  (a folder's class folders), else "0".."K-1"."""
  entry = lookup(data_config.name)
  if entry.class_names:
    return entry.class_names
  if entry.builder is not None:
    return tuple(_open_builder(entry.name, _data_dir(data_config)).info.features["label"].names)
  splits, count = registry.read_arrays(entry.name, _data_dir(data_config), data_config)
  names = getattr(splits["train"], "class_names", None)
  return tuple(names) if names else tuple(str(c) for c in range(count))


def image_shape(data_config) -> tuple[int, int, int]:
  """(H, W, C) of the images fed to the net (after `resize` or `image_size`), known without
  reading a builder's data."""
  if streamed.is_streamed(data_config):
    size = streamed.image_size(data_config)
    train = _source(data_config, "train")   # Not test: a tuning run never reads it.
    stored = getattr(train, "image_shape", None) or train[0]["image"].shape   # Else read one.
    return (size, size, stored[-1]) if size else tuple(stored)
  stored, _ = dataset_shape(data_config.name, _data_dir(data_config), data_config)
  size = data_config.get("resize")
  return stored if size is None else (*subsets.check_size(size), stored[2])


def dataset_info(data_config) -> DatasetInfo:
  """Shape and size facts of a dataset (prepares it on first use)."""
  has_validation = validation_fraction(data_config) or _own_validation(data_config)
  if streamed.is_streamed(data_config):
    sizes = [len(_source(data_config, s)) if s != "validation" or has_validation else 0
             for s in SPLITS]
    return DatasetInfo(data_config.name, image_shape(data_config), num_classes(data_config),
                       sizes[0], sizes[2], sizes[1], class_names(data_config))
  train, test = load_split(data_config, "train"), load_split(data_config, "test")
  num_validation = len(load_split(data_config, "validation").labels) if has_validation else 0
  return DatasetInfo(data_config.name, tuple(train.images.shape[1:]), num_classes(data_config),
                     len(train.labels), len(test.labels), num_validation,
                     class_names(data_config))


@functools.lru_cache(maxsize=16)
def _stats(where: Where, size: tuple[int, int] | None, fraction: float, seed: int):
  train, _ = _carve(where, size, fraction, seed)
  x = train.images.astype(np.float64) / 255.0
  mean = x.mean(axis=(0, 1, 2))
  std = x.std(axis=(0, 1, 2))
  return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


NORMALIZATIONS = ("data", "imagenet")


def normalisation(data_config) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std [C] in [0, 1] units; images are fed as (pixel / 255 - mean) / std.
  `config.dataset.normalization`: "imagenet" (ImageNet's, as torchvision's models expect) or
  "data": of the (resized) train split without its validation examples, over all of it even
  when training on a subset; for a streamed dataset, of up to 2,048 of its train images (a
  seeded sample) after the eval transform."""
  style = data_config.get("normalization", "data")
  if style not in NORMALIZATIONS:
    raise ConfigError(f"config.dataset.normalization={style!r} is not allowed; choose one of: "
                      f"{', '.join(NORMALIZATIONS)}.")
  if style == "imagenet":
    channels = image_shape(data_config)[2]
    if channels != 3:
      raise ConfigError(f"config.dataset.normalization='imagenet' needs RGB images; dataset "
                        f"{data_config.name!r} has {channels} channel(s): use 'data'.")
    return (np.asarray(transforms.IMAGENET_MEAN, np.float32),
            np.asarray(transforms.IMAGENET_STD, np.float32))
  if streamed.is_streamed(data_config):
    return _streamed_stats(data_config.name, _settings_key(data_config))
  load_split(data_config, "train")
  return _stats(_where(data_config), _size(data_config), validation_fraction(data_config),
                int(data_config.get("validation_seed", 0)))


def _settings_key(data_config) -> str:
  return json.dumps(dict(data_config), sort_keys=True, default=str)


@functools.lru_cache(maxsize=16)
def _streamed_stats(name: str, settings: str):
  """`normalisation` "data" of a streamed dataset, once per process and settings."""
  data_config = registry.Settings(json.loads(settings))
  return stream.source_stats(_source(data_config, "train"), streamed.eval_transform(data_config))


def train_iterator(data_config, batch_size: int, seed: int,
                   rows: slice = slice(None)) -> TrainIterator | StreamIterator:
  """Endless shuffled global batches of `batch_size`, of which this process reads `rows`;
  see `cnnlab.data.pipeline.TrainIterator` (in memory) and `cnnlab.data.stream.StreamIterator`
  (streamed, in `config.dataset.workers` worker processes)."""
  streaming = streamed.is_streamed(data_config)
  train = _source(data_config, "train") if streaming else load_split(data_config, "train")
  count = len(train) if streaming else len(train.labels)
  if batch_size > count:
    raise ConfigError(f"config.batch_size={batch_size} is larger than the {count} "
                      f"training examples of {data_config.name!r}; use at most {count}.")
  mean, std = normalisation(data_config)
  if streaming:
    return StreamIterator(train, batch_size, seed, streamed.train_transform(data_config), mean,
                          std, rows, workers=streamed.workers(data_config))
  augment = streamed.augmentation(data_config)
  transform = None if augment == "none" else streamed.train_transform(data_config)
  return TrainIterator(train.images, train.labels, batch_size, seed, mean, std, transform, rows)


EVAL_WORKERS_FROM = 2000   # Examples of a split from which evaluation uses worker processes.


def eval_batches(data_config, split: str, batch_size: int, multiple_of: int = 1,
                 rows: slice = slice(None)):
  """The whole split in a fixed order, in batches of one shape padded to a multiple of
  `multiple_of` (padding has mask 0); this process reads `rows` of each."""
  mean, std = normalisation(data_config)
  if streamed.is_streamed(data_config):
    source = _source(data_config, split)
    # Starting worker processes takes seconds: a small split is decoded here (with a prefetch
    # thread), faster than waiting for them.
    workers = streamed.workers(data_config) if len(source) >= EVAL_WORKERS_FROM else 0
    return stream_eval_batches(source, batch_size, streamed.eval_transform(data_config), mean,
                               std, multiple_of, rows, workers=workers)
  data = load_split(data_config, split)
  return eval_batches_from_arrays(data.images, data.labels, batch_size, mean, std, multiple_of,
                                  rows)


def data_digest(data_config) -> str | None:
  """The identity of a streamed dataset's files, recorded by runs (see streamed.data_digest)."""
  return streamed.data_digest(data_config) if streamed.is_streamed(data_config) else None
