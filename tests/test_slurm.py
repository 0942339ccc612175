"""The SLURM launcher: signals to jobs and to the launcher, job states, refused submissions, CPU
binding. Most run through submitit's local executor (same job code as on a cluster) or stand-in
SLURM commands; those marked `real_slurm` run only where `sbatch` exists, against a real cluster
(e.g. `../shared/tools/slurm-one-node/`: one node, no GPUs)."""

import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import slurm_workers
from conftest import ROOT, load_config, run_launch
from test_launchers import importable_tests, run_in_thread  # noqa: F401 (a fixture)

from cnnlab import data
from cnnlab.base.errors import ConfigError
from cnnlab.study import launchers, slurm_job
from cnnlab.study import workers as local_workers
from cnnlab.study.launchers import WorkerError
from cnnlab.training import supervisor

LOCAL_ARRAY = {"cluster": "local", "array_size": 2, "gpus_per_job": 0, "cpus_per_job": 1,
               "time_limit_min": 5}
def _cluster_answers() -> bool:
  """Whether a SLURM controller answers here (Debian's slurm-wlm can be installed with no cluster
  running: then sbatch exists but every real-cluster test would fail)."""
  if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
    return False
  try:
    return subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True,
                          timeout=15).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


real_slurm = pytest.mark.skipif(not _cluster_answers(), reason="needs a running SLURM cluster")


def wait_for(workdir, kind: str, count: int, timeout: float = 120, proc=None) -> list[str]:
  """The `kind_*` files the stand-in workers wrote, once there are `count` of them."""
  deadline = time.time() + timeout
  while True:
    found = sorted(glob.glob(os.path.join(workdir, f"{kind}_*")))
    if len(found) >= count:
      return found
    assert time.time() < deadline, f"{count} {kind}_* files not written in {timeout} s"
    assert proc is None or proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)


def alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def worker_pids(workdir) -> list[int]:
  return [int(p.rsplit("_", 1)[1]) for p in glob.glob(os.path.join(workdir, "up_*"))]


def test_a_sigterm_between_runs_stops_the_job_and_the_launcher_says_so(tmp_path,
                                                                     importable_tests):
  """Between two runs submitit's job process logged `Bypassing signal SIGTERM` and trained on,
  and the launcher reported success. Now the job's workers stop and the launcher names each job
  in one line."""
  _, error = run_in_thread(_signal_jobs, tmp_path, signal.SIGTERM, timeout=120)
  assert isinstance(error, WorkerError) and "\n" not in str(error)
  assert str(error).startswith("2 of 2 sweep jobs did not complete: job ")
  assert "ends: error: interrupted by SIGTERM: each worker saved a checkpoint" in str(error)
  runs = [len(open(p).read().split()) for p in glob.glob(str(tmp_path / "runs_*"))]
  assert max(runs) < slurm_workers.RUNS, "a worker trained on after the signal"
  assert not any(alive(pid) for pid in worker_pids(tmp_path))


def _signal_jobs(workdir, signum):
  """Runs two `between_runs` jobs and sends `signum` to each job's controller (submitit's local
  stand-in for slurmstepd, which passes it to the job) once both workers run."""
  import threading
  def send():
    for up in wait_for(workdir, "up", 2):
      # up_<SUBMITIT_LOCAL_JOB_ID, the pid of the job's controller>_<pid>
      os.kill(int(os.path.basename(up).split("_")[1]), signum)
  threading.Thread(target=send, daemon=True).start()
  launchers.run_slurm_workers(str(workdir), LOCAL_ARRAY, worker_fn=slurm_workers.between_runs,
                              poll_s=0.1)


def test_the_time_limit_warning_stops_workers_at_a_checkpoint_then_requeues(tmp_path,
                                                                            importable_tests):
  """SIGUSR2 (SLURM's warning before the time limit) reaches each worker as one SIGTERM (it
  saves and exits), then the job is requeued and its second run finishes the sweep."""
  _, error = run_in_thread(_warn_jobs, tmp_path, LOCAL_ARRAY)
  assert error is None
  for record in glob.glob(str(tmp_path / "signals_*")):
    assert open(record).read() == "SIGTERM\n"
  assert len(glob.glob(str(tmp_path / "signals_*"))) == 2
  assert len(glob.glob(str(tmp_path / "done_*"))) == 2  # Each job ran again and finished.


