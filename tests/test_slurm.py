"""The SLURM launcher: refused submissions and settings. Most run with stand-in SLURM commands;
those marked `real_slurm` run only where `sbatch` exists, against a real cluster (e.g.
`../shared/tools/slurm-one-node/`: one node, no GPUs)."""

import os
import shutil
import stat

import pytest

from cnnlab import launchers, supervisor
from cnnlab.errors import ConfigError
from conftest import run_launch

real_slurm = pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs a SLURM cluster")


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
    launchers.run_slurm_workers(str(tmp_path), {"partition": "bogus", "gpus_per_job": 0})
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
