"""Streamed datasets: splits read example by example from random-access sources, never whole.

A dataset is streamed when it comes as sources (the built-in `folder` and `tfds` datasets, or a
registered load function that returns sources), when its examples need per-example work that the
in-memory path does not do (`augment="imagenet"` or an `image_size`), or when it is larger than
`config.dataset.in_memory_limit_mb` (a built-in stored as array_record, e.g. CIFAR with a limit of
100). Everything else is read into memory once (cnnlab.data), which is faster for small data.

    splits = open_splits(data_config)      # {"train", "test"[, "validation"]}: sources
    split = split_source(data_config, "train")   # the train split less validation, subset

The validation split is carved from train by index: class-stratified when the source knows its
labels cheaply (a folder), else a seeded uniform share (a TFDS dataset: reading every label would
read every image). Both depend only on (validation_fraction, validation_seed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from cnnlab.base.errors import ConfigError, DatasetError
from cnnlab.data import folders, prepared, registry, stream, subsets, transforms
from cnnlab.data.registry import labels_of, lookup

FOLDER, TFDS = "folder", "tfds"
MEGABYTE = 1 << 20


def data_dir(data_config) -> str:
  """`config.dataset.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(data_config.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                            or os.path.join("~", "tensorflow_datasets"))


class Subset:
  """The examples `indices` [n] of `source`, as a source (picklable)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.class_names = getattr(source, "class_names", None)
    self.digest = getattr(source, "digest", None)
    self.image_shape = getattr(source, "image_shape", None)

  @property
  def labels(self) -> np.ndarray | None:
    labels = getattr(self.source, "labels", None)
    return None if labels is None else np.asarray(labels)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.indices[i])]


class TfdsSource:
  """A TFDS data source's examples as {"image", "label"} (its supervised keys), picklable."""

  def __init__(self, source, image_key: str, label_key: str, class_names: tuple[str, ...],
               digest: str):
    self.source, self.image_key, self.label_key = source, image_key, label_key
    self.class_names, self.digest = class_names, digest

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    example = self.source[i]
    image = np.asarray(example[self.image_key], np.uint8)
    return {"image": image if image.ndim == 3 else image[..., None],
            "label": int(example[self.label_key])}


def open_folder(data_config) -> dict:
  """The `folder` dataset: `config.dataset.folder` read in place (cnnlab.data.folders), its index
  cached under data_dir/cnnlab_folders/."""
  root = data_config.get("folder")
  if not root:
    raise ConfigError("config.dataset.name='folder' needs config.dataset.folder=PATH, a folder "
                      "of root/<class>/*.jpg|png, or of root/train/<class>/... and "
                      "root/val/<class>/...")
  root = os.path.abspath(os.path.expanduser(root))
  key = hashlib.sha256(root.encode()).hexdigest()[:16]
  index = folders.index_folder(root, float(data_config.get("test_fraction", 0.2)),
                               int(data_config.get("split_seed", 0)),
                               os.path.join(data_dir(data_config), "cnnlab_folders", key))
  splits = {}
  for split, files in index.splits.items():
    source = folders.FolderSource(index.root, files, index.class_names)
    source.digest = index.digest
    splits[split] = source
  return splits


def open_tfds(data_config) -> dict:
  """The `tfds` dataset: `config.dataset.tfds_name` (e.g. "imagenette/320px-v2"), prepared in
  array_record format in data_dir (`tfds build NAME --file_format=array_record`), read with
  `tfds.data_source` without TensorFlow. Its test split is "test", else "validation"."""
  name = data_config.get("tfds_name")
  if not name:
    raise ConfigError("config.dataset.name='tfds' needs config.dataset.tfds_name, a TFDS dataset "
                      "prepared in array_record format in config.dataset.data_dir.")
  where = data_dir(data_config)
  try:
    builder = tfds.builder(name, data_dir=where, file_format="array_record")
    ready = builder.is_prepared()
  except Exception as e:   # TFDS raises many kinds for an unknown or damaged dataset.
    raise DatasetError(f"config.dataset.tfds_name={name!r}: no TFDS dataset of that name is "
                       f"prepared in {where} ({type(e).__name__}); prepare it with `tfds build "
                       f"{name} --file_format=array_record --data_dir={where}` (TFDS's command; "
                       f"it needs TensorFlow).") from None
  if not ready:
    raise DatasetError(f"config.dataset.tfds_name={name!r} is not prepared in {where}; prepare "
                       f"it with `tfds build {name} --file_format=array_record "
                       f"--data_dir={where}` (TFDS's command; it needs TensorFlow).")
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  names = tuple(info.features[label_key].names)
  own = [s for s in ("train", "validation", "test") if s in info.splits]
  if "train" not in own or len(own) < 2:
    raise DatasetError(f"config.dataset.tfds_name={name!r} has the splits {sorted(info.splits)}; "
                       f"cnnlab needs 'train' and 'test' or 'validation'.")
  mapping = {"train": "train", "test": "test" if "test" in own else "validation"}
  if "test" in own and "validation" in own:
    mapping["validation"] = "validation"
  digest = _tfds_digest(builder.data_dir)
  return {ours: TfdsSource(builder.as_data_source(split=theirs), image_key, label_key, names,
                           digest) for ours, theirs in mapping.items()}


