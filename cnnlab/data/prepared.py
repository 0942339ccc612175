"""Preparing registered TFDS builders (array_record files, generated on first use under a lock)
and reading a prepared split into memory, checked against what was generated (RECORD_FILE)."""

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
from cnnlab.data import registry
from cnnlab.data.builders import RECORD_FILE, _ImageBuilder, examples_digest
from cnnlab.data.registry import lookup


class Split(NamedTuple):
  images: np.ndarray   # uint8 [N, H, W, C]
  labels: np.ndarray   # int32 [N]


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
def _load_split(name: str, data_dir: str, manual_dir: str | None, settings: str | None,
                split: str) -> Split:
  """Every example of a split, read once through `tfds.data_source` into host memory, checked
  against what was generated (RECORD_FILE): a DatasetError names the directory to delete. A
  dataset registered with a load function: that split of what it returned for `data_dir` or
  `settings` (`registry.load_settings`), checked."""
  if lookup(name).builder is None:
    return Split(*registry.read_splits(name, data_dir, settings)[0][split])
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
