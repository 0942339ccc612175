"""Sweep launchers: local worker processes (logs, no pipe deadlock, one-line failures) and the
submitit job array (run here with submitit's local executor)."""

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from cnnlab.base.errors import ConfigError
from cnnlab.study import launchers
from cnnlab.study import workers as local_workers
from cnnlab.study.launchers import WorkerError

LOCAL_ARRAY = {"cluster": "local", "array_size": 2, "gpus_per_job": 0, "cpus_per_job": 1,
               "time_limit_min": 5}


def run_in_thread(fn, *args, timeout=120, **kwargs):
  """Calls fn in a thread and returns (result, exception); fails, not hangs, past `timeout`."""
  outcome = {}
  def target():
    try:
      outcome["result"] = fn(*args, **kwargs)
    except Exception as e:  # Handed back to the test.
      outcome["error"] = e
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  assert not thread.is_alive(), f"{fn.__name__} still waits after {timeout} s"
  return outcome.get("result"), outcome.get("error")


def python(code: str) -> list[str]:
  return [sys.executable, "-c", code]


def test_worker_with_huge_output_fails_with_one_line_not_a_hang(tmp_path):
  """More than 64 KB on stderr used to block the worker on a full pipe while the launcher waited
  for it to exit. Now the output goes to a log and the error quotes its cnnlab error line."""
  noisy = python("import sys\nfor i in range(4000): print('W orbax: retrying write', 'x' * 60, "
                 "i, file=sys.stderr)\nprint('error: no space left on device: /ckpt', "
                 "file=sys.stderr)\nprint('W shutting down', file=sys.stderr)\nsys.exit(1)")
  calls = []
  _, error = run_in_thread(local_workers.run_local_workers, str(tmp_path), 2,
                           lambda: calls.append(1), command=noisy, poll_s=0.05)
  log = tmp_path / "logs" / "worker_0.log"
  assert isinstance(error, WorkerError) and log.stat().st_size > 200_000
  message = str(error)
  assert "\n" not in message and calls
  assert message.startswith("2 of 2 sweep workers failed (worker 0 exited with status 1)")
  assert message.endswith(f"{log} ends: error: no space left on device: /ckpt")


def test_failure_quotes_the_exception_line_of_a_traceback(tmp_path):
  crashing = python("import sys\nprint('epoch 1\\rstep 10/20\\rstep 20/20', flush=True)\n"
                    "raise RuntimeError('RESOURCE_EXHAUSTED: out of memory')")
  _, error = run_in_thread(local_workers.run_local_workers, str(tmp_path), 1, command=crashing,
                           poll_s=0.05)
  assert str(error).endswith("ends: RuntimeError: RESOURCE_EXHAUSTED: out of memory")
  assert str(error).startswith("1 of 1 sweep workers failed")


def test_killed_worker_is_named_with_its_signal(tmp_path):
  killed = python("import os, signal\nprint('step 5', flush=True)\n"
                  "os.kill(os.getpid(), signal.SIGKILL)")
  _, error = run_in_thread(local_workers.run_local_workers, str(tmp_path), 1, command=killed,
                           poll_s=0.05)
  assert "(worker 0 was killed by SIGKILL)" in str(error) and str(error).endswith("ends: step 5")


def test_workers_are_pinned_to_one_core_and_one_xla_thread(tmp_path):
  report = python("import os\nprint(sorted(os.sched_getaffinity(0)), os.environ['XLA_FLAGS'])")
  _, error = run_in_thread(local_workers.run_local_workers, str(tmp_path), 2, command=report,
                           poll_s=0.05)
  assert error is None
  cpus = sorted(os.sched_getaffinity(0))
  for i in range(2):
    text = (tmp_path / "logs" / f"worker_{i}.log").read_text()
    assert text.startswith(f"[{cpus[i % len(cpus)]}] ")
    assert local_workers.SINGLE_THREAD_XLA_FLAGS in text