def test_a_job_requeued_too_often_says_what_to_change(tmp_path, importable_tests):
  """After max_requeues the error quoted submitit's "timed-out too many times" only."""
  _, error = run_in_thread(_warn_jobs, tmp_path, {**LOCAL_ARRAY, "max_requeues": 0})
  assert isinstance(error, WorkerError) and "\n" not in str(error)
  assert ("ends: error: the job reached its time limit (config.sweep.slurm.time_limit_min=5) "
          "more than max_requeues=0 times; raise time_limit_min (or max_requeues), then rerun "
          "the same command to resume.") in str(error)


def _warn_jobs(workdir, slurm):
  """Runs two `saves_on_sigterm` jobs; sends each job's process SIGUSR2 once its worker runs."""
  import threading
  def send():
    for up in wait_for(workdir, "up", 2):
      os.kill(int(open(up).read()), local_workers.REQUEUE_SIGNAL)  # The worker's parent: the job.
  threading.Thread(target=send, daemon=True).start()
  launchers.run_slurm_workers(str(workdir), slurm, worker_fn=slurm_workers.saves_on_sigterm,
                              poll_s=0.1)


def test_a_job_runs_one_single_threaded_worker_per_cpu(tmp_path, importable_tests):
  """A SLURM job used every core it saw in one process, local workers one thread each: the same
  sweep gave other bits through SLURM (0 of 18 equal digests). Now a job of N CPUs runs N
  workers, each pinned to one core and one XLA thread, as local workers are."""
  cores = len(os.sched_getaffinity(0))
  _, error = run_in_thread(launchers.run_slurm_workers, str(tmp_path),
                           {**LOCAL_ARRAY, "array_size": 1, "cpus_per_job": 2},
                           worker_fn=slurm_workers.reports_cpus, poll_s=0.1)
  assert error is None
  reports = [open(p).read().split("|") for p in glob.glob(str(tmp_path / "cpus_*"))]
  assert len(reports) == min(2, cores)
  assert len({cpus for cpus, _ in reports}) == len(reports)  # Each its own core.
  for cpus, flags in reports:
    assert len(json.loads(cpus)) == 1 and local_workers.SINGLE_THREAD_XLA_FLAGS in flags.split()


def test_job_cpu_sets_follow_the_binding():
  """Bound jobs use the cores they see; unbound ones (task/none) take their own in turn."""
  allowed = sorted(os.sched_getaffinity(0))
  assert slurm_job.job_cpu_sets(1, False, 0) == [[allowed[0]]]
  assert slurm_job.job_cpu_sets(1, False, 1) == [[allowed[1 % len(allowed)]]]
  assert slurm_job.job_cpu_sets(99, True, 3) == [allowed]  # A GPU job: one worker, every core.


_LAUNCHER = """
import sys
from cnnlab.study import launchers
from cnnlab.base.errors import CnnlabError
import slurm_workers
try:
  launchers.run_slurm_workers(sys.argv[1], eval(sys.argv[2]), poll_s=0.1,
                              worker_fn=slurm_workers.saves_on_sigterm)
except CnnlabError as e:
  print(f"error: {e}")
  sys.exit(getattr(e, "exit_code", 2))
"""


