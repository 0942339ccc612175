"""The SLURM launcher for sweep workers: a job array through submitit (local processes are
`cnnlab.study.workers`).

Every worker runs the entry point the sweep passes down (`worker_fn(workdir)`): it trains the
cells of the sweep recorded in `<workdir>/sweep.json` whose `CellLock` it gets and returns when
all are done.
The launchers start workers, call `on_progress()` about every `poll_s` seconds while they run (the
caller refreshes its progress bar), and raise a `WorkerError` naming the logs of failed workers.

On a CPU every worker is pinned to one core and runs one XLA thread, whichever launcher starts it:
XLA:CPU sizes its thread pool from the cores a process may use, and the thread count changes the
low bits of the results. A SLURM job of `cpus_per_job` CPUs therefore runs that many workers (one
with all its CPUs when it has GPUs), so a sweep gives the same bits locally and on any cluster.

Worker output goes to log files, never to pipes: a pipe that is read only after the worker exits
fills up at 64 KB (one orbax disk-full error is longer) and both processes then wait forever.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import submitit
from submitit.core.utils import FailedJobError

from cnnlab.base.errors import ConfigError, Interrupted
from cnnlab.base.interrupts import interrupt_guard
from cnnlab.study.slurm_job import SweepWorker
from cnnlab.study.workers import WorkerError, failure

# Pins XLA's CPU backend to one intra-op thread (recorded as threads=1 in every result). Not
# the common recipe's extra `intra_op_parallelism_threads=1`: that is no XLA flag, and XLA stops
# reading XLA_FLAGS at it, so any flag after it was recorded but never applied.
CLUSTERS = ("slurm", "local")
# config.sweep.launcher: workers as local processes, or as a SLURM job array.
LAUNCHERS = ("local", "slurm")
# `config.sweep.slurm` settings and their defaults; "" leaves the cluster's default, mem_gb=0
# asks for MEM_GB_PER_CPU per CPU of the job.
SLURM_DEFAULTS = {"cluster": "slurm", "partition": "", "account": "", "qos": "",
                  "array_size": 4, "gpus_per_job": 1, "cpus_per_job": 4, "mem_gb": 0,
                  "time_limit_min": 240, "max_requeues": 3}
# A sweep worker's peak memory was 0.7 GB (the quick ablation; one worker per CPU): 2 GB per CPU
# leaves room and lets a node run several jobs (without --mem SLURM gives each the whole node's).
MEM_GB_PER_CPU = 2
# A job is sent SIGUSR2 this long before its time limit (submitit's --signal=USR2@90): its workers
# save checkpoints and it is requeued. SLURM sends it up to a minute late, so a limit under
# MIN_TIME_LIMIT_MIN would leave a job little or no time to train before it is warned.
SIGNAL_DELAY_S = 90
MIN_TIME_LIMIT_MIN = 5
# The signal submitit's SLURM job receives SIGNAL_DELAY_S before its time limit (or preemption).
# SLURM job states (sacct) of a job that has not ended yet: submitit's list.
UNFINISHED_STATES = ("READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING",
                     "PREEMPTED")
STOP_TIMEOUT_S = 120  # How long a cancelled sweep waits for its jobs to stop.


def slurm_settings(slurm: Mapping[str, Any]) -> dict[str, Any]:
  """`slurm` (e.g. `config.sweep.slurm`) over SLURM_DEFAULTS, checked; ConfigError names the
  first bad key."""
  unknown = sorted(set(slurm) - set(SLURM_DEFAULTS))
  if unknown:
    raise ConfigError(f"config.sweep.slurm.{unknown[0]} is not a setting; the settings are: "
                      f"{', '.join(SLURM_DEFAULTS)}.")
  settings = {**SLURM_DEFAULTS, **slurm}
  if settings["cluster"] not in CLUSTERS:
    raise ConfigError(f"config.sweep.slurm.cluster={settings['cluster']!r} is not allowed; "
                      f"choose one of: {', '.join(CLUSTERS)}.")
  for key, default in SLURM_DEFAULTS.items():
    value, least = settings[key], 1 if key in ("array_size", "cpus_per_job") else 0
    if isinstance(default, str) and not isinstance(value, str):
      raise ConfigError(f"config.sweep.slurm.{key}={value!r} must be a string.")
    if isinstance(default, int) and (type(value) is not int or value < least):
      raise ConfigError(f"config.sweep.slurm.{key}={value!r} must be an integer >= {least}.")
  if settings["time_limit_min"] < MIN_TIME_LIMIT_MIN:
    raise ConfigError(
        f"config.sweep.slurm.time_limit_min={settings['time_limit_min']} is too short: a job is "
        f"warned {SIGNAL_DELAY_S} s before its time limit (SLURM may be a minute late) to save "
        f"its runs and be requeued; use time_limit_min >= {MIN_TIME_LIMIT_MIN}.")
  return settings


def make_executor(folder: str, settings: Mapping[str, Any]):
  """A submitit executor for `slurm_settings(...)`: a SLURM array, or local processes."""
  if settings["cluster"] == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
    raise ConfigError("config.sweep.launcher=slurm needs SLURM's sbatch and srun, which are not "
                      "on PATH here: run the command on a login node of the cluster, or set "
                      "config.sweep.slurm.cluster=local to run the same job array here.")
  executor = submitit.AutoExecutor(folder=folder, cluster=settings["cluster"],
                                   slurm_max_num_timeout=settings["max_requeues"],
                                   local_max_num_timeout=settings["max_requeues"])
  optional = {"slurm_partition": settings["partition"], "slurm_account": settings["account"],
              "slurm_qos": settings["qos"]}
  executor.update_parameters(
      name="cnnlab-sweep", timeout_min=settings["time_limit_min"],
      gpus_per_node=settings["gpus_per_job"], cpus_per_task=settings["cpus_per_job"],
      mem_gb=job_mem_gb(settings),
      tasks_per_node=1, nodes=1, slurm_array_parallelism=settings["array_size"],
      slurm_signal_delay_s=SIGNAL_DELAY_S, **{k: v for k, v in optional.items() if v})
  return executor


def check_slurm_submission(workdir: str, slurm: Mapping[str, Any]) -> None:
  """Asks sbatch whether the cluster accepts the sweep's job array (`sbatch --test-only`: nothing
  is queued or written), so a bad partition, GPUs on a cluster without any, or more CPUs or
  memory than a node has end in one ConfigError quoting sbatch before the sweep writes anything.
  Nothing to check for `cluster="local"`."""
  settings = slurm_settings(slurm)
  if settings["cluster"] != "slurm":
    return
  executor = make_executor(os.path.join(workdir, "slurm"), settings)._executor
  from submitit.slurm.slurm import _make_sbatch_string  # The text map_array submits.
  script = _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder,
                               map_count=settings["array_size"], **executor.parameters)
  done = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True,
                        timeout=120)
  if done.returncode:
    raise _refused(done.stderr, settings)


def _refused(sbatch_stderr: str, settings: Mapping[str, Any]) -> ConfigError:
  said = " ".join(line.strip() for line in sbatch_stderr.splitlines() if line.strip())
  asked = [f"{k}={settings[k]!r}" for k in ("partition", "account", "qos") if settings[k]]
  asked += [f"gpus_per_job={settings['gpus_per_job']}", f"cpus_per_job={settings['cpus_per_job']}",
            f"mem_gb={settings['mem_gb']}" if settings["mem_gb"] else
            f"mem_gb=0 (= {job_mem_gb(settings)} GB)"]
  return ConfigError(f"sbatch refused the sweep's job array ({said or 'no message'}); it asked "
                     f"for {', '.join(asked)}: fix config.sweep.slurm.")


def job_mem_gb(settings: Mapping[str, Any]) -> int:
  """The memory a job asks for: `mem_gb`, or for 0 MEM_GB_PER_CPU per CPU of the job."""
  return settings["mem_gb"] or MEM_GB_PER_CPU * settings["cpus_per_job"]


def run_slurm_workers(workdir: str, slurm: Mapping[str, Any],
                      on_progress: Callable[[], None] | None = None, *,
                      worker_fn: Callable[[str], None],
                      poll_s: float = 10.0) -> None:
  """Submits a job array of `array_size` `SweepWorker` jobs, with logs in `<workdir>/slurm/`,
  and waits until SLURM says each has ended (a requeued job is waited for); raises WorkerError,
  one line, for jobs that did not complete (failed, cancelled, timed out, out of memory).
  `slurm["cluster"] = "local"` runs the same jobs on this machine.

  SIGTERM/SIGINT (Ctrl-C) to this process cancel the jobs (their workers save checkpoints),
  wait until they have stopped and raise `Interrupted`; a sbatch that refuses the array raises
  ConfigError quoting it, and leaves nothing of the submission behind."""
  settings = slurm_settings(slurm)
  with interrupt_guard() as interrupt:
    jobs = _submit(workdir, settings, worker_fn)
    states = _states(jobs)
    while any(s in UNFINISHED_STATES for s in states) and not interrupt["signal"]:
      if on_progress:
        on_progress()
      deadline = time.monotonic() + poll_s
      while time.monotonic() < deadline and not interrupt["signal"]:
        time.sleep(min(0.1, poll_s))
      states = _states(jobs)
    if interrupt["signal"]:
      raise Interrupted(f"interrupted by {interrupt['signal']}: {_cancel(jobs)}; rerun the same "
                        f"command to resume.")
  if on_progress:
    on_progress()
  failed = [(job, state) for job, state in zip(jobs, states) if not _succeeded(job, state)]
  if failed:
    job, state = failed[0]
    first = failure(str(job.paths.stderr), f"job {job.job_id} {_outcome(job, state, settings)}")
    others = "".join(f"; job {j.job_id}: {s}" for j, s in failed[1:])
    raise WorkerError(f"{len(failed)} of {len(jobs)} sweep jobs did not complete: {first}{others}"
                      f"; rerun the same command to resume.")


def _submit(workdir: str, settings: Mapping[str, Any], worker_fn) -> list:
  """The submitted jobs of the array; ConfigError quoting sbatch if it refuses them, after
  removing the files the attempt wrote (pickles, submission script)."""
  folder = os.path.join(workdir, "slurm")
  before = set(os.listdir(folder)) if os.path.isdir(folder) else None
  executor = make_executor(folder, settings)
  try:
    with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error itself.
      return executor.map_array(SweepWorker(worker_fn, settings),
                                [workdir] * settings["array_size"])
  except FailedJobError as e:
    if before is None:
      shutil.rmtree(folder, ignore_errors=True)
    else:
      for name in set(os.listdir(folder)) - before:
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    raise _refused(str(e), settings) from None


def _states(jobs: list) -> list[str]:
  """Each job's state: SLURM's (one `sacct` for the array), or where sacct knows none of them
  (no accounting, or not yet) squeue's, and ENDED for a job squeue no longer lists; UNKNOWN while
  neither answers. For submitit's local jobs: RUNNING, FINISHED or INTERRUPTED."""
  if not isinstance(jobs[0], submitit.SlurmJob):
    return [job.state for job in jobs]
  array_id, watcher = jobs[0].job_id.split("_")[0], jobs[0].watcher
  info, ended = _ask(["sacct", "-X", "-P", "-o", "JobID,State", "-j", array_id]), "UNKNOWN"
  if info:
    info = watcher.read_info(info)
  else:
    listed = _ask(["squeue", "-h", "-o", "%i|%T", "-j", array_id])
    if listed is not None:  # An ended job is no longer listed, or its id no longer known.
      info, ended = watcher.read_info(f"JobID|State\n{listed}"), "ENDED"
  return [((info or {}).get(job.job_id, {}).get("State") or ended).split()[0] for job in jobs]


