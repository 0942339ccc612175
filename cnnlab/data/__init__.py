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

import fcntl
import functools
import json
import logging
import os
import tarfile
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format

from cnnlab.base.errors import ConfigError, DatasetError
from cnnlab.data import registry, subsets
from cnnlab.data.builders import BUILDERS, RECORD_FILE, _ImageBuilder, examples_digest  # noqa: F401
from cnnlab.data.pipeline import TrainIterator, eval_batches_from_arrays
from cnnlab.data.registry import dataset_names, lookup, register_dataset  # noqa: F401


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


class Split(NamedTuple):
  images: np.ndarray   # uint8 [N, H, W, C]
  labels: np.ndarray   # int32 [N]


def _data_dir(data_config) -> str:
  return os.path.expanduser(data_config.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                            or os.path.join("~", "tensorflow_datasets"))


def _builder(name: str) -> type[tfds.core.DatasetBuilder]:
  """The TFDS builder class registered as `name` (ConfigError if unknown or a load function)."""
  builder = lookup(name).builder
  if builder is None:
    raise ConfigError(f"dataset {name!r} is registered with a load function; it has no TFDS "
                      f"builder to prepare.")
  return builder


# What reading damaged prepared files raises (Riegeli/ArrayRecord: RuntimeError; TFDS metadata:
# protobuf's json_format.Error, KeyError, ValueError).
_READ_ERRORS = (RuntimeError, ValueError, OSError, KeyError, IndexError, json_format.Error)


def _redo(name: str, where: str, problem: str) -> DatasetError:
  return DatasetError(f"dataset {name!r} in {where} {problem}; delete {where} to prepare it "
                      f"again.")


def _open_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of `name` in `data_dir`; it reads the prepared metadata, if there is any."""
  cls = _builder(name)
  where = os.path.join(data_dir, cls.name, str(cls.VERSION))
  try:
    return cls(data_dir=data_dir, file_format="array_record")
  except _READ_ERRORS as e:
    raise _redo(name, where, f"has unreadable metadata ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None


def prepare(name: str, data_dir: str, manual_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name`, generated into `data_dir` if it is not there yet.

  Safe under concurrency: processes that find the dataset unprepared take an exclusive lock
  (`data_dir/<builder name>.lock`); the first generates it, the others then find it prepared.

  Raises:
    DatasetError: the raw files are neither in `manual_dir` nor downloadable, or malformed; or
      the prepared metadata is unreadable.
  """
  builder = _open_builder(name, data_dir)
  if builder.is_prepared():
    return builder
  try:
    os.makedirs(data_dir, exist_ok=True)
    lock = open(os.path.join(data_dir, f"{builder.name}.lock"), "w")
  except OSError as e:
    raise DatasetError(f"dataset {name!r} is not prepared in {data_dir} and cannot be prepared "
                       f"there ({e.strerror}); set config.dataset.data_dir to a writable "
                       f"directory.") from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)   # Released when the file closes.
    builder = _open_builder(name, data_dir)   # Another process may have prepared it meanwhile.
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
      builder.download_and_prepare(download_config=config)
    except (ValueError, OSError, EOFError, KeyError, tarfile.TarError) as e:
      files = ", ".join(getattr(builder, "FILES", ())) or "package data"
      raise DatasetError(f"preparing dataset {name!r} from its raw files failed: {e}. Check "
                         f"them (expected: {files}).") from None
  return builder


def _prepared_record(name: str, builder: tfds.core.DatasetBuilder) -> dict | None:
  """RECORD_FILE of a prepared dataset: {split: {"num_examples", "sha256"}}; None (with a
  warning) for a dataset prepared without one (by an older cnnlab, or mocked in tests), and for
  a builder not derived from cnnlab's (it writes none)."""
  path = os.path.join(builder.data_dir, RECORD_FILE)
  if not isinstance(builder, _ImageBuilder):
    return None
  if not os.path.exists(path):
    logging.warning("dataset %r in %s has no %s, so it cannot be verified; delete %s to prepare "
                    "it again with one.", name, builder.data_dir, RECORD_FILE, builder.data_dir)
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    raise _redo(name, builder.data_dir, f"has an unreadable {RECORD_FILE}") from None


