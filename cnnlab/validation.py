"""Checks a config before anything is built, so a bad value fails in a second with one message.

Each failure raises `ConfigError` naming the dotted key, the value given and what is allowed. The
allowed names come from the modules that own them (layers, models, data, optim): adding a model
or a dropout kind there makes it valid here.
"""

from __future__ import annotations

import numbers

import ml_collections

from cnnlab import data, environment, models, optim
from cnnlab.errors import ConfigError

DTYPES = ("float32", "bfloat16")


def _choice(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r} is not allowed; choose one of: "
                      f"{', '.join(map(str, allowed))}.")


def _number(key: str, value, *, low=None, high=None, low_open=False, high_open=False,
            integer=False) -> None:
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ConfigError(f"config.{key}={value!r} must be {'an integer' if integer else 'a number'}.")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    interval = f"{lo or '(-inf'}, {hi or 'inf)'}"
    raise ConfigError(f"config.{key}={value!r} is out of range; allowed: {interval}.")


def validate_model(model: ml_collections.ConfigDict, prefix: str = "model") -> None:
  """Checks the model name and the options every architecture shares."""
  _choice(f"{prefix}.name", model.name, models.MODEL_NAMES)
  models.block_options(model, prefix=f"config.{prefix}.")
  _number(f"{prefix}.aux_loss_weight", model.get("aux_loss_weight", 0.3), low=0)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid value in `config`."""
  _number("seed", config.seed, low=0, integer=True)
  _choice("dtype", config.dtype, DTYPES)
  _choice("deterministic", config.deterministic, (True, False))
  _choice("matmul_precision", config.matmul_precision, environment.MATMUL_PRECISIONS)
  _choice("dataset.name", config.dataset.name, data.DATASET_NAMES)
  validate_model(config.model)
  opt = config.optimizer
  _choice("optimizer.name", opt.name, optim.OPTIMIZERS)
  _choice("optimizer.schedule", opt.schedule, optim.SCHEDULES)
  _number("optimizer.learning_rate", opt.learning_rate, low=0, low_open=True)
  _number("optimizer.momentum", opt.momentum, low=0, high=1, high_open=True)
  _number("optimizer.weight_decay", opt.weight_decay, low=0)
  _number("optimizer.warmup_epochs", opt.warmup_epochs, low=0)
  for b in opt.step_boundaries:
    _number("optimizer.step_boundaries[]", b, low=0, high=1, low_open=True, high_open=True)
  _number("optimizer.step_factor", opt.step_factor, low=0, low_open=True)
  for key in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps",
              "checkpoint_every_steps", "checkpoints_to_keep"):
    _number(key, config[key], low=1, integer=True)
