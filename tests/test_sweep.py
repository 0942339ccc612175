"""Sweeps: expansion and naming, vmapped seeds, locks, workers, kill-and-resume, the :quick
report."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, finished_runs, load_config, wait_for_finished_runs

from cnnlab.base.errors import ConfigError
from cnnlab.study import grid, sweep, tables
from cnnlab.study import settings as sweep_config
from cnnlab.training import loop, restore
from cnnlab.training import seeds as seeds_lib


@pytest.fixture
def quick(data_dir):
  config = load_config("experiments/ablation.py", "quick")
  config.dataset.data_dir = data_dir
  return config


def test_expansion_names_and_hashes(quick):
  cells = grid.expand(quick)
  assert len(cells) == 9
  names = [c.name for c in cells]
  assert names[0] == "bn=none,dropout=none" and "bn=before_act,dropout=spatial" in names
  assert len({c.digest for c in cells}) == 9 and all(len(c.digest) == 8 for c in cells)
  cell = cells[names.index("bn=after_act,dropout=standard")]
  assert (cell.config.model.bn_placement, cell.config.model.dropout) == ("after_act", "standard")
  assert cell.seed_config(7).seed == 7 and "sweep" not in cell.config
  assert cell.dirname.startswith("bn-after_act_dropout-standard-")
  # The hash covers the whole config: another learning rate is another cell.
  quick.optimizer.learning_rate = 0.2
  assert grid.expand(quick)[0].digest != cells[0].digest


def test_bad_axes_fail_before_training(quick):
  quick.sweep.axes.dropout["values"] = ("none", "gaussian")
  with pytest.raises(ConfigError, match="'gaussian'"):
    grid.expand(quick)
  quick.sweep.axes.dropout["values"] = ("none",)
  quick.sweep.axes.dropout.key = "model.dropuot"
  with pytest.raises(ConfigError, match="model.dropuot"):
    grid.expand(quick)
  with quick.sweep.axes.dropout.ignore_type():  # A config file may set any type.
    quick.sweep.axes.dropout.key = 3
  with pytest.raises(ConfigError, match=r"axes.dropout needs a `key` \(dotted config key\)"):
    grid.expand(quick)  # It was an AttributeError traceback.
  with quick.sweep.axes.dropout.ignore_type():
    quick.sweep.axes.dropout.key = "model.dropout"
  quick.sweep.baseline = "bn=none,dropout=standard"
  with pytest.raises(ConfigError, match="baseline.*bn=none,dropout=none"):
    sweep.run(quick, "/nonexistent/never-written", progress=False)


@pytest.mark.parametrize("key, values, message", [
    ("model.dropout", ("none", "none"),
     r"axes.dropout.values=\('none', 'none'\) repeats 'none'; give each value once"),
    ("optimizer.learning_rate", (0.05, 1, 1.0),
     r"cells bn=none,dropout=1 and bn=none,dropout=1.0 train the same config"),
])
def test_an_axis_value_given_twice_is_refused_before_anything_is_written(quick, tmp_path, key,
                                                                        values, message):
  """A repeated value trained, then the report failed (zip() argument 2 is longer than argument
  1); two spellings of one value trained one config twice."""
  quick.sweep.axes.dropout.key = key
  quick.sweep.axes.dropout["values"] = values
  quick.sweep.axes.bn["values"] = ("none",)
  quick.sweep.baseline = ""
  quick.sweep.seeds = (0,)
  quick.num_epochs = 1
  with pytest.raises(ConfigError, match=message):
    sweep.run(quick, str(tmp_path / "sweep"), progress=False)
  assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("key, values", [
    ("xla_cpu_vector_width", (256, 512)), ("xla_cpu_ynn_convolutions", (True, False)),
    ("deterministic", (True, False)), ("matmul_precision", ("highest", "default"))])
def test_an_axis_over_a_process_wide_setting_is_refused(quick, key, values):
  # Workers start with the sweep's XLA flags and precision: such cells would all have run with
  # one value while their configs named another (a 256 cell's xla_flags said 512, and the two
  # cells' digests were equal).
  quick.sweep.axes.bn.key = key
  quick.sweep.axes.bn["values"] = values
  with pytest.raises(ConfigError, match=f"axes.bn: key='{key}' is set for a whole process"):
    grid.expand(quick)


def test_vmapped_seeds_match_sequential_runs(quick, tmp_path):
  """Tolerance: vmapping turns each conv into a batched conv whose float32 sums run in another
  order, so results differ from the one-by-one runs at the rounding level (measured ~1e-7
  relative after 88 steps) and such differences can grow during training; rtol 1e-4 on the
  metrics and 1e-3 (atol 1e-5) on every parameter is far above that and far below any effect a
  sweep reports. Data order and dropout masks are each seed's own, so anything else would show."""
  cell = [c for c in grid.expand(quick) if c.name == "bn=before_act,dropout=spatial"][0]
  seeds = (0, 1)
  seq = [loop.train_and_evaluate(cell.seed_config(s), str(tmp_path / f"seq{s}"), progress=False)
         for s in seeds]
  vm = seeds_lib.train_seeds([cell.seed_config(s) for s in seeds],
                             [str(tmp_path / f"vm{s}") for s in seeds], progress=False)
  assert seq[0]["test_loss"] != seq[1]["test_loss"]  # The seeds really differ.
  for a, b, s in zip(seq, vm, seeds):
    assert b["vmapped_seeds"] == 2
    for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy"):
      assert b[key] == pytest.approx(a[key], rel=1e-4)
    pa = restore.load_trained_state(cell.seed_config(s), str(tmp_path / f"seq{s}"))
    pb = restore.load_trained_state(cell.seed_config(s), str(tmp_path / f"vm{s}"))
    for x, y in zip(jax.tree_util.tree_leaves(pa.params), jax.tree_util.tree_leaves(pb.params)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)