def interrupt_launcher(workdir, slurm: dict, signum: int, workers: int = 2):
  """Starts a launcher of `saves_on_sigterm` jobs, sends it `signum` once `workers` run; returns
  (its exit status, its stdout lines, seconds from the signal to its exit)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(workdir), repr(slurm)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(workdir, "up", workers, timeout=240, proc=proc)
  start = time.time()
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=240)
  return proc.returncode, out.splitlines() + err.splitlines(), time.time() - start


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_to_the_launcher_stops_the_jobs_in_one_line(tmp_path, signum):
  """Ctrl-C cancelled the jobs but ended in a 17-line KeyboardInterrupt traceback; SIGTERM killed
  the launcher silently (rc 143) and left the jobs running. Now both cancel the jobs, wait until
  their workers saved and stopped, and end in one line with exit 130."""
  rc, lines, _ = interrupt_launcher(tmp_path, LOCAL_ARRAY, signum)
  assert rc == 130 and lines == [
      f"error: interrupted by {signal.Signals(signum).name}: cancelled the sweep's 2 jobs, whose "
      f"workers saved checkpoints of the runs they were training and stopped; rerun the same "
      f"command to resume."], lines
  deadline = time.time() + 10  # A worker may still be leaving its signal handler.
  while any(alive(pid) for pid in worker_pids(tmp_path)) and time.time() < deadline:
    time.sleep(0.05)
  assert not any(alive(pid) for pid in worker_pids(tmp_path))
  for record in glob.glob(str(tmp_path / "signals_*")):
    assert open(record).read().startswith("SIGTERM\n")


@pytest.fixture
def refusing_sbatch(tmp_path, monkeypatch):
  """Stand-in SLURM commands whose sbatch refuses every job, as a cluster does a bad partition."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text("#!/bin/sh\n")
  (bin_dir / "sbatch").write_text(
      "#!/bin/sh\necho 'sbatch: error: invalid partition specified: bogus' >&2\n"
      "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
      "exit 1\n")
  for name in ("srun", "sbatch"):
    (bin_dir / name).chmod(stat.S_IRWXU)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


SAID = ("sbatch: error: invalid partition specified: bogus sbatch: error: Batch job submission "
        "failed: Invalid partition name specified")


def test_a_refused_sweep_is_one_line_and_writes_nothing(tmp_path, data_dir, refusing_sbatch):
  """A bad partition (or GPUs on a cluster without any) was 37 lines of two chained tracebacks,
  rc 1, leaving sweep.json, pickles and a submission script: sbatch is now asked first
  (--test-only)."""
  workdir = tmp_path / "sweep"
  config = load_config("experiments/ablation.py", "quick")
  config.dataset.data_dir = data_dir
  data.dataset_info(config.dataset)  # Prepared first: its messages are not the sweep's.
  done = run_launch("--config=experiments/ablation.py:quick", f"--workdir={workdir}",
                    f"--config.dataset.data_dir={data_dir}", "--config.sweep.launcher=slurm",
                    "--config.sweep.slurm.partition=bogus", "--noprogress")
  assert done.returncode == 2 and done.stderr.splitlines() == [
      f"error: sbatch refused the sweep's job array ({SAID}); it asked for partition='bogus', "
      f"gpus_per_job=1, cpus_per_job=4, mem_gb=0 (= 8 GB): fix config.sweep.slurm."]
  assert not workdir.exists()


def test_a_refused_submission_leaves_no_files(tmp_path, refusing_sbatch):
  """If sbatch refuses the array itself, the pickles and the script submitit wrote go too."""
  (tmp_path / "slurm").mkdir()
  (tmp_path / "slurm" / "earlier.log").write_text("kept")
  with pytest.raises(ConfigError, match=r"^sbatch refused the sweep's job array \(sbatch: error"):
    launchers.run_slurm_workers(str(tmp_path), {"partition": "bogus", "gpus_per_job": 0},
                                worker_fn=slurm_workers.between_runs)
  assert os.listdir(tmp_path / "slurm") == ["earlier.log"]


def test_time_limits_too_short_for_the_warning_are_refused():
  with pytest.raises(ConfigError, match=r"time_limit_min=1 is too short: a job is warned 90 s "
                                        r"before its time limit .* use time_limit_min >= 5\.$"):
    launchers.slurm_settings({"time_limit_min": 1})
  assert launchers.slurm_settings({"time_limit_min": 5})["time_limit_min"] == 5


def test_jobs_ask_for_memory_per_cpu_not_the_whole_node(tmp_path, refusing_sbatch):
  """mem_gb=0 asked for nothing, which SLURM grants as the node's whole memory: an array of 2
  ran one job after the other. Now 0 means MEM_GB_PER_CPU per CPU of the job."""
  def script(**slurm):
    executor = launchers.make_executor(str(tmp_path), launchers.slurm_settings(slurm))
    return executor._executor._make_submission_file_text("python worker.py", "uid")
  assert "#SBATCH --mem=8GB\n" in script()
  assert "#SBATCH --mem=2GB\n" in script(cpus_per_job=1)
  assert "#SBATCH --mem=3GB\n" in script(cpus_per_job=1, mem_gb=3)
  assert "#SBATCH --signal=USR2@90\n" in script()


