"""Transfer learning: start a run from another run's weights, re-initialise or freeze parts of it.

`config.init` (cnnlab.configs.init_defaults) names a source: a cnnlab workdir, whose config.json
builds its model and optimizer and whose checkpoint (the latest, or `init.step`) is restored, or
a torchvision weight file of architecture `init.arch`, read by cnnlab.nets.convert.
Every array of the new model (parameters and BatchNorm statistics) is then, by its path:

  re-initialised  it matches `init.reinit`, or it is the classifier head (its shape depends on
                  the number of classes) and the source has another number of classes;
  loaded          the source holds it with the same shape;
  an error        the source holds it with another shape (ConfigError naming both shapes):
                  nothing is restored partially or silently;
  untouched       the source does not hold it (it keeps its fresh initialisation).

The run prints these lists, writes them to <workdir>/transfer.json and copies them into
results.json under "transfer". This happens once, when the run starts: a resumed run restores
its own checkpoint and never reads the source again.

`init.freeze` (path globs, `!` excludes, the last match decides; a pattern matching nothing is
an error) selects parameters that do not train: optax.set_to_zero (no update, optimizer state or
weight decay), so they come out of training bit for bit. With `init.freeze_bn` a BatchNorm layer
whose parameters are all frozen runs on its running statistics and keeps them (`FrozenBatchNorm`
calls it with train=False). `init.body_lr_scale` scales the rate of all but the head and `reinit`.

In a sweep, `init.source = "sweep:pretrain"` names the sweep's pretraining run of the cell's
seed, <sweep workdir>/pretrain/seed_<s>, which `cnnlab.study.pretrain` trains (once, under a lock)
before any cell; `config.sweep.pretrain` holds the overrides that make the pretraining config.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import inspect
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from cnnlab import configs
from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers
from cnnlab.study import pretrain
from cnnlab.training import rundir

SWEEP_PRETRAIN = "sweep:pretrain"
SETTING_KEYS = ("source", "arch", "step", "reinit", "freeze", "freeze_bn", "body_lr_scale")
RECORD_FILE = "transfer.json"
COLLECTIONS = ("params", "batch_stats")
# Optimizer groups (cnnlab.training.optim.create_optimizer): frozen, the head and re-initialised
# arrays, everything else (the body).
FROZEN, HEAD, BODY = "frozen", "head", "body"


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.init` with defaults filled in and its recipe applied; raises ConfigError for the
  first bad value."""
  s = configs.init_defaults()
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


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


