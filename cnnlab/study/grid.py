"""The cells of a sweep's grid: every combination of its axes' values, each a validated config
named `axis=value,...` and identified by a short hash of its config (seed excluded); each
(cell, seed) trains in `<workdir>/cells/<cell dir>/seed_<s>/`."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import re
from typing import Any

import ml_collections

from cnnlab.base import environment
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


def expand(config: ml_collections.ConfigDict) -> list[Cell]:
  """The cells of the grid, in product order of the (alphabetically sorted) axes; each cell's
  config is validated, so a bad value fails before anything trains."""
  settings = sweep_settings(config)
  axes = settings.axes
  seed_keys = tuple(settings.seed_keys)
  for key in seed_keys:
    check_key(config, key)
  names = sorted(axes.keys())
  for name in names:
    if ("key" not in axes[name] or not isinstance(axes[name].key, str)
        or "values" not in axes[name] or not axes[name]["values"]):
      raise ConfigError(f"config.sweep.axes.{name} needs a `key` (dotted config key) and a "
                        f"non-empty tuple of `values`.")
    values = tuple(axes[name]["values"])
    repeated = [v for i, v in enumerate(values) if str(v) in map(str, values[:i])]
    if repeated:  # Its cells would share a name and a directory.
      raise ConfigError(f"config.sweep.axes.{name}.values={values!r} repeats {repeated[0]!r}; "
                        f"give each value once.")
    if axes[name].key in environment.PROCESS_WIDE_FIELDS:
      raise ConfigError(
          f"config.sweep.axes.{name}: key={axes[name].key!r} is set for a whole process (the XLA "
          f"flags and matmul precision every worker starts with), so the cells of one sweep "
          f"cannot differ in it; run one sweep per value, e.g. --config.{axes[name].key}=... "
          f"with its own --workdir.")
  base = copy.deepcopy(config)
  if "sweep" in base:
    with base.unlocked():
      del base["sweep"]
  cells = []
  for combo in itertools.product(*(tuple(axes[n]["values"]) for n in names)):
    cell_config = copy.deepcopy(base)
    for name, value in zip(names, combo):
      _set_dotted(cell_config, axes[name].key, value, name)
    validate_config(cell_config)
    name = ",".join(f"{n}={v}" for n, v in zip(names, combo))
    cells.append(Cell(name, dict(zip(names, combo)), cell_config,
                      rundir.fingerprint(cell_config, exclude=("seed",))[:8], seed_keys))
    same = [c.name for c in cells[:-1] if c.digest == cells[-1].digest]
    if same:  # E.g. 1 and 1.0 for a float field: one config trained twice, reported as two.
      raise ConfigError(f"config.sweep.axes: the cells {same[0]} and {name} train the same config "
                        f"(values that differ only as written, e.g. 1 and 1.0, or in a field the "
                        f"model does not read); give each config once.")
  return cells


def seed_workdir(workdir: str, cell: Cell, seed: int, degenerate: bool) -> str:
  return workdir if degenerate else os.path.join(workdir, "cells", cell.dirname, f"seed_{seed}")


def finished(workdir: str, config: ml_collections.ConfigDict | None = None) -> bool:
  """Whether `workdir` holds results (of `config`, if given: results that do not prove they are
  this config's raise CheckpointError rather than count as finished or not)."""
  run = rundir.RunDir(workdir)
  if config is None:
    return run.finished()
  return run.finished_result(config) is not None
