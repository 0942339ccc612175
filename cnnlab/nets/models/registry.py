"""The model registry: `register_model` makes an architecture known by name, with the
`config.model` fields it reads and their defaults. cnnlab's own models register through it
(cnnlab.nets.models), and so does a researcher's model from their own file (`config.imports`).

    @register_model("dsnet", fields={"width_mult": 1.0})
    class DSNet(nn.Module):
      num_classes: int
      options: layers.BlockOptions     # BN placement, dropout kind and rate, activation, dtype
      width_mult: float = 1.0
      @nn.compact
      def __call__(self, x, train: bool):   # x [N, H, W, C] -> float32 logits [N, num_classes]
        ...

Every registered field becomes `config.model.<field>` with its default (its type is the
default's; `ml_collections.config_dict.placeholder(type)` for a None default), so
`--config.model.width_mult=0.5` works and is type-checked; only the fields of the named model
enter a run's fingerprint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import ml_collections
from ml_collections import config_dict

from cnnlab.base.errors import ConfigError
from cnnlab.base.registry import Registry
from cnnlab.nets import layers

# config.model fields every model reads (the block options) or the train step reads, with their
# defaults: a registered model cannot redefine them.
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(layers.BlockOptions) if f.name != "dtype")


def shared_defaults() -> config_dict.ConfigDict:
  """`config.model`'s fields that do not depend on the architecture, with their defaults."""
  model = config_dict.ConfigDict()
  model.name = "lenet5"   # See `model_names()`.
  # Options every block shares (cnnlab.nets.layers.BlockOptions).
  model.bn_placement = "none"      # none | before_act | after_act (ResNets: no after_act)
  model.bn_convention = "pytorch"  # pytorch | flax
  model.dropout = "none"           # none | standard | spatial | dropblock
  model.dropout_rate = 0.0
  model.dropblock_size = 3         # dropblock only: side of the dropped squares
  model.activation = "relu"        # relu | tanh (LeNet-5 in 1998 used tanh) | ...
  # BatchNorm epsilon; None = the model's default (1e-5; googlenet 1e-3, as torchvision's).
  model.bn_epsilon = config_dict.placeholder(float)
  # Conv biases: None = only where no BN directly follows; True/False force them.
  model.conv_bias = config_dict.placeholder(bool)
  # Weight of auxiliary classifiers' loss (googlenet), read by the train step.
  model.aux_loss_weight = 0.3
  return model


