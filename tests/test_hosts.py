"""Multi-process runs end together, in one line each, and resume: cnnlab.training.hosts and
cnnlab.training.supervisor, driven through launch.py as a user runs it (2 processes of 2 forced
devices).

Bounds checked here (with CNNLAB_PEER_TIMEOUT_S=5 and CNNLAB_START_TIMEOUT_S=5 to keep the tests
short; the defaults are 30 s and 120 s): a killed process's peer ends within the peer timeout
plus a margin; a signalled run stops on every process at the same step.
A killed or signalled run, resumed by the same two commands, ends with the uninterrupted run's
params_sha256: the same topology runs the same program, so the bits are equal.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, wait_for_checkpoint

FAST = {"CNNLAB_PEER_TIMEOUT_S": "5", "CNNLAB_START_TIMEOUT_S": "5"}


def _env(devices: int = 2, **extra) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  return dict(os.environ, PYTHONUNBUFFERED="1", **FAST, **extra,
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(data_dir, workdir, epochs=2):
  return [os.path.join(ROOT, "launch.py"), "--config=experiments/default.py",
          f"--workdir={workdir}", "--noprogress", "--config.dataset.name=digits",
          f"--config.dataset.data_dir={data_dir}", "--config.model.name=vgg_cnn",
          "--config.model.stages=((8,),(16,))", "--config.model.bn_placement=before_act",
          "--config.model.dropout=spatial", "--config.model.dropout_rate=0.2",
          "--config.batch_size=32", f"--config.num_epochs={epochs}",
          "--config.log_every_steps=5", "--config.checkpoint_every_steps=10"]


def _start(args, port, process_id, **env):
  return subprocess.Popen(
      [sys.executable, *args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={process_id}"], env=_env(**env), cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _both(args, **env):
  port = _free_port()
  return [_start(args, port, i, **env) for i in range(2)]


def _finish(procs, timeout=300):
  """(return codes, stderr of each, seconds each took after the call)."""
  start, out = time.monotonic(), []
  for p in procs:
    _, err = p.communicate(timeout=timeout)
    out.append((p.returncode, err, time.monotonic() - start))
  return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def _errors(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith("error: ")]


def _results(workdir):
  return json.load(open(os.path.join(workdir, "results.json")))


def _assert_resumes_to(args, workdir, uninterrupted):
  """The same two commands again: the run resumes, finishes, and equals the uninterrupted one."""
  codes, errs, _ = _finish(_both(args))
  assert codes == [0, 0], errs
  assert _results(workdir)["params_sha256"] == uninterrupted["params_sha256"]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("hosts") / "whole")
  temp = tmp_path_factory.mktemp("temp")
  codes, errs, _ = _finish(_both(_args(data_dir, workdir), TMPDIR=str(temp)))
  assert codes == [0, 0], errs
  for err in errs:  # XLA's and gloo's own lines stay in the log, not the terminal.
    assert "[Gloo]" not in err and "rendezvous" not in err
  # ... and the logs go once the run has finished: none is left behind for each run.
  assert not list(temp.glob("cnnlab-process*.log")), list(temp.iterdir())
  return _results(workdir)


@pytest.mark.parametrize("flags, says", [
    (["--coordinator_address=127.0.0.1", "--num_processes=2", "--process_id=0"],
     "must be host:port with a port in 1-65535"),
    (["--coordinator_address=127.0.0.1:99999", "--num_processes=2", "--process_id=0"],
     "must be host:port with a port in 1-65535"),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2"], "go together"),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
     "must be in [0, --num_processes=2)"),
])
def test_bad_multihost_flags_are_one_line(data_dir, tmp_path, flags, says):
  workdir = tmp_path / "run"
  done = subprocess.run([sys.executable, *_args(data_dir, workdir), *flags], env=_env(),
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert done.returncode == 2 and _errors(done.stderr) and says in done.stderr, done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert not workdir.exists()


def test_a_coordinator_port_in_use_is_one_line(data_dir, tmp_path):
  with socket.socket() as taken:
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    port = taken.getsockname()[1]
    done = subprocess.run(
        [sys.executable, *_args(data_dir, tmp_path / "run"), f"--coordinator_address=127.0.0.1:"
         f"{port}", "--num_processes=2", "--process_id=0"], env=_env(), cwd=ROOT,
        capture_output=True, text=True, timeout=60)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip() == (f"error: --coordinator_address=127.0.0.1:{port}: port {port} is "
                                 f"in use on this host (another run's coordinator?); choose a "
                                 f"free port for every process.")


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_process_whose_peers_never_start_says_so(data_dir, tmp_path, process_id):
  start = time.monotonic()
  proc = _start(_args(data_dir, tmp_path / "run"), _free_port(), process_id)
  codes, errs, _ = _finish([proc], timeout=120)
  assert codes == [2]
  assert _errors(errs[0]) == errs[0].strip().splitlines(), errs[0]
  assert "could not join the other processes within 5 s" in errs[0]
  assert time.monotonic() - start < 60


def test_a_config_flag_given_to_one_process_only_ends_both_in_one_line(data_dir, tmp_path):
  workdir = tmp_path / "run"
  args, port = _args(data_dir, workdir), _free_port()
  procs = [_start(args, port, 0), _start([*args, "--config.seed=7"], port, 1)]
  codes, errs, _ = _finish(procs, timeout=120)
  assert codes == [2, 2], errs
  assert all(len(_errors(e)) == 1 and "Traceback" not in e for e in errs), errs
  assert any("differs from that of process" in e for e in errs), errs
  assert not (workdir / "results.json").exists() and not (workdir / "checkpoints").exists()


def test_kill_9_of_a_process_itself_not_its_parent_is_one_line_on_each(data_dir, tmp_path):
  """The child of the supervising parent is what the OOM killer or a node failure ends; its
  peer sees gloo's 'Connection closed by peer' in a collective first, then names the peer."""
  workdir = str(tmp_path / "run")
  procs = _both(_args(data_dir, workdir), TMPDIR=str(tmp_path))
  wait_for_checkpoint(workdir, 20, procs[0])
  child = int(subprocess.check_output(["pgrep", "-P", str(procs[1].pid)]).split()[0])
  os.kill(child, signal.SIGKILL)
  codes, errs, took = _finish(procs, timeout=120)
  assert codes == [2, 2], errs
  assert all(len(_errors(e)) == 1 and "Traceback" not in e for e in errs), errs
  assert "ended by SIGKILL" in errs[1]
  assert took[0] < 5 + 15
  # The line names the process's log, and the log is there (XLA's and gloo's lines).
  log = re.search(r"this process's log: (\S+)\)", errs[1]).group(1)
  assert os.path.dirname(log) == str(tmp_path) and os.path.getsize(log) > 0, errs[1]