def test_cell_lock_is_exclusive(tmp_path):
  first, second = sweep.CellLock(str(tmp_path)), sweep.CellLock(str(tmp_path))
  assert first.acquire()
  assert not second.acquire()
  first.release()
  assert second.acquire()
  second.release()


def _small_sweep_args(data_dir, workdir, *extra):
  """A 2-cell x 2-seed slice of ablation.py:quick, via the command line."""
  return [sys.executable, os.path.join(ROOT, "launch.py"),
          "--config=experiments/ablation.py:quick", f"--workdir={workdir}", "--noprogress",
          f"--config.dataset.data_dir={data_dir}",
          "--config.sweep.axes.bn.values=('none', 'before_act')",
          "--config.sweep.axes.dropout.values=('spatial',)", "--config.num_epochs=3",
          "--config.sweep.baseline=bn=none,dropout=spatial", *extra]


def _report_text(workdir):
  with open(os.path.join(workdir, "report.md")) as f:
    return f.read().replace(workdir, "WORKDIR")


def test_kill_mid_sweep_then_rerun_keeps_finished_cells_and_same_report(data_dir, tmp_path):
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  done = subprocess.run(_small_sweep_args(data_dir, reference), cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  # The report's Reproduce line is a command to paste (it lacked `python`), and its config shows
  # what each swept key took, not the base value no cell ran with.
  text = open(os.path.join(reference, "report.md")).read()
  command = text.split("## Reproduce\n\n```\n")[1].splitlines()[0]
  assert shlex.split(command) == ["python", *_small_sweep_args(data_dir, reference)[1:]]
  config = json.loads(text.split("```json\n")[1].split("\n```")[0])
  assert (config["model"]["bn_placement"], config["model"]["dropout"], config["seed"]) == (
      "swept (none, before_act)", "swept (spatial)", "swept (seeds 0, 1)")
  rows = tables.read_results_csv(os.path.join(reference, "results.csv"))
  mean = lambda cell: np.mean([r["test_accuracy"] for r in rows if r["cell"] == cell])
  assert done.stdout.splitlines()[-3:] == [  # It ended with only `wrote W/report.md`.
      f"wrote {reference}/report.md; test accuracy per cell:",
      f"  bn=none,dropout=spatial: {mean('bn=none,dropout=spatial'):.4f} (mean of 2 of 2 seeds)",
      f"  bn=before_act,dropout=spatial: {mean('bn=before_act,dropout=spatial'):.4f} (mean of 2 "
      f"of 2 seeds)"]

  proc = subprocess.Popen(_small_sweep_args(data_dir, killed), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  cells_dir = os.path.join(killed, "cells")
  wait_for_finished_runs(cells_dir, 2, proc)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  kept = {p: os.path.getmtime(p) for p in finished_runs(cells_dir)}
  assert len(kept) >= 2 and not os.path.exists(os.path.join(killed, "report.md"))

  rerun = subprocess.run(_small_sweep_args(data_dir, killed), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert {p: os.path.getmtime(p) for p in kept} == kept  # No finished run was retrained.
  assert _report_text(killed) == _report_text(reference)
  assert rerun.stdout.splitlines()[-3] == f"wrote {killed}/report.md; test accuracy per cell:"
  # Once every run is finished, a rerun says so (it printed what a fresh sweep prints).
  again = subprocess.run(_small_sweep_args(data_dir, reference), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.splitlines()[-3:] == [
      f"{reference} already holds a finished sweep of this config, nothing was retrained; "
      f"wrote its report {reference}/report.md; test accuracy per cell:",
      *done.stdout.splitlines()[-2:]]


def test_two_workers_train_every_run_once(data_dir, tmp_path):
  """Also: with sweep.diagnostics=False no cell draws diagnostics and the report has none."""
  workdir = str(tmp_path / "workers")
  proc = subprocess.run(_small_sweep_args(data_dir, workdir, "--config.sweep.workers=2",
                                          "--config.num_epochs=1",
                                          "--config.sweep.diagnostics=False"),
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = tables.read_results_csv(os.path.join(workdir, "results.csv"))
  assert len(rows) == 4 and {r["threads"] for r in rows} == {1}
  drawn = [f for _, _, fs in os.walk(workdir) for f in fs
           if f in ("diagnostics.json", "filters.png", "variance_shift.png")]
  assert drawn == []
  report = open(os.path.join(workdir, "report.md")).read()
  assert "Variance shift" not in report and "filters" not in report
  for root, _, files in os.walk(os.path.join(workdir, "cells")):
    if "metrics.jsonl" in files:
      lines = [json.loads(l) for l in open(os.path.join(root, "metrics.jsonl"))]
      keys = [(l["step"], l["split"]) for l in lines]
      assert len(keys) == len(set(keys)), f"{root} was trained twice"


def _quick_ablation(data_dir, workdir, *extra):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config=experiments/ablation.py:quick",
       f"--workdir={workdir}", "--noprogress", f"--config.dataset.data_dir={data_dir}", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def quick_ablation(data_dir, tmp_path_factory):
  """The :quick ablation run by `python launch.py`, shared by the tests that read its report."""
  return _quick_ablation(data_dir, str(tmp_path_factory.mktemp("quick") / "quick"))


def _result_tables(workdir):
  """The report's table rows (cells, comparisons, power, diagnostics): its numbers."""
  return [l for l in _report_text(workdir).splitlines() if l.startswith("| `")]


def test_quick_ablation_through_submitit_gives_the_same_report(data_dir, tmp_path,
                                                               quick_ablation):
  """launcher=slurm with submitit's local executor: the same job-array path a SLURM cluster
  runs (2 jobs sharing the cells through their locks), the same numbers in the report."""
  workdir = _quick_ablation(data_dir, str(tmp_path / "submitit"), "--config.sweep.launcher=slurm",
                            "--config.sweep.slurm.cluster=local",
                            "--config.sweep.slurm.array_size=2")
  assert len(os.listdir(os.path.join(workdir, "slurm"))) > 0
  assert _result_tables(workdir) == _result_tables(quick_ablation)


def test_quick_ablation_end_to_end_report_is_recomputable(quick_ablation):
  workdir = quick_ablation
  for name in ("report.md", "results.csv", "accuracy.png", "curves.png", "variance_shift.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  rows = tables.read_results_csv(os.path.join(workdir, "results.csv"))
  assert len(rows) == 18 and len({r["cell"] for r in rows}) == 9
  text = _report_text(workdir)
  # Recompute from results.csv with numpy/scipy directly, and find the numbers in the report.
  from scipy import stats
  for cell in {r["cell"] for r in rows}:
    acc = np.array([r["test_accuracy"] for r in rows if r["cell"] == cell])
    half = stats.t.ppf(0.975, len(acc) - 1) * acc.std(ddof=1) / np.sqrt(len(acc))
    line = next(l for l in text.splitlines() if l.startswith(f"| `{cell}` | 2 |"))
    assert (f"{100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f} "
            f"[{100 * (acc.mean() - half):.2f}, {100 * (acc.mean() + half):.2f}]") in line
  base = {r["seed"]: r["test_accuracy"] for r in rows if r["cell"] == "bn=none,dropout=none"}
  for cell in {r["cell"] for r in rows} - {"bn=none,dropout=none"}:
    acc = {r["seed"]: r["test_accuracy"] for r in rows if r["cell"] == cell}
    diff = np.array([acc[s] - base[s] for s in sorted(base)])
    p = stats.ttest_rel([acc[s] for s in sorted(base)], [base[s] for s in sorted(base)]).pvalue
    if not np.std(diff) > 0:
      p = np.nan  # The report's documented rule: no p-value for identical differences.
    line = [l for l in text.splitlines() if l.startswith(f"| `{cell}` | 2 | ")][-1]
    assert f"{100 * diff.mean():.2f}" in line
    assert (f"{p:.4f}" if np.isfinite(p) else "n/a") in line
  # The variance-shift table lists the BN layers of BN cells, and the reproduction section.
  assert "| `bn=before_act,dropout=spatial` | stage1_conv0/bn |" in text
  assert "experiments/ablation.py:quick" in text and "jax 0.10" in text


@pytest.mark.parametrize("path, cells", [("experiments/ablation.py", 9),
                                         ("experiments/dropout_rates.py", 10),
                                         ("experiments/bn_placement.py", 12)])
@pytest.mark.parametrize("variant", [None, "quick", "cifar10"])
def test_experiment_files_expand_and_name_their_baseline(path, cells, variant):
  config = load_config(path, variant)
  expanded = grid.expand(config)
  assert len(expanded) == cells
  assert config.sweep.baseline in [c.name for c in expanded]
  with pytest.raises(ValueError, match="not a variant"):
    load_config(path, "nope")


def test_a_baseline_names_its_axes_in_any_order():
  """The baseline had to list the axes alphabetically ('bn=none,dropout=none'); written the
  other way round it named no cell."""
  config = load_config("experiments/ablation.py")
  config.sweep.baseline = "dropout=spatial,bn=before_act"
  settings = sweep_config.sweep_settings(config)
  assert settings.baseline == "bn=before_act,dropout=spatial"
  assert settings.baseline in [c.name for c in grid.expand(config)]


def test_worker_count_none_is_one_per_cpu_core_at_most_one_per_cell(monkeypatch):
  settings = sweep_config.sweep_settings(load_config("experiments/ablation.py"))
  assert settings.workers is None  # The main job's sweeps use every core.
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
  assert sweep.worker_count(settings, 9, 45) == 4
  assert sweep.worker_count(settings, 3, 15) == 3
  settings.launcher = "slurm"
  assert sweep.worker_count(settings, 9, 45) == 1  # SLURM jobs set their own parallelism.
  settings.launcher, settings.workers = "local", 2
  assert sweep.worker_count(settings, 9, 45) == 2
  quick = sweep_config.sweep_settings(load_config("experiments/ablation.py", "quick"))
  assert sweep.worker_count(quick, 9, 9) == 1


def test_more_workers_than_can_help_are_not_started(monkeypatch, caplog):
  """`--config.sweep.workers=99` on a 2-core machine started 99 processes of ~400 MB each, about
  50 pinned to each core, for a sweep of 9 runs; it was killed with 9 of 23 GiB left."""
  settings = sweep_config.sweep_settings(load_config("experiments/ablation.py", "quick"))
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  settings.workers = 99
  with caplog.at_level("WARNING"):
    assert sweep.worker_count(settings, 9, 9) == 2
  assert "config.sweep.workers=99 is more than can help (9 runs, 2 CPU cores with one worker " \
         "pinned to each); starting 2." in caplog.text
  assert sweep.worker_count(settings, 1, 1) == 1
  settings.workers = 2
  assert sweep.worker_count(settings, 9, 9) == 2



def test_a_free_process_helps_with_the_seeds_of_a_cell_another_holds(quick, tmp_path):
  """Once no cell is free, a process trains the unstarted seeds of cells others hold (a seed lock
  each), so the last cell is not left to one process; the holder then writes the diagnostics."""
  import threading
  quick.sweep.axes.bn["values"], quick.sweep.axes.dropout["values"] = ("before_act",), ("none",)
  quick.sweep.seeds, quick.num_epochs = (0, 1), 1
  (cell,) = grid.expand(quick)
  workdir = str(tmp_path / "sweep")
  dirs = [grid.seed_workdir(workdir, cell, s, False) for s in (0, 1)]
  holder = sweep.CellLock(os.path.dirname(dirs[0]))  # Another process holds the cell...
  assert holder.acquire()
  helper = threading.Thread(target=sweep.work, args=(quick, workdir),
                            kwargs=dict(progress=False, poll_s=0.05), daemon=True)
  helper.start()
  deadline = time.time() + 300
  while not all(os.path.exists(os.path.join(d, "results.json")) for d in dirs):
    assert time.time() < deadline, "the free process did not train the held cell's seeds"
    time.sleep(0.1)
  diagnostics = os.path.join(os.path.dirname(dirs[0]), "diagnostics.json")
  assert helper.is_alive() and not os.path.exists(diagnostics)  # ...and writes them: not it.
  holder.release()  # (As if the holder died before its diagnostics: the helper takes the cell.)
  helper.join(timeout=300)
  assert not helper.is_alive() and os.path.exists(diagnostics)
  # A single run draws its learning curve; a sweep's seeds leave it to the report's curves.png.
  assert not any(os.path.exists(os.path.join(d, "learning_curve.png")) for d in dirs)
