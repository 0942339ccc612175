"""Ablation sweeps: a grid of config overrides x seeds -> cells -> runs -> report.

A config's `sweep` section declares named axes over dotted config keys and the seeds:

    config.sweep.axes.dropout = ConfigDict(dict(key="model.dropout",
                                                values=("none", "standard", "spatial")))
    config.sweep.seeds = (0, 1, 2, 3, 4)

Every combination of axis values is a cell, named `bn=before_act,dropout=spatial` (axes in
alphabetical order) and identified by a short hash of its full config (seed excluded). Each
(cell, seed) trains in `<workdir>/cells/<cell dir>/seed_<s>/`, a normal training workdir. A config
without axes and with one seed is the degenerate sweep: it trains directly in `<workdir>`.

Cells are claimed with a lock file, so several processes (the `workers` setting, or the user
starting the command again elsewhere) never train one cell twice; a killed process's lock is freed
by the OS, finished seeds are kept and an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from cnnlab import configs
from cnnlab.base import environment, errors
from cnnlab.base.errors import ConfigError, TrainingDivergedError
from cnnlab.base.locks import CellLock
from cnnlab.study import collect, launchers, pretrain
from cnnlab.training import rundir, train, transfer
from cnnlab.training import seeds as seeds_lib
from cnnlab.training.validation import check_key, validate_config, validate_setup, validate_sweep

VMAP_CHOICES = ("auto", "on", "off")
# Measured (see README, "Performance"): on this 2-core CPU vmapped seeds ran slower than one
# after another; on a GPU they share the idle device and win.
VMAP_AUTO = {"cpu": False, "gpu": True, "tpu": True}


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


def sweep_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.sweep` with defaults filled in; a config without one is a single run."""
  s = configs.sweep_defaults(config.seed)
  if "sweep" in config:
    s.update(config.sweep)
  validate_sweep(s)
  return s


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


def use_vmap(setting: str, num_seeds: int) -> bool:
  if num_seeds < 2 or setting == "off":
    return False
  return setting == "on" or VMAP_AUTO.get(jax.default_backend(), False)


def finished(workdir: str, config: ml_collections.ConfigDict | None = None) -> bool:
  """Whether `workdir` holds results (of `config`, if given: results that do not prove they are
  this config's raise CheckpointError rather than count as finished or not)."""
  run = rundir.RunDir(workdir)
  if config is None:
    return run.finished()
  return run.finished_result(config) is not None


def work(config: ml_collections.ConfigDict, workdir: str, *, overrides=(), command: str = "",
         progress: bool = True, on_seed_done=None, poll_s: float = 0.5) -> None:
  """Trains every unfinished (cell, seed) this process can lock; returns when all are finished
  (waiting for cells other processes hold, and taking over any whose holder died).

  A process takes whole cells (a cell lock) while there are free ones; once none is free, it
  helps with the seeds of cells others hold (a seed lock each, unless seeds are vmapped), so the
  last cells are not left to one process while the others' cores idle. The cell's holder writes
  its diagnostics once every seed is finished."""
  settings = sweep_settings(config)
  cells = expand(config)
  seeds = tuple(settings.seeds)
  degenerate = len(cells) == 1 and len(seeds) == 1 and not settings.axes
  vmapped = use_vmap(settings.vmap_seeds, len(seeds))
  pretrain.run_stage(config, workdir, overrides=overrides, command=command, progress=progress)
  train_kwargs = dict(overrides=overrides, command=command, progress=progress)
  while True:
    held = []  # Cells other processes hold.
    for cell in cells:
      dirs = [seed_workdir(workdir, cell, s, degenerate) for s in seeds]
      cell_dir = workdir if degenerate else os.path.dirname(dirs[0])
      diag_path = None if degenerate else os.path.join(cell_dir, "diagnostics.json")
      configs = [cell.seed_config(s) for s in seeds]
      if _cell_done(dirs, configs, diag_path):
        continue
      lock = CellLock(cell_dir)
      if not lock.acquire():
        held.append((configs, dirs))
        lock.close()
        continue
      try:  # Look again under the lock: another process may have just finished the cell.
        todo = [(c, d) for c, d in zip(configs, dirs) if not finished(d, c)]
        if vmapped and len(todo) > 1:
          seeds_lib.train_seeds([c for c, _ in todo], [d for _, d in todo], **train_kwargs)
          if on_seed_done:
            on_seed_done(len(todo))
        else:
          while not all(finished(d, c) for c, d in todo):  # Helpers may hold some seeds.
            if not _train_free_seeds(todo, degenerate, on_seed_done, train_kwargs):
              time.sleep(poll_s)
        if diag_path and not os.path.exists(diag_path):
          from cnnlab.inspection import diagnostics  # Only sweeps need it.
          trained = [(s, d) for s, d in zip(seeds, dirs)  # Diverged runs have no weights.
                     if rundir.RunDir(d).read_results().get("status", "finished") == "finished"]
          diagnostics.write_variance_shift(cell, [s for s, _ in trained], [d for _, d in trained],
                                           diag_path)
        if diag_path:  # Drawn here, in parallel workers, rather than by the report at the end.
          collect.filter_grid(cell, seeds, workdir)
      finally:
        lock.release()
    if not held:
      return
    helped = not vmapped and not degenerate and any(
        _train_free_seeds([(c, d) for c, d in zip(configs, dirs) if not finished(d, c)],
                          degenerate, on_seed_done, train_kwargs) for configs, dirs in held)
    if not helped:
      time.sleep(poll_s)


