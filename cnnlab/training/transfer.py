"""Transfer learning: start a run from another run's weights, re-initialise or freeze parts of it.

`config.init` (cnnlab.training.init_settings) names a source: a cnnlab workdir, whose config.json
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
seed, which `cnnlab.study.pretrain` trains before any cell; the sweep passes its workdir down
(`pretrain_run`), since a run does not know the sweep it belongs to.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from cnnlab.base import files
from cnnlab.base.errors import ConfigError
from cnnlab.nets import convert, models
from cnnlab.training import restore, rundir, steps
from cnnlab.training.checkpoint import saved_steps
from cnnlab.training.init_settings import (
  COLLECTIONS,
  FROZEN,
  SWEEP_PRETRAIN,
  flat,
  groups,
  head_paths,
  match,
  settings,
  variable_shapes,
)

RECORD_FILE = "transfer.json"


def source_path(config: ml_collections.ConfigDict, pretrain_run: str | None = None) -> str:
  """The source (workdir or weight file) of a run of `config`; "" for none.

  `init.source="sweep:pretrain"` names the sweep's pretraining run of the run's seed: only the
  sweep knows where that is, and passes it down as `pretrain_run`."""
  source = settings(config).source
  if source != SWEEP_PRETRAIN:
    return source
  if not pretrain_run:
    raise ConfigError(f"config.init.source={SWEEP_PRETRAIN!r} names a sweep's pretraining run; "
                      f"this run is not a sweep cell's run (use a workdir path instead).")
  return pretrain_run


def _source_step(path: str, step: int | None) -> int | None:
  """The checkpoint step to load from the source workdir `path`: `step`, or None for its newest,
  chosen as it is read (the source may still be training: its steps come and go).

  Raises:
    ConfigError: no such workdir, no config.json, no checkpoint, or no checkpoint `step`.
  """
  where = f"config.init.source={path!r}"
  run = rundir.RunDir(path)
  if not os.path.isdir(path):
    raise ConfigError(f"{where} is not a directory; give a cnnlab workdir (it holds "
                      "config.json and checkpoints/).")
  if not os.path.isfile(run.config_path):
    raise ConfigError(f"{where} holds no config.json; is it a cnnlab workdir?")
  saved = saved_steps(run.checkpoint_dir)  # Read only: opens no orbax manager.
  if not saved:
    raise ConfigError(f"{where} holds no checkpoint; train it first.")
  if step is not None and step not in saved:
    raise ConfigError(f"config.init.step={step} is not a checkpoint of {path}; it has steps: "
                      f"{', '.join(map(str, saved))}.")
  return step


@functools.lru_cache(maxsize=4)
def _load_source(path: str, step: int | None) -> tuple[dict, str, int]:
  """({collection: {path: np.ndarray}}, config fingerprint, step) of checkpoint `step` (None: the
  newest) of the source workdir `path`, restored into the model and optimizer its config.json
  builds, without changing the source."""
  config, fingerprint = rundir.RunDir(path).recorded_config(
      f"config.init.source={path!r} must be a cnnlab workdir as its run left it")
  state = restore.load_trained_state(config, path, step)
  variables = {c: {p: np.asarray(v) for p, v in flat(getattr(state, c)).items()}
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
  variables = convert.from_torchvision(arch, convert.read_state_dict(path), aux_classifiers)
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  return {c: {p: np.asarray(v) for p, v in flat(variables.get(c, {})).items()}
          for c in COLLECTIONS}, f"{arch}:{digest}"


def transfer_plan(config, pretrain_run: str | None = None):
  """(record, source variables) for a run of `config` (`pretrain_run`: see `source_path`),
  reading the source but writing nothing; (None, None) without a source."""
  s = settings(config)
  path = source_path(config, pretrain_run)
  if not path:
    return None, None
  info = steps.setup(config).info
  if path.lower().endswith(convert.STATE_DICT_FORMATS):
    step, (source, fingerprint) = None, _load_weight_file(config, path, s.arch)
  else:
    source, fingerprint, step = _load_source(path, _source_step(path, s.step))
  model = models.get_model(config.model, info.num_classes, dtype=jnp.dtype(config.dtype))
  shape = tuple(info.image_shape)
  shapes = lambda tree: {c: {p: tuple(v.shape) for p, v in tree[c].items()} for c in COLLECTIONS}
  record = plan(shapes(variable_shapes(model, shape)), shapes(source), head_paths(model, shape),
                s.reinit)
  labels, frozen_bn = groups(config, model, shape)
  record = {"source": path, "source_step": step, "source_fingerprint": fingerprint, **record,
            "frozen": [f"params/{p}" for p, label in (labels or {}).items() if label == FROZEN],
            "frozen_batch_norm": sorted("/".join(m) for m in frozen_bn),
            "body_lr_scale": float(s.body_lr_scale)}
  return record, source


def check(config: ml_collections.ConfigDict, run_dir: rundir.RunDir,
          pretrain_run: str | None = None) -> None:
  """Checks `config.init` before a run claims its workdir: bad values, patterns that match
  nothing, and (unless the workdir holds progress: a resume reads its own checkpoint) a source
  that is missing, has no checkpoint or does not fit the model. Raises ConfigError."""
  steps.setup(config)  # Builds the optimizer groups: checks the values and the patterns.
  if not run_dir.has_progress():
    transfer_plan(config, pretrain_run)


def start(run, state):
  """The state a fresh run starts from: `state` with the source's arrays where the plan loads
  them (and a fresh optimizer state); prints the plan and records it (transfer.json)."""
  record, source = transfer_plan(run.config, run.pretrain_run)
  if record is None:
    return state
  new = {}
  for c in COLLECTIONS:
    arrays = dict(flat(getattr(state, c)))
    for name in record["loaded"]:
      collection, path = name.split("/", 1)
      if collection == c:
        arrays[path] = jnp.asarray(source[c][path])
    new[c] = traverse_util.unflatten_dict(arrays, sep="/") if arrays else {}
  print(describe(record, run.dir.workdir))
  if run.primary:
    files.write_json_atomic(os.path.join(run.dir.workdir, RECORD_FILE), record)
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
  return {"transfer": files.read_json(path)} if os.path.exists(path) else {}
