"""Data parallelism over a device mesh, multi-process runs and topology-free resume.

JAX fixes its device count when its backend starts, so every check on 4 CPU devices runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N.

Tolerance: on several devices XLA sums each device's partial sums (of the loss, of BatchNorm's
per-channel moments, of gradients) and then adds the partials; on one device it sums in another
order. float32 rounding of ~1e-7 relative per sum is all that may differ: one step agrees to
<1e-6 (parameters of magnitude ~1 to 1e-6 absolute, BN statistics to 1e-5 of their largest
magnitude, measured 2e-7: an element-wise relative test failed on a running mean of 1.2e-4 off by
4e-9), and a whole run's metrics to 1e-4 relative (measured 1e-7 after 88 steps). Per-device BN
(pmap without axis_name) differs by 1.5e-2 on the skewed batch used here: the checks see it.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, wait_for_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("test_accuracy", "test_loss", "train_loss", "train_accuracy")


def _env(devices: int) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def test_one_step_on_four_devices_equals_one_device_with_global_batchnorm(data_dir):
  done = subprocess.run([sys.executable, os.path.join(HERE, "mesh_probe.py"), "step", data_dir],
                        capture_output=True, text=True, timeout=600, env=_env(4), cwd=HERE)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  one, four = out["loss"]
  assert four == pytest.approx(one, rel=1e-6)
  assert out["params_max_abs_diff"] < 1e-6 * max(1.0, out["params_max_abs"])
  assert out["bn_max_rel_diff"] < 1e-5          # Global statistics: as on one device.
  assert out["per_device_bn_max_rel_diff"] > 1e-3  # Per-device BN would give (1.5e-2).
  # Eval over 4 devices pads each 250-example batch to 252 and masks the padding: every test
  # example is counted exactly once.
  e1, e4 = out["eval"]
  assert e1["count"] == e4["count"] == 364 and e1["correct"] == e4["correct"]
  assert e4["loss_sum"] == pytest.approx(e1["loss_sum"], rel=1e-6)
  assert "does not divide over the 4 data-parallel devices" in out["bad_batch_error"]


def _args(data_dir, workdir):
  return [os.path.join(ROOT, "launch.py"), "--config=experiments/default.py",
          f"--workdir={workdir}", "--noprogress", "--config.dataset.name=digits",
          f"--config.dataset.data_dir={data_dir}", "--config.model.name=vgg_cnn",
          "--config.model.stages=((8,),(16,))", "--config.model.bn_placement=before_act",
          "--config.model.dropout=spatial", "--config.model.dropout_rate=0.2",
          "--config.batch_size=32", "--config.num_epochs=2", "--config.log_every_steps=5",
          "--config.checkpoint_every_steps=10"]


def _launch(args, devices, **kw):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                        env=_env(devices), cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def four_device_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("four") / "run")
  done = _launch(_args(data_dir, workdir), 4)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.load(open(os.path.join(workdir, "results.json")))


def _assert_close(got, want):
  for key in METRICS:
    assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_two_processes_of_two_devices_match_four_devices(data_dir, tmp_path, four_device_run):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "two_processes")
  procs = [subprocess.Popen(
      [sys.executable, *_args(data_dir, workdir), f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"], env=_env(2), cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["topology"] == {"device_count": 4, "process_count": 2,
                                 "mesh": {"seed": 1, "data": 4}}
  _assert_close(results, four_device_run)
  # One process wrote the metrics: every step once.
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
           if '"train"' in l]
  assert steps == sorted(set(steps))


def test_kill_on_four_devices_resume_on_one(data_dir, tmp_path, four_device_run):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, *_args(data_dir, workdir)], env=_env(4), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_checkpoint(workdir, 20, proc)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  resumed = _launch(_args(data_dir, workdir), 1)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "written on 4 device(s) in 1 process(es) and resumes on 1 in 1" in resumed.stdout
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["topology_changed"]["from"]["device_count"] == 4
  assert results["topology"]["device_count"] == 1
  _assert_close(results, four_device_run)
