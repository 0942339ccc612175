"""Config checks: every numeric setting finite and in range, checkpoints on logging steps, sweep
settings and the workdir refused before anything is written, and every experiment valid."""

import glob
import os
import re

import pytest
from conftest import ROOT, load_config
from ml_collections import config_dict

from cnnlab import configs
from cnnlab.base.errors import ConfigError
from cnnlab.study import grid
from cnnlab.study import settings as sweep_config
from cnnlab.training import validation


def _set(config, key, value):
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


@pytest.mark.parametrize("key", [
    "optimizer.momentum", "optimizer.weight_decay", "optimizer.learning_rate",
    "optimizer.warmup_epochs", "optimizer.step_factor", "model.aux_loss_weight",
    "model.dropout_rate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(key, value):
  config = configs.base_config()
  _set(config, key, value)
  with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)}={value!r} .*[\[(]0, "):
    validation.validate_config(config)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1e-5])
def test_bn_epsilon_must_be_positive_and_finite(value):
  """An infinite epsilon would zero every BN output silently: (x - mean) / sqrt(var + inf)."""
  config = configs.base_config()
  config.model.bn_placement, config.model.bn_epsilon = "before_act", value
  with pytest.raises(ConfigError, match=rf"config\.model\.bn_epsilon={value!r} is not allowed; "
                                        r"use None \(the model's default\) or a positive finite"):
    validation.validate_config(config)
  config.model.bn_epsilon = 1e-3
  validation.validate_config(config)


@pytest.mark.parametrize("key", ["seed", "dataset.validation_seed", "dataset.subset_seed"])
def test_seeds_must_fit_in_64_bits(key):
  """A seed of 2**63 or more ended in numpy's OverflowError traceback."""
  config = configs.base_config()
  _set(config, key, 2**63)
  with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)}=9223372036854775808 is out of "
                                        r"range; allowed: \[0, 9223372036854775807\]"):
    validation.validate_config(config)
  _set(config, key, 2**63 - 1)
  validation.validate_config(config)


def test_checkpoint_steps_must_be_a_multiple_of_log_steps():
  config = configs.base_config()
  config.log_every_steps, config.checkpoint_every_steps = 50, 120
  with pytest.raises(ConfigError, match=r"checkpoint_every_steps=120 .*log_every_steps=50.*100 or "
                                        r"150"):
    validation.validate_config(config)
  config.checkpoint_every_steps = 150
  validation.validate_config(config)


@pytest.mark.parametrize("warmup", [12.5, 1e308])
def test_warmup_longer_than_the_run_is_refused(warmup):
  """1e308 epochs overflowed the schedule's step count (OverflowError traceback)."""
  config = configs.base_config()
  config.optimizer.warmup_epochs = warmup
  expected = (rf"warmup_epochs={re.escape(repr(warmup))} is longer than the run "
              r"\(config.num_epochs=12\); allowed: \[0, 12\]")
  with pytest.raises(ConfigError, match=expected):
    validation.validate_config(config)
  config.optimizer.warmup_epochs = 12.0
  validation.validate_config(config)


def _experiments():
  """Every experiment file with every variant it declares (`VARIANTS`, else the sweeps')."""
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    rel = os.path.relpath(path, ROOT)
    declared = re.search(r"^VARIANTS = \((.*)\)", open(path).read(), re.M)
    named = (re.findall(r'"(\w+)"', declared.group(1)) if declared
             else configs.SWEEP_VARIANTS)
    variants = [None] if rel.endswith("default.py") else [None, *named]
    yield from ((rel, v) for v in variants)


@pytest.mark.parametrize("path, variant", list(_experiments()))
def test_every_experiment_config_validates(path, variant):
  config = load_config(path, variant)
  validation.validate_config(config)
  sweep_config.validate_sweep(sweep_config.sweep_settings(config))
  assert grid.expand(config)   # Validates every cell.


def _settings(**changes):
  """The default sweep settings with `changes` (any types: a ConfigDict would refuse some)."""
  return config_dict.ConfigDict({**sweep_config.sweep_settings(configs.base_config()).to_dict(),
                                 **changes})


@pytest.mark.parametrize("changes, fragment", [
    ({"seeds": (-1, 0)}, r"seeds=\(-1, 0\) must be .*distinct non-negative integers"),
    ({"seeds": (0, 1.5)}, r"seeds=\(0, 1\.5\) must be"),
    ({"seeds": (0, 0)}, r"seeds=\(0, 0\) must be"),
    ({"seeds": (True, 2)}, r"seeds=\(True, 2\) must be"),
    ({"seeds": ()}, r"seeds=\(\) must be a non-empty"),
    ({"seeds": (2**63,)}, r"seeds=\(9223372036854775808,\) must be .*integers below 2\*\*63"),
    ({"seed_keys": (1,)}, r"sweep\.seed_keys=\(1,\) must be a tuple of dotted config keys"),
    ({"workers": 0}, r"sweep\.workers=0 is out of range; allowed: \[1, inf\)"),
    ({"workers": 1.5}, r"sweep\.workers=1\.5 must be an integer"),
    ({"vmap_seeds": "maybe"}, r"sweep\.vmap_seeds='maybe' is not allowed; choose one of: auto"),
    ({"diagnostics": "no"}, r"sweep\.diagnostics='no' is not allowed; choose one of: True"),
    ({"target_accuracy": 0.0}, r"target_accuracy=0\.0 is out of range; allowed: \(0, 1\]"),
    ({"target_accuracy": 95}, r"target_accuracy=95 is out of range"),
    ({"target_accuracy": float("nan")}, r"target_accuracy=nan must be a finite number"),
    ({"baseline": 3}, r"sweep\.baseline=3 must be a cell name"),
])
def test_bad_sweep_settings_are_refused(changes, fragment):
  with pytest.raises(ConfigError, match=fragment):
    sweep_config.validate_sweep(_settings(**changes))


def test_good_sweep_settings_pass():
  sweep_config.validate_sweep(_settings(seeds=(3, 0, 7), workers=2, target_accuracy=1.0))
  sweep_config.validate_sweep(_settings(workers=None))  # One per CPU core (sweep.worker_count).


def test_workdir_that_is_a_file_is_refused(tmp_path):
  existing = tmp_path / "results.txt"
  existing.write_text("x")
  with pytest.raises(ConfigError, match=r"workdir='.*results\.txt' is an existing file"):
    validation.validate_workdir(str(existing))
  with pytest.raises(ConfigError, match=r"lies under .*results\.txt, which is an existing file"):
    validation.validate_workdir(str(existing / "run"))
  validation.validate_workdir(str(tmp_path / "new" / "run"))
  assert not os.path.exists(tmp_path / "new")   # Checking creates nothing.
  with pytest.raises(ConfigError, match=r"--workdir= is empty"):  # It was the current directory.
    validation.validate_workdir("")


def test_check_key_names_the_missing_part_and_what_exists():
  config = configs.base_config()
  validation.check_key(config, "model.dropout")
  with pytest.raises(ConfigError, match=r"config\.model has no 'nonexistent'; its fields: .*"
                                        r"dropout_rate"):
    validation.check_key(config, "model.nonexistent")
  with pytest.raises(ConfigError, match=r"config\.seed has no 'x'; it is not a section"):
    validation.check_key(config, "seed.x")