def test_workers_start_without_forking_a_multithreaded_jax_process(tmp_path):
  """The pinning ran Python between fork and exec (a preexec_fn) in the sweep's process, where
  JAX's threads run: Python's docs say that can deadlock, and JAX printed "os.fork() was called
  ... will likely lead to a deadlock" on every sweep with workers."""
  code = ("import sys, jax; jax.numpy.zeros(1).block_until_ready()\n"
          "from cnnlab.study import workers as local_workers\n"
          "local_workers.run_local_workers(sys.argv[1], 2, command=[sys.executable, '-c', 'pass'])")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                        text=True, cwd=ROOT, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "fork" not in done.stderr, done.stderr[-2000:]


def test_workers_stop_when_the_sweep_is_killed_outright(tmp_path):
  """A `kill -9` of the sweep's process left its workers training unseen (found by hand: 33 of
  45 runs finished after the kill); now each gets SIGTERM, on which a worker saves and stops."""
  worker = ("import os, sys, time\n"
            "open(os.path.join(sys.argv[1], f'worker_{os.getpid()}'), 'w').close()\n"
            "time.sleep(120)")
  sweep = ("import sys\nfrom cnnlab.study import workers as local_workers\n"
           "local_workers.run_local_workers(sys.argv[1], 2, command=[sys.executable, '-c', "
           f"{worker!r}, sys.argv[1]])")
  parent = subprocess.Popen([sys.executable, "-c", sweep, str(tmp_path)], cwd=ROOT)
  deadline = time.time() + 60
  while len(list(tmp_path.glob("worker_*"))) < 2 and time.time() < deadline:
    time.sleep(0.05)
  pids = [int(p.name.split("_")[1]) for p in tmp_path.glob("worker_*")]
  assert len(pids) == 2, "the workers did not start"
  parent.kill()
  parent.wait()
  deadline = time.time() + 10
  while any(_alive(pid) for pid in pids) and time.time() < deadline:
    time.sleep(0.05)
  alive = [pid for pid in pids if _alive(pid)]
  for pid in alive:
    os.kill(pid, signal.SIGKILL)
  assert not alive, "workers outlived the sweep's process"


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as stopped)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def record_worker(workdir: str) -> None:
  """A stand-in for cnnlab.study.sweep.worker_main: leaves a file per job."""
  with open(os.path.join(workdir, f"ran_{os.getpid()}"), "w") as f:
    f.write(os.environ.get("SUBMITIT_LOCAL_JOB_ID", ""))


def failing_worker(workdir: str) -> None:
  raise RuntimeError(f"cannot train in {workdir}")


@pytest.fixture
def importable_tests(monkeypatch):
  """submitit's job processes unpickle the worker function by module name: they need tests/."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def test_job_array_runs_every_worker(tmp_path, importable_tests):
  calls = []
  _, error = run_in_thread(launchers.run_slurm_workers, str(tmp_path), LOCAL_ARRAY,
                           lambda: calls.append(1), worker_fn=record_worker, poll_s=0.1)
  assert error is None and calls
  assert len([p for p in os.listdir(tmp_path) if p.startswith("ran_")]) == 2
  assert any(p.endswith("_log.err") for p in os.listdir(tmp_path / "slurm"))


def test_failed_jobs_are_named_in_one_line_with_their_logs(tmp_path, importable_tests):
  _, error = run_in_thread(launchers.run_slurm_workers, str(tmp_path), LOCAL_ARRAY,
                           worker_fn=failing_worker, poll_s=0.1)
  assert isinstance(error, WorkerError) and "\n" not in str(error)
  assert str(error).startswith("2 of 2 sweep jobs did not complete: job ")
  assert f"_log.err ends: error: 1 of 1 sweep workers failed (worker 0 exited with status 1); " \
      f"{tmp_path / 'slurm'}{os.sep}" in str(error)
  assert f"_worker_0.log ends: RuntimeError: cannot train in {tmp_path}; job " in str(error)
  assert str(error).endswith(": FINISHED; rerun the same command to resume.")


def test_slurm_settings_become_sbatch_lines(tmp_path, monkeypatch):
  """Without a cluster: a stand-in `srun` lets submitit build the SLURM script it would submit."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text("#!/bin/sh\n")
  (bin_dir / "srun").chmod(stat.S_IRWXU)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  settings = launchers.slurm_settings({"partition": "gpu", "account": "lab", "qos": "high",
                                       "gpus_per_job": 2, "cpus_per_job": 8, "mem_gb": 32,
                                       "time_limit_min": 90})
  executor = launchers.make_executor(str(tmp_path / "slurm"), settings)
  script = executor._executor._make_submission_file_text("python worker.py", "uid")
  for line in ("--partition=gpu", "--account=lab", "--qos=high", "--gpus-per-node=2",
               "--cpus-per-task=8", "--mem=32GB", "--time=90", "--ntasks-per-node=1"):
    assert f"#SBATCH {line}\n" in script


