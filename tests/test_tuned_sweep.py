"""A sweep with nuisance axes, end to end through launch.py: every cell tuned on the validation
split (the test split is never read while tuning: the dataset records its reads), final runs with
fresh seeds, the fixed-point comparison beside it, the tuning figure; killed mid-tuning, a rerun
ends with the same report; bad tuning settings are one line and write nothing."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import types

import pytest
from conftest import ROOT, finished_runs, load_config, wait_for_finished_runs

from cnnlab.base.errors import ConfigError, WorkdirError
from cnnlab.study import grid, tables
from cnnlab.study import settings as sweep_settings
from cnnlab.training import validation

# Reads of a split recorded with the time they happened, from every process that reads them.
RECORDED_DIGITS = '''
import os
import time

import numpy as np
from sklearn.datasets import load_digits

from cnnlab.data import register_dataset
from cnnlab.data.stream import ArraySource


class Recorded(ArraySource):
  def __init__(self, images, labels, split):
    super().__init__(images, labels)
    self.split = split

  def __getitem__(self, i):
    with open(os.environ["CNNLAB_TEST_READS"], "a") as f:
      f.write(f"{self.split} {time.time()!r}\\n")
    return super().__getitem__(i)


def load(data_dir):
  digits = load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  return {"train": Recorded(images[:1400], labels[:1400], "train"),
          "test": Recorded(images[1400:], labels[1400:], "test")}


register_dataset("recorded_digits", load)
'''


STUDY = '''
from ml_collections import config_dict

from cnnlab.configs import sweep_base


def get_config(arg=None):
  """ablation.py:quick cut to 2 cells x 2 final seeds, the learning rate tuned over 2 points
  with 2 tuning seeds, on digits read through a recording source; the larger point is the
  config's own rate, 0.05, which every cell chooses (the other, 0.0005, barely trains)."""
  config = sweep_base("tuned_test", "quick", imports=(RECORDED,))
  config.dataset.name = "recorded_digits"
  config.dataset.workers = 0
  config.sweep.axes.bn = config_dict.ConfigDict(
      {"key": "model.bn_placement", "values": ("none", "before_act")})
  config.sweep.seeds = (0, 1)
  config.sweep.baseline = "bn=none"
  config.sweep.nuisance.lr = config_dict.ConfigDict(   # Its fixed rate, 0.05, wins.
      {"key": "optimizer.learning_rate", "log": (0.0005, 0.05)})
  config.sweep.tuning_method = "grid"
  config.sweep.tuning_budget = 2
  config.sweep.tuning_seeds = (10, 11)
  return config
