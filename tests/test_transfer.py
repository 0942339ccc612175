"""Transfer learning (cnnlab.training.transfer): loading by path and shape, re-initialising,
freezing (bit-identical parameters, no optimizer state, BN on running statistics), resume, bad
sources, the data subsets, and the study's `:quick` variant end to end."""

import copy
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import ROOT, load_config, run_launch
from flax import traverse_util

from cnnlab import data
from cnnlab.base import files
from cnnlab.base.errors import CnnlabError, ConfigError
from cnnlab.data import subsets
from cnnlab.nets import convert
from cnnlab.study import grid, sweep, tables
from cnnlab.training import loop, restore, transfer

PROBE = ("*", "!head/*")


def _config(data_dir):
  """A 3-stage VGG-style net with BN on digits, 1 epoch: seconds."""
  config = load_config("experiments/default.py")
  config.dataset.name = "digits"
  config.dataset.data_dir = data_dir
  config.model.name = "vgg_cnn"
  config.model.stages = ((8,), (8,), (16,))
  config.model.bn_placement = "before_act"
  config.batch_size = 32
  config.num_epochs = 1
  config.log_every_steps = 11
  config.checkpoint_every_steps = 22
  return config


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
  """A trained source run: (its config, its workdir)."""
  config = _config(data_dir)
  workdir = str(tmp_path_factory.mktemp("source") / "run")
  loop.train_and_evaluate(config, workdir, progress=False)
  return config, workdir


def _target(source, **init):
  config = copy.deepcopy(source[0])
  config.seed = 1
  config.init.source = source[1]
  for key, value in init.items():
    config.init[key] = value
  return config


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _final(config, workdir):
  state = restore.load_trained_state(config, workdir)
  return _flat(state.params), _flat(state.batch_stats), state


def test_plan_loads_by_path_and_shape():
  model = {"params": {"a/kernel": (3, 3, 1, 8), "head/kernel": (8, 10), "head/bias": (10,),
                      "new/bias": (4,)}, "batch_stats": {"a/bn/mean": (8,)}}
  source = {"params": {"a/kernel": (3, 3, 1, 8), "head/kernel": (8, 5), "head/bias": (5,),
                       "old/bias": (2,)}, "batch_stats": {"a/bn/mean": (8,)}}
  heads = {"head/kernel", "head/bias"}
  record = transfer.plan(model, source, heads, ())
  assert record["loaded"] == ["params/a/kernel", "batch_stats/a/bn/mean"]
  assert set(record["reinitialised"]) == {"params/head/kernel", "params/head/bias"}
  assert "(8, 5)" in record["reinitialised"]["params/head/kernel"]
  assert record["untouched"] == ["params/new/bias"]
  assert record["unused_source"] == ["params/old/bias"]
  # A pattern re-initialises more; the last matching pattern decides.
  record = transfer.plan(model, source, heads, ("a/*", "!a/kernel"))
  assert record["reinitialised"]["batch_stats/a/bn/mean"] == "config.init.reinit"
  assert "params/a/kernel" in record["loaded"]


def test_shape_mismatch_is_an_error_unless_reinitialised():
  model = {"params": {"a/kernel": (3, 3, 1, 8), "head/kernel": (8, 10)}, "batch_stats": {}}
  source = {"params": {"a/kernel": (3, 3, 3, 8), "head/kernel": (8, 10)}, "batch_stats": {}}
  with pytest.raises(ConfigError) as e:
    transfer.plan(model, source, {"head/kernel"}, ())
  message = str(e.value)
  assert "params/a/kernel" in message and "(3, 3, 3, 8)" in message and "(3, 3, 1, 8)" in message
  assert "\n" not in message
  record = transfer.plan(model, source, {"head/kernel"}, ("a/*",))
  assert record["loaded"] == ["params/head/kernel"]
  with pytest.raises(ConfigError, match="shares no array"):
    transfer.plan(model, {"params": {"x": (1,)}, "batch_stats": {}}, set(), ())