@functools.lru_cache(maxsize=32)
def _abstract(model, input_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
  """{collection: {path: ShapeDtypeStruct}} of `model`'s variables for inputs `input_shape`."""
  dummy = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
  return {c: _flat(variables.get(c, {})) for c in COLLECTIONS}


def head_paths(model, input_shape: tuple[int, ...]) -> set[str]:
  """Parameter paths whose shape depends on the number of classes (the classifier heads)."""
  params = _abstract(model, input_shape)["params"]
  other = _abstract(model.clone(num_classes=model.num_classes + 1), input_shape)["params"]
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


def _groups(config, model, input_shape: tuple[int, ...]):
  """({param path: FROZEN | HEAD | BODY}, frozen BatchNorm module paths) of `config.init`;
  (None, {}) when every parameter trains at the schedule's rate."""
  s = settings(config)
  if not s.freeze and s.body_lr_scale == 1:
    return None, frozenset()
  variables = _abstract(model, input_shape)
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
  """What train.setup needs for `config.init`: (model, param_labels, lr_scales).

  `param_labels` (None without freezing or a body learning-rate scale) labels each parameter
  FROZEN, HEAD (classifier head and `reinit` arrays) or BODY for optim.create_optimizer;
  `model` is wrapped in FrozenBatchNorm when frozen BatchNorm layers must keep their statistics.
  Raises ConfigError for a bad init value or a pattern that matches nothing.
  """
  labels, frozen_bn = _groups(config, model, tuple(input_shape))
  if labels is None:
    return model, None, None
  scales = {FROZEN: 0.0, HEAD: 1.0, BODY: float(settings(config).body_lr_scale)}
  return (FrozenBatchNorm(model, frozen_bn) if frozen_bn else model,
          traverse_util.unflatten_dict(labels, sep="/"), scales)


# ----------------------------------------------------------------------------------------------
# The source.

def source_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The source workdir of the run of `config` in `workdir` ("" for none)."""
  source = settings(config).source
  if source != SWEEP_PRETRAIN:
    return source
  cells = os.path.dirname(os.path.dirname(os.path.normpath(workdir)))
  if os.path.basename(cells) != "cells":
    raise ConfigError(f"config.init.source={SWEEP_PRETRAIN!r} names a sweep's pretraining run; "
                      f"{workdir} is not a sweep cell's run (use a workdir path instead).")
  return pretrain.run_dir(os.path.dirname(cells), config.seed)


def _source_step(path: str, step: int | None) -> int | None:
  """The checkpoint step to load from the source workdir `path`: `step`, or None for its newest,
  chosen as it is read (the source may still be training: its steps come and go).

  Raises:
    ConfigError: no such workdir, no config.json, no checkpoint, or no checkpoint `step`.
  """
  from cnnlab.training import checkpoint
  where = f"config.init.source={path!r}"
  run = rundir.RunDir(path)
  if not os.path.isdir(path):
    raise ConfigError(f"{where} is not a directory; give a cnnlab workdir (it holds "
                      "config.json and checkpoints/).")
  if not os.path.isfile(run.config_path):
    raise ConfigError(f"{where} holds no config.json; is it a cnnlab workdir?")
  steps = checkpoint.saved_steps(run.checkpoint_dir)  # Read only: opens no orbax manager.
  if not steps:
    raise ConfigError(f"{where} holds no checkpoint; train it first.")
  if step is not None and step not in steps:
    raise ConfigError(f"config.init.step={step} is not a checkpoint of {path}; it has steps: "
                      f"{', '.join(map(str, steps))}.")
  return step


@functools.lru_cache(maxsize=4)
def _load_source(path: str, step: int | None) -> tuple[dict, str, int]:
  """({collection: {path: np.ndarray}}, config fingerprint, step) of checkpoint `step` (None: the
  newest) of the source workdir `path`, restored into the model and optimizer its config.json
  builds, without changing the source."""
  from cnnlab.training import train  # train imports this module.
  config, fingerprint = rundir.RunDir(path).recorded_config(
      f"config.init.source={path!r} must be a cnnlab workdir as its run left it")
  state = train.load_trained_state(config, path, step)
  variables = {c: {p: np.asarray(v) for p, v in _flat(getattr(state, c)).items()}
               for c in COLLECTIONS}
  return variables, fingerprint, int(state.step)


def plan(model_shapes: dict, source_shapes: dict, heads: set[str],
         reinit: Sequence[str]) -> dict[str, Any]:
  """Which arrays to load, re-initialise or leave untouched; `*_shapes` are {collection: {path:
  shape}}. Returns the transfer record's lists (paths as "collection/path").

  Raises:
    ConfigError: an array matches by path but not by shape (and is not re-initialised), or
      the source shares no array with the model (another architecture).
  """
  to_reinit = match(reinit, [*model_shapes["params"], *model_shapes["batch_stats"]], "reinit")
  record = {"loaded": [], "reinitialised": {}, "untouched": [], "unused_source": []}
  for c in COLLECTIONS:
    for path, shape in model_shapes[c].items():
      name, theirs = f"{c}/{path}", source_shapes[c].get(path)
      if path in to_reinit:
        record["reinitialised"][name] = "config.init.reinit"
      elif theirs is None:
        record["untouched"].append(name)
      elif tuple(theirs) != tuple(shape) and path in heads:
        record["reinitialised"][name] = (f"classifier head: source shape {tuple(theirs)}, "
                                         f"model {tuple(shape)}")
      elif tuple(theirs) != tuple(shape):
        raise ConfigError(f"{name} has shape {tuple(theirs)} in the source and {tuple(shape)} "
                          f"in the model; add a pattern for it to config.init.reinit to "
                          f"re-initialise it.")
      else:
        record["loaded"].append(name)
    record["unused_source"] += [f"{c}/{p}" for p in source_shapes[c] if p not in model_shapes[c]]
  if not record["loaded"] and model_shapes["params"]:
    raise ConfigError(f"the source shares no array with the model (another architecture?): "
                      f"it holds {', '.join(record['unused_source'][:3])}, ..., the model "
                      f"{', '.join(list(model_shapes['params'])[:3])}, ...")
  return record


def _load_weight_file(config, path: str, arch: str) -> tuple[dict, str]:
  """({collection: {path: np.ndarray}}, "arch:sha256 of the file") of a torchvision state_dict
  file; ConfigError unless `arch` is set and config.model is torchvision's `arch` layout."""
  from cnnlab.nets import convert
  if not arch:
    raise ConfigError(f"config.init.source={path!r} is a weight file: set config.init.arch to "
                      f"its torchvision architecture, one of: "
                      f"{', '.join(convert.TORCHVISION_ARCHS)}.")
  layout = convert.torchvision_model_config(arch, config.model.get("aux_classifiers", False))
  differ = [f"{k}={config.model.get(k)!r} (torchvision: {v!r})" for k, v in layout.items()
            if config.model.get(k) != v]
  if differ:
    raise ConfigError(f"config.init.arch={arch!r} needs config.model as "
                      f"convert.torchvision_model_config({arch!r}); it has model.{differ[0]}.")
  return _read_weights(path, arch, config.model.get("aux_classifiers", False),
                       os.stat(path).st_mtime_ns if os.path.exists(path) else 0)


@functools.lru_cache(maxsize=2)
def _read_weights(path: str, arch: str, aux_classifiers: bool, mtime_ns: int):
  """The converted variables of a weight file (read once per change of the file)."""
  from cnnlab.nets import convert
  variables = convert.from_torchvision(arch, convert.read_state_dict(path), aux_classifiers)
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  return {c: {p: np.asarray(v) for p, v in _flat(variables.get(c, {})).items()}
          for c in COLLECTIONS}, f"{arch}:{digest}"


def transfer_plan(config, workdir: str):
  """(record, source variables) for the run of `config` in `workdir`, reading the source but
  writing nothing; (None, None) without a source."""
  from cnnlab.nets import convert, models
  from cnnlab.training import train
  s = settings(config)
  path = source_dir(config, workdir)
  if not path:
    return None, None
  info = train.setup(config).info
  if path.lower().endswith(convert.STATE_DICT_FORMATS):
    step, (source, fingerprint) = None, _load_weight_file(config, path, s.arch)
  else:
    source, fingerprint, step = _load_source(path, _source_step(path, s.step))
  model = models.get_model(config.model, info.num_classes, dtype=jnp.dtype(config.dtype))
  shape = tuple(info.image_shape)
  shapes = lambda tree: {c: {p: tuple(v.shape) for p, v in tree[c].items()} for c in COLLECTIONS}
  record = plan(shapes(_abstract(model, shape)), shapes(source), head_paths(model, shape),
                s.reinit)
  labels, frozen_bn = _groups(config, model, shape)
  record = {"source": path, "source_step": step, "source_fingerprint": fingerprint, **record,
            "frozen": [f"params/{p}" for p, label in (labels or {}).items() if label == FROZEN],
            "frozen_batch_norm": sorted("/".join(m) for m in frozen_bn),
            "body_lr_scale": float(s.body_lr_scale)}
  return record, source


def check(config: ml_collections.ConfigDict, run_dir: rundir.RunDir) -> None:
  """Checks `config.init` before a run claims its workdir: bad values, patterns that match
  nothing, and (unless the workdir holds progress: a resume reads its own checkpoint) a source
  that is missing, has no checkpoint or does not fit the model. Raises ConfigError."""
  from cnnlab.training import train
  train.setup(config)  # Builds the optimizer groups: checks the values and the patterns.
  if not run_dir.has_progress():
    transfer_plan(config, run_dir.workdir)


def start(run, state):
  """The state a fresh run starts from: `state` with the source's arrays where the plan loads
  them (and a fresh optimizer state); prints the plan and records it (transfer.json)."""
  record, source = transfer_plan(run.config, run.dir.workdir)
  if record is None:
    return state
  new = {}
  for c in COLLECTIONS:
    flat = dict(_flat(getattr(state, c)))
    for name in record["loaded"]:
      collection, path = name.split("/", 1)
      if collection == c:
        flat[path] = jnp.asarray(source[c][path])
    new[c] = traverse_util.unflatten_dict(flat, sep="/") if flat else {}
  print(describe(record, run.dir.workdir))
  if run.primary:
    rundir.write_json_atomic(os.path.join(run.dir.workdir, RECORD_FILE), record)
  return state.replace(params=new["params"], batch_stats=new["batch_stats"],
                       opt_state=jax.jit(state.tx.init)(new["params"]))


def describe(record: dict, workdir: str) -> str:
  """The transfer record as the lines a run prints."""
  lists = {"loaded": record["loaded"], "left untouched": record["untouched"],
           "re-initialised": [f"{p} ({why})" for p, why in record["reinitialised"].items()],
           "in the source, unused": record["unused_source"], "frozen": record["frozen"],
           "BatchNorm on running statistics": record["frozen_batch_norm"]}
  return "\n".join([f"{workdir}: starting from {record['source']} (step "
                    f"{record['source_step']}); recorded in {os.path.join(workdir, RECORD_FILE)}"]
                   + [f"  {k} ({len(v)}): {', '.join(v) or '-'}" for k, v in lists.items()])


def recorded(workdir: str) -> dict[str, Any]:
  """{"transfer": record} of a run that started from a source, else {} (for results.json)."""
  path = os.path.join(workdir, RECORD_FILE)
  return {"transfer": rundir.read_json(path)} if os.path.exists(path) else {}
