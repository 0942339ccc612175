"""Model registry: `get_model(config.model, num_classes, dtype)` -> a Linen classifier.

Every model maps x [N,H,W,C] float -> float32 logits [N, num_classes] via
`model.apply(variables, x, train=...)`; BN statistics live in `batch_stats`, dropout draws from the
`dropout` / `channel_dropout` streams, auxiliary classifiers (GoogLeNet) sow their logits into
`aux_logits` in training. Every model has the fields `num_classes` and `options`
(`layers.BlockOptions`: BN placement, dropout kind, activation, dtype), built from the same-named
`config.model` fields. Adding a model is one line in `_REGISTRY` (plus the import of its family
module): `"name": from_fields(FamilyModule.Class, **fixed_fields)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers
from cnnlab.nets.models import alexnet, baselines, inception, lenet, nin, resnet, vgg

Builder = Callable[[ml_collections.ConfigDict, int, Any], nn.Module]

_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(layers.BlockOptions) if f.name != "dtype")


def _freeze(value):
  """Lists (e.g. from a command-line override) -> tuples, recursively, so modules hash."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def block_options(model_config: ml_collections.ConfigDict, dtype=jnp.float32,
                  prefix: str = "config.model.") -> layers.BlockOptions:
  """`layers.BlockOptions` from `config.model` (absent fields take the defaults), checked:
  ConfigError names `prefix + field` for a bad value."""
  kwargs = {k: _freeze(model_config[k]) for k in _OPTION_FIELDS if k in model_config}
  if isinstance(kwargs.get("dropout_rate"), int) and not isinstance(kwargs["dropout_rate"], bool):
    kwargs["dropout_rate"] = float(kwargs["dropout_rate"])
  options = layers.BlockOptions(**kwargs, dtype=dtype)
  options.check(prefix)
  return options


def from_fields(cls: type[nn.Module], **fixed) -> Builder:
  """A builder that fills `cls`'s dataclass fields from same-named config fields.

  `num_classes`, `options` come from `get_model`; `fixed` fields define the registered
  architecture (e.g. a depth) and are not read from the config; other fields absent from the
  config keep the class defaults.
  """
  names = {f.name for f in dataclasses.fields(cls)} - {"name", "parent", "num_classes",
                                                       "options", *fixed}

  def build(model_config, num_classes: int, options: layers.BlockOptions) -> nn.Module:
    kwargs = {k: _freeze(model_config[k]) for k in names if k in model_config}
    return cls(num_classes=num_classes, options=options, **kwargs, **fixed)
  build.fields = frozenset(names)  # The config.model fields this architecture reads.
  return build


_REGISTRY: dict[str, Builder] = {
    "linear": from_fields(baselines.MLP, hidden=()),
    "mlp": from_fields(baselines.MLP),
    "lenet5": from_fields(lenet.LeNet5, fully_conv=False),
    "lenet5_fcn": from_fields(lenet.LeNet5, fully_conv=True),
    "alexnet": from_fields(alexnet.AlexNet),
    "vgg_cnn": from_fields(vgg.VGG),
    **{f"vgg{d}": from_fields(vgg.VGG, stages=vgg.VGG_STAGES[d], head="classifier")
       for d in sorted(vgg.VGG_STAGES)},
    **{f"resnet{d}": from_fields(resnet.ResNet, **resnet.cifar_resnet(d))
       for d in resnet.CIFAR_DEPTHS},
    **{f"resnet{d}": from_fields(resnet.ResNet, **resnet.imagenet_resnet(d))
       for d in resnet.IMAGENET_DEPTHS},
    "nin": from_fields(nin.NiN),
    "googlenet": from_fields(inception.GoogLeNet),
}

MODEL_NAMES = tuple(_REGISTRY)
# config.model fields every run reads, whatever the architecture (the train step reads the
# auxiliary loss weight).
_SHARED_FIELDS = frozenset(("name", "aux_loss_weight") + _OPTION_FIELDS)


def used_fields(model_config: ml_collections.ConfigDict) -> frozenset[str]:
  """The fields of `config.model` the named architecture reads: the others (e.g. `hidden` for a
  LeNet) cannot change its numbers, so they are left out of a run's fingerprint."""
  builder = _REGISTRY.get(model_config.get("name"))
  return _SHARED_FIELDS | (builder.fields if builder is not None else frozenset(model_config))


def get_model(model_config: ml_collections.ConfigDict, num_classes: int,
              dtype=jnp.float32) -> nn.Module:
  """Builds the classifier `model_config.name` with `num_classes` outputs.

  Raises ConfigError for an unknown name or a bad shared option (bn_placement, bn_convention,
  dropout, dropout_rate, dropblock_size, activation, conv_bias); model-specific fields are
  checked when the model is called.
  """
  name = model_config.get("name", None)
  if name not in _REGISTRY:
    raise ConfigError(f"model.name={name!r} is not a registered model; choose one of: "
                      f"{', '.join(MODEL_NAMES)}.")
  options = block_options(model_config, dtype, prefix="model.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes={num_classes!r} must be a positive int.")
  return _REGISTRY[name](model_config, num_classes, options)
