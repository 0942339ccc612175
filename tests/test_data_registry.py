"""Registered datasets: a researcher's own data from a file outside the package, the checks of what
its load function returns, names listed with their modules, and class names in pictures."""

import importlib.util
import os
import re

import matplotlib.text
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import config_dict

from cnnlab import data
from cnnlab.base.errors import ConfigError, DatasetError
from cnnlab.data import builders
from cnnlab.inspection import plots, visualize
from cnnlab.training import loop, validation

STRIPES = '''
import numpy as np
from cnnlab.data import register_dataset

CALLS = []   # The data_dir of every call of load.


def _split(rng, n):
  """8x8 gray images of a bright horizontal, vertical or diagonal stripe on noise."""
  labels = np.arange(n) % 3
  images = rng.integers(0, 60, (n, 8, 8, 1))
  for i, (c, p) in enumerate(zip(labels, rng.integers(1, 7, n))):
    if c == 0:
      images[i, p, :, 0] = 255
    elif c == 1:
      images[i, :, p, 0] = 255
    else:
      images[i, np.arange(8), np.arange(8), 0] = 255
  return images.astype(np.uint8), labels


def load(data_dir):
  CALLS.append(data_dir)
  rng = np.random.default_rng(0)
  return {"train": _split(rng, 600), "test": _split(rng, 90)}


register_dataset(NAME, load, class_names=("horizontal", "vertical", "diagonal"))
'''


def _import_file(path, module_name):
  """Imports the file `path` as module `module_name`, as a user module named by path is."""
  spec = importlib.util.spec_from_file_location(module_name, str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _stripes_module(tmp_path, dataset, module_name, takes_config=False):
  path = tmp_path / f"{module_name}.py"
  text = STRIPES.replace("NAME", repr(dataset))
  if takes_config:
    text = text.replace("def load(data_dir):\n  CALLS.append(data_dir)",
                        "def load(data_config):\n  CALLS.append(data_config.data_dir)")
  path.write_text(text)
  return _import_file(path, module_name)


def _cfg(name, data_dir, **kw):
  return config_dict.ConfigDict({"name": name, "data_dir": data_dir, "manual_dir": None,
                                 "augment": False, **kw})


def test_a_dataset_registered_from_a_file_outside_the_package_trains(tiny_config, tmp_path,
                                                                      monkeypatch):
  module = _stripes_module(tmp_path, "stripes", "my_stripes")
  assert "stripes" in data.dataset_names() and "stripes" in data.DATASET_NAMES
  tiny_config.dataset.name = "stripes"
  tiny_config.num_epochs = 1
  info = data.dataset_info(tiny_config.dataset)
  assert info == data.DatasetInfo("stripes", (8, 8, 1), 3, 600, 90, 0,
                                  ("horizontal", "vertical", "diagonal"))
  workdir = str(tmp_path / "run")
  results = loop.train_and_evaluate(tiny_config, workdir, progress=False)
  assert results["test_accuracy"] > 0.6   # Chance is 1/3: it learned from the stripes.
  assert module.CALLS == [tiny_config.dataset.data_dir]   # Loaded once, with the config's dir.

  texts = []   # Every text of every picture, e.g. "#3: pred vertical (90%)\ntrue horizontal".
  save = plots.save
  monkeypatch.setattr(plots, "save", lambda fig, path: (
      texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text)), save(fig, path))[1])
  visualize.write_pictures(workdir)
  words = " ".join(texts)
  assert "true horizontal" in words and "pred " in words and "test #0, horizontal" in words
  assert {"horizontal", "vertical", "diagonal"} <= set(texts)   # Class-accuracy ticks.


def test_a_load_function_that_takes_the_config_gets_it_on_every_read(tiny_config, tmp_path):
  """Every read of an in-memory dataset (its shape, classes, splits, statistics) calls `load`
  with the run's `config.dataset`, once: never with an empty one."""
  module = _stripes_module(tmp_path, "stripes_config", "my_stripes_config", takes_config=True)
  tiny_config.dataset.name = "stripes_config"
  tiny_config.num_epochs = 1
  results = loop.train_and_evaluate(tiny_config, str(tmp_path / "run"), progress=False)
  assert results["test_accuracy"] > 0.6
  assert module.CALLS == [tiny_config.dataset.data_dir]


def test_an_unknown_name_lists_the_registered_names_and_their_modules(tiny_config, tmp_path):
  _stripes_module(tmp_path, "stripes_listed", "lab_datasets")
  tiny_config.dataset.name = "stripez"
  with pytest.raises(ConfigError) as error:
    validation.validate_config(tiny_config)
  message = str(error.value)
  assert "\n" not in message and message.startswith("config.dataset.name='stripez' is not")
  assert "mnist5k, digits, mnist, fashion_mnist, cifar10, cifar100" in message
  assert "stripes_listed (from lab_datasets)" in message


