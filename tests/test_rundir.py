"""Workdir integrity: a finished run proves it is this config's, failed writes are one line and
leave a workdir that resumes exactly."""

import contextlib
import copy
import errno
import json
import os
import re
import shutil
import subprocess

import ml_collections
import orbax.checkpoint as ocp
import pytest

from cnnlab.base import errors, files
from cnnlab.study import grid, sweep
from cnnlab.training import loop, rundir
from cnnlab.training.rundir import RunDir

_TRAINED = {}  # One finished run per test module; each test works on its own copy.


def numbers_of(results):
  return {k: v for k, v in results.items() if k != "wall_time_s"}


@pytest.fixture
def trained(tiny_config, tmp_path_factory, tmp_path):
  """(config, workdir, results): a copy of a finished 1-epoch run of `tiny_config`."""
  tiny_config.num_epochs = 1
  if not _TRAINED:
    path = str(tmp_path_factory.mktemp("trained") / "run")
    _TRAINED.update(path=path, results=loop.train_and_evaluate(tiny_config, path,
                                                               progress=False))
  workdir = str(tmp_path / "run")
  shutil.copytree(_TRAINED["path"], workdir)
  return tiny_config, workdir, _TRAINED["results"]


def other(config, **changes):
  config = copy.deepcopy(config)
  for dotted, value in changes.items():
    section, _, field = dotted.rpartition("__")
    (config[section] if section else config)[field] = value
  return config


@pytest.mark.parametrize("damage, proof", [
    ("delete config.json", r"different config \(fingerprint \w+ in its checkpoint \d+"),
    ("garble config.json", r"different config \(fingerprint \w+ in its checkpoint \d+"),
    ("keep only results.json", r"results.json belongs to a run of a different config or seed"),
])
def test_another_configs_results_are_refused_when_config_json_is_lost(trained, damage, proof):
  """Issue 13.1: a run of the default config in a workdir holding a finished dropout run whose
  config.json is lost or garbled got the dropout run's results, with exit status 0."""
  config, workdir, results = trained
  run = RunDir(workdir)
  if damage == "garble config.json":
    with open(run.config_path, "w") as f:
      f.write('{"fingerprint": ')
  else:
    os.remove(run.config_path)
  if damage == "keep only results.json":
    shutil.rmtree(run.checkpoint_dir)
  with pytest.raises(errors.CheckpointError, match=proof):
    loop.train_and_evaluate(other(config, model__dropout="none"), workdir, progress=False)
  # The run's own config still gets its results, and config.json is written again.
  assert loop.train_and_evaluate(config, workdir, progress=False) == results
  assert files.read_json(run.config_path)["fingerprint"] == rundir.fingerprint(config)


def test_results_json_must_carry_this_configs_fingerprint_seed_and_digest(tiny_config, tmp_path):
  run = RunDir(str(tmp_path))
  assert run.finished_result(tiny_config) is None
  mine = {"test_accuracy": 0.5, "seed": tiny_config.seed,
          "config_fingerprint": rundir.fingerprint(tiny_config)}
  run.write_results(mine)
  assert run.finished_result(tiny_config) == mine == run.read_results()

  seed_1 = other(tiny_config, seed=1)
  for swapped in ({**mine, "seed": 1}, {**mine, "config_fingerprint": rundir.fingerprint(seed_1)}):
    run.write_results(swapped)  # Self-consistent, but another run's.
    with pytest.raises(errors.CheckpointError, match="results.json belongs to a run of a"):
      run.finished_result(tiny_config)

  run.write_results(mine)
  edited = files.read_json(run.results_path)
  edited["test_accuracy"] = 0.9
  files.write_json_atomic(run.results_path, edited)
  with pytest.raises(errors.CheckpointError, match="results.json does not match .*results.sha256"):
    run.finished_result(tiny_config)
  with open(run.results_path, "w") as f:
    f.write('{"test_accuracy": 0.')
  with pytest.raises(errors.CheckpointError, match="results.json cannot be read"):
    run.finished_result(tiny_config)


def test_claim_asks_the_newest_checkpoint_when_config_json_is_lost(trained):
  config, workdir, _ = trained
  run = RunDir(workdir)
  os.remove(run.results_path)
  os.remove(run.config_path)
  newest = max(int(n) for n in os.listdir(run.checkpoint_dir) if n.isdigit())
  with pytest.raises(errors.CheckpointError, match=f"in its checkpoint {newest}, this config"):
    run.claim(other(config, model__dropout="none"))
  assert not os.path.exists(run.config_path)
  run.claim(config)
  assert files.read_json(run.config_path)["fingerprint"] == rundir.fingerprint(config)


