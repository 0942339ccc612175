"""Checkpoint integrity: digests refuse flipped bits, restore_latest falls back to an intact
checkpoint, failed writes are one WorkdirError line, orbax stays quiet."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT

from cnnlab.base import digests, errors
from cnnlab.training import checkpoint
from cnnlab.training.checkpoint import Checkpointer

# Random bits are incompressible, so orbax stores them verbatim, in a data file that tensorstore
# reads without a checksum of its own (small arrays sit in checksummed index nodes instead).
MARKER = np.random.default_rng(0).integers(-2**31, 2**31 - 1, 1024, dtype=np.int32)


def small_state(step: int) -> dict:
  return {"step": np.array(step, np.int32),
          "params": {"w": np.roll(MARKER, step), "b": np.full(3, step, np.int32)}}


def saved(tmp_path, steps=(1, 2)):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=len(steps))
  for step in steps:
    ckpt.save(step, small_state(step), {"data_iterator": {"epoch": step}})
  return ckpt


def flip_one_bit_of(directory: str, array: np.ndarray) -> list[str]:
  """Flips one bit of `array`'s bytes wherever they lie in a file under `directory` (orbax may
  keep a per-process copy besides the merged one); returns those files."""
  needle, flipped = array.tobytes(), []
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      blob = bytearray(open(path, "rb").read())
      at = blob.find(needle)
      if at >= 0:
        blob[at + 17] ^= 0x08
        open(path, "wb").write(bytes(blob))
        flipped.append(path)
  assert flipped, f"the array's bytes were not found under {directory}"
  return flipped


def test_save_restore_round_trip_returns_progress_as_given(tmp_path):
  ckpt = saved(tmp_path)
  state, progress = ckpt.restore(2, small_state(0))
  np.testing.assert_array_equal(state["params"]["w"], np.roll(MARKER, 2))
  assert progress == {"data_iterator": {"epoch": 2}}


def test_flipped_bit_is_refused_and_restore_latest_falls_back_with_one_line(tmp_path, caplog):
  ckpt = saved(tmp_path)
  flip_one_bit_of(os.path.join(ckpt.directory, "2"), np.roll(MARKER, 2))
  with pytest.raises(errors.CheckpointError, match=r"checkpoints/2 cannot be restored \(1 array"):
    ckpt.restore(2, small_state(0))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    step, state, progress = ckpt.restore_latest(small_state(0))
  assert step == 1 and progress == {"data_iterator": {"epoch": 1}}
  np.testing.assert_array_equal(state["params"]["w"], np.roll(MARKER, 1))
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and "resuming from step 1" in lines[0] and "['params']['w']" in lines[0]
  # The corrupt one is set aside, so training can write step 2 again.
  assert ckpt.all_steps() == [1]
  assert os.path.isdir(os.path.join(ckpt.directory, "2.corrupt"))
  ckpt.save(2, small_state(2), {})
  assert ckpt.restore_latest(small_state(0))[0] == 2


@pytest.mark.parametrize("recorded", [True, False])
def test_a_checkpoint_renamed_to_another_step_is_set_aside_as_corrupt(tmp_path, caplog, recorded):
  """The step is read from inside: the progress record names it (digested), and a checkpoint
  saved before records named it is checked against its state's `step` array."""
  ckpt = saved(tmp_path, steps=(1, 2))
  if not recorded:  # As saved before cnnlab recorded the step.
    record = os.path.join(ckpt.directory, "2", *checkpoint.PROGRESS_FILE)
    old = json.load(open(record))
    del old[checkpoint.STEP_KEY], old[checkpoint.RECORD_DIGEST_KEY]
    old[checkpoint.RECORD_DIGEST_KEY] = digests.json_sha256(old)
    json.dump(old, open(record, "w"))
  os.rename(os.path.join(ckpt.directory, "2"), os.path.join(ckpt.directory, "5"))
  with pytest.raises(errors.CheckpointError, match=r"holds step 2, not 5: renamed or copied"):
    Checkpointer(ckpt.directory).restore(5, small_state(0))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    step, _, _ = Checkpointer(ckpt.directory).restore_latest(small_state(0))
  assert step == 1
  assert [r.getMessage() for r in caplog.records] == [
      f"checkpoint {ckpt.directory}/5 cannot be restored (it holds step 2, not 5: renamed or "
      f"copied from another step); resuming from step 1, the newest intact one (set aside as "
      f"{ckpt.directory}/5.corrupt)."]


