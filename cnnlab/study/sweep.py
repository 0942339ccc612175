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
import logging
import os
import sys
import time

import jax
import ml_collections

from cnnlab.base import environment, errors, files, plugins
from cnnlab.base.errors import ConfigError, TrainingDivergedError
from cnnlab.base.locks import CellLock
from cnnlab.inspection import diagnostics, plots
from cnnlab.study import collect, launchers, pretrain, tables, tuning
from cnnlab.study import workers as workers_lib
from cnnlab.study.grid import TRIAL_AXIS, copy_finished_runs, expand, finished, seed_workdir
from cnnlab.study.settings import VMAP_AUTO, sweep_settings
from cnnlab.training import loop, rundir, transfer
from cnnlab.training import seeds as seeds_lib
from cnnlab.training.init_settings import SWEEP_PRETRAIN
from cnnlab.training.init_settings import settings as init_settings
from cnnlab.training.validation import validate_setup


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What `run` wrote: `path` is results.json (a single run) or report.md (a sweep);
  `test_accuracy` maps each cell's name to (its test accuracy, the mean over its finished seeds,
  or None if every seed diverged; finished seeds; seeds); `already_finished`: every run had
  finished before, so nothing was trained."""
  path: str
  single: bool
  test_accuracy: dict[str, tuple[float | None, int, int]]
  already_finished: bool = False


def cell_accuracy(run_dirs: list[str]) -> tuple[float | None, int, int]:
  """(mean test accuracy of the finished runs in `run_dirs` or None, finished runs, runs)."""
  values = [rundir.RunDir(d).read_results().get("test_accuracy") for d in run_dirs]
  done = [v for v in values if v is not None]  # A diverged run has none.
  return (sum(done) / len(done) if done else None), len(done), len(values)




def use_vmap(setting: str, num_seeds: int) -> bool:
  if num_seeds < 2 or setting == "off":
    return False
  return setting == "on" or VMAP_AUTO.get(jax.default_backend(), False)


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
      diag_path = None if degenerate or not settings.diagnostics else os.path.join(
          cell_dir, "diagnostics.json")
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
          seeds_lib.train_seeds([c for c, _ in todo], [d for _, d in todo], **train_kwargs,
                                pretrain_runs=[pretrain_run(c, workdir) for c, _ in todo])
          if on_seed_done:
            on_seed_done(len(todo))
        else:
          while not all(finished(d, c) for c, d in todo):  # Helpers may hold some seeds.
            if not _train_free_seeds(todo, degenerate, on_seed_done, train_kwargs, workdir):
              time.sleep(poll_s)
        if diag_path and not os.path.exists(diag_path):
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
                          degenerate, on_seed_done, train_kwargs, workdir)
        for configs, dirs in held)
    if not helped:
      time.sleep(poll_s)


def pretrain_run(config: ml_collections.ConfigDict, sweep_workdir: str) -> str | None:
  """The workdir `init.source="sweep:pretrain"` names for a cell's run of `config` (None for
  another source): the sweep resolves it, so that a run needs to know nothing of sweeps."""
  if init_settings(config).source != SWEEP_PRETRAIN:
    return None
  return pretrain.run_dir(sweep_workdir, config.seed)


def _train_free_seeds(todo, degenerate: bool, on_seed_done, train_kwargs,
                      sweep_workdir: str) -> bool:
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
        results = loop.train_and_evaluate(  # A sweep's report draws the curves (curves.png).
            config, run_dir, **train_kwargs,
            learning_curve=plots.learning_curve if degenerate else None,
            pretrain_run=None if degenerate else pretrain_run(config, sweep_workdir))
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
        progress: bool = True) -> Outcome:
  """Runs a config: a single training run, or a sweep followed by its report.

  Returns the path of results.json (single run) or of report.md (sweep), with test accuracies.
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
    results = rundir.RunDir(workdir).finished_result(config)
    already = results is not None
    if not already:
      results = loop.train_and_evaluate(config, workdir, overrides=overrides, command=command,
                                        progress=progress and jax.process_index() == 0,
                                        learning_curve=plots.learning_curve)
  elif single:
    transfer.check(config, rundir.RunDir(workdir))  # A bad source: fail before the lock file.
    already = finished(workdir, config)
    work(config, workdir, overrides=overrides, command=command, progress=progress)
    results = rundir.RunDir(workdir).read_results()
  if single:
    if results.get("status") == "diverged":
      raise TrainingDivergedError(f"{results['diverged_reason']}. Its results.json says so; "
                                  f"lower the learning rate or add BatchNorm, and use a fresh "
                                  f"--workdir.")
    return Outcome(os.path.join(workdir, "results.json"), True,
                   {cells[0].name: (results["test_accuracy"], 1, 1)}, already)

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
  if settings.nuisance:
    return _run_tuned(config, workdir, cells, overrides=overrides, command=command,
                      progress=progress)
  already = train_all(config, workdir, cells, overrides=overrides, command=command,
                      progress=progress)
  path = collect.write_sweep_report(config, cells, seeds, workdir, command=command)
  return Outcome(path, False, {c.name: cell_accuracy([seed_workdir(workdir, c, s, False)
                                                      for s in seeds]) for c in cells}, already)