'''


def _args(study, workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={study}",
          f"--workdir={workdir}", "--noprogress", *extra]


def _env(reads):
  return dict(os.environ, PYTHONUNBUFFERED="1", CNNLAB_TEST_READS=str(reads))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
  """One finished tuned sweep: (workdir, the reads file, the study file)."""
  root = tmp_path_factory.mktemp("tuned")
  (root / "recorded.py").write_text(RECORDED_DIGITS)
  study = root / "tuned_study.py"
  study.write_text(STUDY.replace("(RECORDED,)", f"({str(root / 'recorded.py')!r},)"))
  workdir, reads = root / "run", root / "reads.txt"
  done = subprocess.run(_args(study, workdir), cwd=ROOT, env=_env(reads), capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, reads, study


def test_tuning_never_reads_the_test_split(tuned):
  workdir, reads, _ = tuned
  trials = [os.path.join(r, "results.json") for r, _, f in os.walk(workdir / "tuning" / "cells")
            if "results.json" in f]
  assert len(trials) == 2 * 2 * 2   # cells x points x tuning seeds
  tuning_done = max(os.path.getmtime(p) for p in trials)
  test_reads = [float(t) for split, t in (line.split() for line in open(reads)) if split == "test"]
  assert test_reads and min(test_reads) > tuning_done   # Only the later stages read test.
  for path in trials:
    results = json.load(open(path))
    assert "test_accuracy" not in results and 0 <= results["validation_accuracy"] <= 1


def test_the_report_shows_the_choice_the_figure_and_both_comparisons(tuned):
  workdir, _, _ = tuned
  record = json.load(open(workdir / "tuning.json"))
  assert [p["lr"] for p in record["points"]] == [0.0005, 0.05]
  assert record["tuning_seeds"] == [10, 11] and record["cost"]["runs"] == 8
  rows = tables.read_results_csv(str(workdir / "results.csv"))
  assert {r["seed"] for r in rows} == {0, 1}   # Disjoint from the tuning seeds.
  fixed = tables.read_results_csv(str(workdir / "fixed" / "results.csv"))
  assert {r["cell"] for r in fixed} == {r["cell"] for r in rows}
  text = open(workdir / "report.md").read()
  assert "## Tuning" in text and "## Tuned against fixed" in text and "tuning.png" in text
  for cell, chosen in record["cells"].items():
    # Each cell's final runs trained at its chosen rate, written in its config.json.
    run = next(os.path.join(r, "config.json") for r, _, f in os.walk(workdir / "cells")
               if "config.json" in f and f"{cell.replace('=', '-').replace(',', '_')}-" in r)
    assert json.load(open(run))["config"]["optimizer"]["learning_rate"] == chosen["chosen"]["lr"]
    assert f"| `{cell}` | {chosen['chosen']['lr']:.4g} |" in text
  assert os.path.getsize(workdir / "tuning.png") > 10_000


def test_only_compared_cells_draw_diagnostics(tuned):
  """The final (and fixed-point) cells draw the variance shift and filters the report shows; the
  tuning trials, which no report compares, draw none (about 1-1.5 s a cell)."""
  workdir, _, _ = tuned
  def drawn(stage):
    cells = [d for d in (stage / "cells").iterdir() if d.is_dir()]
    assert cells
    return {(c / "diagnostics.json").exists() and (c / "filters.png").exists() for c in cells}
  assert drawn(workdir / "tuning") == {False}
  assert drawn(workdir) == {True} and drawn(workdir / "fixed") == {True}
  assert "## Variance shift" in open(workdir / "report.md").read()


def test_a_tuned_sweep_stopped_by_sigterm_then_killed_reruns_to_the_same_report(tuned, tmp_path):
  """SIGTERM mid-tuning ends the sweep in one line (exit 130); the rerun, killed with -9 once
  the fixed-point stage has begun, and a second rerun end with the uninterrupted report."""
  reference, _, study = tuned
  killed, reads = tmp_path / "killed", tmp_path / "reads.txt"
  start = lambda: subprocess.Popen(_args(study, killed), cwd=ROOT, env=_env(reads),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
  proc = start()
  wait_for_finished_runs(killed / "tuning", 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and err.strip().startswith("error: interrupted by SIGTERM"), err
  assert len(err.strip().splitlines()) == 1, err
  tuned_before = finished_runs(killed / "tuning")
  assert 3 <= len(tuned_before) < 8 and not os.path.exists(killed / "report.md")

  proc = start()
  wait_for_finished_runs(killed / "fixed", 1, proc)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert len(finished_runs(killed / "tuning")) == 8 and not os.path.exists(killed / "report.md")
  rerun = subprocess.run(_args(study, killed), cwd=ROOT, env=_env(reads), capture_output=True,
                         text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  text = lambda w: re.sub(r"\d+ s of training", "T s of training",
                          open(w / "report.md").read().replace(str(w), "WORKDIR"))
  assert text(killed) == text(reference)


def test_final_runs_at_the_fixed_point_are_the_fixed_point_runs_copied(tuned):
  workdir, _, _ = tuned
  record = json.load(open(workdir / "tuning.json"))
  assert {c["chosen"]["lr"] for c in record["cells"].values()} == {0.05}
  finals = finished_runs(workdir / "cells")
  assert len(finals) == 4
  for final in finals:   # Byte for byte, wall time included: copied, not trained again.
    fixed = final.replace(str(workdir / "cells"), str(workdir / "fixed" / "cells"))
    assert open(final, "rb").read() == open(fixed, "rb").read()
  assert ("`bn=none`, `bn=before_act` chose the fixed point: their final runs are the "
          "fixed-point runs (the same config and seeds), copied rather than trained again."
          ) in open(workdir / "report.md").read()


def test_copying_finished_runs_keeps_what_is_there_and_removes_dead_copies(tuned, tmp_path):
  workdir, _, _ = tuned
  fixed = workdir / "fixed" / "cells"
  cells = [types.SimpleNamespace(dirname=d) for d in sorted(os.listdir(fixed))]
  target = tmp_path / "final"
  started = target / "cells" / cells[0].dirname / "seed_1"   # A run that began here.
  started.mkdir(parents=True)
  (started / "mine").write_text("kept")
  gone = subprocess.Popen(["true"])
  gone.wait()
  dead = target / "cells" / cells[0].dirname / f"seed_0.copy{gone.pid}"
  dead.mkdir()
  (dead / "results.json").write_text("{}")   # What a killed copy left.
  grid.copy_finished_runs(str(workdir / "fixed"), str(target), cells, (0, 1, 7))
  copied = finished_runs(target / "cells")
  assert len(copied) == 3 and not dead.exists()   # seed 1 of cell 0 is the one that began.
  assert os.listdir(started) == ["mine"]
  assert all(open(p, "rb").read() == open(p.replace(str(target), str(workdir / "fixed")),
                                          "rb").read() for p in copied)


@pytest.mark.parametrize("change, says", [
    ({"lr": {"key": "optimizer.learning_rate", "log": (0.0, 0.1)}}, "log"),
    ({"lr": {"key": "optimizer.learning_rate", "values": ()}}, "values"),
    ({"lr": {"key": "model.dropout", "values": ("none",)}}, "scientific axis"),
    ({"lr": {"key": "optimizer.learning_rate", "linear": (0.2, 0.1)}}, "linear"),
])
def test_bad_search_spaces_are_one_line(change, says):
  config = load_config("experiments/ablation.py", "tuned")
  config.sweep.nuisance = change
  with pytest.raises(ConfigError, match=says) as error:
    sweep_settings.sweep_settings(config)
  assert "\n" not in str(error.value) and str(error.value).startswith("config.sweep.")


def test_final_seeds_must_be_fresh():
  config = load_config("experiments/ablation.py", "tuned")
  config.sweep.tuning_seeds = (4, 5, 6)   # Seed 4 is a final seed too.
  with pytest.raises(ConfigError, match=r"share \[4\]"):
    sweep_settings.sweep_settings(config)


def test_evaluate_test_false_needs_a_validation_split(tiny_config):
  tiny_config.evaluate_test = False   # tiny_config has no validation split.
  with pytest.raises(ConfigError, match=r"config.evaluate_test=False .*validation_fraction=0 "):
    validation.validate_config(tiny_config)
  tiny_config.dataset.validation_fraction = 0.1
  validation.validate_config(tiny_config)


def test_copying_onto_a_full_disk_is_one_line_and_leaves_no_partial_copy(tuned, tmp_path,
                                                                         monkeypatch):
  workdir, _, _ = tuned
  fixed = workdir / "fixed" / "cells"
  cells = [types.SimpleNamespace(dirname=d) for d in sorted(os.listdir(fixed))]

  def full(src, dst, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(grid.shutil, "copyfile", full)   # What each file copy calls.
  with pytest.raises(WorkdirError) as error:
    grid.copy_finished_runs(str(workdir / "fixed"), str(tmp_path / "final"), cells, (0,))
  assert "\n" not in str(error.value) and "No space left on device" in str(error.value)
  assert finished_runs(tmp_path / "final") == [] and not any(
      ".copy" in name for _, dirs, _ in os.walk(tmp_path) for name in dirs)