def test_bad_slurm_settings_name_the_key(tmp_path):
  with pytest.raises(ConfigError, match=r"slurm.partiton is not a setting; .*partition"):
    launchers.slurm_settings({"partiton": "gpu"})
  with pytest.raises(ConfigError, match=r"cluster='pbs' is not allowed; .*slurm, local"):
    launchers.slurm_settings({"cluster": "pbs"})
  with pytest.raises(ConfigError, match=r"array_size=0 must be an integer >= 1"):
    launchers.slurm_settings({"array_size": 0})
  with pytest.raises(ConfigError, match=r"partition=3 must be a string"):
    launchers.slurm_settings({"partition": 3})


_SIGNALLED_WORKER = """
import os, signal, sys, time
out = sys.argv[1]
def handler(signum, frame):  # Records each signal; exits like cnnlab's loop after a checkpoint.
  with open(os.path.join(out, f"signals_{os.getpid()}"), "a") as f:
    f.write(signal.Signals(signum).name + "\\n")
  time.sleep(0.5)  # Room for a second signal to arrive, if one is sent.
  sys.exit(130)
signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGINT, handler)
open(os.path.join(out, f"up_{os.getpid()}"), "w").close()
while True:
  time.sleep(0.05)
"""

_LAUNCHING_PARENT = """
import sys
from cnnlab.study import workers as local_workers
from cnnlab.base.errors import CnnlabError
try:
  local_workers.run_local_workers(sys.argv[1], 2, poll_s=0.05,
                              command=[sys.executable, "-c", sys.argv[2], sys.argv[1]])
except CnnlabError as e:
  print(f"error: {e}")
  sys.exit(e.exit_code)
"""


def test_ctrl_c_reaches_each_worker_once_and_ends_in_one_line(tmp_path):
  """Ctrl-C (SIGINT to the terminal's process group) stops a local sweep cleanly: each worker
  gets exactly one SIGTERM (a second would cut its checkpoint short) and the launcher ends with
  `Interrupted`'s one line and exit 130. Before, the workers got the terminal's SIGINT and then
  the launcher's SIGTERM, and the launcher died of KeyboardInterrupt."""
  parent = subprocess.Popen([sys.executable, "-c", _LAUNCHING_PARENT, str(tmp_path),
                             _SIGNALLED_WORKER], cwd=os.path.dirname(os.path.dirname(__file__)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
  deadline = time.time() + 60
  while len([p for p in os.listdir(tmp_path) if p.startswith("up_")]) < 2:
    assert time.time() < deadline and parent.poll() is None, parent.stderr.read()[-2000:]
    time.sleep(0.05)
  os.killpg(parent.pid, signal.SIGINT)
  out, err = parent.communicate(timeout=60)
  assert parent.returncode == 130, err[-2000:]
  assert out.strip().splitlines() == [
      "error: interrupted by SIGINT: each worker saved a checkpoint of the run it was training; "
      "rerun the same command to resume."]
  records = sorted(p for p in os.listdir(tmp_path) if p.startswith("signals_"))
  assert len(records) == 2
  assert all((tmp_path / r).read_text() == "SIGTERM\n" for r in records)
