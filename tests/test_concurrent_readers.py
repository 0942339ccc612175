"""Readers never modify what they read (issue 22): `--mode=visualize` and a transfer source open
the workdir of a run that is still training. They opened it with a writable orbax manager, whose
construction deleted the writer's in-flight `*.orbax-checkpoint-tmp` save and killed the training
run (`cannot write .../86 (No such file or directory)`)."""

import copy
import os
import subprocess
import sys
import time

from conftest import ROOT

from cnnlab.inspection import visualize
from cnnlab.training import rundir, transfer

IN_FLIGHT = "1000000.orbax-checkpoint-tmp"  # Stands for a save in flight the whole time.


def test_readers_of_a_training_run_leave_it_intact_and_it_finishes(tiny_config, tmp_path):
  source = str(tmp_path / "source")
  writer = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config=experiments/default.py",
       f"--workdir={source}", "--noprogress", "--config.dataset.name=digits",
       f"--config.dataset.data_dir={tiny_config.dataset.data_dir}",
       "--config.model.name=vgg_cnn", "--config.model.stages=((8,),(16,))",
       "--config.batch_size=32", "--config.num_epochs=3", "--config.log_every_steps=2",
       "--config.checkpoint_every_steps=2"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  checkpoints = os.path.join(source, "checkpoints")
  while writer.poll() is None and not any(n.isdigit() for n in _listing(checkpoints)):
    time.sleep(0.05)
  os.makedirs(os.path.join(checkpoints, IN_FLIGHT))
  target = copy.deepcopy(tiny_config)
  target.init.source = source
  reads = []
  while writer.poll() is None or len(reads) < 3:
    _, state = visualize.load_run(source)
    transfer._load_source.cache_clear()  # Read the source again, as a new process would.
    record, _ = transfer.transfer_plan(target, str(tmp_path / "target"))
    reads.append((int(state.step), record["source_step"]))
  out = writer.communicate()[0]
  assert writer.returncode == 0, out[-3000:]
  assert rundir.RunDir(source).read_results()["status"] == "finished"
  assert len({step for pair in reads for step in pair}) > 2, reads  # Read while it trained.
  assert IN_FLIGHT in _listing(checkpoints)                         # Not deleted by a reader,
  assert not [n for n in _listing(checkpoints) if n.endswith(".corrupt")]  # nothing set aside.
  assert not os.path.exists(tmp_path / "target")


def _listing(path):
  return os.listdir(path) if os.path.isdir(path) else []