def test_a_name_registered_twice_from_different_modules_is_refused(tmp_path):
  first = _stripes_module(tmp_path, "stripes_twice", "first_module")
  data.dataset_info(_cfg("stripes_twice", str(tmp_path)))
  again = _stripes_module(tmp_path, "stripes_twice", "first_module")   # Imported twice: fine.
  assert data.lookup("stripes_twice").source is again.load is not first.load
  data.dataset_info(_cfg("stripes_twice", str(tmp_path)))   # Reads with the new function.
  assert first.CALLS == again.CALLS == [str(tmp_path)]
  with pytest.raises(ConfigError, match=r"register_dataset\('stripes_twice'\): the name is "
                                        r"taken by first_module.load; registered again by "
                                        r"second_module.load"):
    _stripes_module(tmp_path, "stripes_twice", "second_module")
  with pytest.raises(ConfigError, match=r"register_dataset\('digits'\): the name is taken by "
                                        r"cnnlab.data.builders.CnnlabDigits; registered again"):
    data.register_dataset("digits", first.load)
  with pytest.raises(ConfigError, match=r"name='my data' must be letters"):
    data.register_dataset("my data", first.load)


def _good(n=12, shape=(8, 8, 1)):
  return np.zeros((n, *shape), np.uint8), np.arange(n) % 3


@pytest.mark.parametrize("returned, problem", [
    (lambda: {"train": _good()}, "load must return a dict with the splits 'train' and 'test'"),
    (lambda: {"train": _good(), "test": _good()[0]}, "split 'test' must be a pair"),
    (lambda: {"train": (_good()[0].astype(np.float32), _good()[1]), "test": _good()},
     r"train images must be uint8 \[N, H, W, C\] \(N, H, W, C >= 1\); got float32 "
     r"\[12, 8, 8, 1\]"),
    (lambda: {"train": (_good()[0][..., 0], _good()[1]), "test": _good()},
     r"train images must be uint8 \[N, H, W, C\].*got uint8 \[12, 8, 8\]"),
    (lambda: {"train": _good(), "test": (_good()[0], _good()[1][:5])},
     r"test labels must be integers \[N\] with N = 12 \(one per image\); got int64 \[5\]"),
    (lambda: {"train": _good(), "test": (_good()[0], _good()[1] - 1)},
     r"test label -1 is out of range"),
    (lambda: {"train": _good(), "test": _good(shape=(9, 9, 1))},
     r"the splits' images differ in shape"),
    (lambda: {"train": _good(), "test": (_good()[0], _good()[1] + 5)},
     r"test label 7 is out of range for its 3 class_names; labels must be in \[0, 3\)"),
    (lambda: 1 / 0, r"load\('.*'\) raised ZeroDivisionError: division by zero"),
], ids=["no test", "not a pair", "float", "no channel", "label count", "negative", "shapes",
        "beyond class_names", "raises"])
def test_what_a_load_function_returns_is_checked_in_one_line(tmp_path, returned, problem,
                                                             request):
  name = "bad_" + request.node.callspec.id.replace(" ", "_")
  def load(data_dir):
    return returned()
  data.register_dataset(name, load, class_names=("a", "b", "c"))
  with pytest.raises(DatasetError) as error:
    data.dataset_info(_cfg(name, str(tmp_path)))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"dataset {name!r} (test_data_registry.test_what_a_load_function_")
  assert re.search(problem, message), message


def test_a_load_functions_own_validation_split(tmp_path):
  def load(data_dir):
    images, labels = _good(30)
    return {"train": (images, labels), "validation": _good(9), "test": _good(6)}
  data.register_dataset("with_validation", load)
  cfg = _cfg("with_validation", str(tmp_path))
  info = data.dataset_info(cfg)
  assert (info.num_train, info.num_validation, info.num_test) == (30, 9, 6)
  assert info.class_names == ("0", "1", "2")   # Unnamed: the largest label + 1 classes.
  cfg.validation_fraction = 0.1
  with pytest.raises(ConfigError, match=r"validation_fraction=0.1 would carve a validation split "
                                        r"out of train, but dataset 'with_validation' has its own"):
    data.load_split(cfg, "train")


class RegistryTestPlus(tfds.core.GeneratorBasedBuilder):
  """A researcher's own TFDS builder: twelve flat 4x4 images in two named classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=["plus", "cross"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(8), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 4, 1), 50 * (i % 2), np.uint8), "label": i % 2}


def test_a_tfds_builder_of_ones_own_registers_like_the_built_ins(tmp_path):
  data.register_dataset("plus_cross", RegistryTestPlus)
  info = data.dataset_info(_cfg("plus_cross", str(tmp_path)))
  assert info == data.DatasetInfo("plus_cross", (4, 4, 1), 2, 8, 4, 0, ("plus", "cross"))
  assert data.dataset_shape("plus_cross", str(tmp_path)) == ((4, 4, 1), 2)


def test_built_in_datasets_name_their_classes(data_dir, tmp_path):
  assert data.dataset_info(_cfg("digits", data_dir)).class_names == tuple("0123456789")
  assert data.class_names(_cfg("fashion_mnist", data_dir))[::9] == ("T-shirt/top", "Ankle boot")
  with tfds.testing.mock_data(num_examples=20):
    info = data.dataset_info(_cfg("cifar10", str(tmp_path / "mock")))
  data.clear_caches()
  assert info.class_names[:3] == ("airplane", "automobile", "bird") and info.num_classes == 10
  fine = data.class_names(_cfg("cifar100", data_dir))
  assert len(set(fine)) == 100 and list(fine) == sorted(fine)   # fine_label_names.txt's order.
  assert (fine[0], fine[1], fine[-1]) == ("apple", "aquarium_fish", "worm")
  assert builders.CnnlabCifar100.CLASS_NAMES == fine
  assert not os.path.exists(os.path.join(data_dir, "cnnlab_cifar100"))   # Names: no data read.
