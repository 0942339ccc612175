"""A killed two-process run resumes as two processes (issue 22): the rerun's ownership check must
not enter a cross-process barrier (an orbax CheckpointManager's constructor) on one process only.

Each process gets one forced CPU device and PJRT_NPROC=8 (see tests/test_mesh.py for the
multi-device cases)."""

import json
import os
import signal
import socket
import subprocess
import sys

from conftest import ROOT, wait_for_checkpoint


def _args(data_dir, workdir):
  return [os.path.join(ROOT, "launch.py"), "--config=experiments/default.py",
          f"--workdir={workdir}", "--noprogress", "--config.dataset.name=digits",
          f"--config.dataset.data_dir={data_dir}", "--config.model.name=vgg_cnn",
          "--config.model.stages=((8,),(16,))", "--config.model.bn_placement=before_act",
          "--config.batch_size=32", "--config.num_epochs=2", "--config.log_every_steps=5",
          "--config.checkpoint_every_steps=10"]


def _start_two(data_dir, workdir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONUNBUFFERED="1", PJRT_NPROC="8",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return [subprocess.Popen(
      [sys.executable, *_args(data_dir, workdir), f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"], env=env, cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish_two(data_dir, workdir) -> dict:
  procs = _start_two(data_dir, workdir)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  return json.load(open(os.path.join(workdir, "results.json")))


def test_killed_two_process_run_resumes_as_two_processes(data_dir, tmp_path):
  """It failed in 6 s with `AssertionError: sync_global_devices name mismatch
  ('CheckpointManager:save_root_metadata')`: only process 0 ran RunDir.claim's check."""
  reference = _finish_two(data_dir, str(tmp_path / "uninterrupted"))
  workdir = str(tmp_path / "killed")
  procs = _start_two(data_dir, workdir)
  wait_for_checkpoint(workdir, 20, procs[0])
  for proc in procs:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = _finish_two(data_dir, workdir)
  # The same topology, data order and settings: the same bits as an uninterrupted run.
  assert resumed["params_sha256"] == reference["params_sha256"]
  assert resumed["test_accuracy"] == reference["test_accuracy"]
  assert _train_steps(workdir) == _train_steps(str(tmp_path / "uninterrupted"))  # Each once.


def _train_steps(workdir):
  return [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
          if '"train"' in l]