def test_linear_probe_keeps_frozen_bits_bn_statistics_and_no_optimizer_state(source, tmp_path):
  config = _target(source, reinit=("head/*",), freeze=PROBE)
  config.optimizer.weight_decay = 5e-3  # Would move every frozen kernel if it applied.
  workdir = str(tmp_path / "probe")
  results = loop.train_and_evaluate(config, workdir, progress=False)
  src_params, src_stats, _ = _final(source[0], source[1])
  params, stats, state = _final(config, workdir)
  record = results["transfer"]
  assert record["source"] == source[1] and record["reinitialised"] == {
      "params/head/bias": "config.init.reinit", "params/head/kernel": "config.init.reinit"}
  assert sorted(record["loaded"]) == sorted(
      [f"params/{p}" for p in src_params if not p.startswith("head/")]
      + [f"batch_stats/{p}" for p in src_stats])
  assert record["frozen_batch_norm"] == ["stage0_conv0/bn", "stage1_conv0/bn", "stage2_conv0/bn"]
  for path, value in src_params.items():
    if path.startswith("head/"):
      assert not np.array_equal(params[path], value)  # New and trained.
    else:
      assert params[path].tobytes() == value.tobytes(), path
  for path, value in stats.items():
    assert value.tobytes() == src_stats[path].tobytes(), path
  # Optimizer state (SGD momentum; the int step counts aside) exists for the head only.
  state_sizes = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state)
                    if np.issubdtype(x.dtype, np.floating))
  assert state_sizes == params["head/kernel"].size + params["head/bias"].size


def test_unfrozen_bn_updates_statistics_and_body_lr_scale_trains_slower(source, tmp_path):
  config = _target(source, reinit=("head/*",), freeze=PROBE, freeze_bn=False)
  workdir = str(tmp_path / "bn")
  loop.train_and_evaluate(config, workdir, progress=False)
  params, stats, _ = _final(config, workdir)
  src_params, src_stats, _ = _final(source[0], source[1])
  assert params["stage0_conv0/conv/kernel"].tobytes() == src_params[
      "stage0_conv0/conv/kernel"].tobytes()
  assert not np.array_equal(stats["stage0_conv0/bn/mean"], src_stats["stage0_conv0/bn/mean"])
  moved = {}
  for scale in (1.0, 0.1):
    config = _target(source, body_lr_scale=scale)
    workdir = str(tmp_path / f"lr{scale}")
    loop.train_and_evaluate(config, workdir, progress=False)
    p, _, _ = _final(config, workdir)
    moved[scale] = np.abs(p["stage1_conv0/conv/kernel"]
                          - src_params["stage1_conv0/conv/kernel"]).mean()
  assert moved[0.1] < 0.5 * moved[1.0]


def test_resume_restores_own_checkpoint_not_the_source(source, tmp_path):
  config = _target(source, reinit=("head/*",), freeze=("stage0_*",))
  whole = loop.train_and_evaluate(config, str(tmp_path / "whole"), progress=False)
  # Copy the source, train from the copy, then keep only an early checkpoint and delete the
  # source: the resumed run needs only its own checkpoint and ends bit-identical.
  copied = str(tmp_path / "source_copy")
  shutil.copytree(source[1], copied)
  config.init.source = copied
  workdir = str(tmp_path / "cut")
  first = loop.train_and_evaluate(config, workdir, progress=False)
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  assert len(steps) >= 2
  shutil.rmtree(os.path.join(ckpts, str(steps[-1])))
  os.remove(os.path.join(workdir, "results.json"))
  shutil.rmtree(copied)
  resumed = loop.train_and_evaluate(config, workdir, progress=False)
  assert resumed["params_sha256"] == first["params_sha256"] == whole["params_sha256"]
  assert resumed["transfer"]["source"] == copied


