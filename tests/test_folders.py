"""Image folders: both layouts, the seeded stratified split, the digest and the change warning,
FolderSource's checks, pickling, and the one-line errors."""

import errno
import json
import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from cnnlab.base.errors import DatasetError
from cnnlab.data import folders

SIZES = [(48, 300), (300, 64), (100, 100), (57, 83), (200, 150), (64, 48), (90, 250)]


def _write_image(path, h, w, seed, grey=False):
  """A real JPEG or PNG (by suffix) of h x w, RGB or grey."""
  rng = np.random.default_rng(seed)
  shape = (h, w) if grey else (h, w, 3)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(path)


def _make_classes(where, counts, seed=0):
  """where/<class>/img<k>.(jpg|png) with counts[class] images of mixed sizes, every third grey.
  Returns {relative path: (h, w)}."""
  made = {}
  for c, (name, n) in enumerate(counts.items()):
    for k in range(n):
      h, w = SIZES[(c + k) % len(SIZES)]
      rel = f"{name}/img{k}.{'png' if k % 2 else 'jpg'}"
      _write_image(os.path.join(where, rel), h, w, seed + 100 * c + k, grey=k % 3 == 0)
      made[rel] = (h, w)
  return made


@pytest.fixture
def flat(tmp_path):
  root = tmp_path / "pets"
  made = _make_classes(str(root), {"cat": 5, "dog": 5, "eel": 7})
  return str(root), made


def _index(root, tmp_path, test_fraction=0.4, split_seed=0):
  return folders.index_folder(root, test_fraction, split_seed, str(tmp_path / "cache"))


def test_flat_layout_is_split_per_class(flat, tmp_path):
  root, made = flat
  index = _index(root, tmp_path)
  assert index.root == root and index.class_names == ("cat", "dog", "eel")
  train, test = index.splits["train"], index.splits["test"]
  # round(0.4 * 5) = 2 of cat and of dog, round(0.4 * 7) = round(2.8) = 3 of eel to test.
  np.testing.assert_array_equal(np.bincount(test.labels), [2, 2, 3])
  np.testing.assert_array_equal(np.bincount(train.labels), [3, 3, 4])
  assert sorted(train.paths + test.paths) == sorted(made)
  for split in (train, test):
    assert list(split.paths) == sorted(split.paths)
    assert [index.class_names[label] for label in split.labels] == [
        p.split("/")[0] for p in split.paths]
    assert split.labels.dtype == np.int32 and split.mtimes.dtype == np.int64
    np.testing.assert_array_equal(split.sizes, [os.path.getsize(f"{root}/{p}")
                                                for p in split.paths])
  source = folders.FolderSource(index.root, test, index.class_names)
  assert len(source) == 7 and source.class_names == index.class_names
  for i, path in enumerate(test.paths):
    example = source[i]
    assert example["image"].dtype == np.uint8
    assert example["image"].shape == (*made[path], 3)
    assert example["label"] == test.labels[i]


def test_the_split_is_seeded(flat, tmp_path):
  root, _ = flat
  test_paths = lambda seed: _index(root, tmp_path, split_seed=seed).splits["test"].paths
  assert test_paths(0) == test_paths(0)
  assert test_paths(0) != test_paths(1)


def test_train_and_val_folders_are_the_splits(tmp_path):
  root = tmp_path / "imagenette"
  train = _make_classes(str(root / "train"), {"church": 3, "golf_ball": 2})
  val = _make_classes(str(root / "val"), {"church": 1, "golf_ball": 2}, seed=7)
  index = _index(str(root), tmp_path)
  assert index.class_names == ("church", "golf_ball")
  assert index.splits["train"].paths == tuple(sorted(f"train/{p}" for p in train))
  assert index.splits["test"].paths == tuple(sorted(f"val/{p}" for p in val))
  np.testing.assert_array_equal(index.splits["test"].labels, [0, 1, 1])
  image = folders.FolderSource(index.root, index.splits["test"], index.class_names)[0]["image"]
  assert image.shape == (*val["church/img0.jpg"], 3)


def test_train_and_val_with_other_classes_is_one_line(tmp_path):
  root = tmp_path / "f"
  _make_classes(str(root / "train"), {"a": 1, "b": 1})
  _make_classes(str(root / "validation"), {"a": 1, "c": 1})
  with pytest.raises(DatasetError, match=r"only in train/: b; only in validation/: c\)") as e:
    _index(str(root), tmp_path)
  assert "\n" not in str(e.value)