def test_garbled_progress_record_is_refused(tmp_path):
  ckpt = saved(tmp_path, steps=(1,))
  record = os.path.join(ckpt.directory, "1", "progress", "metadata")
  text = open(record).read()
  open(record, "w").write(text.replace('"epoch": 1', '"epoch": 7'))
  with pytest.raises(errors.CheckpointError, match="progress record does not match its sha256"):
    ckpt.restore(1, small_state(0))


def test_newest_progress_reads_the_newest_intact_record_from_its_file(tmp_path):
  ckpt = saved(tmp_path)
  assert checkpoint.newest_progress(ckpt.directory)[0] == 2
  record = os.path.join(ckpt.directory, "2", *checkpoint.PROGRESS_FILE)
  open(record, "w").write(open(record).read().replace('"epoch": 2', '"epoch": 7'))
  step, progress = checkpoint.newest_progress(ckpt.directory)
  assert step == 1 and progress["data_iterator"] == {"epoch": 1}


def test_every_checkpoint_garbage_is_one_error_and_orbax_logs_nothing(tmp_path, caplog):
  directory = saved(tmp_path).directory
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      open(path, "wb").write(os.urandom(max(64, os.path.getsize(path))))
  caplog.clear()
  with caplog.at_level(logging.DEBUG):
    ckpt = Checkpointer(directory)
    with pytest.raises(errors.CheckpointError) as info:
      ckpt.restore_latest(small_state(0))
  assert f"no checkpoint in {directory} can be restored (steps 2, 1" in str(info.value)
  assert "\n" not in str(info.value)
  assert [r.getMessage() for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname] == []


def test_quiet_orbax_drops_only_the_noise_of_orbax_failures(monkeypatch, caplog):
  """A real full disk (tmpfs) made orbax's I/O threads report "Event loop is closed" and asyncio
  log "Future exception was never retrieved" once per array; nothing else is dropped."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  with caplog.at_level(logging.INFO), checkpoint._quiet_orbax():
    for error in (RuntimeError("Event loop is closed"), KeyError("a real bug")):
      sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error))
    logging.getLogger("asyncio").error("Future exception was never retrieved")
    logging.getLogger("cnnlab").warning("kept")
  assert [type(u.exc_value) for u in seen] == [KeyError]
  assert [r.getMessage() for r in caplog.records] == ["kept"]
  # orbax's I/O threads go on raising it after the failed call returned: dropped then too.
  for error in (RuntimeError("Event loop is closed"), KeyError("another bug")):
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error))
  assert [type(u.exc_value) for u in seen] == [KeyError, KeyError]


def test_no_checkpoint_restores_none(tmp_path):
  assert Checkpointer(str(tmp_path / "empty")).restore_latest(small_state(0)) is None


TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing local file "{path}/manifest.ocdbt": Failed to write 114 '
    "bytes to file 8: No space left on device [os_error_code='28']")  # As orbax raised it here.


@pytest.mark.parametrize("failure, reason, fix", [
    (TENSORSTORE_ENOSPC, "No space left on device", "free space on the disk holding"),
    (RuntimeError("orbax gave up"), "Read-only file system", "writable or use another --workdir"),
])
def test_failed_save_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, failure,
                                                                reason, fix):
  ckpt = saved(tmp_path, steps=(1,))
  real_save = ocp.CheckpointManager.save

  def full_disk_save(manager, step, *args, **kwargs):
    os.makedirs(os.path.join(ckpt.directory, f"{step}.orbax-checkpoint-tmp-123"))
    if isinstance(failure, RuntimeError):  # An OSError buried in the chain of causes.
      raise failure from OSError(errno.EROFS, os.strerror(errno.EROFS))
    raise failure

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_save)
  with pytest.raises(errors.WorkdirError) as info:
    ckpt.save(2, small_state(2), {})
  message = str(info.value)
  assert message.startswith(f"cannot write {ckpt.directory}/2 ({reason}); ")
  assert fix in message and message.endswith("rerun the same command to resume from step 1.")
  assert os.listdir(ckpt.directory) == ["1"]  # The half-written one is gone.
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  step, state, _ = Checkpointer(ckpt.directory).restore_latest(small_state(0))
  assert step == 1 and np.array_equal(state["params"]["w"], np.roll(MARKER, 1))


def test_a_bug_in_save_is_not_dressed_as_a_disk_error(tmp_path, monkeypatch):
  ckpt = saved(tmp_path, steps=(1,))
  monkeypatch.setattr(ocp.CheckpointManager, "save", lambda *a, **k: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    ckpt.save(2, small_state(2), {})


def test_os_failure_reads_errno_from_oserrors_and_tensorstore_messages():
  assert checkpoint.os_failure(OSError(errno.ENOSPC, "No space left on device")) == (
      errno.ENOSPC, "No space left on device")
  assert checkpoint.os_failure(TENSORSTORE_ENOSPC).errno == errno.ENOSPC
  assert checkpoint.os_failure(ValueError("shape mismatch")) is None


SHARDED = textwrap.dedent("""
    import os, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cnnlab.training.checkpoint import Checkpointer
    from cnnlab.base.errors import CheckpointError
    sys.path.insert(0, {tests!r})
    from test_checkpoint import MARKER, flip_one_bit_of
    mesh = Mesh(np.array(jax.devices()), ("data",))
    split = NamedSharding(mesh, P("data"))
    state = {{"w": jax.device_put(MARKER, split), "b": jax.device_put(np.ones(4), split)}}
    ckpt = Checkpointer({directory!r})
    ckpt.save(1, state, {{}})
    abstract = {{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split)
                for k, v in state.items()}}
    step, restored, _ = ckpt.restore_latest(abstract)
    assert len(restored["w"].sharding.device_set) == 2, restored["w"].sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), MARKER)
    flip_one_bit_of(os.path.join({directory!r}, "1"), MARKER[:512])  # Device 0's shard.
    try:
      ckpt.restore(1, abstract)
    except CheckpointError as e:
      print("refused:", e)