@functools.lru_cache(maxsize=16)
def _load_split(name: str, data_dir: str, manual_dir: str | None, split: str) -> Split:
  """Every example of a split, read once through `tfds.data_source` into host memory, checked
  against what was generated (RECORD_FILE): a DatasetError names the directory to delete. A
  dataset registered with a load function: that split of what it returned (checked)."""
  if lookup(name).builder is None:
    return Split(*registry.read_arrays(name, data_dir)[0][split])
  builder = prepare(name, data_dir, manual_dir)
  where = builder.data_dir
  record = _prepared_record(name, builder)
  expected = record.get(split, {}) if record is not None else {}
  try:
    source = tfds.data_source(builder.name, split=split, data_dir=data_dir,
                              builder_kwargs={"file_format": "array_record"}, download=False)
    if "num_examples" in expected and len(source) != expected["num_examples"]:
      raise _redo(name, where, f"lists {len(source)} {split} examples but "
                               f"{expected['num_examples']} were prepared (was its "
                               f"dataset_info.json changed?)")
    examples = [source[i] for i in range(len(source))]
  except _READ_ERRORS as e:
    raise _redo(name, where, f"is damaged: reading its {split} split failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             ) from None
  images = np.stack([e["image"] for e in examples]).astype(np.uint8)
  labels = np.asarray([e["label"] for e in examples], np.int32)
  if "sha256" in expected and examples_digest(images, labels) != expected["sha256"]:
    raise _redo(name, where, f"holds {split} examples that differ from those prepared (their "
                             f"sha256 does not match {RECORD_FILE})")
  return Split(images, labels)


def _sized_split(name: str, data_dir: str, manual_dir: str | None, split: str,
                 size: tuple[int, int] | None) -> Split:
  """A split with its images resized to `size` (None: as stored)."""
  if size is None:
    return _load_split(name, data_dir, manual_dir, split)
  return _resized_split(name, data_dir, manual_dir, split, size)


@functools.lru_cache(maxsize=16)
def _resized_split(name: str, data_dir: str, manual_dir: str | None, split: str,
                   size: tuple[int, int]) -> Split:
  data = _load_split(name, data_dir, manual_dir, split)
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
  return (lookup(name).builder is None
          and "validation" in registry.read_arrays(name, _data_dir(data_config))[0])


def load_split(data_config, split: str) -> Split:
  """`train` (less the validation examples), `validation` (a seeded, class-stratified
  `config.dataset.validation_fraction` of the train split, or the dataset's own when its load
  function returns one and the fraction is 0) or `test`, resized (`resize`); the train split cut
  to `train_per_class` examples per class (`_subset`)."""
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is not allowed; choose one of: {', '.join(SPLITS)}.")
  lookup(data_config.name)
  where = (data_config.name, _data_dir(data_config), data_config.get("manual_dir"))
  if split == "test":
    return _sized_split(*where, "test", _size(data_config))
  fraction = validation_fraction(data_config)
  if _own_validation(data_config):
    if fraction:
      raise ConfigError(f"config.dataset.validation_fraction={fraction} would carve a validation "
                        f"split out of train, but dataset {data_config.name!r} has its own; set "
                        f"it to 0 to use that one.")
    if split == "validation":
      return _sized_split(*where, "validation", _size(data_config))
  elif split == "validation" and fraction == 0:
    raise ConfigError("config.dataset.validation_fraction=0: there is no validation split; set "
                      "it in (0, 0.5], e.g. 0.1.")
  train, validation = _carve(*where, _size(data_config), fraction,
                             int(data_config.get("validation_seed", 0)))
  return _subset(train, data_config) if split == "train" else validation


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
def _carve(name: str, data_dir: str, manual_dir: str | None, size: tuple[int, int] | None,
           fraction: float, seed: int) -> tuple[Split, Split]:
  """(train, validation): round(fraction x n_c) examples of each class c, drawn with `seed`, go to
  validation; both keep the train split's order. The same for every run seed, so the cells and
  seeds of a sweep are compared on one validation split."""
  full = _sized_split(name, data_dir, manual_dir, "train", size)
  held = np.zeros(len(full.labels), bool)
  rng = np.random.default_rng(seed)
  for c in np.unique(full.labels):
    members = np.flatnonzero(full.labels == c)
    held[rng.permutation(members)[:int(round(fraction * len(members)))]] = True
  return (Split(full.images[~held], full.labels[~held]),
          Split(full.images[held], full.labels[held]))


def clear_caches() -> None:
  """Forgets every split read so far (the next load reads and verifies the files again, and
  calls registered load functions again)."""
  for cached in (_load_split, _resized_split, _carve, _stats, registry.read_arrays):
    cached.cache_clear()


registry.CACHE_CLEARERS.append(clear_caches)


def dataset_shape(name: str, data_dir: str | None = None) -> tuple[tuple[int, int, int], int]:
  """(image shape (H, W, C), number of classes) of dataset `name`: a builder's, without
  preparing it; a load function's, from what it returns for `data_dir` (None: the default)."""
  builder = lookup(name).builder
  data_dir = _data_dir({"data_dir": data_dir})
  if builder is None:
    arrays, num_classes = registry.read_arrays(name, data_dir)
    return tuple(arrays["train"][0].shape[1:]), num_classes
  if issubclass(builder, _ImageBuilder):
    return tuple(builder.IMAGE_SHAPE), builder.NUM_CLASSES
  features = _open_builder(name, data_dir).info.features
  return tuple(features["image"].shape), features["label"].num_classes


def class_names(data_config) -> tuple[str, ...]:
  """One name per class: as registered, else a TFDS builder's ClassLabel names, else "0".."K-1"."""
  entry = lookup(data_config.name)
  if entry.class_names:
    return entry.class_names
  if entry.builder is not None:
    return tuple(_open_builder(entry.name, _data_dir(data_config)).info.features["label"].names)
  _, num_classes = dataset_shape(entry.name, _data_dir(data_config))
  return tuple(str(c) for c in range(num_classes))


def image_shape(data_config) -> tuple[int, int, int]:
  """(H, W, C) of the dataset's images after `resize`, known without reading a builder's data."""
  stored, _ = dataset_shape(data_config.name, _data_dir(data_config))
  size = data_config.get("resize")
  return stored if size is None else (*subsets.check_size(size), stored[2])


def dataset_info(data_config) -> DatasetInfo:
  """Shape and size facts of a dataset (prepares it on first use)."""
  train, test = load_split(data_config, "train"), load_split(data_config, "test")
  has_validation = validation_fraction(data_config) or _own_validation(data_config)
  num_validation = len(load_split(data_config, "validation").labels) if has_validation else 0
  _, num_classes = dataset_shape(data_config.name, _data_dir(data_config))
  return DatasetInfo(data_config.name, tuple(train.images.shape[1:]), num_classes,
                     len(train.labels), len(test.labels), num_validation,
                     class_names(data_config))


@functools.lru_cache(maxsize=16)
def _stats(name: str, data_dir: str, manual_dir: str | None, size: tuple[int, int] | None,
           fraction: float, seed: int):
  train, _ = _carve(name, data_dir, manual_dir, size, fraction, seed)
  x = train.images.astype(np.float64) / 255.0
  mean = x.mean(axis=(0, 1, 2))
  std = x.std(axis=(0, 1, 2))
  return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def normalisation(data_config) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std [C] of the (resized) train split without its validation
  examples, in [0, 1] units, over all of it even when training on a subset: images are fed as
  (pixel / 255 - mean) / std."""
  load_split(data_config, "train")
  return _stats(data_config.name, _data_dir(data_config), data_config.get("manual_dir"),
                _size(data_config), validation_fraction(data_config),
                int(data_config.get("validation_seed", 0)))


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