def test_digest_and_describe_changes_see_added_removed_and_edited_files(flat, tmp_path):
  root, _ = flat
  before = _index(root, tmp_path)
  assert folders.describe_changes(before, before) == ""
  assert _index(root, tmp_path).digest == before.digest
  _write_image(f"{root}/dog/new.png", 50, 60, seed=99)
  added = _index(root, tmp_path)
  assert added.digest != before.digest
  assert folders.describe_changes(before, added) == "1 added (dog/new.png)"
  os.remove(f"{root}/cat/img1.png")
  removed = _index(root, tmp_path)
  assert removed.digest != added.digest
  _edit(f"{root}/eel/img2.jpg")
  edited = _index(root, tmp_path)
  assert edited.digest != removed.digest
  assert folders.describe_changes(before, edited) == (
      "1 added (dog/new.png), 1 removed (cat/img1.png), 1 edited (eel/img2.jpg)")


def _edit(path):
  """Other bytes and a later mtime, as an image editor would leave the file."""
  stat = os.stat(path)
  _write_image(path, 30, 40, seed=12345)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_changed_folder_is_logged_once_and_indexed_again(flat, tmp_path, caplog):
  root, _ = flat
  caplog.set_level(logging.WARNING, logger="cnnlab.data.folders")
  first = _index(root, tmp_path)
  cache = tmp_path / "cache" / "index.json"
  assert json.loads(cache.read_text())["digest"] == first.digest
  _index(root, tmp_path)
  assert caplog.records == []
  for k in range(5):
    _write_image(f"{root}/cat/more{k}.jpg", 48, 48, seed=k)
  os.remove(f"{root}/dog/img0.jpg")
  _edit(f"{root}/eel/img2.jpg")
  second = _index(root, tmp_path)
  [record] = caplog.records
  assert record.getMessage() == (
      f"folder {root} changed since it was indexed: 5 added (cat/more0.jpg, cat/more1.jpg, "
      f"cat/more2.jpg, ...), 1 removed (dog/img0.jpg), 1 edited (eel/img2.jpg); indexing it again")
  assert json.loads(cache.read_text())["digest"] == second.digest
  caplog.clear()
  _index(root, tmp_path)
  assert caplog.records == []


def test_folder_source_refuses_files_changed_after_indexing(flat, tmp_path):
  root, _ = flat
  index = _index(root, tmp_path)
  source = folders.FolderSource(index.root, index.splits["train"], index.class_names)
  first, second = source.files.paths[:2]
  _edit(f"{root}/{first}")
  with pytest.raises(DatasetError) as e:
    source[0]
  assert str(e.value) == (f"folder {root}: {first} changed after it was indexed (size, mtime); "
                          f"rerun to index the folder again")
  os.remove(f"{root}/{second}")
  with pytest.raises(DatasetError, match=f"{second} changed after it was indexed \\(missing\\)"):
    source[1]
  assert source[2]["image"].dtype == np.uint8


def test_folder_source_names_an_undecodable_file(flat, tmp_path):
  root, _ = flat
  with open(f"{root}/cat/broken.jpg", "wb") as f:
    f.write(b"this is no JPEG")
  index = _index(root, tmp_path)
  split = next(s for s in index.splits.values() if "cat/broken.jpg" in s.paths)
  source = folders.FolderSource(index.root, split, index.class_names)
  with pytest.raises(DatasetError, match=f"folder {root}: cat/broken.jpg is not a readable image"):
    source[split.paths.index("cat/broken.jpg")]


def test_folder_source_pickles(flat, tmp_path):
  root, _ = flat
  index = _index(root, tmp_path)
  source = folders.FolderSource(index.root, index.splits["train"], index.class_names)
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == len(source) and copy.class_names == source.class_names
  np.testing.assert_array_equal(copy.labels, source.labels)
  np.testing.assert_array_equal(copy[3]["image"], source[3]["image"])


