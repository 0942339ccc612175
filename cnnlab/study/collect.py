"""A sweep's results, gathered from its runs' workdirs for the report: one row per (cell, seed)
with its metrics and provenance, the learning curves, each cell's variance-shift diagnostics and
first-layer filter picture; `write_sweep_report` hands them to `cnnlab.study.report`.
"""

from __future__ import annotations

import os

from cnnlab.base import environment, files
from cnnlab.study import tables
from cnnlab.study.grid import TRIAL_AXIS, Cell, cell_name, seed_workdir
from cnnlab.study.settings import sweep_settings
from cnnlab.training import restore, rundir


def curve_split(metrics: list[dict]) -> str:
  """The split a run's learning curve was measured on: validation if it had one, else test."""
  return "validation" if any(m["split"] == "validation" for m in metrics) else "test"


def steps_to_target(metrics: list[dict], target: float) -> int | None:
  """The first step whose end-of-epoch accuracy on the curve split (validation, or test for a
  run without one) reached `target` (None if none did)."""
  split = curve_split(metrics)
  for m in metrics:
    if m["split"] == split and m["accuracy"] >= target:
      return m["step"]
  return None


def tuning_trials(trial_cells: list[Cell], seeds: tuple[int, ...], workdir: str, axes,
                  target: float) -> dict[str, list[dict]]:
  """{cell name: its trials} of a tuned sweep's tuning stage in `workdir`: one dict per (trial
  point, seed) with the point ({axis name: value}), seed, status, validation accuracy, steps to
  `target` on the validation curve and wall time (cnnlab.study.tuning.select's input)."""
  out: dict[str, list[dict]] = {}
  for cell in trial_cells:
    values = dict(cell.values)
    point = dict(zip((a.name for a in axes), values.pop(TRIAL_AXIS)))
    for seed in seeds:
      run = rundir.RunDir(seed_workdir(workdir, cell, seed, False))
      res = run.finished_result(cell.seed_config(seed))
      out.setdefault(cell_name(values), []).append({
          "point": point, "seed": seed, "status": res.get("status", "finished"),
          "validation_accuracy": res.get("validation_accuracy"),
          "steps_to_target": steps_to_target(run.read_metrics(), target),
          "wall_time_s": res["wall_time_s"]})
  return out


def write_sweep_report(config, cells: list[Cell], seeds: tuple[int, ...], workdir: str, *,
                       command: str = "", tuned: dict | None = None,
                       fixed_rows: list[dict] | None = None) -> str:
  """Collects every (cell, seed) result into rows, curves and diagnostics; writes the report
  (of a tuned sweep: with its tuning summary `tuned` and the fixed-point runs' `fixed_rows`)."""
  from cnnlab.inspection import summary
  from cnnlab.study import report  # Post-processing only: scipy, statsmodels, matplotlib.
  settings = sweep_settings(config)
  rows, curves, diagnostics = [], {}, {}
  for cell in cells:
    curves[cell.name] = []
    cost = summary.summarize(cell.seed_config(seeds[0]), step_flops=False)
    step_flops = None  # Recorded by training; counted here only for results without it.
    for seed in seeds:
      run = rundir.RunDir(seed_workdir(workdir, cell, seed, False))
      res, metrics = run.finished_result(cell.seed_config(seed)), run.read_metrics()
      env = res["environment"]
      if step_flops is None:
        step_flops = res.get("train_step_flops") or summary.summarize(
            cell.seed_config(seed)).train_step_flops
      rows.append({
          "cell": cell.name, "cell_hash": cell.digest, "seed": seed,
          **{axis: str(value) for axis, value in cell.values.items()},
          **{k: res[k] for k in ("test_accuracy", "test_loss", "train_loss", "train_accuracy")},
          "steps_to_target": steps_to_target(metrics, settings.target_accuracy),
          "curve_split": curve_split(metrics),
          "wall_time_s": res["wall_time_s"], "num_params": res["num_params"],
          "forward_macs": cost.total_macs, "train_step_flops": step_flops,
          **{k: env[k] for k in tables.PROVENANCE}, "vmapped_seeds": res["vmapped_seeds"],
          "params_sha256": res.get("params_sha256"), "status": res.get("status", "finished"),
          "diverged_step": res.get("diverged_step"),
          "diverged_reason": res.get("diverged_reason")})
      curves[cell.name].append(metrics)
    path = os.path.join(workdir, "cells", cell.dirname, "diagnostics.json")
    if settings.diagnostics:
      diagnostics[cell.name] = files.read_json(path) if os.path.exists(path) else []
  if not settings.diagnostics:   # None: the report has no variance-shift section or figure.
    diagnostics = None
  filter_grids = _filter_grids(cells, seeds, workdir) if settings.diagnostics else {}
  baseline = settings.baseline or cells[0].name
  meta = {"command": command, "config": config_for_report(config, settings),
          "packages": environment.package_versions(), "git_commit": environment.git_commit(),
          "environment": {k: rows[0][k] for k in tables.PROVENANCE},
          "filter_grids": filter_grids}
  return report.write_report(workdir, rows, curves, diagnostics, baseline=baseline,
                             target_accuracy=settings.target_accuracy, meta=meta,
                             min_effect=settings.min_effect, plot_axis=settings.plot_axis,
                             tuned=tuned, fixed_rows=fixed_rows)


def config_for_report(config, settings) -> dict:
  """The config as the report shows it: a key that a sweep axis sets reads `swept (its values)`,
  and `seed` (with `settings.seed_keys`) `swept (seeds ...)`, not a base value no run had."""
  shown = rundir.config_to_dict(config)
  seeds = f"swept (seeds {', '.join(map(str, settings.seeds))})"
  swept = {key: f"swept ({', '.join(map(str, axis['values']))})"
           for axis in settings.axes.values() for key in (axis.get("keys") or (axis.key,))
           } | {k: seeds for k in ("seed", *settings.seed_keys)}
  for _, pairs in settings.get("cell_overrides", ()):   # A tuned sweep's chosen points.
    for key, _ in pairs:
      swept[key] = "tuned per cell (report, Tuning)"
  for key, text in swept.items():
    *parents, leaf = key.split(".")
    node = shown
    for part in parents:
      node = node[part]
    node[leaf] = text
  return shown


def _filter_grids(cells: list[Cell], seeds, workdir: str) -> dict[str, tuple[int, str]]:
  """{cell name: (seed, path relative to workdir)} of each cell's filter picture (`filter_grid`;
  cells whose model has no conv layer have none)."""
  grids = {}
  for cell in cells:
    found = filter_grid(cell, seeds, workdir)
    if found:
      grids[cell.name] = found
  return grids


def filter_grid(cell: Cell, seeds, workdir: str) -> tuple[int, str] | None:
  """(seed, path relative to workdir) of a picture of the first conv layer's filters of the
  cell's first finished seed, drawn unless it exists (workers draw it when they finish the cell);
  None when no seed finished or the model has no 2-D conv layer."""
  from cnnlab.inspection import visualize  # Matplotlib: post-processing only.
  for seed in seeds:
    run_dir = seed_workdir(workdir, cell, seed, False)
    if rundir.RunDir(run_dir).read_results().get("status", "finished") != "finished":
      continue
    path = os.path.join("cells", cell.dirname, "filters.png")
    if not os.path.exists(os.path.join(workdir, path)):
      state = restore.load_trained_state(cell.seed_config(seed), run_dir)
      try:
        visualize.write_filter_grid(state, os.path.join(workdir, path),
                                    title=f"{cell.name}, seed {seed}: first conv layer")
      except ValueError:  # No 2-D conv kernel.
        return None
    return seed, path
  return None
