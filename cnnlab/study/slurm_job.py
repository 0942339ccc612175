"""What runs inside one job of a sweep's SLURM array (`launchers.run_slurm_workers`): the
`SweepWorker` that submitit starts in each job.

A job is a small supervisor: it runs its sweep workers as `launchers.run_local_workers` does
(one pinned single-threaded worker per CPU, so results do not depend on the cluster's CPU
binding; one worker with every CPU when the job has a GPU) and turns SLURM's signals into one
SIGTERM per worker, on which each saves a checkpoint and stops. The warning SLURM sends before the
time limit (or a preemption) then requeues the job; any other signal (scancel, a requeue) ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from cnnlab.base.errors import CnnlabError, Interrupted
from cnnlab.study.workers import (
  REQUEUE_SIGNAL,
  WorkerError,
  function_command,
  pinned,
  run_local_workers,
)

SENTINEL_WAIT_S = 1.0  # How long after a job's signal its sentinel may take to end (_sentinel).


def job_cpu_sets(cpus_per_job: int, one_worker: bool, task_index: int) -> list[list[int]]:
  """The CPUs of each worker of a job: one single-threaded worker per CPU, or `one_worker` with
  all of them (a job with a GPU). Under a cluster that binds jobs to their CPUs these are the
  cores this process may use; under one that does not (task/none) each array task takes its own
  `cpus_per_job` of them in turn, so that the jobs of one node do not share cores. Never more
  workers than cores (submitit's local jobs all see this machine's)."""
  allowed = sorted(os.sched_getaffinity(0))
  count = min(cpus_per_job, len(allowed))
  start = task_index * count if len(allowed) > count else 0
  cpus = [allowed[(start + i) % len(allowed)] for i in range(count)]
  return [cpus] if one_worker else [[c] for c in cpus]


def _accelerated() -> bool:
  """Whether JAX finds a GPU or TPU here (asked in a subprocess: a job's supervisor must not
  hold the device its worker will use)."""
  code = "import jax; print(jax.default_backend())"
  try:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
  except (OSError, subprocess.SubprocessError):
    return False
  return done.stdout.strip() not in ("", "cpu")


def _sentinel(cpus: Sequence[int]) -> subprocess.Popen:
  """An idle process started as the workers are. SLURM signals every process of a job under some
  clusters' process tracking (linuxproc) and only the job's own under others (cgroup, pgid):
  whether a signal reached this one says whether it reached the workers, which must not get a
  second one (it would stop them before their checkpoints)."""
  return subprocess.Popen(
      pinned(cpus, [sys.executable, "-c", "import signal; signal.pause()"]),
      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      start_new_session=True)


def _ended_within(process: subprocess.Popen, seconds: float) -> bool:
  try:
    process.wait(seconds)
    return True
  except subprocess.TimeoutExpired:
    return False


class SweepWorker(submitit.helpers.Checkpointable):
  """One job of the array: runs `worker_fn(workdir)` in the workers of `job_cpu_sets`, with
  their logs in `<workdir>/slurm/<job id>_worker_<i>.log`. SLURM's warning before the time limit
  (or a preemption) stops the workers at a checkpoint, then the job is requeued with the same
  argument and resumes (cells are locked, runs restore their checkpoints); any other signal stops
  the job the same way, for good."""

  def __init__(self, worker_fn: Callable[[str], None], settings: Mapping[str, Any]):
    self.worker_fn = worker_fn
    self.settings = dict(settings)

  def __call__(self, workdir: str) -> None:
    env = submitit.JobEnvironment()
    job_id, cpus = env.job_id, self.settings["cpus_per_job"]
    one_worker = self.settings["gpus_per_job"] > 0 and _accelerated()
    cpu_sets = job_cpu_sets(cpus, one_worker, int(env.array_task_id or 0))
    warned = {}
    requeue = signal.getsignal(REQUEUE_SIGNAL)  # submitit's: checkpoint and requeue.
    signal.signal(REQUEUE_SIGNAL, lambda *_: warned.setdefault("signal", REQUEUE_SIGNAL.name))
    print(f"job {job_id}: {len(cpu_sets)} worker(s) on CPUs {cpu_sets} (this job may use "
          f"{sorted(os.sched_getaffinity(0))}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")  # A requeued job's logs are new ones.
    attempt = "" if restart == "0" else f"_restart{restart}"
    logs = [os.path.join(workdir, "slurm", f"{job_id}{attempt}_worker_{i}.log")
            for i in range(len(cpu_sets))]
    sentinel = _sentinel(cpu_sets[0])
    try:
      run_local_workers(workdir, len(cpu_sets), command=function_command(self.worker_fn, workdir),
                        cpu_sets=cpu_sets, log_paths=logs, stop=lambda: warned.get("signal"),
                        signalled_too=lambda: _ended_within(sentinel, SENTINEL_WAIT_S))
    except CnnlabError as e:
      if isinstance(e, Interrupted) and warned and callable(requeue):
        try:
          requeue(REQUEUE_SIGNAL, None)  # Requeues the job and exits, or raises:
        except UncompletedJobError as not_requeued:
          e = WorkerError(self._not_requeued(str(not_requeued)))
      # The one line the launcher quotes; the job's state (sacct) says how it ended.
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(getattr(e, "exit_code", 2))
    finally:
      sentinel.kill()
      sentinel.wait()

  def _not_requeued(self, reason: str) -> str:
    if "timed-out too many times" not in reason:
      return reason
    return (f"the job reached its time limit (config.sweep.slurm.time_limit_min="
            f"{self.settings['time_limit_min']}) more than max_requeues="
            f"{self.settings['max_requeues']} times; raise time_limit_min (or max_requeues), "
            f"then rerun the same command to resume.")