SHARED_FIELDS = frozenset(shared_defaults().keys())


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered architecture: its class, the config.model fields it declares (with the
  defaults config.model gets), the fields fixed by the registration (e.g. a depth), and the
  module that registered it."""
  name: str
  cls: type[nn.Module]
  fields: Mapping[str, Any]
  fixed: Mapping[str, Any]
  module: str

  @property
  def reads(self) -> frozenset[str]:
    """The config.model fields this model reads: every field of its class but those the
    registration fixes (one set in a config, e.g. LeNet-5's `c3_table`, is honoured even if
    undeclared; a declared one has a config default)."""
    return frozenset(f.name for f in dataclasses.fields(self.cls)) - {
        "name", "parent", "num_classes", "options", *self.fixed}

  def build(self, model_config: ml_collections.ConfigDict, num_classes: int,
            options: layers.BlockOptions) -> nn.Module:
    kwargs = {k: freeze(model_config[k]) for k in self.reads if k in model_config}
    return self.cls(num_classes=num_classes, options=options, **kwargs, **self.fixed)


MODELS = Registry("model", "model.name", "cnnlab.register_model")


def freeze(value):
  """Lists (e.g. from a command-line override) -> tuples, recursively, so modules hash."""
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  return value


def _default_value(default):
  return default.get() if isinstance(default, config_dict.FieldReference) else default


def _check_entry(name: str, cls, fields: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
  where = f"register_model({name!r})"
  if not isinstance(name, str) or not name.isidentifier():
    raise ConfigError(f"register_model({name!r}): a model name is an identifier, e.g. 'dsnet'.")
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise ConfigError(f"{where}: {cls!r} is not a flax.linen Module class.")
  own = {f.name for f in dataclasses.fields(cls)}
  missing = [f for f in ("num_classes", "options") if f not in own]
  if missing:
    raise ConfigError(f"{where}: {cls.__name__} needs the fields num_classes: int and options: "
                      f"cnnlab.nets.layers.BlockOptions; it has no {', '.join(missing)}.")
  unknown = sorted(set(fields) - own) + sorted(set(fixed) - own)
  if unknown:
    raise ConfigError(f"{where}: {cls.__name__} has no field {', '.join(unknown)}; its fields: "
                      f"{', '.join(sorted(own - {'parent', 'name'}))}.")
  clash = sorted(set(fields) & (SHARED_FIELDS | {"num_classes", "options"}))
  if clash:
    raise ConfigError(f"{where}: config.model.{clash[0]} is shared by every model; a model "
                      f"reads it through `options` (or the train step), not as its own field.")
  for field, default in fields.items():
    for other in MODELS:
      if (other.name != name and field in other.fields
          and _default_value(other.fields[field]) != _default_value(default)):
        raise ConfigError(f"{where}: config.model.{field} defaults to {_default_value(default)!r} "
                          f"here but to {_default_value(other.fields[field])!r} for "
                          f"{other.name!r} ({other.module}); give it the same default or "
                          f"another name.")


def register_model(name: str, cls: type[nn.Module] | None = None, *,
                   fields: Mapping[str, Any] | None = None, **fixed) -> Callable:
  """Registers the Linen classifier `cls` as `config.model.name = name`; usable as a decorator.

  `cls` has the dataclass fields `num_classes: int` and `options: layers.BlockOptions` (built
  from the shared config.model fields) and maps x [N, H, W, C] -> float32 logits
  [N, num_classes] via `apply(variables, x, train=...)`. `fields` ({field: default}) are the
  fields of `cls` read from `config.model`: each becomes a config field with that default.
  `fixed` fields are set by the registration itself (e.g. `stages=...` for a named depth).
  Registering a name again from the same module and class replaces it (a module imported
  twice); from anywhere else it is a ConfigError.
  """
  def register(model_cls):
    field_defaults = dict(fields or {})
    _check_entry(name, model_cls, field_defaults, fixed)
    module = getattr(model_cls, "__module__", "?")
    MODELS.add(name, ModelEntry(name, model_cls, field_defaults, dict(fixed), module), model_cls)
    return model_cls
  return register if cls is None else register(cls)


def model_names() -> tuple[str, ...]:
  """Every registered model name, in registration order (cnnlab's own first)."""
  return MODELS.names()


def lookup(name) -> ModelEntry:
  """The entry of `name`; ConfigError listing the registered names (and where the ones not from
  cnnlab come from) for an unknown one."""
  return MODELS.get(name)


def field_defaults() -> config_dict.ConfigDict:
  """`config.model` with every field: the shared ones and each registered model's own."""
  model = shared_defaults()
  for entry in MODELS:
    for field, default in entry.fields.items():
      if field not in model:   # A fresh placeholder: configs must not share one reference.
        model[field] = (config_dict.FieldReference(default.get(), field_type=default.get_type())
                        if isinstance(default, config_dict.FieldReference) else default)
  return model


def used_fields(model_config: ml_collections.ConfigDict) -> frozenset[str]:
  """The fields of `config.model` the named architecture reads: the others (e.g. `hidden` for a
  LeNet) cannot change its numbers, so they are left out of a run's fingerprint."""
  name = model_config.get("name")
  entry = MODELS.get(name) if name in MODELS else None
  return SHARED_FIELDS | (entry.reads if entry is not None else frozenset(model_config))
