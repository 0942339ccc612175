"""Stand-ins for `cnnlab.study.sweep.worker_main` that SLURM and submitit jobs run in tests
(tests/test_slurm.py). Light on purpose: every job and worker process imports this module.

Each leaves files in the workdir named after its job (submitit's local job id, or SLURM's array
job and task) and pid, so a test can see which ran, what signals reached them, and signal them.
"""

import os
import signal
import sys
import time

RUNS = 200  # "Runs" of STEP_S each: long enough to be signalled, short enough to end by itself.
STEP_S = 0.1


def job_name() -> str:
  env = os.environ
  if "SLURM_ARRAY_JOB_ID" in env:
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
  return env.get("SLURM_JOB_ID") or env["SUBMITIT_LOCAL_JOB_ID"]


def _mark(workdir: str, kind: str, text: str = "") -> str:
  path = os.path.join(workdir, f"{kind}_{job_name()}_{os.getpid()}")
  with open(path, "a") as f:
    f.write(text)
  return path


def between_runs(workdir: str) -> None:
  """Trains RUNS short runs with no signal handler, as a sweep worker is between two runs (each
  run is checkpointed when it ends): SIGTERM ends it at once, losing nothing. Writes its parent's
  pid (the job's process) into `up_*` and one line per run into `runs_*`."""
  _mark(workdir, "up", str(os.getppid()))
  for i in range(RUNS):
    time.sleep(STEP_S)
    _mark(workdir, "runs", f"{i}\n")


def saves_on_sigterm(workdir: str) -> None:
  """Trains until SIGTERM, which it records (`signals_*`) and answers like cnnlab's loop: a
  checkpoint, exit 130. Started again for the same job (a requeue), it finishes at once
  (`done_*`)."""
  if any(n.startswith(f"up_{job_name()}_") for n in os.listdir(workdir)):
    _mark(workdir, "done")
    return

  def handler(signum, frame):
    _mark(workdir, "signals", signal.Signals(signum).name + "\n")
    time.sleep(0.5)  # Room for a second signal to arrive, if one is sent.
    sys.exit(130)
  signal.signal(signal.SIGTERM, handler)
  signal.signal(signal.SIGINT, handler)
  _mark(workdir, "up", str(os.getppid()))
  while True:
    time.sleep(0.05)


def reports_cpus(workdir: str) -> None:
  """Records the CPUs it may use and its XLA_FLAGS."""
  _mark(workdir, "cpus", f"{sorted(os.sched_getaffinity(0))}|{os.environ.get('XLA_FLAGS', '')}")