def _ask(command: list[str]) -> str | None:
  """`command`'s output; "" for an unknown job id, None if it failed otherwise."""
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError):
    return None
  if done.returncode:
    return "" if "Invalid job id" in done.stderr else None
  return done.stdout


def _succeeded(job, state: str) -> bool:
  return (state in ("COMPLETED", "FINISHED", "ENDED") and job.paths.result_pickle.exists()
          and job.exception() is None)


def _outcome(job, state: str, settings: Mapping[str, Any]) -> str:
  """How a job that did not complete ended, and what to change where that is a setting."""
  if state == "TIMEOUT":
    return (f"reached its time limit (state TIMEOUT); raise config.sweep.slurm.time_limit_min "
            f"(now {settings['time_limit_min']})")
  if state == "OUT_OF_MEMORY":
    return (f"ran out of memory (state OUT_OF_MEMORY); raise config.sweep.slurm.mem_gb (now "
            f"{job_mem_gb(settings)} GB)")
  if state == "CANCELLED":
    return "was cancelled (state CANCELLED)"
  return "failed" if state in ("COMPLETED", "FINISHED") else f"failed (state {state})"


def _cancel(jobs: list) -> str:
  """Cancels the jobs and waits, up to STOP_TIMEOUT_S, until none runs; says what happened."""
  slurm = isinstance(jobs[0], submitit.SlurmJob)
  array_id = jobs[0].job_id.split("_")[0]
  if slurm:
    subprocess.run(["scancel", array_id], capture_output=True, timeout=60)
  else:  # SIGTERM to each local job's controller, which passes it on (job.cancel's SIGINT
    for job in jobs:  # would print its KeyboardInterrupt traceback and SIGKILL the job 1 s later).
      with contextlib.suppress(ProcessLookupError):
        os.kill(int(job.job_id), signal.SIGTERM)
  deadline = time.monotonic() + STOP_TIMEOUT_S
  while time.monotonic() < deadline:
    if slurm:
      listed = subprocess.run(["squeue", "-h", "-j", array_id, "-o", "%i"], capture_output=True,
                              text=True, timeout=60)
      running = listed.returncode == 0 and listed.stdout.strip()
    else:
      running = any(job.state == "RUNNING" for job in jobs)
    if not running:
      what = f"SLURM job array {array_id}" if slurm else f"{len(jobs)} jobs"
      return (f"cancelled the sweep's {what}, whose workers saved checkpoints of the runs they "
              f"were training and stopped")
    time.sleep(0.5)
  return (f"cancelled the sweep's jobs, but they had not stopped {STOP_TIMEOUT_S} s later "
          f"(see squeue)")