def _tfds_digest(directory: str) -> str:
  """sha256 over a prepared TFDS dataset's file names and sizes (its metadata and records)."""
  entries = sorted((e.name, e.stat().st_size) for e in os.scandir(directory) if e.is_file())
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


registry.register_dataset(FOLDER, open_folder, description="a folder of images, read in place")
registry.register_dataset(TFDS, open_tfds, description="any TFDS dataset prepared as array_record")


def augmentation(data_config) -> str:
  """`config.dataset.augment` as one of transforms.AUGMENTATIONS (True: "cifar", False: "none";
  None: "imagenet" for a folder or TFDS dataset, else "none")."""
  style = data_config.get("augment")
  if style is None:
    style = "imagenet" if data_config.name in (FOLDER, TFDS) else "none"
  style = {True: "cifar", False: "none"}.get(style, style)
  if style not in transforms.AUGMENTATIONS:
    raise ConfigError(f"config.dataset.augment={style!r} is not allowed; choose one of: "
                      f"{', '.join(transforms.AUGMENTATIONS)}.")
  return style


def image_size(data_config) -> int | None:
  """`config.dataset.image_size`: the side of the square images fed to the net (None: as stored;
  a folder or TFDS dataset, whose images differ in size, defaults to 224)."""
  size = data_config.get("image_size")
  if size is None and data_config.name in (FOLDER, TFDS):
    return 224
  return size


def is_streamed(data_config) -> bool:
  """Whether the dataset is read example by example (see the module docstring)."""
  if augmentation(data_config) == "imagenet" or data_config.get("image_size") is not None:
    return True
  entry = lookup(data_config.name)
  if entry.builder is not None:
    return _builder_bytes(entry.builder, data_config) > in_memory_limit(data_config)
  splits, _ = registry.read_arrays(data_config.name, data_dir(data_config), data_config)
  return registry.is_source(splits["train"])


def in_memory_limit(data_config) -> int:
  """Bytes a dataset's splits may take in memory (`config.dataset.in_memory_limit_mb`)."""
  return int(float(data_config.get("in_memory_limit_mb", 1024)) * MEGABYTE)


def _builder_bytes(builder, data_config) -> int:
  """uint8 bytes of every split of a registered builder: a cnnlab builder's IMAGE_SHAPE x
  NUM_EXAMPLES; another's from its prepared metadata (an image feature of varying size counts
  as too large to hold)."""
  if getattr(builder, "IMAGE_SHAPE", None) and getattr(builder, "NUM_EXAMPLES", None):
    return int(np.prod(builder.IMAGE_SHAPE)) * int(sum(builder.NUM_EXAMPLES.values()))
  info = prepared.prepare(data_config.name, data_dir(data_config),
                          data_config.get("manual_dir")).info
  shape = info.features["image"].shape
  if any(side is None for side in shape):
    return 1 << 62
  return int(np.prod(shape)) * sum(split.num_examples for split in info.splits.values())


