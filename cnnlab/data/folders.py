"""Image-folder datasets, read in place: an index of the files (class from the folder name, split,
size and mtime) and a grain source that reads and decodes one file per example.

    index = index_folder(root, test_fraction=0.1, split_seed=0, cache_dir=...)
    source = FolderSource(index.root, index.splits["train"], index.class_names)
    source[i]   # {"image": uint8 [H, W, 3], "label": int}

Layouts: root/train/<class>/* with root/(val|validation|test)/<class>/* (the val folder is
cnnlab's test split), or root/<class>/* (also root/train/<class>/* alone), split per class with a
seeded hash of each path (so adding files moves no other file between the splits). Hidden files
and folders (".name") are skipped; class folders may hold subfolders.

Stale data is never served: the index records each file's size and mtime (ns), its digest covers
them, a rerun that finds the folder changed logs one warning line naming the changes and indexes
it again, and FolderSource refuses a file that changed after indexing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import NamedTuple

import numpy as np

from cnnlab.base import files
from cnnlab.base.errors import DatasetError, WorkdirError
from cnnlab.data import transforms

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VAL_FOLDERS = ("val", "validation", "test")
INDEX_FILE = "index.json"

logger = logging.getLogger(__name__)


class SplitFiles(NamedTuple):
  paths: tuple[str, ...]   # relative to the root, "/"-separated, sorted
  labels: np.ndarray       # int32 [N]
  sizes: np.ndarray        # int64 [N] bytes
  mtimes: np.ndarray       # int64 [N] ns


class FolderIndex(NamedTuple):
  root: str                       # absolute
  class_names: tuple[str, ...]    # sorted folder names; label = position
  splits: dict[str, SplitFiles]   # "train", "test"
  digest: str                     # sha256 over (split, path, label, size, mtime)


def _subfolders(directory: str) -> list[str]:
  with os.scandir(directory) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _images(directory: str, prefix: str) -> list[tuple[str, int, int]]:
  """(path relative to the root, size, mtime ns) of every image under `directory`."""
  found = []
  with os.scandir(directory) as entries:
    for entry in entries:
      if entry.name.startswith("."):
        continue
      path = f"{prefix}/{entry.name}" if prefix else entry.name
      if entry.is_dir(follow_symlinks=False):
        found += _images(entry.path, path)
      elif entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
        stat = entry.stat()
        found.append((path, stat.st_size, stat.st_mtime_ns))
  return found


def _scan_classes(root: str, folder: str) -> dict[str, list[tuple[str, int, int]]]:
  """{class name: its images} of root/folder/<class>/*, classes sorted."""
  where = os.path.join(root, folder) if folder else root
  classes = _subfolders(where)
  if not classes:
    raise DatasetError(f"folder {where} holds no class folders; lay the images out as "
                       f"<class>/*.jpg|png (or train/<class>/* and val/<class>/*)")
  found = {c: _images(os.path.join(where, c), f"{folder}/{c}" if folder else c) for c in classes}
  for name, images in found.items():
    if not images:
      raise DatasetError(f"folder {where}: class folder {name}/ holds no "
                         f"{'/'.join(IMAGE_SUFFIXES)} images; add images or remove the folder")
  return found


def _split_files(rows: list[tuple[str, int, int, int]]) -> SplitFiles:
  """(path, label, size, mtime) rows -> SplitFiles sorted by path."""
  rows = sorted(rows)
  return SplitFiles(tuple(r[0] for r in rows), np.array([r[1] for r in rows], np.int32),
                    np.array([r[2] for r in rows], np.int64),
                    np.array([r[3] for r in rows], np.int64))


def _rows(found: dict[str, list[tuple[str, int, int]]], class_names: tuple[str, ...]):
  """{class name: its (path, label, size, mtime) rows}, label = the class's position."""
  return {c: [(p, label, s, m) for p, s, m in found[c]] for label, c in enumerate(class_names)}


def _stratified(root: str, found, class_names, test_fraction: float, split_seed: int):
  """round(test_fraction * n_c) images of each class to "test", the rest to "train": those whose
  sha256(split_seed, path) is smallest, so the choice is seeded and stable under additions."""
  rank = lambda row: hashlib.sha256(f"{split_seed}\0{row[0]}".encode()).digest()
  train, test = [], []
  for rows in _rows(found, class_names).values():
    k = round(test_fraction * len(rows))
    ranked = sorted(rows, key=rank)
    test += ranked[:k]
    train += ranked[k:]
  if not test or not train:
    empty = "test" if not test else "train"
    largest = max(len(images) for images in found.values())
    raise DatasetError(f"folder {root}: test_fraction {test_fraction} leaves the {empty} split "
                       f"empty (the largest class has {largest} images); "
                       f"{'raise' if not test else 'lower'} dataset.test_fraction")
  return {"train": _split_files(train), "test": _split_files(test)}


def _presplit(root: str, val: str):
  """The splits of root/train/<class>/* and root/<val>/<class>/*, which hold the same classes."""
  train, test = _scan_classes(root, "train"), _scan_classes(root, val)
  if set(train) != set(test):
    only = lambda a, b, name: f"only in {name}/: {', '.join(sorted(set(a) - set(b))) or 'none'}"
    raise DatasetError(f"folder {root}: train/ and {val}/ hold different class folders "
                       f"({only(train, test, 'train')}; {only(test, train, val)}); give both "
                       f"the same classes")
  class_names = tuple(train)
  join = lambda found: _split_files([r for rows in _rows(found, class_names).values()
                                     for r in rows])
  return class_names, {"train": join(train), "test": join(test)}


def _digest(splits: dict[str, SplitFiles]) -> str:
  digest = hashlib.sha256()
  for split in sorted(splits):
    f = splits[split]
    for row in zip(f.paths, f.labels.tolist(), f.sizes.tolist(), f.mtimes.tolist()):
      digest.update("\0".join(map(str, (split, *row))).encode() + b"\n")
  return digest.hexdigest()


def scan_folder(root: str, test_fraction: float, split_seed: int) -> FolderIndex:
  """The index of the folder as it is now (`index_folder` without the cache)."""
  if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float) or not (
      0 < test_fraction < 1):
    raise DatasetError(f"dataset.test_fraction={test_fraction!r} is not in (0, 1): the share of "
                       f"each class of folder {root} held out as the test split")
  if not os.path.isdir(root):
    raise DatasetError(f"folder {root} is not a directory; set dataset.folder to a folder of "
                       f"class folders (<class>/*.jpg|png)")
  root = os.path.abspath(root)
  top = _subfolders(root)
  vals = [v for v in VAL_FOLDERS if v in top]
  if "train" in top and vals:
    if len(vals) > 1:
      raise DatasetError(f"folder {root} holds train/ and several held-out folders "
                         f"({', '.join(v + '/' for v in vals)}); keep one of them")
    class_names, splits = _presplit(root, vals[0])
  else:
    base = "train" if top == ["train"] else ""
    found = _scan_classes(root, base)
    class_names = tuple(found)
    splits = _stratified(root, found, class_names, test_fraction, split_seed)
  return FolderIndex(root, class_names, splits, _digest(splits))


def _record(index: FolderIndex) -> dict:
  splits = {name: {"paths": list(f.paths), "labels": f.labels.tolist(), "sizes": f.sizes.tolist(),
                   "mtimes": f.mtimes.tolist()} for name, f in index.splits.items()}
  return {"root": index.root, "class_names": list(index.class_names), "splits": splits,
          "digest": index.digest}


def _from_record(record) -> FolderIndex | None:
  """The FolderIndex of a cached record; None if it is missing or malformed."""
  try:
    splits = {name: SplitFiles(tuple(f["paths"]), np.array(f["labels"], np.int32),
                               np.array(f["sizes"], np.int64), np.array(f["mtimes"], np.int64))
              for name, f in record["splits"].items()}
    return FolderIndex(record["root"], tuple(record["class_names"]), splits, record["digest"])
  except (KeyError, TypeError, ValueError, AttributeError):
    return None


def index_folder(root: str, test_fraction: float, split_seed: int, cache_dir: str) -> FolderIndex:
  """The index of image folder `root` (see the module docstring), kept in cache_dir/index.json.

  A folder that differs from its cached index is logged as ONE warning line naming the added,
  removed and edited files, and indexed again. The cache is replaced atomically, so processes
  indexing the same folder at once write identical content and never a torn file.

  The cache only serves to name the changes: where it cannot be written (a read-only data
  directory, a full disk), one warning line says so and the folder is used as scanned.

  Raises:
    DatasetError: root is not a directory, holds no class folders or an empty one, train/ and
      val/ hold different classes, or test_fraction is not in (0, 1) or leaves a split empty.
  """
  new = scan_folder(root, test_fraction, split_seed)
  path = os.path.join(cache_dir, INDEX_FILE)
  cached = files.read_json_or_none(path)
  old = _from_record(cached) if isinstance(cached, dict) else None
  if old is not None and old.root == new.root:
    changes = describe_changes(old, new)
    if changes:
      logger.warning("folder %s changed since it was indexed: %s; indexing it again",
                     new.root, changes)
  record = _record(new)
  if cached != record:
    try:
      os.makedirs(cache_dir, exist_ok=True)
      files.write_json_atomic(path, record)
    except (OSError, WorkdirError) as e:
      reason = getattr(e if isinstance(e, OSError) else e.__cause__, "strerror", None) or e
      logger.warning("cannot keep the index of folder %s in %s (%s); the folder is used as "
                     "scanned, and the next run cannot name what changed in it", new.root,
                     cache_dir, reason)
  return new


def describe_changes(old: FolderIndex, new: FolderIndex) -> str:
  """"2 added (a/x.jpg, b/y.png), 1 removed (...), 1 edited (...)" between two indexes of a folder
  (an edit: a new size or mtime; at most 3 names each); "" when they hold the same files."""
  table = lambda index: {p: (s, m) for f in index.splits.values()
                         for p, s, m in zip(f.paths, f.sizes.tolist(), f.mtimes.tolist())}
  before, after = table(old), table(new)
  changes = (("added", sorted(after.keys() - before.keys())),
             ("removed", sorted(before.keys() - after.keys())),
             ("edited", sorted(p for p in before.keys() & after.keys() if before[p] != after[p])))
  names = lambda paths: ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
  return ", ".join(f"{len(paths)} {what} ({names(paths)})" for what, paths in changes if paths)


class FolderSource:
  """A grain random-access source over one split of an indexed folder: source[i] = {"image":
  uint8 [H, W, 3], "label": int}. Picklable (paths and arrays only); each read checks the file's
  size and mtime against the index first, so a changed file is an error, never stale data."""

  def __init__(self, root: str, files: SplitFiles, class_names: tuple[str, ...]):
    self.root, self.files, self.class_names = root, files, tuple(class_names)

  @property
  def labels(self) -> np.ndarray:
    """int32 [N]."""
    return self.files.labels

  def __len__(self) -> int:
    return len(self.files.paths)

  def __getitem__(self, i: int) -> dict:
    relative = self.files.paths[i]
    try:
      with open(os.path.join(self.root, relative), "rb") as f:
        stat = os.fstat(f.fileno())
        changed = [what for what, now, then in (("size", stat.st_size, self.files.sizes[i]),
                                                ("mtime", stat.st_mtime_ns, self.files.mtimes[i]))
                   if now != then]
        if changed:
          raise self._changed(relative, ", ".join(changed))
        data = f.read()
    except FileNotFoundError:
      raise self._changed(relative, "missing") from None
    except OSError as e:
      raise DatasetError(f"folder {self.root}: cannot read {relative} ({e.strerror or e}); make "
                         f"it readable or remove it, then rerun") from e
    try:
      image = transforms.decode(data)
    except ValueError as e:
      raise DatasetError(f"folder {self.root}: {relative} is {e}; replace or remove it, then "
                         f"rerun") from e
    return {"image": image, "label": int(self.files.labels[i])}

  def _changed(self, relative: str, what: str) -> DatasetError:
    return DatasetError(f"folder {self.root}: {relative} changed after it was indexed ({what}); "
                        f"rerun to index the folder again")
