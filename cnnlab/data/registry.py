"""Registered datasets: the one way a dataset name becomes known to cnnlab.

A dataset is either a `load(data_dir)` function returning uint8 arrays (a researcher's own data,
no TensorFlow or TFDS knowledge needed), or a TFDS builder class (cnnlab's six built-ins,
prepared into array_record files on first use). `cnnlab.data` reads both behind one interface:
`dataset_info`, `load_split`, `train_iterator` and `eval_batches` work the same for either.

    # my_data.py
    import numpy as np
    from cnnlab.data import register_dataset

    def load(data_dir):
      train = np.load("/data/shapes/train.npz")   # any reader: images uint8 [N, H, W, C]
      test = np.load("/data/shapes/test.npz")
      return {"train": (train["x"], train["y"]), "test": (test["x"], test["y"])}

    register_dataset("shapes", load, class_names=("circle", "square", "triangle"))

A load function may instead return random-access *sources* (grain's protocol: `len(source)` and
`source[i] -> {"image": uint8 [H, W, C], "label": int}`, images of any size): such a dataset is
streamed, never read whole (cnnlab.data.streamed). A load function whose first parameter is
named `data_config` gets the whole `config.dataset` section instead of `data_dir` (the built-in
`folder` and `tfds` datasets read their paths from it).
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from cnnlab.base.errors import ConfigError, DatasetError
from cnnlab.base.registry import Registry, origin

ARRAY_SPLITS = ("train", "validation", "test")   # What a load function may return.
_NAME = re.compile(r"[A-Za-z0-9_]+")


class Registered(NamedTuple):
  """A registered dataset: `source` is a load function or a TFDS builder class."""
  name: str
  source: Callable | type
  class_names: tuple[str, ...] | None   # None: the builder's ClassLabel names, or "0".."K-1"
  description: str

  @property
  def builder(self) -> type[tfds.core.DatasetBuilder] | None:
    return self.source if isinstance(self.source, type) else None

  @property
  def module(self) -> str:
    return self.source.__module__

  @property
  def builtin(self) -> bool:
    return self.module.split(".")[0] == "cnnlab"


DATASETS = Registry("dataset", "dataset.name", "cnnlab.register_dataset")
# Called when a name is registered again with a new object (a reloaded module), so that no cache
# serves what the old one returned; `cnnlab.data` adds its `clear_caches`.
CACHE_CLEARERS: list[Callable[[], None]] = []


def register_dataset(name: str, load: Callable | type, *, class_names=None,
                     description: str = "") -> None:
  """Makes dataset `name` known to every config that names it (`config.dataset.name`).

  `load` is either
  - a function `load(data_dir: str) -> {"train": (images, labels), "test": (images, labels)}`,
    optionally with a "validation" split (used when config.dataset.validation_fraction is 0):
    images uint8 [N, H, W, C] of one (H, W, C) in every split, labels integers [N] in
    [0, number of classes). It is called once per process and data_dir (`config.dataset.data_dir`,
    default $TFDS_DATA_DIR or ~/tensorflow_datasets; it may ignore it), and what it returns is
    checked: a wrong dtype, shape or label is one DatasetError naming the dataset; or
  - a TFDS builder class (a `tfds.core.DatasetBuilder` with "image" and "label" features),
    prepared into data_dir as array_record files on first use, as cnnlab's built-ins are.

  `class_names`: one name per class, shown in pictures (default: a builder's ClassLabel names,
  else "0".."K-1" with K = the largest label + 1). `description`: one line for listings.
  Registering a name again from the same module and function (a module imported twice)
  replaces the entry; from anywhere else it is a ConfigError.
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ConfigError(f"register_dataset: name={name!r} must be letters, digits and "
                      f"underscores, e.g. 'my_digits'.")
  is_builder = isinstance(load, type) and issubclass(load, tfds.core.DatasetBuilder)
  if not is_builder and (isinstance(load, type) or not callable(load)):
    raise ConfigError(f"register_dataset({name!r}): load={load!r} must be a function "
                      f"load(data_dir) -> splits or a TFDS builder class.")
  if class_names is not None:
    class_names = tuple(class_names)
    if not class_names or not all(isinstance(c, str) and c for c in class_names):
      raise ConfigError(f"register_dataset({name!r}): class_names must be non-empty strings, "
                        f"one per class; got {class_names!r}.")
  old = DATASETS.get(name) if name in DATASETS else None
  DATASETS.add(name, Registered(name, load, class_names, str(description)), load)
  if old is not None and old.source is not load:  # A reloaded module: forget what it read.
    for clear in CACHE_CLEARERS:
      clear()


def dataset_names() -> tuple[str, ...]:
  """The names registered so far, built-ins first, in registration order."""
  return DATASETS.names()


def lookup(name: str) -> Registered:
  """The registered dataset `name`, or a ConfigError naming `config.dataset.name` that lists every
  registered name (with the module that registered it, for those not built in)."""
  return DATASETS.get(name)