def test_a_multi_task_batch_script_outside_srun_says_to_use_srun(monkeypatch):
  """`sbatch -n 2 --wrap "python launch.py ..."` was `ValueError: coordinator_address should be
  defined.` in a traceback."""
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
  with pytest.raises(ConfigError, match=r"2 tasks \(SLURM_NTASKS\) but runs outside srun: start "
                                        r"one process per task with `srun python launch.py"):
    supervisor.check_arguments(None, None, None)
  done = run_launch("--config=experiments/default.py", "--workdir=/nonexistent/never")
  assert done.returncode == 2 and done.stderr.startswith("error: this SLURM job has 2 tasks")
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# On a real cluster (one node, no GPUs, e.g. ../shared/tools/slurm-one-node/, with or without
# CPU binding). The jobs share this machine's files, so tmp_path works as a shared workdir.
REAL = {"gpus_per_job": 0, "cpus_per_job": 1, "array_size": 2, "time_limit_min": 10}


def sacct(job_id: str, *fields: str, all_attempts: bool = False) -> list[list[str]]:
  args = ["sacct", "-X", "-n", "-P", "-o", ",".join(fields), "-j", job_id]
  out = subprocess.run(args + (["-D"] if all_attempts else []), capture_output=True, text=True,
                       check=True).stdout
  return [line.split("|") for line in out.splitlines()]


def squeue_state(job_id: str) -> str:
  return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                        text=True).stdout.strip()


def job_of(up_path: str) -> str:
  """The SLURM job (<array>_<task>, or <job>) that wrote `up_<job>_<pid>`."""
  return "_".join(os.path.basename(up_path).split("_")[1:-1])


@real_slurm
def test_real_cluster_gives_local_digests_and_runs_jobs_side_by_side(tmp_path, data_dir):
  """The same sweep through SLURM gave 0 of 18 equal digests (threads: every core a job saw), and
  jobs asked for a whole node's memory, so an array of 2 ran one job after the other."""
  args = ["--config=experiments/ablation.py:quick", f"--config.dataset.data_dir={data_dir}",
          "--config.sweep.axes.bn.values=('none',)", "--config.sweep.seeds=(0,)",
          "--config.num_epochs=1", "--noprogress"]
  local = run_launch(*args, f"--workdir={tmp_path / 'local'}")
  assert local.returncode == 0, local.stderr[-3000:]
  slurm = run_launch(*args, f"--workdir={tmp_path / 'slurm'}", "--config.sweep.launcher=slurm",
                     *(f"--config.sweep.slurm.{k}={v}" for k, v in REAL.items()))
  assert slurm.returncode == 0, slurm.stderr[-3000:]
  results = {}
  for where in ("local", "slurm"):
    for path in glob.glob(str(tmp_path / where / "cells" / "*" / "seed_*" / "results.json")):
      result = json.load(open(path))
      assert result["environment"]["threads"] == 1
      results.setdefault(os.path.relpath(path, tmp_path / where), []).append(
          result["params_sha256"])
  assert len(results) == 3 and all(len(set(d)) == 1 and len(d) == 2 for d in results.values())
  array_id = os.path.basename(glob.glob(str(tmp_path / "slurm" / "slurm" / "*_submission.sh"))[0])
  starts = sacct(array_id.split("_")[0], "Start")
  assert len(starts) == 2 and starts[0] == starts[1]  # Side by side, not one after the other.


@real_slurm
def test_real_cluster_scancel_between_runs_stops_the_job_and_fails_the_sweep(
    tmp_path, importable_tests):
  import threading
  outcome = {}
  thread = threading.Thread(target=lambda: outcome.update(error=run_in_thread(
      launchers.run_slurm_workers, str(tmp_path), REAL, worker_fn=slurm_workers.between_runs,
      poll_s=1, timeout=300)[1]))
  thread.start()
  cancelled = job_of(sorted(wait_for(tmp_path, "up", 2, timeout=240))[0])
  subprocess.run(["scancel", cancelled], check=True)
  thread.join(300)
  error = str(outcome["error"])
  assert "\n" not in error and error.startswith(
      f"1 of 2 sweep jobs did not complete: job {cancelled} was cancelled (state CANCELLED); ")
  assert sacct(cancelled, "State")[0][0].startswith("CANCELLED")
  runs = {job_of(p): len(open(p).read().split()) for p in glob.glob(str(tmp_path / "runs_*"))}
  assert runs.get(cancelled, 0) < slurm_workers.RUNS and max(runs.values()) == slurm_workers.RUNS


