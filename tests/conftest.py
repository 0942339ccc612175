"""Shared fixtures: one prepared-data directory per test session, and tiny fast configs."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_jax_under_the_default_numerics() -> None:
  """In-process tests, the PyTorch parity tests above all, run under the XLA flags and precision
  a default config gives a training process (`environment.apply_numerics`), so CI checks the
  numerics users run. XLA reads XLA_FLAGS once, when its backend starts; the variable is then
  restored, so subprocess tests start from this shell's environment, as a user's command does."""
  from cnnlab import configs
  from cnnlab.base import environment
  environment.apply_numerics(configs.base_config())
  import jax
  jax.devices()
  if SHELL_XLA_FLAGS is None:
    os.environ.pop("XLA_FLAGS", None)
  else:
    os.environ["XLA_FLAGS"] = SHELL_XLA_FLAGS


SHELL_XLA_FLAGS = os.environ.get("XLA_FLAGS")
_start_jax_under_the_default_numerics()


def load_config(path: str, arg: str | None = None):
  """Calls `get_config(arg)` of an experiment file, as `--config=path[:arg]` would."""
  spec = importlib.util.spec_from_file_location("experiment_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_stay_in_the_session(tmp_path_factory):
  """Processes the tests start keep their temporary files (e.g. the log a multi-process run's
  failed process names) in the session's folder, which pytest removes, not in /tmp."""
  os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session, so each bundled dataset is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_config(data_dir):
  """The default config shrunk to seconds: digits (8x8), a small VGG-style CNN, 2 epochs."""
  config = load_config("experiments/default.py")
  config.dataset.name = "digits"
  config.dataset.data_dir = data_dir
  config.model.name = "vgg_cnn"
  config.model.stages = ((8,), (16,))
  config.model.bn_placement = "before_act"
  config.model.dropout = "spatial"
  config.model.dropout_rate = 0.2
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_epochs = 2
  config.log_every_steps = 10
  config.checkpoint_every_steps = 20
  return config


def run_launch(*args, timeout=300):
  """Runs `python launch.py ARGS` in a subprocess; returns the CompletedProcess."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


def wait_for_checkpoint(workdir: str, at_least: int, proc, timeout: float = 300) -> None:
  """Waits until `workdir` holds a checkpoint of step >= `at_least` while `proc` still runs
  (AssertionError if it ended first: the run is too short to be interrupted)."""
  import time
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(
        ckpt_dir) else []
    if steps and max(steps) >= at_least:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be interrupted; make it longer"


def finished_runs(folder) -> list[str]:
  """The results.json of every finished run under `folder`, sorted (none while it is absent)."""
  return sorted(os.path.join(root, "results.json") for root, _, files in os.walk(folder)
                if "results.json" in files)


def wait_for_finished_runs(folder, at_least: int, proc, timeout: float = 300) -> None:
  """Waits until `at_least` runs under `folder` have finished while `proc` still runs
  (AssertionError if it ended first: the sweep is too short to be interrupted)."""
  import time
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and len(finished_runs(folder)) < at_least:
    time.sleep(0.05)
  assert proc.poll() is None, "the sweep ended before it could be interrupted; make it longer"
