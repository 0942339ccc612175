"""Faults that must end in one clear line with the state intact: signals and divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, wait_for_checkpoint
from test_train import _launch_args, numbers_of

from cnnlab.study import tables
from cnnlab.training.rundir import RunDir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_then_resume_is_bit_identical(tiny_config, tmp_path, signum):
  """SIGTERM (SLURM, cloud preemption) and Ctrl-C: a checkpoint at the next step boundary (with
  the metric sums of the unfinished log interval), one line, a non-zero exit; rerunning the
  command ends exactly as an uninterrupted run."""
  reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
  cmd = [sys.executable, os.path.join(ROOT, "launch.py")]
  done = subprocess.run(cmd + _launch_args(tiny_config, reference), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]

  proc = subprocess.Popen(cmd + _launch_args(tiny_config, stopped), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_checkpoint(stopped, 10, proc)
  time.sleep(0.15)  # Somewhere between log points.
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[-1].startswith(f"error: interrupted by {signal.Signals(signum).name} at step ")
  assert "Traceback" not in err
  assert not os.path.exists(os.path.join(stopped, "results.json"))
  step = int(lines[-1].split("at step ")[1].split(";")[0])
  assert os.path.isdir(os.path.join(stopped, "checkpoints", str(step)))

  resumed = subprocess.run(cmd + _launch_args(tiny_config, stopped), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"from step {step}" in resumed.stdout
  got = json.load(open(os.path.join(stopped, "results.json")))
  expected = json.load(open(os.path.join(reference, "results.json")))
  assert numbers_of(got) == numbers_of(expected)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rs]
  assert strip(RunDir(stopped).read_metrics()) == strip(RunDir(reference).read_metrics())


def test_single_run_divergence_is_one_line_naming_step_and_cause(tiny_config, tmp_path):
  workdir = str(tmp_path / "diverged")
  args = [a for a in _launch_args(tiny_config, workdir) if "bn_placement" not in a]
  args += ["--config.model.bn_placement=none", "--config.optimizer.learning_rate=1e6",
           "--config.optimizer.warmup_epochs=0.0"]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
  assert last.startswith("error: seed 0 diverged: non-finite ") and "at step " in last
  # Once: the loop printed it too.
  assert (proc.stdout + proc.stderr).count("diverged: non-finite") == 1, proc.stdout
  assert "Traceback" not in proc.stderr
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["status"] == "diverged" and results["test_accuracy"] is None
  assert 1 <= results["diverged_step"] <= 5


def test_diverging_cell_is_recorded_and_the_sweep_finishes(data_dir, tmp_path):
  """One cell's seeds diverge (a learning rate of 1e6 without BN); the other cell trains, the
  report shows '2 of 2 diverged' and the sweep exits 0."""
  workdir = str(tmp_path / "sweep")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config=experiments/ablation.py:quick",
       f"--workdir={workdir}", "--noprogress", f"--config.dataset.data_dir={data_dir}",
       "--config.num_epochs=1", "--config.model.bn_placement=none",
       "--config.optimizer.warmup_epochs=0.0",
       "--config.sweep.axes.dropout.values=('none',)",
       "--config.sweep.axes.bn.key=optimizer.learning_rate",
       "--config.sweep.axes.bn.values=(0.05, 1e6)", "--config.sweep.baseline=bn=0.05,dropout=none"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = tables.read_results_csv(os.path.join(workdir, "results.csv"))
  status = {(r["cell"], r["seed"]): r["status"] for r in rows}
  assert status == {("bn=0.05,dropout=none", 0): "finished",
                    ("bn=0.05,dropout=none", 1): "finished",
                    ("bn=1000000.0,dropout=none", 0): "diverged",
                    ("bn=1000000.0,dropout=none", 1): "diverged"}
  text = open(os.path.join(workdir, "report.md")).read()
  assert "2 of 2" in text or "all seeds diverged" in text


def test_two_sweeps_started_together_on_a_fresh_data_dir(tmp_path):
  """Both prepare the dataset at once (one waits on the other's lock), share the cells through
  their locks, and finish with one report; every run trained exactly once."""
  from test_sweep import _small_sweep_args
  data_dir, workdir = str(tmp_path / "fresh_tfds"), str(tmp_path / "sweep")
  args = _small_sweep_args(data_dir, workdir, "--config.num_epochs=1")
  procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for _ in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  rows = tables.read_results_csv(os.path.join(workdir, "results.csv"))
  assert len(rows) == 4
  for root, _, files in os.walk(os.path.join(workdir, "cells")):
    if "metrics.jsonl" in files:
      keys = [(r["step"], r["split"]) for r in RunDir(root).read_metrics()]
      assert len(keys) == len(set(keys)), f"{root} was trained twice"
      # One process trained it: its event files hold one run (no restart marker needed).
      assert len([n for n in files if n.startswith("events.out.tfevents")]) == 1


# launch.py with SIGTERM sent to itself as `module.name` is called (when `when(args)` holds): a
# signal that lands at that point of the command.
SIGNAL_AT = """
import importlib, os, runpy, signal, sys
module, name, when = sys.argv[1], sys.argv[2], eval(sys.argv[3])
target = importlib.import_module(module)
real = getattr(target, name)


def signalled(*args, **kwargs):
  if when(args):
    os.kill(os.getpid(), signal.SIGTERM)
  return real(*args, **kwargs)


setattr(target, name, signalled)
sys.argv = ["launch.py", *sys.argv[4:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def _launch_signalled_at(where: str, when: str, args) -> subprocess.CompletedProcess:
  module, _, name = where.rpartition(".")
  proc = subprocess.run([sys.executable, "-c", SIGNAL_AT, module, name, when, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: interrupted by SIGTERM"), proc.stderr
  return proc


def _one_epoch_args(config, workdir):
  return [a for a in _launch_args(config, workdir) if "num_epochs" not in a] + [
      "--config.num_epochs=1"]


def test_signal_during_start_up_is_one_line(tiny_config, tmp_path):
  """SIGTERM while the run reads its data, before the training loop: the process died by the
  signal (-15) without a word."""
  workdir = str(tmp_path / "run")
  proc = _launch_signalled_at("cnnlab.data.train_iterator", "lambda args: True",
                              _one_epoch_args(tiny_config, workdir))
  assert "before the command finished" in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_signal_during_the_final_evaluation_keeps_the_checkpoint(tiny_config, tmp_path):
  """SIGTERM while the final evaluation reads the train split: one line, exit 130, no
  results.json; the same command then evaluates from the last checkpoint and finishes."""
  workdir = str(tmp_path / "run")
  args = _one_epoch_args(tiny_config, workdir)
  proc = _launch_signalled_at("cnnlab.data.eval_batches", "lambda args: args[1] == 'train'", args)
  assert "during the final evaluation" in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  steps = 1433 // tiny_config.batch_size
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))
  again = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"from step {steps} of {steps}" in again.stdout
  assert json.load(open(os.path.join(workdir, "results.json")))["status"] == "finished"


def test_signal_while_the_sweep_writes_its_report_leaves_no_report(data_dir, tmp_path):
  """SIGTERM while the report's plots are drawn: one line, exit 130, and no report.md (which
  would look finished); the trained run is kept."""
  workdir = tmp_path / "sweep"
  _launch_signalled_at("cnnlab.inspection.plots.curves", "lambda args: True", [
      "--config=experiments/ablation.py:quick", f"--workdir={workdir}", "--noprogress",
      f"--config.dataset.data_dir={data_dir}", "--config.num_epochs=1",
      "--config.sweep.axes.bn.values=('none',)", "--config.sweep.axes.dropout.values=('none',)",
      "--config.sweep.seeds=(0,)"])
  assert not (workdir / "report.md").exists()
  assert len(list(workdir.glob("cells/*/seed_0/results.json"))) == 1


def test_a_second_signal_exits_at_once():
  """The first SIGTERM outside a loop raises; a second one, while that unwinds, ends the process
  by the signal."""
  script = ("import os, signal, time\n"
            "from cnnlab.base import interrupts\n"
            "interrupts.stop_on_signal()\n"
            "try:\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "except interrupts.Signalled:\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(60)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == -signal.SIGTERM, proc.stderr


def test_a_signal_inside_an_import_that_rewraps_it_is_still_one_line(tmp_path):
  """numpy's import turns any exception into an ImportError: a SIGTERM in the first second of
  launch.py came out as that traceback, exit 1. launch.py reports what the handler caught."""
  (tmp_path / "rewraps.py").write_text(
      "import os, signal\n"
      "try:\n"
      "  os.kill(os.getpid(), signal.SIGTERM)\n"
      "except BaseException as e:\n"
      "  raise ImportError('the package failed to import') from e\n")
  # The config file is read while the flags are parsed: the import fails inside it.
  script = ("import sys, runpy\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            f"sys.argv = [{os.path.join(ROOT, 'launch.py')!r}, '--config=experiments/default.py']\n"
            "import cnnlab.configs\n"
            "original = cnnlab.configs.base_config\n"
            "cnnlab.configs.base_config = lambda: (__import__('rewraps'), original())[1]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      "error: interrupted by SIGTERM before the command finished; what the workdir holds "
      "(finished runs, checkpoints) is kept: rerun the same command to go on from there."]