def _train_free_seeds(todo, degenerate: bool, on_seed_done, train_kwargs) -> bool:
  """Trains the unfinished (config, workdir) runs of `todo` no other process has started, each
  under its own seed lock (none for a degenerate one-run sweep, whose cell lock is the run's);
  returns whether it trained any."""
  trained = False
  for config, run_dir in todo:
    lock = None if degenerate else CellLock(run_dir)
    if lock is not None and not lock.acquire():
      lock.close()
      continue
    try:
      if not finished(run_dir, config):  # Look again under the lock.
        results = train.train_and_evaluate(config, run_dir, **train_kwargs)
        if results.get("status") == "diverged" and not degenerate:  # A single run raises.
          print(f"{results['diverged_reason']}; recorded in {run_dir}; the sweep goes on.")
        trained = True
        if on_seed_done:
          on_seed_done(1)
    finally:
      if lock is not None:
        lock.release()
  return trained


def _cell_done(seed_dirs: list[str], configs, diagnostics_path: str | None) -> bool:
  return all(map(finished, seed_dirs, configs)) and (
      diagnostics_path is None or os.path.exists(diagnostics_path))


def run(config: ml_collections.ConfigDict, workdir: str, *, overrides=(), command: str = "",
        progress: bool = True) -> str:
  """Runs a config: a single training run, or a sweep followed by its report.

  Returns the path of results.json (single run) or of report.md (sweep).
  """
  settings = sweep_settings(config)
  cells = expand(config)
  for cell in cells:  # Prepares every dataset here, before workers could race to generate it.
    validate_setup(cell.config)
  seeds = tuple(settings.seeds)
  single = len(cells) == 1 and len(seeds) == 1 and not settings.axes
  if jax.process_count() > 1:  # A multi-host run: every process takes part in the one run.
    if not single:
      raise ConfigError("a multi-process launch (--num_processes > 1) trains one config; run "
                        "sweeps with config.sweep.workers or on SLURM (config.sweep.launcher).")
    results = train.train_and_evaluate(config, workdir, overrides=overrides, command=command,
                                       progress=progress and jax.process_index() == 0)
  elif single:
    transfer.check(config, rundir.RunDir(workdir))  # A bad source: fail before the lock file.
    work(config, workdir, overrides=overrides, command=command, progress=progress)
    results = rundir.RunDir(workdir).read_results()
  if single:
    if results.get("status") == "diverged":
      raise TrainingDivergedError(f"{results['diverged_reason']}. Its results.json says so; "
                                  f"lower the learning rate or add BatchNorm, and use a fresh "
                                  f"--workdir.")
    return os.path.join(workdir, "results.json")

  names = [c.name for c in cells]
  axis, _, value = settings.baseline.partition("=")
  if settings.baseline and settings.baseline not in names and not any(
      str(c.values.get(axis)) == value for c in cells):
    raise ConfigError(f"config.sweep.baseline={settings.baseline!r} names no cell and no "
                      f"axis=value; the cells are: {'; '.join(names)}.")
  if settings.plot_axis and settings.plot_axis not in settings.axes:
    raise ConfigError(f"config.sweep.plot_axis={settings.plot_axis!r} is not an axis; the axes "
                      f"are: {', '.join(settings.axes)}.")
  if settings.launcher == "slurm":  # Asks the cluster before anything is written.
    launchers.check_slurm_submission(workdir, settings.slurm.to_dict())
  os.makedirs(workdir, exist_ok=True)
  rundir.write_json_atomic(os.path.join(workdir, "sweep.json"), {
      "config": rundir.config_to_dict(config), "overrides": list(overrides),
      "command": command})
  total = len(cells) * len(seeds)
  workers = worker_count(settings, len(cells), total)
  finished_per_cell = lambda: [sum(finished(seed_workdir(workdir, c, s, False)) for s in seeds)
                               for c in cells]
  bar = rundir.progress_bar(total, sum(finished_per_cell()), enabled=progress,
                            desc="sweep runs", unit="run")
  imported = []

  def advance():
    per_cell = finished_per_cell()  # Each results.json is looked at once per poll.
    bar.update(sum(per_cell) - bar.n)
    cells_left = sum(n < len(seeds) for n in per_cell)
    if workers > 1 and cells_left < workers and not imported:
      # A worker with no cell left waits for the others: use its core to import the report's
      # libraries (matplotlib, scipy.stats, statsmodels: ~4 s) before the report is due.
      from cnnlab.inspection import summary, visualize
      from cnnlab.study import report  # noqa: F401
      imported.append(True)
  # On a CPU even one worker is a pinned one-thread process, as a SLURM job's are: the thread
  # count changes the low bits, and a sweep must give the same results wherever it runs.
  if settings.launcher == "local" and workers == 1 and jax.default_backend() != "cpu":
    work(config, workdir, overrides=overrides, command=command, progress=progress,
         on_seed_done=bar.update)
  elif settings.launcher == "slurm":
    launchers.run_slurm_workers(workdir, settings.slurm.to_dict(), advance)
  else:
    launchers.run_local_workers(workdir, workers, advance)
  bar.close()
  return collect.write_sweep_report(config, cells, seeds, workdir, command=command)