def _run_tuned(config: ml_collections.ConfigDict, workdir: str, cells, *, overrides=(),
               command: str = "", progress: bool = True) -> Outcome:
  """A sweep with nuisance axes, in three stages, each an ordinary sweep (workers, SLURM, locks
  and resumption as for any): the tuning trials of every cell on the validation split
  (<workdir>/tuning, `tuning_seeds`, never reading test); every cell at the config's own values
  with the final seeds (<workdir>/fixed, with `compare_fixed`); every cell at its chosen point
  with the final seeds (<workdir>), whose report compares the cells and sets the fixed
  comparison beside it."""
  settings = sweep_settings(config)
  axes = tuning.parse_space(settings.nuisance, tuple(
      k for a in settings.axes.values() for k in (a.get("keys") or (a.get("key"),))))
  tuning.check_keys(axes, config)
  trial_points = tuning.points(axes, settings.tuning_method, settings.tuning_budget)
  keys = tuple(a.key for a in axes)
  tune_dir = os.path.join(workdir, "tuning")
  trials_config = _stage_config(config, seeds=settings.tuning_seeds, evaluate_test=False,
                                diagnostics=False,
                                trial_axis=(keys, tuple(tuple(p[a.name] for a in axes)
                                                        for p in trial_points)))
  trial_cells = expand(trials_config)
  before = train_all(trials_config, tune_dir, trial_cells, overrides=overrides, command=command,
                     progress=progress, desc="tuning runs")
  trials = collect.tuning_trials(trial_cells, tuple(settings.tuning_seeds), tune_dir, axes,
                                 settings.target_accuracy)
  tuned = tuning.summarize(axes, trial_points, trials, settings)
  plots.tuning(os.path.join(workdir, "tuning.png"), {
      cell: {"axes": axes, "trials": trials[cell], "per_point": t["per_point"],
             "chosen": t["chosen"]} for cell, t in tuned["cells"].items()})
  files.write_json_atomic(os.path.join(workdir, "tuning.json"), tuned)
  fixed_rows = None
  if settings.compare_fixed:
    fixed_dir = os.path.join(workdir, "fixed")
    fixed_config = _stage_config(config)
    before &= train_all(fixed_config, fixed_dir, cells, overrides=overrides, command=command,
                        progress=progress, desc="fixed-point runs")
    collect.write_sweep_report(fixed_config, cells, tuple(settings.seeds), fixed_dir,
                               command=command)
    fixed_rows = tables.read_results_csv(os.path.join(fixed_dir, "results.csv"))
  chosen = tuple((cell, tuple(zip(keys, (t["chosen"][a.name] for a in axes))))
                 for cell, t in tuned["cells"].items() if t["chosen"] is not None)
  final_config = _stage_config(config, cell_overrides=chosen)
  final_cells = expand(final_config)
  if settings.compare_fixed:   # A cell that chose the fixed point has trained its final runs.
    copy_finished_runs(fixed_dir, workdir, final_cells, settings.seeds)
    fixed_dirs = {c.dirname for c in cells}
    tuned["same_as_fixed"] = [c.name for c in final_cells if c.dirname in fixed_dirs]
  before &= train_all(final_config, workdir, final_cells, overrides=overrides, command=command,
                      progress=progress, desc="final runs")
  path = collect.write_sweep_report(final_config, final_cells, tuple(settings.seeds), workdir,
                                    command=command, tuned=tuned, fixed_rows=fixed_rows)
  return Outcome(path, False, {c.name: cell_accuracy([seed_workdir(workdir, c, s, False)
                                                      for s in settings.seeds])
                               for c in final_cells}, before)