def open_splits(data_config) -> dict:
  """{split: source} of the dataset: a registered builder's prepared array_record files, a load
  function's sources, or its arrays wrapped as sources."""
  entry = lookup(data_config.name)
  where = data_dir(data_config)
  if entry.builder is not None:
    return _builder_splits(entry.name, where, data_config.get("manual_dir"))
  splits, _ = registry.read_arrays(entry.name, where, data_config)
  if registry.is_source(splits["train"]):
    return splits
  return {split: stream.ArraySource(*value) for split, value in splits.items()}


@functools.lru_cache(maxsize=16)
def _builder_splits(name: str, where: str, manual_dir: str | None) -> dict:
  builder = prepared.prepare(name, where, manual_dir)
  names = tuple(lookup(name).class_names or builder.info.features["label"].names)
  splits = {}
  for split in ("train", "test"):
    source = TfdsSource(builder.as_data_source(split=split), "image", "label", names, None)
    source.labels = labels_of(source)   # Small fixed-size records: one pass, ~15 us each.
    splits[split] = source
  return splits


def held_out(labels: np.ndarray | None, num_examples: int, fraction: float,
             seed: int) -> np.ndarray:
  """bool [N]: the examples carved out as validation. With labels, round(fraction x n_c) of each
  class c drawn with `seed` (classes in increasing order); without, round(fraction x N) drawn
  uniformly with `seed`."""
  held = np.zeros(num_examples, bool)
  rng = np.random.default_rng(seed)
  if labels is None:
    held[rng.permutation(num_examples)[:int(round(fraction * num_examples))]] = True
    return held
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    held[rng.permutation(members)[:int(round(fraction * len(members)))]] = True
  return held


def split_source(data_config, part: str):
  """The source of one part of the dataset (see cnnlab.data.split_parts): "test", "validation"
  (the dataset's own), or "train"/"carved validation" of the train split."""
  splits = open_splits(data_config)
  if part in ("test", "validation"):
    return splits[part]
  train = splits["train"]
  fraction = float(data_config.get("validation_fraction", 0.0) or 0.0)
  if fraction:
    held = held_out(getattr(train, "labels", None), len(train), fraction,
                    int(data_config.get("validation_seed", 0)))
    if part == "carved validation":
      return Subset(train, np.flatnonzero(held))
    train = Subset(train, np.flatnonzero(~held))
  per_class = data_config.get("train_per_class")
  if per_class is None:
    return train
  seed = data_config.get("subset_seed", 0)
  labels = labels_of(train)
  idx = subsets.stratified_subset(labels, per_class, seed, "dataset.train_per_class")
  if data_config.get("subset_repeat", True):
    idx = subsets.repeat_to(idx, len(labels), seed)
  return Subset(train, idx)


def train_transform(data_config):
  return transforms.train_transform(augmentation(data_config), image_size(data_config))


def eval_transform(data_config):
  return transforms.eval_transform(image_size(data_config))


def default_workers() -> int:
  """Worker processes when `config.dataset.workers` is None: all cores but one, at most 8."""
  return max(1, min(8, (os.cpu_count() or 2) - 1))


def workers(data_config) -> int:
  value = data_config.get("workers")
  return default_workers() if value is None else int(value)


def data_digest(data_config) -> str | None:
  """The identity of a streamed dataset's files (a folder's index digest, a TFDS dataset's file
  names and sizes), recorded by runs so that a changed dataset is noticed; None for others."""
  return getattr(open_splits(data_config)["train"], "digest", None)


class LazyImages:
  """A streamed split's images as an array-like read on indexing: `images[i]`, `images[a:b]`,
  `images[index_array]` -> uint8 [..., h, w, C] after the eval transform."""

  def __init__(self, source, transform):
    self.source, self.transform = source, transform

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, key):
    if isinstance(key, (int, np.integer)):
      return self.transform(self.source[int(key)]["image"], None)
    rows = np.arange(len(self.source))[key]
    return np.stack([self.transform(self.source[int(i)]["image"], None) for i in rows])


class LazySplit:
  """A streamed split: `labels` int32 [N] (read once) and `images` (LazyImages)."""

  def __init__(self, source, transform):
    self.images = LazyImages(source, transform)
    self._source = source

  @functools.cached_property
  def labels(self) -> np.ndarray:
    return labels_of(self._source)