@real_slurm
def test_real_cluster_time_limit_warning_saves_requeues_and_the_launcher_waits(
    tmp_path, importable_tests):
  """After a requeue the launcher returned 0 while the job was still pending; a warned job's
  workers were not told to save."""
  import threading
  outcome = {}
  thread = threading.Thread(target=lambda: outcome.update(error=run_in_thread(
      launchers.run_slurm_workers, str(tmp_path), {**REAL, "array_size": 1},
      worker_fn=slurm_workers.saves_on_sigterm, poll_s=1, timeout=300)[1]))
  thread.start()
  job = job_of(wait_for(tmp_path, "up", 1, timeout=240)[0])
  subprocess.run(["scancel", "--signal=USR2", job], check=True)  # What SLURM sends at T-90 s.
  deadline = time.time() + 60
  while squeue_state(job) != "PENDING" and time.time() < deadline:
    time.sleep(0.2)
  assert thread.is_alive(), "the launcher returned while the job was requeued"
  # SLURM holds a requeued job back for a while (reason BeginTime): not in a test.
  subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
  thread.join(300)
  assert outcome["error"] is None
  assert [open(p).read() for p in glob.glob(str(tmp_path / "signals_*"))] == ["SIGTERM\n"]
  assert len(glob.glob(str(tmp_path / "done_*"))) == 1
  assert [s[0].split()[0] for s in sacct(job, "State", all_attempts=True)] == [
      "REQUEUED", "COMPLETED"]


@real_slurm
def test_real_cluster_ctrl_c_cancels_and_stops_the_jobs_in_one_line(tmp_path):
  rc, lines, seconds = interrupt_launcher(tmp_path, {**REAL, "cluster": "slurm"}, signal.SIGINT)
  array_id = job_of(glob.glob(str(tmp_path / "up_*"))[0]).split("_")[0]
  assert rc == 130 and lines == [
      f"error: interrupted by SIGINT: cancelled the sweep's SLURM job array {array_id}, whose "
      f"workers saved checkpoints of the runs they were training and stopped; rerun the same "
      f"command to resume."], lines
  assert seconds < 60
  assert subprocess.run(["squeue", "-h", "-j", array_id], capture_output=True,
                        text=True).stdout.strip() == ""
  assert [open(p).read() for p in glob.glob(str(tmp_path / "signals_*"))] == ["SIGTERM\n"] * 2


@real_slurm
@pytest.mark.parametrize("setting, said", [("partition=bogus", "Invalid partition name specified"),
                                           ("gpus_per_job=1", "Invalid generic resource")])
def test_real_cluster_refuses_a_bad_partition_or_gpus_in_one_line(tmp_path, data_dir, setting,
                                                                  said):
  workdir = tmp_path / "sweep"
  done = run_launch("--config=experiments/ablation.py:quick", f"--workdir={workdir}",
                    f"--config.dataset.data_dir={data_dir}", "--config.sweep.launcher=slurm",
                    "--config.sweep.slurm.gpus_per_job=0", f"--config.sweep.slurm.{setting}",
                    "--noprogress")
  assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr[-3000:]
  assert done.stderr.startswith("error: sbatch refused the sweep's job array (")
  assert said in done.stderr and not workdir.exists()


@real_slurm
def test_real_cluster_without_sacct_the_launcher_follows_squeue(tmp_path, importable_tests,
                                                                  monkeypatch):
  """Where sacct does not answer (no accounting), jobs are followed through squeue."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sacct").write_text("#!/bin/sh\necho 'sacct: error: no accounting' >&2\nexit 1\n")
  (bin_dir / "sacct").chmod(stat.S_IRWXU)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  _, error = run_in_thread(launchers.run_slurm_workers, str(tmp_path / "sweep"), REAL,
                           worker_fn=slurm_workers.reports_cpus, poll_s=0.5, timeout=240)
  assert error is None and len(glob.glob(str(tmp_path / "sweep" / "cpus_*"))) == 2