def _stage_config(config: ml_collections.ConfigDict, *, seeds=None, evaluate_test=None,
                  diagnostics=None, trial_axis=None, cell_overrides=()
                  ) -> ml_collections.ConfigDict:
  """One stage of a tuned sweep: `config` without nuisance axes, with other seeds, the test
  split left unread, without diagnostics, an axis `trial` over the points (keys, values) or
  per-cell settings."""
  stage = copy.deepcopy(config)
  with stage.unlocked():
    stage.sweep.nuisance = ml_collections.ConfigDict()
    stage.sweep.cell_overrides = tuple(cell_overrides)
    if seeds is not None:
      stage.sweep.seeds = tuple(seeds)
    if evaluate_test is not None:
      stage.evaluate_test = evaluate_test
    if diagnostics is not None:
      stage.sweep.diagnostics = diagnostics
    if trial_axis is not None:
      stage.sweep.axes[TRIAL_AXIS] = ml_collections.ConfigDict(
          {"keys": trial_axis[0], "values": trial_axis[1]})
  return stage


def train_all(config: ml_collections.ConfigDict, workdir: str, cells, *, overrides=(),
              command: str = "", progress: bool = True, desc: str = "sweep runs") -> bool:
  """Trains every (cell, seed) of the sweep `config` into `workdir` with its workers and
  launcher (recording the config in workdir/sweep.json for them); returns whether every run had
  finished before."""
  settings = sweep_settings(config)
  seeds = tuple(settings.seeds)
  os.makedirs(workdir, exist_ok=True)
  files.write_json_atomic(os.path.join(workdir, "sweep.json"), {
      "config": rundir.config_to_dict(config), "overrides": list(overrides),
      "command": command})
  total = len(cells) * len(seeds)
  workers = worker_count(settings, len(cells), total)
  finished_per_cell = lambda: [sum(finished(seed_workdir(workdir, c, s, False)) for s in seeds)
                               for c in cells]
  done_before = sum(finished_per_cell())  # All of them: nothing is trained, the report redone.
  bar = rundir.progress_bar(total, done_before, enabled=progress, desc=desc, unit="run")
  imported = []

  def advance():
    per_cell = finished_per_cell()  # Each results.json is looked at once per poll.
    bar.update(sum(per_cell) - bar.n)
    cells_left = sum(n < len(seeds) for n in per_cell)
    if workers > 1 and cells_left < workers and not imported:
      # A worker with no cell left waits for the others: use its core to import the report's
      # libraries (matplotlib, scipy.stats, statsmodels: ~4 s) before the report is due.
      from cnnlab.study import report  # noqa: F401
      imported.append(True)
  # On a CPU even one worker is a pinned one-thread process, as a SLURM job's are: the thread
  # count changes the low bits, and a sweep must give the same results wherever it runs.
  if settings.launcher == "local" and workers == 1 and jax.default_backend() != "cpu":
    work(config, workdir, overrides=overrides, command=command, progress=progress,
         on_seed_done=bar.update)
  elif settings.launcher == "slurm":
    launchers.run_slurm_workers(workdir, settings.slurm.to_dict(), advance,
                                worker_fn=worker_main)
  else:
    workers_lib.run_local_workers(workdir, workers, advance,
                                  command=workers_lib.function_command(worker_main, workdir))
  bar.close()
  return done_before == total


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
  saved = files.read_json(os.path.join(workdir, "sweep.json"))
  config = ml_collections.ConfigDict(saved["config"])
  plugins.import_modules(tuple(config.get("imports", ())))  # Before anything reads the config.
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
