"""Model registry: `get_model(config.model, num_classes, dtype)` -> a Linen classifier.

Every model maps x [N,H,W,C] float -> float32 logits [N, num_classes] via
`model.apply(variables, x, train=...)`; BN statistics live in `batch_stats`, dropout draws from the
`dropout` / `channel_dropout` streams. Adding a model is one line in `_REGISTRY` (plus the import
of its family module): `"name": from_fields(FamilyModule.Class)` or any callable
`(model_config, num_classes, dtype) -> nn.Module`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cnnlab import layers
from cnnlab.errors import ConfigError
from cnnlab.models import baselines, lenet, vgg

Builder = Callable[[ml_collections.ConfigDict, int, Any], nn.Module]

# Defaults for the options every model shares (fields absent from a config take these).
COMMON_DEFAULTS = {"bn_placement": "none", "bn_convention": "pytorch", "dropout": "none",
                   "dropout_rate": 0.0, "activation": "relu"}


def _freeze(value):
  """Lists (e.g. from a command-line override) -> tuples, recursively, so modules hash."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def from_fields(cls: type[nn.Module], **fixed) -> Builder:
  """A builder that fills `cls`'s dataclass fields from same-named config fields.

  `num_classes` and `dtype` come from `get_model`'s arguments, `fixed` overrides the config,
  and fields absent from the config keep the class defaults.
  """
  names = {f.name for f in dataclasses.fields(cls)} - {"name", "parent", "num_classes", "dtype"}

  def build(model_config, num_classes: int, dtype) -> nn.Module:
    kwargs = {k: _freeze(model_config[k]) for k in names if k in model_config}
    kwargs.update(fixed)
    if "dropout_rate" in kwargs and isinstance(kwargs["dropout_rate"], int):
      kwargs["dropout_rate"] = float(kwargs["dropout_rate"])
    return cls(num_classes=num_classes, dtype=dtype, **kwargs)
  return build


_REGISTRY: dict[str, Builder] = {
    "mlp": from_fields(baselines.MLP),
    "lenet5": from_fields(lenet.LeNet5),
    "vgg_cnn": from_fields(vgg.VGG),
}

MODEL_NAMES = tuple(_REGISTRY)


def get_model(model_config: ml_collections.ConfigDict, num_classes: int,
              dtype=jnp.float32) -> nn.Module:
  """Builds the classifier `model_config.name` with `num_classes` outputs.

  Raises ConfigError for an unknown name or a bad shared option (bn_placement, bn_convention,
  dropout, dropout_rate, activation); model-specific fields are checked when the model is called.
  """
  name = model_config.get("name", None)
  if name not in _REGISTRY:
    raise ConfigError(f"model.name={name!r} is not a registered model; choose one of: "
                      f"{', '.join(MODEL_NAMES)}.")
  options = {k: model_config.get(k, v) for k, v in COMMON_DEFAULTS.items()}
  try:
    layers.check_block_options(**options)
  except ConfigError as e:
    raise ConfigError(f"model.{e}") from None
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes={num_classes!r} must be a positive int.")
  return _REGISTRY[name](model_config, num_classes, dtype)
