"""The cells of a sweep's grid: every combination of its axes' values, each a validated config
named `axis=value,...` and identified by a short hash of its config (seed excluded); each
(cell, seed) trains in `<workdir>/cells/<cell dir>/seed_<s>/`."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import re
import shutil
from typing import Any

import ml_collections

from cnnlab.base import environment, files, locks
from cnnlab.base.errors import ConfigError
from cnnlab.study.settings import sweep_settings
from cnnlab.training import rundir
from cnnlab.training.validation import check_key, validate_config


@dataclasses.dataclass
class Cell:
  """One combination of axis values; `config` has the overrides applied (seed unset)."""
  name: str
  values: dict[str, Any]
  config: ml_collections.ConfigDict
  digest: str
  seed_keys: tuple[str, ...] = ()   # Config keys set to the seed too (config.sweep.seed_keys).

  @property
  def dirname(self) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.replace("=", "-")) or "base"
    return f"{readable}-{self.digest}"

  def seed_config(self, seed: int) -> ml_collections.ConfigDict:
    config = copy.deepcopy(self.config)
    config.seed = seed
    for key in self.seed_keys:
      _set_dotted(config, key, seed, "seed_keys")
    return config


def _set_dotted(config: ml_collections.ConfigDict, key: str, value: Any, axis: str) -> None:
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"config.sweep.axes.{axis}.key={key!r} names no config field.")
    node = node[part]
  if leaf not in node:
    raise ConfigError(f"config.sweep.axes.{axis}.key={key!r} names no config field.")
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.sweep.axes.{axis}: {key}={value!r} does not fit the field "
                      f"({e}).") from None


# The axis over a tuned sweep's trial points in its tuning stage (cnnlab.study.sweep).
TRIAL_AXIS = "trial"


def expand(config: ml_collections.ConfigDict) -> list[Cell]:
  """The cells of the grid, in product order of the (alphabetically sorted) axes; each cell's
  config is validated, so a bad value fails before anything trains."""
  settings = sweep_settings(config)
  axes = settings.axes
  seed_keys = tuple(settings.seed_keys)
  for key in seed_keys:
    check_key(config, key)
  names = sorted(axes.keys())
  keys = {name: _axis_keys(name, axes[name]) for name in names}
  for name in names:
    values = tuple(axes[name]["values"])
    repeated = [v for i, v in enumerate(values) if str(v) in map(str, values[:i])]
    if repeated:  # Its cells would share a name and a directory.
      raise ConfigError(f"config.sweep.axes.{name}.values={values!r} repeats {repeated[0]!r}; "
                        f"give each value once.")
    wide = [k for k in keys[name] if k in environment.PROCESS_WIDE_FIELDS]
    if wide:
      raise ConfigError(
          f"config.sweep.axes.{name}: key={wide[0]!r} is set for a whole process (the XLA "
          f"flags and matmul precision every worker starts with), so the cells of one sweep "
          f"cannot differ in it; run one sweep per value, e.g. --config.{wide[0]}=... "
          f"with its own --workdir.")
  # ((cell name, ((dotted key, value), ...)), ...): settings of single cells on top of the axes'
  # (a tuned sweep's chosen points).
  overrides = {cell: tuple(pairs) for cell, pairs in settings.get("cell_overrides", ())}
  base = copy.deepcopy(config)
  if "sweep" in base:
    with base.unlocked():
      del base["sweep"]
  cells = []
  for combo in itertools.product(*(tuple(axes[n]["values"]) for n in names)):
    cell_config = copy.deepcopy(base)
    for name, value in zip(names, combo):
      parts = tuple(value) if "keys" in axes[name] else (value,)
      for key, part in zip(keys[name], parts):
        _set_dotted(cell_config, key, part, name)
    name = cell_name(dict(zip(names, combo)))
    for key, value in overrides.get(name, ()):
      _set_dotted(cell_config, key, value, "cell_overrides")
    validate_config(cell_config)
    cells.append(Cell(name, dict(zip(names, combo)), cell_config,
                      rundir.fingerprint(cell_config, exclude=("seed",))[:8], seed_keys))
    same = [c.name for c in cells[:-1] if c.digest == cells[-1].digest]
    if same:  # E.g. 1 and 1.0 for a float field: one config trained twice, reported as two.
      raise ConfigError(f"config.sweep.axes: the cells {same[0]} and {name} train the same config "
                        f"(values that differ only as written, e.g. 1 and 1.0, or in a field the "
                        f"model does not read); give each config once.")
  return cells


def _axis_keys(name: str, axis) -> tuple[str, ...]:
  """The dotted keys axis `name` sets: `key`, or `keys` (each value then a tuple, one entry per
  key: an axis over points of several keys, such as a tuning stage's trial points)."""
  several = "keys" in axis and isinstance(axis["keys"], (tuple, list)) and axis["keys"] and all(
      isinstance(k, str) for k in axis["keys"])
  one = "key" in axis and isinstance(axis["key"], str)
  if several == one or "values" not in axis or not axis["values"]:
    raise ConfigError(f"config.sweep.axes.{name} needs a `key` (dotted config key) and a "
                      f"non-empty tuple of `values`.")
  if one:
    return (axis["key"],)
  keys = tuple(axis["keys"])
  if not all(isinstance(v, (tuple, list)) and len(v) == len(keys) for v in axis["values"]):
    raise ConfigError(f"config.sweep.axes.{name}: each value must be a tuple of {len(keys)} "
                      f"values, one per key of {keys!r}.")
  return keys


def cell_name(values: dict[str, Any]) -> str:
  """The name of the cell with axis values `values`: `axis=value,...`, axes sorted."""
  return ",".join(f"{n}={_label(values[n])}" for n in sorted(values))


def _label(value) -> str:
  """An axis value as a cell name shows it (a point of several keys: its values joined by /)."""
  if isinstance(value, (tuple, list)):
    return "/".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
  return str(value)


def seed_workdir(workdir: str, cell: Cell, seed: int, degenerate: bool) -> str:
  return workdir if degenerate else os.path.join(workdir, "cells", cell.dirname, f"seed_{seed}")


def finished(workdir: str, config: ml_collections.ConfigDict | None = None) -> bool:
  """Whether `workdir` holds results (of `config`, if given: results that do not prove they are
  this config's raise CheckpointError rather than count as finished or not)."""
  run = rundir.RunDir(workdir)
  if config is None:
    return run.finished()
  return run.finished_result(config) is not None


def copy_finished_runs(source: str, workdir: str, cells: list[Cell], seeds) -> None:
  """Copies each finished run of `source` (another stage's workdir) whose cell dir (its config's
  hash) and seed a run of `cells` in `workdir` has, and which is not there yet: the same config
  and seed train the same bits, so it is not trained twice. Each copy is made beside its place
  and renamed into it (a killed copy is never taken for a run); another process's finished copy
  is kept."""
  for cell in cells:
    for seed in seeds:
      src, dst = seed_workdir(source, cell, seed, False), seed_workdir(workdir, cell, seed, False)
      if os.path.exists(dst) or not finished(src):
        continue
      _remove_dead_copies(dst)
      tmp = f"{dst}.copy{os.getpid()}"
      shutil.rmtree(tmp, ignore_errors=True)
      try:
        shutil.copytree(src, tmp)
      except OSError as e:   # A full disk: one line, and no partial copy left.
        shutil.rmtree(tmp, ignore_errors=True)
        raise files.write_error(tmp, e, None) from e
      try:
        os.rename(tmp, dst)
      except OSError:   # Another process put its copy (or its run) there first.
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_copies(dst: str) -> None:
  """Removes `<dst>.copy<pid>` folders left by copying processes that are gone (killed)."""
  folder, name = os.path.split(dst)
  for entry in os.listdir(folder) if os.path.isdir(folder) else ():
    pid = entry[len(name) + len(".copy"):]
    if entry.startswith(f"{name}.copy") and pid.isdigit() and not locks.process_alive(int(pid), ""):
      shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