@pytest.mark.parametrize("test_fraction", [0, 1, 1.5, -0.1, "0.2"])
def test_test_fraction_outside_0_1_is_one_line(flat, tmp_path, test_fraction):
  root, _ = flat
  with pytest.raises(DatasetError, match=r"dataset.test_fraction=.* is not in \(0, 1\)") as e:
    _index(root, tmp_path, test_fraction=test_fraction)
  assert "\n" not in str(e.value) and not (tmp_path / "cache").exists()


def test_bad_folders_are_one_line_errors_and_write_nothing(tmp_path):
  cases = []
  (tmp_path / "empty").mkdir()
  cases.append((tmp_path / "empty", "holds no class folders"))
  cases.append((tmp_path / "missing", "is not a directory"))
  _make_classes(str(tmp_path / "hollow"), {"a": 2, "b": 2})
  (tmp_path / "hollow" / "c").mkdir()
  (tmp_path / "hollow" / "c" / "notes.txt").write_text("no image")
  cases.append((tmp_path / "hollow", "class folder c/ holds no .jpg/.jpeg/.png images"))
  _make_classes(str(tmp_path / "tiny"), {"a": 2, "b": 1})
  cases.append((tmp_path / "tiny", r"test_fraction 0.1 leaves the test split empty \(the "
                                   r"largest class has 2 images\); raise dataset.test_fraction"))
  for root, message in cases:
    with pytest.raises(DatasetError, match=message) as e:
      folders.index_folder(str(root), 0.1, 0, str(tmp_path / "cache"))
    assert "\n" not in str(e.value) and str(root) in str(e.value)
  assert not (tmp_path / "cache").exists()


def test_a_lone_train_folder_is_split_and_two_held_out_folders_are_refused(tmp_path):
  root = tmp_path / "f"
  made = _make_classes(str(root / "train"), {"a": 5, "b": 5})
  index = _index(str(root), tmp_path)
  assert index.class_names == ("a", "b")
  assert sorted(index.splits["train"].paths + index.splits["test"].paths) == sorted(
      f"train/{p}" for p in made)
  _make_classes(str(root / "val"), {"a": 1, "b": 1})
  _make_classes(str(root / "test"), {"a": 1, "b": 1})
  with pytest.raises(DatasetError, match=r"several held-out folders \(val/, test/\); keep one"):
    _index(str(root), tmp_path)


@pytest.mark.parametrize("content", [
    b"", b"\x00\xff not json", b"[1, 2, 3]", b'{"splits": [1, 2]}', b'{"root": NaN}',
    b'{"root": "/elsewhere", "class_names": [], "splits": {}, "digest": "x"}', "half"])
def test_a_damaged_or_foreign_index_cache_is_replaced_without_a_warning(flat, tmp_path, caplog,
                                                                        content):
  root, _ = flat
  cache = tmp_path / "cache" / "index.json"
  if content == "half":   # A torn copy of the folder's own index.
    _index(root, tmp_path)
    content = cache.read_bytes()[:len(cache.read_bytes()) // 2]
  cache.parent.mkdir(exist_ok=True)
  cache.write_bytes(content)
  caplog.set_level(logging.WARNING, logger="cnnlab.data.folders")
  index = _index(root, tmp_path)
  assert index.digest == folders.scan_folder(root, 0.4, 0).digest
  assert json.loads(cache.read_text())["digest"] == index.digest
  assert caplog.records == []


@pytest.mark.parametrize("blocked", ["read-only", "full disk"])
def test_an_index_cache_that_cannot_be_written_is_one_warning_and_the_folder_is_used(
    flat, tmp_path, caplog, monkeypatch, blocked):
  root, _ = flat
  cache_dir = tmp_path / "cache"
  if blocked == "read-only":
    cache_dir.write_text("a file where the cache folder goes")
    why = "File exists"
  else:
    def full(fd):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(folders.files.os, "fsync", full)   # The write reaches a full disk.
    why = os.strerror(errno.ENOSPC)
  caplog.set_level(logging.WARNING, logger="cnnlab.data.folders")
  index = folders.index_folder(root, 0.4, 0, str(cache_dir))
  assert index.digest == folders.scan_folder(root, 0.4, 0).digest
  [record] = caplog.records
  assert record.getMessage() == (
      f"cannot keep the index of folder {index.root} in {cache_dir} ({why}); the folder is used "
      f"as scanned, and the next run cannot name what changed in it")
  if cache_dir.is_dir():   # Nothing half-written is left behind.
    assert os.listdir(cache_dir) == []
