"""`config.init`: its defaults, its checked settings, and what they make of a model: which
parameters are frozen, re-initialised or the classifier head (optimizer groups), and which
BatchNorm layers keep their running statistics (`FrozenBatchNorm`). Loading a source's weights
is cnnlab.training.transfer's; `steps.setup` needs only this.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from ml_collections import config_dict

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers

SWEEP_PRETRAIN = "sweep:pretrain"
SETTING_KEYS = ("source", "arch", "step", "reinit", "freeze", "freeze_bn", "body_lr_scale")
COLLECTIONS = ("params", "batch_stats")
# Optimizer groups (cnnlab.training.optim.create_optimizer): frozen, the head and re-initialised
# arrays, everything else (the body).
FROZEN, HEAD, BODY = "frozen", "head", "body"


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.init` with defaults filled in and its recipe applied; raises ConfigError for the
  first bad value."""
  s = init_defaults()
  _set_fields(s, config.get("init") or {}, "config.init", list(s))
  if s.recipe:
    if s.recipe not in s.recipes:
      raise ConfigError(f"config.init.recipe={s.recipe!r} names no recipe; config.init.recipes "
                        f"has: {', '.join(s.recipes) or 'none'}.")
    _set_fields(s, s.recipes[s.recipe], f"config.init.recipes.{s.recipe}", SETTING_KEYS)
  if not isinstance(s.source, str) or not isinstance(s.arch, str):
    raise ConfigError(f"config.init.source={s.source!r} and init.arch={s.arch!r} must be "
                      f"strings: source '' (none), a cnnlab workdir, a weight file or "
                      f"{SWEEP_PRETRAIN!r}.")
  if s.step is not None and (isinstance(s.step, bool) or not isinstance(s.step, int)
                             or s.step < 0):
    raise ConfigError(f"config.init.step={s.step!r} must be None (the latest) or a checkpoint "
                      "step >= 0.")
  for key in ("reinit", "freeze"):
    if isinstance(s[key], str) or not all(isinstance(p, str) and p.lstrip("!") for p in s[key]):
      raise ConfigError(f"config.init.{key}={s[key]!r} must be a tuple of non-empty path "
                        "patterns, e.g. ('*', '!head/*').")
  if not isinstance(s.freeze_bn, bool):
    raise ConfigError(f"config.init.freeze_bn={s.freeze_bn!r} must be True or False.")
  scale = s.body_lr_scale
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < np.inf:
    raise ConfigError(f"config.init.body_lr_scale={scale!r} must be a number > 0 (freeze "
                      "parameters with config.init.freeze).")
  return s


def _set_fields(target: ml_collections.ConfigDict, values, where: str, allowed) -> None:
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    raise ConfigError(f"{where} has no field {', '.join(unknown)}; its fields: "
                      f"{', '.join(allowed)}.")
  for key in values:
    target[key] = values[key]


def match(patterns: Sequence[str], paths, key: str) -> set[str]:
  """The `paths` selected by `patterns` (globs; `!` excludes; the last match decides).

  Raises:
    ConfigError: a pattern matches none of `paths`.
  """
  selected = {}
  for pattern in patterns:
    negate = pattern.startswith("!")
    hits = fnmatch.filter(paths, pattern[1:] if negate else pattern)
    if not hits:
      raise ConfigError(f"config.init.{key} pattern {pattern!r} matches no path; paths look "
                        f"like: {', '.join(sorted(paths)[:4])}, ...")
    selected.update(dict.fromkeys(hits, not negate))
  return {path for path, chosen in selected.items() if chosen}


def flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


@functools.lru_cache(maxsize=32)
def variable_shapes(model, input_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
  """{collection: {path: ShapeDtypeStruct}} of `model`'s variables for inputs `input_shape`."""
  dummy = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
  return {c: flat(variables.get(c, {})) for c in COLLECTIONS}


def head_paths(model, input_shape: tuple[int, ...]) -> set[str]:
  """Parameter paths whose shape depends on the number of classes (the classifier heads)."""
  params = variable_shapes(model, input_shape)["params"]
  other = variable_shapes(model.clone(num_classes=model.num_classes + 1), input_shape)["params"]
  return {p for p, v in params.items() if other[p].shape != v.shape}


@dataclasses.dataclass(frozen=True)
class FrozenBatchNorm:
  """`model` whose BatchNorm layers at `frozen` module paths run with train=False (running
  statistics, not updated) even in training; hashable, so jitted steps are shared."""
  model: nn.Module
  frozen: frozenset[tuple[str, ...]]

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._intercept):
      return self.model.apply(*args, **kwargs)

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, layers.BatchNorm) and context.method_name == "__call__"
        and tuple(module.path) in self.frozen):
      bound = _BN_SIGNATURE.bind(module, *args, **kwargs)
      bound.arguments["train"] = False
      return next_fun(*bound.args[1:], **bound.kwargs)
    return next_fun(*args, **kwargs)