def test_a_checkpoint_renamed_to_a_later_step_is_set_aside_and_the_steps_are_trained(
    trained, tmp_path, caplog):
  """Issue 22: with checkpoints/40 renamed to checkpoints/44 in a killed run, the rerun "resumed
  from step 44", never trained steps 40-43 and wrote results with another params_sha256."""
  config, _, reference = trained
  config.checkpoint_every_steps, config.checkpoints_to_keep = 10, 3  # Not fingerprinted.
  workdir = str(tmp_path / "renamed")
  loop.train_and_evaluate(config, workdir, progress=False)
  run = RunDir(workdir)
  steps = sorted(int(n) for n in os.listdir(run.checkpoint_dir) if n.isdigit())
  assert steps == [30, 40, 44]
  for path in (run.results_path, run.results_digest_path):  # Killed before step 44...
    os.remove(path)
  shutil.rmtree(os.path.join(run.checkpoint_dir, "44"))
  os.rename(os.path.join(run.checkpoint_dir, "40"), os.path.join(run.checkpoint_dir, "44"))
  caplog.clear()
  assert numbers_of(loop.train_and_evaluate(config, workdir, progress=False)) == numbers_of(
      reference)
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
      f"checkpoint {run.checkpoint_dir}/44 cannot be restored (it holds step 40, not 44: renamed "
      f"or copied from another step); resuming from step 30, the newest intact one (set aside as "
      f"{run.checkpoint_dir}/44.corrupt)."]


def write_config_json_of(config, workdir):
  """config.json as a run of `config` writes it (another run's, copied over)."""
  files.write_json_atomic(os.path.join(workdir, "config.json"), {
      "fingerprint": rundir.fingerprint(config), "config": rundir.config_to_dict(config),
      "overrides": [], "command": ""})


@pytest.mark.parametrize("damage", ["seed_1 config.json", "other config.json", "metrics line"])
def test_a_finished_workdir_is_checked_whole(trained, damage):
  """Issue 22: a finished run (and a finished sweep seed: grid.finished) took another config's
  or seed's config.json, or a garbage line in metrics.jsonl, and reported its results."""
  config, workdir, _ = trained
  run = RunDir(workdir)
  if damage == "metrics line":
    with open(run.metrics_path, "ab") as f:
      f.write(b"garbage\n")
    fragment = r"metrics.jsonl line \d+ is not a metrics record \(b'garbage'\)"
  else:
    write_config_json_of(other(config, **({"seed": 1} if damage.startswith("seed") else
                                          {"model__dropout": "none"})), workdir)
    fragment = (r"config.json records another config \(fingerprint \w+\) than the run's "
                r"results.json \(\w+\): it was replaced or edited; put back the run's own")
  for check in (lambda: grid.finished(workdir, config),
                lambda: sweep.run(config, workdir, progress=False)):
    with pytest.raises(errors.CheckpointError, match=fragment):
      check()