@pytest.mark.parametrize("case, fragment", [
    ("missing", "is not a directory"),
    ("no_checkpoint", "holds no checkpoint"),
    ("bad_step", "is not a checkpoint"),
    ("other_architecture", "in the source and"),
    ("freeze_matches_nothing", "matches no path"),
    ("bad_recipe", "names no recipe"),
])
def test_bad_input_is_one_line_and_writes_nothing(source, tmp_path, data_dir, case, fragment):
  config = _target(source)
  if case == "missing":
    config.init.source = str(tmp_path / "nowhere")
  elif case == "no_checkpoint":
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(source[1], "config.json"), empty)
    config.init.source = str(empty)
  elif case == "bad_step":
    config.init.step = 7
  elif case == "other_architecture":
    config.model.stages = ((8,), (16,), (16,))
  elif case == "freeze_matches_nothing":
    config.init.freeze = ("stage9_*",)
  else:
    config.init.recipe = "probe"
  _assert_refused_in_one_line(config, tmp_path, fragment, ConfigError)


def _assert_refused_in_one_line(config, tmp_path, fragment, error_type):
  """Running `config` raises `error_type` with one line containing `fragment`, and writes
  nothing."""
  workdir = str(tmp_path / "run")
  with pytest.raises(error_type) as e:
    sweep.run(config, workdir, progress=False)
  assert fragment in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(workdir)


def _weight_file(tmp_path, arch, num_classes):
  """A safetensors file of torchvision `arch`'s state_dict (random weights, its head resized)."""
  from safetensors.numpy import save_file
  manifest = files.read_json(os.path.join(ROOT, "tests", "fixtures", "torchvision",
                                           f"{arch}_64.json"))["manifest"]
  manifest = {k: [num_classes, *v[1:]] if k.startswith("fc.") else v for k, v in manifest.items()}
  path = str(tmp_path / f"{arch}.safetensors")
  save_file(convert.random_state_dict(manifest, 0), path)
  return path


def _torchvision_target(data_dir, arch):
  config = _config(data_dir)
  config.model.update(convert.torchvision_model_config(arch))
  config.init.arch = arch
  return config


def test_torchvision_weight_file_loads_by_path_and_shape(data_dir, tmp_path):
  config = _torchvision_target(data_dir, "resnet18")
  config.init.source = _weight_file(tmp_path, "resnet18", num_classes=5)
  config.init.reinit = ("stem_conv/*",)  # torchvision's stem reads RGB, digits are grey.
  record, source = transfer.transfer_plan(config, str(tmp_path / "run"))
  assert record["reinitialised"]["params/stem_conv/kernel"] == "config.init.reinit"
  assert "(512, 5)" in record["reinitialised"]["params/head/kernel"]  # 5 classes -> 10.
  assert set(record["reinitialised"]) == {"params/stem_conv/kernel", "params/head/kernel",
                                          "params/head/bias"}
  assert not record["untouched"] and not record["unused_source"]
  assert len(record["loaded"]) == sum(len(v) for v in source.values()) - 3
  assert record["source_fingerprint"].startswith("resnet18:")
  config.init.reinit = ()
  with pytest.raises(ConfigError, match=r"stem_conv/kernel has shape \(7, 7, 3, 64\)"):
    transfer.transfer_plan(config, str(tmp_path / "run"))


@pytest.mark.parametrize("case, fragment", [
    ("another_architecture", "is not torchvision's resnet18"),
    ("no_arch", "set config.init.arch"),
    ("model_not_torchvision", "needs config.model as"),
])
def test_bad_weight_file_is_one_line_and_writes_nothing(data_dir, tmp_path, case, fragment):
  config = _torchvision_target(data_dir, "resnet18")
  config.init.source = _weight_file(tmp_path, "resnet34" if case == "another_architecture"
                                    else "resnet18", num_classes=10)
  if case == "no_arch":
    config.init.arch = ""
  elif case == "model_not_torchvision":
    config.model.stem = "small"
  _assert_refused_in_one_line(config, tmp_path, fragment, CnnlabError)