@pytest.mark.parametrize("victim", [0, 1])
def test_kill_9_of_either_process_ends_the_other_in_one_line_and_the_run_resumes(
    data_dir, tmp_path, uninterrupted, victim):
  workdir = str(tmp_path / "run")
  args = _args(data_dir, workdir)
  procs = _both(args)
  wait_for_checkpoint(workdir, 20, procs[0])
  os.kill(procs[victim].pid, signal.SIGKILL)
  codes, errs, took = _finish(procs, timeout=120)
  other = 1 - victim
  assert codes[victim] == -signal.SIGKILL
  assert codes[other] == 2 and len(_errors(errs[other])) == 1, errs[other]
  assert errs[other].strip().splitlines()[-1] == _errors(errs[other])[0]
  assert took[other] < 5 + 15  # The peer timeout, a heartbeat and exit.
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  _assert_resumes_to(args, workdir, uninterrupted)


@pytest.mark.parametrize("signalled", [(0,), (1,), (0, 1)])
def test_sigterm_to_either_or_both_stops_both_at_one_step_and_the_run_resumes(
    data_dir, tmp_path, uninterrupted, signalled):
  workdir = str(tmp_path / "run")
  args = _args(data_dir, workdir)
  procs = _both(args)
  wait_for_checkpoint(workdir, 20, procs[0])
  for i in signalled:
    procs[i].send_signal(signal.SIGTERM)
  codes, errs, took = _finish(procs, timeout=120)
  assert codes == [130, 130], errs
  lines = [_errors(e) for e in errs]
  assert len(lines[0]) == len(lines[1]) == 1 and lines[0] == lines[1], errs
  assert "interrupted by SIGTERM at step" in lines[0][0]
  assert max(took) < 30
  _assert_resumes_to(args, workdir, uninterrupted)