def worker_count(settings: ml_collections.ConfigDict, num_cells: int, num_runs: int) -> int:
  """`settings.workers`, or for None one per CPU core this process may use (at most one per
  cell) when JAX runs on CPU with the local launcher, else 1. A number beyond what can help is
  lowered, with a warning: more workers than runs, or on CPU with the local launcher (each
  worker pinned to one core) more than the cores."""
  local_cpu = settings.get("launcher", "local") == "local" and jax.default_backend() == "cpu"
  cores = len(os.sched_getaffinity(0))
  if settings.workers is None:
    return max(1, min(cores, num_cells)) if local_cpu else 1
  useful = min(num_runs, cores) if local_cpu else num_runs
  if settings.workers <= useful:
    return settings.workers
  pinned = f", {cores} CPU cores with one worker pinned to each" if local_cpu else ""
  logging.warning("config.sweep.workers=%d is more than can help (%d runs%s); starting %d.",
                  settings.workers, num_runs, pinned, useful)
  return useful


def worker_main(workdir: str) -> None:
  """Entry point of a worker process: trains cells of the sweep recorded in `workdir` until every
  cell is finished (cells other workers hold are waited for)."""
  saved = rundir.read_json(os.path.join(workdir, "sweep.json"))
  config = ml_collections.ConfigDict(saved["config"])
  environment.apply_numerics(config)
  environment.enable_compilation_cache()
  try:
    work(config, workdir, overrides=saved["overrides"], command=saved["command"],
         progress=False)
  except Exception as e:  # The one line the launcher quotes from this worker's log.
    known = errors.user_error(e)
    if known is None:
      raise
    print(f"error: {known}", file=sys.stderr, flush=True)
    sys.exit(getattr(known, "exit_code", 2))


if __name__ == "__main__":
  worker_main(sys.argv[1])
