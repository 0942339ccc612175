"""cnnlab from Python (a notebook, a script): the same steps `launch.py` takes, as functions.

    import cnnlab
    config = cnnlab.load_config("experiments/default.py", overrides={"num_epochs": 1})
    results = cnnlab.train(config, "runs/nb")       # results.json's dict
    run = cnnlab.load_run("runs/nb")                # .config .results .metrics .variables .model
    logits = run.model.apply(run.variables, images, train=False)   # images [N, H, W, C] float
    outcome = cnnlab.sweep(cnnlab.load_config("experiments/ablation.py:quick"), "runs/abl")

Training applies the config's numerics (XLA flags, matmul precision) before JAX starts; in a
process where JAX already runs without them it refuses with one ConfigError line, rather than
train under settings its run would not record truthfully.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from cnnlab import cli, configs
from cnnlab import data as data_lib
from cnnlab.base import environment, files
from cnnlab.base.errors import ConfigError
from cnnlab.inspection import visualize
from cnnlab.nets import models
from cnnlab.study import grid
from cnnlab.study import settings as sweep_settings_lib
from cnnlab.study import sweep as sweep_lib
from cnnlab.training import rundir, validation


def load_config(spec: str, overrides: Mapping[str, Any] | Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """The config `launch.py --config=spec --config.<key>=<value> ...` trains.

  `spec`: an experiment file, `path.py` or `path.py:variant`. `overrides`: {"model.dropout":
  "spatial"} (Python values) or ["model.dropout=spatial"] (as on the command line). The modules
  the config imports (`config.imports`) are imported. Raises ConfigError (one line) for a file
  that fails, an unknown key or a value of the wrong type."""
  texts = [] if isinstance(overrides, Mapping) else list(overrides)
  argv = ["cnnlab", f"--config={spec}", *(f"--config.{o}" for o in texts)]
  values = flags.FlagValues()
  try:  # sys_argv: the override flags are defined from the file named in it.
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                             lock_config=True, sys_argv=argv)
    values(argv)
    config = holder.value
    config.keys()  # A file that failed to load (e.g. missing) raises its error here.
  except Exception as e:  # The file's own error, an unknown key or a mistyped value.
    raise ConfigError(cli.flag_error_line(e, argv, values)) from None
  for key, value in (overrides.items() if isinstance(overrides, Mapping) else ()):
    validation.check_key(config, key)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{key}={value!r} does not fit the field ({e}).") from None
  return configs.complete(config)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """What every way of training does before JAX starts: imports `config.imports`, checks the
  workdir, the config and its sweep section, applies the numerics, and turns on XLA's
  compilation cache. Raises ConfigError, before anything is written."""
  configs.complete(config)
  validation.validate_workdir(workdir)
  validation.validate_config(config)
  sweep_settings_lib.sweep_settings(config)
  not_applied = environment.numerics_not_applied(config)
  if not_applied:
    raise ConfigError(f"{not_applied}; train in a fresh Python process (in a notebook, restart "
                      f"its kernel and train before any other JAX call), or start it with those "
                      f"XLA_FLAGS.")
  environment.apply_numerics(config)
  environment.enable_compilation_cache()


def sweep(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = False,
          overrides: Sequence[str] = (), command: str = "") -> sweep_lib.Outcome:
  """Trains every cell and seed of `config` in `workdir` (resuming what is there) and writes the
  report; a config without axes and with one seed is one run. Returns what was written
  (`Outcome`: the path of report.md or results.json, each cell's test accuracy)."""
  prepare(config, workdir)
  return sweep_lib.run(config, workdir, overrides=overrides, command=command,
                       progress=progress)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          progress: bool = False) -> dict[str, Any]:
  """Trains the single run `config` in `workdir` (resuming it, or returning it if finished) and
  returns its results.json. A config with sweep axes or several seeds is refused: run it with
  `sweep`."""
  cells = len(grid.expand(configs.complete(config)))
  seeds = len(sweep_settings_lib.sweep_settings(config).seeds)
  if cells * seeds > 1:
    raise ConfigError(f"config {config.name!r} is a sweep of {cells} cells x {seeds} seeds; run "
                      f"it with cnnlab.sweep(config, workdir).")
  outcome = sweep(config, workdir, progress=progress)
  return files.read_json(outcome.path)


def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> nn.Module:
  """The Linen classifier `config.model` describes, with the dataset's number of classes (or
  `num_classes`); its `init`/`apply` take images [N, H, W, C] and `train=`."""
  configs.complete(config)
  if num_classes is None:
    num_classes = data_lib.dataset_info(config.dataset).num_classes
  return models.get_model(config.model, num_classes, dtype=jnp.dtype(config.dtype))


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained (or checkpointed) run read back: its `config`, `results` (results.json; None
  while unfinished), `metrics` (metrics.jsonl's records), `variables` ({"params",
  "batch_stats"} of its newest checkpoint) and `model` (the Linen module, for
  `model.apply(variables, x, train=False)`)."""
  workdir: str
  config: ml_collections.ConfigDict
  results: dict[str, Any] | None
  metrics: list[dict[str, Any]]
  variables: dict[str, Any]
  model: nn.Module


def load_run(workdir: str) -> Run:
  """The run in `workdir` (one run; a sweep's are <workdir>/cells/<cell>/seed_<s>), read without
  changing it. Raises CheckpointError for a workdir without config.json or checkpoint."""
  config, state = visualize.load_run(workdir)
  run_dir = rundir.RunDir(workdir)
  results = run_dir.read_results() if run_dir.finished() else None
  return Run(os.path.abspath(workdir), config, results, run_dir.read_metrics(),
             {"params": state.params, "batch_stats": state.batch_stats},
             build_model(config))