def takes_config(load: Callable) -> bool:
  """Whether load function `load` takes `data_config` (its first parameter's name) rather than
  `data_dir`."""
  try:
    params = list(inspect.signature(load).parameters)
  except (TypeError, ValueError):
    return False
  return bool(params) and params[0] == "data_config"


def is_source(value) -> bool:
  """Whether a split a load function returned is a random-access source (not (images, labels))."""
  return hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(
      value, (tuple, list, np.ndarray))


def read_arrays(name: str, data_dir: str, data_config=None
                ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray] | object], int]:
  """({split: (uint8 images [N, H, W, C], int32 labels [N]) or a source}, number of classes) of
  the load function registered as `name`, called once per process and data_dir (or settings of
  `data_config`, for a function that takes it), checked."""
  return read_splits(name, data_dir, load_settings(name, data_config))


def load_settings(name: str, data_config) -> str | None:
  """What the load function registered as `name` is called with besides data_dir, as a cache
  key: `data_config` as JSON for one that takes it, else None."""
  if not takes_config(lookup(name).source):
    return None
  return json.dumps(dict(data_config or {}), sort_keys=True, default=str)


@functools.lru_cache(maxsize=16)
def read_splits(name: str, data_dir: str, settings: str | None):
  """`read_arrays`, cached per (name, data_dir, settings as JSON)."""
  entry = lookup(name)
  where = f"dataset {name!r} ({origin(entry.source)})"
  argument = data_dir if settings is None else Settings(json.loads(settings))
  try:
    splits = entry.source(argument)
  except DatasetError:
    raise
  except Exception as e:   # The researcher's code: one line naming it, not a traceback.
    raise DatasetError(f"{where}: load({argument!r}) raised {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if not isinstance(splits, dict) or not {"train", "test"} <= set(splits) <= set(ARRAY_SPLITS):
    got = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
    raise DatasetError(f"{where}: load must return a dict with the splits 'train' and 'test' "
                       f"(and optionally 'validation') -> (images, labels) or a source; got "
                       f"{got}.")
  kinds = {is_source(value) for value in splits.values()}
  if len(kinds) > 1:
    raise DatasetError(f"{where}: load returned sources for some splits and arrays for others; "
                       f"return one kind for every split.")
  if kinds == {True}:
    return splits, _source_classes(where, entry, splits)
  out = {split: _checked(where, split, value) for split, value in splits.items()}
  shapes = {split: images.shape[1:] for split, (images, _) in out.items()}
  if len(set(shapes.values())) > 1:
    raise DatasetError(f"{where}: the splits' images differ in shape (H, W, C): {shapes}; "
                       f"every split needs one shape.")
  top = max(int(labels.max()) for _, labels in out.values())
  num_classes = len(entry.class_names) if entry.class_names else top + 1
  if top >= num_classes:
    split = next(s for s, (_, labels) in out.items() if labels.max() == top)
    raise DatasetError(f"{where}: {split} label {top} is out of range for its "
                       f"{num_classes} class_names; labels must be in [0, {num_classes}).")
  return out, num_classes


class Settings(dict):
  """`config.dataset` as a load function that takes it sees it: keys and attributes."""
  __getattr__ = dict.get


def labels_of(source) -> np.ndarray:
  """All labels of a source, int32 [N]: its `labels` attribute, else read example by example."""
  labels = getattr(source, "labels", None)
  if labels is None:
    labels = [source[i]["label"] for i in range(len(source))]
  return np.asarray(labels, np.int32)


def _source_classes(where: str, entry: Registered, splits: dict) -> int:
  """The number of classes of a streamed dataset: its class names' count (registered, or the
  train source's `class_names`), else the largest label + 1."""
  for split, source in splits.items():
    if len(source) == 0:
      raise DatasetError(f"{where}: the {split} split is empty; every split needs examples.")
  names = entry.class_names or getattr(splits["train"], "class_names", None)
  if names:
    return len(names)
  return int(max(labels_of(source).max() for source in splits.values())) + 1


def _checked(where: str, split: str, value) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of one split, or a DatasetError saying what is wrong with them."""
  if not (isinstance(value, (tuple, list)) and len(value) == 2):
    raise DatasetError(f"{where}: split {split!r} must be a pair (images, labels); got "
                       f"{type(value).__name__}.")
  images, labels = np.asarray(value[0]), np.asarray(value[1])
  if images.dtype != np.uint8 or images.ndim != 4 or 0 in images.shape:
    raise DatasetError(f"{where}: {split} images must be uint8 [N, H, W, C] (N, H, W, C >= 1); "
                       f"got {images.dtype} {list(images.shape)}.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
    raise DatasetError(f"{where}: {split} labels must be integers [N] with N = "
                       f"{len(images)} (one per image); got {labels.dtype} {list(labels.shape)}.")
  if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
    bad = labels.min() if labels.min() < 0 else labels.max()
    raise DatasetError(f"{where}: {split} label {bad} is out of range; labels must be in "
                       f"[0, number of classes).")
  return images, labels.astype(np.int32)
