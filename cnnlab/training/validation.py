"""Checks a config before anything is built, so a bad value fails in a second with one message.

Each failure raises `ConfigError` naming the dotted key, the value given and what is allowed. The
allowed names come from the modules that own them (layers, models, data, optim): adding a model
or a dropout kind there makes it valid here.
"""

from __future__ import annotations

import math
import numbers
import os

import jax
import ml_collections

from cnnlab import data
from cnnlab.base import environment
from cnnlab.base.errors import ConfigError
from cnnlab.nets import models
from cnnlab.training import optim, steps

DTYPES = ("float32", "bfloat16")
SEED_MAX = 2**63 - 1  # numpy's and JAX's seeds are 64-bit integers.


def choice(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r} is not allowed; choose one of: "
                      f"{', '.join(map(str, allowed))}.")


def _interval(low, high, low_open, high_open) -> str:
  lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
  hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
  return f"{lo}, {hi}"


def check_number(key: str, value, *, low=None, high=None, low_open=False, high_open=False,
            integer=False) -> None:
  """ConfigError unless `value` is a finite number (an integer if `integer`) in the interval."""
  interval = _interval(low, high, low_open, high_open)
  kind = numbers.Integral if integer else numbers.Real
  if (isinstance(value, bool) or not isinstance(value, kind)
      or not (isinstance(value, numbers.Integral) or math.isfinite(value))):
    what = "an integer" if integer else "a finite number"
    raise ConfigError(f"config.{key}={value!r} must be {what} in {interval}.")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    raise ConfigError(f"config.{key}={value!r} is out of range; allowed: {interval}.")


def validate_model(model: ml_collections.ConfigDict, prefix: str = "model") -> None:
  """Checks the model name and the options every architecture shares."""
  models.lookup(model.name)   # Every registered model; an unknown name lists them.
  models.block_options(model, prefix=f"config.{prefix}.")
  check_number(f"{prefix}.aux_loss_weight", model.get("aux_loss_weight", 0.3), low=0)