def test_launch_prints_one_line_for_a_missing_source(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_launch("--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
                    f"--config.dataset.data_dir={data_dir}", "--config.dataset.name=digits",
                    f"--config.init.source={tmp_path / 'nowhere'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.init.source=")
  assert not os.path.exists(workdir)


def test_stratified_subset_and_resize(data_dir):
  labels = np.repeat(np.arange(3), [5, 7, 9])
  idx = subsets.stratified_subset(labels, 4, seed=0, key="dataset.train_per_class")
  assert np.bincount(labels[idx]).tolist() == [4, 4, 4]
  assert not np.array_equal(idx, subsets.stratified_subset(labels, 4, 1, "k"))
  with pytest.raises(ConfigError, match="more than the 5 examples of class 0"):
    subsets.stratified_subset(labels, 6, 0, "dataset.train_per_class")
  repeated = subsets.repeat_to(idx, 20, seed=0)
  assert len(repeated) == 20 and set(repeated) == set(idx)
  config = _config(data_dir)
  config.dataset.name = "mnist5k"
  config.dataset.resize = (8, 8)
  config.dataset.train_per_class = 10
  info = data.dataset_info(config.dataset)
  assert info.image_shape == (8, 8, 1)
  whole = copy.deepcopy(config.dataset)
  whole.train_per_class = None
  split = data.load_split(config.dataset, "train")
  # An epoch repeats the 10 x 10 images up to the whole split's length.
  assert info.num_train == len(split.labels) == len(data.load_split(whole, "train").labels)
  assert len(np.unique(split.images.reshape(len(split.images), -1), axis=0)) == 100
  assert np.bincount(split.labels).min() >= np.bincount(split.labels).max() - 10


def test_a_resize_beyond_the_memory_is_one_line_not_an_abort(monkeypatch):
  """XLA aborts the process (a CHECK failure, no exception) when the resize's buffers do not fit:
  `--config.dataset.resize=(100000,100000)` on mnist5k died with SIGABRT. It is refused first."""
  images = np.zeros((10, 4, 4, 1), np.uint8)
  monkeypatch.setattr(subsets, "available_memory", lambda: 2**20)  # 1 MiB free.
  with pytest.raises(ConfigError, match=r"config.dataset.resize=\(300, 300\) needs 4 MiB to "
                                        r"resize the 10 images of the split; 1 MiB of memory is "
                                        r"available. Use a smaller size.$"):
    subsets.resize(images, (300, 300))
  assert subsets.resize(images, (8, 8)).shape == (10, 8, 8, 1)  # ~3 KiB: fits.


def test_study_quick_end_to_end(data_dir, tmp_path):
  workdir = str(tmp_path / "study")
  proc = run_launch("--config=experiments/transfer.py:quick", f"--workdir={workdir}",
                    "--noprogress", f"--config.dataset.data_dir={data_dir}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = tables.read_results_csv(os.path.join(workdir, "results.csv"))
  config = load_config("experiments/transfer.py", "quick")
  config.dataset.data_dir = data_dir
  assert len(rows) == len(grid.expand(config)) * len(config.sweep.seeds)
  for seed in config.sweep.seeds:  # One pretraining run per seed, shared by every cell.
    assert os.path.exists(os.path.join(workdir, "pretrain", f"seed_{seed}", "results.json"))
    sources = {r["transfer"]["source"] for r in _results(workdir) if r["seed"] == seed
               and "transfer" in r}
    assert sources == {os.path.join(workdir, "pretrain", f"seed_{seed}")}
  for cell in grid.expand(config):  # config.sweep.seed_keys: seed s trains on subset s.
    for seed in config.sweep.seeds:
      saved = files.read_json(os.path.join(workdir, "cells", cell.dirname, f"seed_{seed}",
                                            "config.json"))
      assert saved["config"]["dataset"]["subset_seed"] == seed
  comparisons = tables.read_results_csv(os.path.join(workdir, "comparisons.csv"))
  for c in comparisons:  # Every method is paired with scratch at its own data size.
    assert c["baseline"] == c["cell"].replace(c["cell"].split(",")[0], "method=scratch")
  assert os.path.exists(os.path.join(workdir, "accuracy_by_per_class.png"))
  with open(os.path.join(workdir, "report.md")) as f:
    assert "accuracy_by_per_class.png" in f.read()


def _results(workdir):
  cells = os.path.join(workdir, "cells")
  return [files.read_json(os.path.join(cells, c, s, "results.json"))
          for c in sorted(os.listdir(cells)) if os.path.isdir(os.path.join(cells, c))
          for s in sorted(os.listdir(os.path.join(cells, c))) if s.startswith("seed_")]