_BN_SIGNATURE = inspect.signature(layers.BatchNorm.__call__)


def groups(config, model, input_shape: tuple[int, ...]):
  """({param path: FROZEN | HEAD | BODY}, frozen BatchNorm module paths) of `config.init`;
  (None, {}) when every parameter trains at the schedule's rate."""
  s = settings(config)
  if not s.freeze and s.body_lr_scale == 1:
    return None, frozenset()
  variables = variable_shapes(model, input_shape)
  frozen = match(s.freeze, list(variables["params"]), "freeze")
  new = head_paths(model, input_shape) | match(
      s.reinit, [*variables["params"], *variables["batch_stats"]], "reinit")
  labels = {p: FROZEN if p in frozen else HEAD if p in new else BODY for p in variables["params"]}
  module = lambda path: tuple(path.split("/")[:-1])
  bn_modules = {module(p) for p in variables["batch_stats"]}
  frozen_bn = frozenset(m for m in bn_modules if s.freeze_bn and all(
      label == FROZEN for p, label in labels.items() if module(p) == m))
  return labels, frozen_bn


def prepare(config: ml_collections.ConfigDict, model, input_shape: tuple[int, ...]):
  """What steps.setup needs for `config.init`: (model, param_labels, lr_scales).

  `param_labels` (None without freezing or a body learning-rate scale) labels each parameter
  FROZEN, HEAD (classifier head and `reinit` arrays) or BODY for optim.create_optimizer;
  `model` is wrapped in FrozenBatchNorm when frozen BatchNorm layers must keep their statistics.
  Raises ConfigError for a bad init value or a pattern that matches nothing.
  """
  labels, frozen_bn = groups(config, model, tuple(input_shape))
  if labels is None:
    return model, None, None
  scales = {FROZEN: 0.0, HEAD: 1.0, BODY: float(settings(config).body_lr_scale)}
  return (FrozenBatchNorm(model, frozen_bn) if frozen_bn else model,
          traverse_util.unflatten_dict(labels, sep="/"), scales)


def init_defaults() -> config_dict.ConfigDict:
  """`config.init`: start from another run, re-initialise or freeze parts
  (cnnlab.training.transfer).

  Path patterns are globs over parameter paths like `stage2_conv0/conv/kernel` (`*` crosses `/`);
  a pattern starting with `!` excludes, and the last pattern that matches a path decides, as in
  .gitignore: ("*", "!head/*") is everything but the head.
  """
  init = config_dict.ConfigDict()
  # "" (train from scratch) | a cnnlab workdir | a torchvision weight file (see `arch`) |
  # "sweep:pretrain" (the sweep's pretraining run of the same seed, see config.sweep.pretrain).
  init.source = ""
  # A torchvision state_dict file as the source (.safetensors/.pt/.pth/.bin) needs its
  # architecture (cnnlab.nets.convert.TORCHVISION_ARCHS, e.g. "resnet18") and config.model set to
  # convert.torchvision_model_config(arch).
  init.arch = ""
  init.step = config_dict.placeholder(int)    # The source checkpoint's step; None = the latest.
  # Arrays (params and BN statistics) to re-initialise instead of loading. The classifier head
  # is re-initialised anyway when the source has another number of classes.
  init.reinit = ()
  init.freeze = ()          # Parameters that do not train (no update, no optimizer state).
  # BatchNorm layers whose parameters are frozen use their running statistics in training and
  # keep them (as Keras' trainable=False); False: they normalise with batch statistics and
  # update the running ones (PyTorch's requires_grad=False without model.eval()).
  init.freeze_bn = True
  # Learning rate of the trained parameters but the head and the `reinit` ones, relative to the
  # schedule's (discriminative fine-tuning); 1 = the same rate everywhere.
  init.body_lr_scale = 1.0
  # Named settings of the fields above, e.g. recipes.probe = {"freeze": ("*", "!head/*")}; the
  # one named by `recipe` overrides them ("" = none): a sweep axis over `init.recipe` then
  # varies several fields at once.
  init.recipe = ""
  init.recipes = config_dict.ConfigDict()
  return init