def no_space(*_args, **_kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("write", ["log", "truncate_metrics", "write_results"])
def test_a_full_disk_is_one_line_and_leaves_files_as_they_were(tmp_path, monkeypatch, write):
  run = RunDir(str(tmp_path))
  run.log({"step": 1, "split": "train", "loss": 1.0})
  run.write_results({"seed": 0})
  before = {name: open(tmp_path / name, "rb").read() for name in os.listdir(tmp_path)}
  real_write = os.write

  def half_then_full(fd, data):  # A real partial write, then ENOSPC: no half line may stay.
    monkeypatch.setattr(os, "write", no_space)
    return real_write(fd, bytes(data[:len(data) // 2]))

  monkeypatch.setattr(os, "write", half_then_full)
  monkeypatch.setattr(os, "fsync", no_space)  # The atomic rewrites fail at fsync.
  with pytest.raises(errors.WorkdirError) as info:
    {"log": lambda: run.log({"step": 2, "split": "train", "loss": 0.5}),
     "truncate_metrics": lambda: run.truncate_metrics(after_step=0),
     "write_results": lambda: run.write_results({"seed": 1})}[write]()
  path = run.results_digest_path if write == "write_results" else run.metrics_path
  assert str(info.value) == (
      f"cannot write {path} (No space left on device); free space on the disk holding {path} "
      f"or use another --workdir; then rerun the same command to resume from step 0.")
  after = {name: open(tmp_path / name, "rb").read() for name in os.listdir(tmp_path)}
  assert after == before  # No stray temporary file, no partial line.


TENSORSTORE_ENOSPC = ValueError(
    "RESOURCE_EXHAUSTED: Error writing local file \"manifest.ocdbt\": No space left on device "
    "[os_error_code='28']")  # The form orbax raised on a real full tmpfs.


def test_disk_full_mid_training_then_rerun_resumes_exactly(trained, tmp_path, monkeypatch):
  config, _, reference = trained
  workdir = str(tmp_path / "full")
  real_save = ocp.CheckpointManager.save

  def fills_at_40(manager, step, *args, **kwargs):
    if step == 40:
      raise TENSORSTORE_ENOSPC
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", fills_at_40)
  with pytest.raises(errors.WorkdirError, match=r"checkpoints/40 \(No space left on device\); "
                     r"free space .* resume from step 20\.$"):
    loop.train_and_evaluate(config, workdir, progress=False)
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  assert numbers_of(loop.train_and_evaluate(config, workdir, progress=False)) == numbers_of(
      reference)


@contextlib.contextmanager
def read_only(path: str):
  """Makes `path` and everything in it really read-only: `chattr +i` as root (root ignores
  permission bits), `chmod a-w` otherwise."""
  if os.geteuid() == 0:
    subprocess.run(["chattr", "-R", "+i", path], check=True)
    undo = ["chattr", "-R", "-i", path]
  else:
    subprocess.run(["chmod", "-R", "a-w", path], check=True)
    undo = ["chmod", "-R", "u+w", path]
  try:
    yield
  finally:
    subprocess.run(undo, check=True)


def test_read_only_workdir_is_one_line_and_reruns_exactly_once_writable(trained):
  config, workdir, reference = trained
  os.remove(os.path.join(workdir, "results.json"))  # Left to do: evaluate and write results.
  listing = sorted(os.listdir(workdir))
  with read_only(workdir):
    with pytest.raises(errors.WorkdirError) as info:
      loop.train_and_evaluate(config, workdir, progress=False)
    assert sorted(os.listdir(workdir)) == listing
  message = str(info.value)
  assert message.startswith(f"cannot write {os.path.join(workdir, 'config.json')} (")
  assert f"make {workdir} writable or use another --workdir" in message
  assert numbers_of(loop.train_and_evaluate(config, workdir, progress=False)) == numbers_of(
      reference)


def test_fingerprint_covers_only_the_model_fields_its_architecture_reads():
  from conftest import load_config

  from cnnlab.training import rundir
  config = load_config("experiments/default.py")  # LeNet-5.
  before = rundir.fingerprint(config)
  config.model.hidden = (3,)       # An MLP field.
  config.model.stages = ((1,),)    # A vgg_cnn field.
  assert rundir.fingerprint(config) == before
  config.model.dropout = "spatial"  # Every architecture reads the block options.
  assert rundir.fingerprint(config) != before
  config.model.name = "vgg_cnn"
  with_stages = rundir.fingerprint(config)
  config.model.stages = ((2,),)
  assert rundir.fingerprint(config) != with_stages


def test_a_run_saved_before_xla_cpu_vector_width_existed_resumes_when_given_its_value(tmp_path):
  # Runs saved before the field existed ran with XLA's default width, 256: at that value the
  # field is left out of the fingerprint, and the refusal names the value that resumes them.
  from conftest import load_config
  config = load_config("experiments/default.py")
  saved = rundir.config_to_dict(config)
  del saved["xla_cpu_vector_width"]
  older = rundir.fingerprint(ml_collections.ConfigDict(saved))
  assert config.xla_cpu_vector_width == 512 and rundir.fingerprint(config) != older
  assert rundir.fingerprint(other(config, xla_cpu_vector_width=256)) == older
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump({"fingerprint": older, "config": saved}, f)
  keys = RunDir(str(tmp_path))._differing_keys(config)
  assert keys == ("xla_cpu_vector_width (the saved run predates it and ran with 256: "
                  "--config.xla_cpu_vector_width=256 resumes it)")


def test_a_damaged_metrics_line_is_refused_but_a_line_cut_by_a_kill_is_skipped(tmp_path):
  """A garbled line inside metrics.jsonl was skipped silently, so a learning curve and its steps
  to target could lose an epoch unseen; only the last line, which a kill can cut short, may be
  incomplete."""
  run = RunDir(str(tmp_path))
  for step in (10, 20, 30):
    run.log({"step": step, "split": "train", "loss": 1.0 / step})
  with open(run.metrics_path, "ab") as f:
    f.write(b'{"step": 40, "split": "tr')  # A kill in the middle of an append.
  assert [r["step"] for r in run.read_metrics()] == [10, 20, 30]
  whole = open(run.metrics_path, "rb").read()
  for damaged, line in ((whole.replace(b'{"loss": 0.05', b'{"loss": 0.0#', 1), 2),
                        (whole.replace(b'{"loss": 0.1,', b'3\n{"loss": 0.1,', 1), 1)):
    with open(run.metrics_path, "wb") as f:
      f.write(damaged)
    with pytest.raises(errors.CheckpointError,
                       match=rf"{re.escape(run.metrics_path)} line {line} is not a metrics record "
                             rf".*damaged or edited.*Delete {re.escape(str(tmp_path))} to train "
                             r"the run again"):
      run.read_metrics()