def validate_dataset(dataset: ml_collections.ConfigDict) -> None:
  """Checks the input pipeline's settings (before any file is read)."""
  if data.streamed.augmentation(dataset) == "imagenet" and data.streamed.image_size(
      dataset) is None:
    raise ConfigError(f"config.dataset.augment='imagenet' crops to config.dataset.image_size, "
                      f"which is None for dataset {dataset.name!r}; set it, e.g. 224.")
  choice("dataset.normalization", dataset.get("normalization", "data"), data.NORMALIZATIONS)
  check_number("dataset.test_fraction", dataset.get("test_fraction", 0.2), low=0, high=1,
               low_open=True, high_open=True)
  check_number("dataset.in_memory_limit_mb", dataset.get("in_memory_limit_mb", 1024), low=0)
  for key, low in (("image_size", 1), ("workers", 0)):
    if dataset.get(key) is not None:
      check_number(f"dataset.{key}", dataset[key], low=low, integer=True)
  if dataset.get("resize") is not None and data.streamed.is_streamed(dataset):
    raise ConfigError(f"config.dataset.resize={dataset.resize!r} applies to datasets read into "
                      f"memory; dataset {dataset.name!r} is streamed: set "
                      f"config.dataset.image_size instead.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid value in `config`."""
  check_number("seed", config.seed, low=0, high=SEED_MAX, integer=True)
  choice("dtype", config.dtype, DTYPES)
  choice("deterministic", config.deterministic, (True, False))
  choice("matmul_precision", config.matmul_precision, environment.MATMUL_PRECISIONS)
  choice("xla_cpu_ynn_convolutions",
          environment.numerics_setting(config, "xla_cpu_ynn_convolutions"), (True, False))
  choice("xla_cpu_vector_width", environment.numerics_setting(config, "xla_cpu_vector_width"),
          environment.XLA_CPU_VECTOR_WIDTHS)
  data.lookup(config.dataset.name)   # The names registered so far, each with its module.
  check_number("dataset.validation_fraction", config.dataset.get("validation_fraction", 0.0),
          low=0, high=0.5)
  for key in ("validation_seed", "subset_seed", "split_seed"):
    check_number(f"dataset.{key}", config.dataset.get(key, 0), low=0, high=SEED_MAX, integer=True)
  validate_dataset(config.dataset)
  check_number("label_smoothing", config.get("label_smoothing", 0.0), low=0, high=1,
               high_open=True)
  choice("evaluate_test", config.get("evaluate_test", True), (True, False))
  if not config.get("evaluate_test", True) and not config.dataset.get("validation_fraction"):
    raise ConfigError("config.evaluate_test=False evaluates the validation split instead of "
                      "test, but config.dataset.validation_fraction=0 gives none; set it, e.g. "
                      "0.1.")
  validate_model(config.model)
  opt = config.optimizer
  optim.lookup(opt.name)   # Every registered optimizer; an unknown name lists them.
  choice("optimizer.schedule", opt.schedule, optim.SCHEDULES)
  check_number("optimizer.learning_rate", opt.learning_rate, low=0, low_open=True)
  check_number("optimizer.momentum", opt.momentum, low=0, high=1, high_open=True)
  check_number("optimizer.weight_decay", opt.weight_decay, low=0)
  check_number("optimizer.warmup_epochs", opt.warmup_epochs, low=0)
  for b in opt.step_boundaries:
    check_number("optimizer.step_boundaries[]", b, low=0, high=1, low_open=True, high_open=True)
  check_number("optimizer.step_factor", opt.step_factor, low=0, low_open=True)
  for key in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps",
              "checkpoint_every_steps", "checkpoints_to_keep"):
    check_number(key, config[key], low=1, integer=True)
  if opt.warmup_epochs > config.num_epochs:
    raise ConfigError(f"config.optimizer.warmup_epochs={opt.warmup_epochs!r} is longer than the "
                      f"run (config.num_epochs={config.num_epochs}); allowed: [0, "
                      f"{config.num_epochs}].")
  size = data.streamed.image_size(config.dataset)
  if size and data.streamed.is_streamed(config.dataset):   # Known before any file is read.
    height, width, channels = size, size, 3   # At most 3 channels: the check's upper bound.
  else:
    height, width, channels = data.image_shape(config.dataset)
  # One padded evaluation batch is held as float32 three times: normalised, padded, on device.
  data.subsets.require_memory(
      f"eval_batch_size={config.eval_batch_size}",
      3 * 4 * config.eval_batch_size * height * width * channels,
      f"for one evaluation batch of {height}x{width}x{channels} images")
  ckpt, log = config.checkpoint_every_steps, config.log_every_steps
  if ckpt % log:
    lower = max(ckpt // log * log, log)
    raise ConfigError(f"config.checkpoint_every_steps={ckpt} must be a multiple of "
                      f"config.log_every_steps={log} (checkpoints are written at logging steps); "
                      f"e.g. {lower} or {lower + log}.")


def validate_setup(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for what only building a run refuses: a model field its layers check
  when called (model.stages, model.pool, model.hidden, ...) or an input they cannot take, and a
  batch larger than the training split. Builds what training builds (`steps.setup`: the
  dataset's facts, preparing it on first use, the model and optimizer) and the initial state
  abstractly (shapes only: nothing is computed), so that a sweep or a run refuses such a value
  before it writes anything. Needs JAX's backend (some layers choose their kernels by it): call
  it after `validate_config` and the numerics are set."""
  setup = steps.setup(config)
  if config.batch_size > setup.info.num_train:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than the "
                      f"{setup.info.num_train} training examples of {config.dataset.name!r}; "
                      f"use at most {setup.info.num_train}.")
  init = steps.init_program(setup.model, setup.tx, tuple(setup.info.image_shape))
  jax.eval_shape(init, jax.eval_shape(jax.random.key, 0))


def validate_workdir(workdir: str) -> None:
  """Raises ConfigError unless `workdir` is a directory or can be created as one (no existing
  file at it or at one of its parents); an empty one (`--workdir=`) would be the current
  directory."""
  if not workdir.strip():
    raise ConfigError(f"--workdir={workdir} is empty; give a directory, or leave the flag out for "
                      f"the default runs/<config name>.")
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "is" if path == os.path.abspath(workdir) else f"lies under {path}, which is"
    raise ConfigError(f"workdir={workdir!r} {where} an existing file; a run needs a directory "
                      f"there: choose another workdir.")


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises ConfigError unless the dotted `key` (e.g. "model.dropout") names a field of
  `config`; the message names the first missing part and the fields that exist there."""
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      parent = ".".join(["config", *parts[:depth]])
      fields = (f"its fields: {', '.join(sorted(node.keys()))}"
                if isinstance(node, ml_collections.ConfigDict) else "it is not a section")
      raise ConfigError(f"config.{key} names no config field: {parent} has no {part!r}; "
                        f"{fields}.")
    node = node[part]