""")


def test_restore_into_sharded_arrays_verifies_digests(tmp_path):
  """Arrays restored sharded over two devices digest like the saved ones, and a flipped bit in
  one of them is still refused."""
  script = SHARDED.format(tests=os.path.join(ROOT, "tests"), directory=str(tmp_path / "ck"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120, env=env, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "refused:" in done.stdout and "1 array(s) differ" in done.stdout


TWO_PROCESSES = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid = int(sys.argv[1])
    jax.distributed.initialize(sys.argv[2], 2, pid)
    from cnnlab.base import digests
    from cnnlab.training.checkpoint import Checkpointer
    mesh = Mesh(np.array(jax.devices()), ("data",))
    full = np.arange(24, dtype=np.float32).reshape(8, 3)
    state = {"split": jax.make_array_from_process_local_data(
                 NamedSharding(mesh, P("data")), full[pid * 4:pid * 4 + 4], full.shape),
             "replicated": jax.make_array_from_process_local_data(
                 NamedSharding(mesh, P()), full, full.shape)}
    assert not any(x.is_fully_addressable for x in state.values())
    assert digests.tree_sha256(state) == digests.tree_sha256({"split": full, "replicated": full})
    ckpt = Checkpointer(sys.argv[3])
    ckpt.save(1, state, {})
    step, restored, _ = ckpt.restore_latest(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()})
    ckpt.close()
    print("ok", step, np.asarray(restored["split"].addressable_data(0))[0].tolist())
""")


def test_digests_of_arrays_spread_over_two_processes(tmp_path):
  """Arrays no process holds whole (sharded, or replicated across processes) digest like the
  same values on one host, and a checkpoint of them restores on both processes."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(pid), address,
                             str(tmp_path / "ck")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
           for pid in range(2)]
  outs = [p.communicate(timeout=180) for p in procs]
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
  assert [out.strip().splitlines()[-1] for out, _ in outs] == [
      "ok 1 [0.0, 1.0, 2.0]", "ok 1 [12.0, 13.0, 14.0]"]
