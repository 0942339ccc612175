"""CellLock on a shared filesystem: races, stale locks (dead pid, silent foreign host),
heartbeats."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from cnnlab.base import files, locks
from cnnlab.base.locks import CellLock
from cnnlab.training import rundir

# Short timings so that staleness shows within a test; heartbeats come 5x faster than staleness.
FAST = dict(heartbeat_s=0.1, stale_after_s=0.5)


def run_python(code: str, **kwargs) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                          stdout=subprocess.PIPE, **kwargs)


def read_record(cell_dir) -> dict:
  with open(os.path.join(cell_dir, locks.LOCK_NAME)) as f:
    return json.load(f)


def write_foreign_lock(cell_dir, age_s: float, pid: int) -> None:
  """A lock file as a process on another host writes it, last refreshed `age_s` ago."""
  path = os.path.join(cell_dir, locks.LOCK_NAME)
  with open(path, "w") as f:
    json.dump({"host": "elsewhere", "machine": "elsewhere/boot/pid:[1]", "pid": pid,
               "start": "1", "job": "77_3", "token": "f" * 32, "time": time.time() - age_s}, f)
  os.utime(path, (time.time() - age_s,) * 2)


def race(cell_dir, contenders: int) -> list[CellLock]:
  """`contenders` threads acquire at once; returns the locks that say they won."""
  cell_locks = [CellLock(cell_dir, **FAST) for _ in range(contenders)]
  barrier, won = threading.Barrier(contenders), []
  def contend(lock):
    barrier.wait()
    if lock.acquire():
      won.append(lock)
  threads = [threading.Thread(target=contend, args=(lock,)) for lock in cell_locks]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return won


def test_threads_racing_for_a_free_lock_one_wins(tmp_path):
  for round_ in range(10):
    won = race(str(tmp_path / f"cell{round_}"), contenders=6)
    assert len(won) == 1
    assert read_record(tmp_path / f"cell{round_}")["token"] == won[0].token
    won[0].release()
    assert not os.path.exists(won[0].path)


def test_processes_racing_for_a_free_lock_one_wins(tmp_path):
  go = tmp_path / "go"
  code = (f"import os, time\nfrom cnnlab.base.locks import CellLock\n"
          f"lock = CellLock({str(tmp_path)!r})\n"
          f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
          "print(int(lock.acquire()), flush=True)\ntime.sleep(1.0)\nlock.release()\n")
  procs = [run_python(code) for _ in range(4)]
  time.sleep(0.5)  # Let them start and wait on `go`.
  go.touch()
  results = [int(p.communicate(timeout=60)[0]) for p in procs]
  assert sorted(results) == [0, 0, 0, 1]
  assert not os.path.exists(tmp_path / locks.LOCK_NAME)  # The winner released it.


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
  """The holder dies without releasing (SIGKILL, OOM): its heartbeat is still fresh, but its
  pid is gone, so the cell is free now, not a minute later."""
  holder = run_python(f"import os\nfrom cnnlab.base.locks import CellLock\n"
                      f"assert CellLock({str(tmp_path)!r}).acquire()\nos._exit(0)\n")
  assert holder.wait(timeout=60) == 0
  dead = read_record(tmp_path)
  assert dead["pid"] == holder.pid
  lock = CellLock(str(tmp_path))  # Default (long) staleness: only the dead pid frees it.
  assert lock.acquire()
  assert read_record(tmp_path)["token"] == lock.token != dead["token"]
  lock.release()


def test_many_takers_of_one_stale_lock_one_wins(tmp_path):
  for round_ in range(10):
    cell_dir = str(tmp_path / f"cell{round_}")
    os.makedirs(cell_dir)
    write_foreign_lock(cell_dir, age_s=30, pid=os.getpid())
    won = race(cell_dir, contenders=6)
    assert len(won) == 1
    assert read_record(cell_dir)["token"] == won[0].token
    assert sorted(os.listdir(cell_dir)) == [locks.LOCK_NAME]  # No aside or probe file is left.
    won[0].release()


def test_foreign_host_lock_is_taken_over_only_after_the_timeout(tmp_path):
  """A pid on another host says nothing about this host's processes: a foreign lock whose pid is
  dead here is still respected until its heartbeat is older than stale_after_s."""
  dead_pid = run_python("pass").pid
  time.sleep(0.2)
  write_foreign_lock(tmp_path, age_s=0, pid=dead_pid)
  assert not CellLock(str(tmp_path), **FAST).acquire()
  time.sleep(FAST["stale_after_s"] + 0.3)  # No heartbeat comes: the host is gone.
  lock = CellLock(str(tmp_path), **FAST)
  assert lock.acquire()
  assert read_record(tmp_path)["token"] == lock.token
  lock.release()


def test_empty_lock_file_of_the_flock_version_is_taken_over_when_old(tmp_path):
  path = tmp_path / locks.LOCK_NAME
  path.touch()  # A fresh empty file may be a lock being written: respected.
  assert not CellLock(str(tmp_path), **FAST).acquire()
  os.utime(path, (time.time() - 3600,) * 2)
  lock = CellLock(str(tmp_path), **FAST)
  assert lock.acquire()
  lock.release()


def test_live_lock_is_not_stolen_and_is_free_after_release(tmp_path):
  holder = CellLock(str(tmp_path), **FAST)
  assert holder.acquire()
  time.sleep(3 * FAST["stale_after_s"])  # Far past the timeout: only the heartbeat keeps it.
  other = CellLock(str(tmp_path), **FAST)
  assert not other.acquire()
  other.close()  # Closing a lock that was not acquired leaves the holder's file alone.
  assert read_record(tmp_path)["token"] == holder.token and not holder.lost
  holder.release()
  assert other.acquire()
  other.release()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
  """A holder that stalled past the timeout was taken over: its release must not delete the new
  holder's lock, and its heartbeat reports the loss."""
  holder = CellLock(str(tmp_path), **FAST)
  assert holder.acquire()
  write_foreign_lock(tmp_path, age_s=0, pid=12345)  # Replaces the file, as a takeover does.
  deadline = time.time() + 10
  while not holder.lost and time.time() < deadline:
    time.sleep(0.05)
  assert holder.lost
  holder.release()
  assert read_record(tmp_path)["token"] == "f" * 32


def test_heartbeat_must_be_shorter_than_staleness(tmp_path):
  with pytest.raises(ValueError, match="heartbeat_s=5.*stale_after_s=2"):
    CellLock(str(tmp_path), heartbeat_s=5, stale_after_s=2)


def test_a_lock_file_that_is_a_directory_is_one_line(tmp_path):
  os.mkdir(tmp_path / locks.LOCK_NAME)
  with pytest.raises(locks.WorkdirError, match=r"\.lock is a directory, not a cnnlab lock file; "
                     r"remove it \(cnnlab never makes one\) or use another --workdir\.$"):
    CellLock(str(tmp_path), **FAST).acquire()


def test_a_lost_lock_fences_every_write_in_its_directory(tmp_path):
  from cnnlab.training import checkpoint
  lock = CellLock(str(tmp_path / "cell"), **FAST)
  assert lock.acquire()
  run_dir = tmp_path / "cell" / "seed_0"
  run_dir.mkdir()
  rundir.RunDir(str(run_dir)).log({"step": 1, "split": "train"})  # Held: written.
  os.remove(lock.path)                                        # A taker removed it, made its own:
  write_foreign_lock(str(tmp_path / "cell"), 0, 4242)
  writes = [lambda: rundir.RunDir(str(run_dir)).log({"step": 2, "split": "train"}),
            lambda: files.write_json_atomic(str(run_dir / "results.json"), {}),
            lambda: checkpoint.Checkpointer(str(run_dir / "checkpoints"))]
  for write in writes:
    with pytest.raises(locks.LockLost, match=r"lost the lock .*cell/\.lock: another process "
                       r"\(host elsewhere, pid 4242\) took it over"):
      write()
  assert sorted(os.listdir(run_dir)) == ["metrics.jsonl"]
  assert len(open(run_dir / "metrics.jsonl").readlines()) == 1
  files.write_json_atomic(str(tmp_path / "elsewhere.json"), {})  # Outside the cell: written.
  lock.release()
  assert read_record(tmp_path / "cell")["pid"] == 4242  # The taker's lock is left alone.


# A sweep process whose locks go stale in 2 s (heartbeats every 0.2 s), so a stop of a few
# seconds loses them (the defaults, 5 s and 60 s, are CellLock's parameters).
FAST_LAUNCH = """
import runpy, sys
from cnnlab.base import locks
locks.CellLock.__init__.__kwdefaults__.update(heartbeat_s=0.2, stale_after_s=2.0)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _launch_fast(data_dir, workdir):
  args = [os.path.join(ROOT, "launch.py"), "--config=experiments/default.py",
          f"--workdir={workdir}", "--noprogress", "--config.dataset.name=digits",
          f"--config.dataset.data_dir={data_dir}", "--config.model.name=vgg_cnn",
          "--config.model.stages=((8,),(16,))", "--config.batch_size=32", "--config.num_epochs=2",
          "--config.log_every_steps=2", "--config.checkpoint_every_steps=4"]
  return subprocess.Popen([sys.executable, "-c", FAST_LAUNCH, *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_a_stopped_holder_that_lost_its_lock_stops_and_the_run_is_trained_once(
    data_dir, tmp_path):
  """Issue 22: a holder stopped past the staleness lost its lock to a second sweep; resumed, it
  kept training the same run beside the taker and crashed (`No ArrayMetadata found ...
  orbax-checkpoint-tmp`). Now its next write raises one line and the taker's run is exact."""
  from conftest import wait_for_checkpoint
  reference = _launch_fast(data_dir, tmp_path / "reference")
  assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
  workdir = tmp_path / "run"
  first = _launch_fast(data_dir, workdir)
  wait_for_checkpoint(str(workdir), 8, first)
  os.kill(first.pid, signal.SIGSTOP)
  second = _launch_fast(data_dir, workdir)
  deadline = time.time() + 120
  while read_record(workdir).get("pid") != second.pid:  # Taken over once 2 s stale.
    assert time.time() < deadline and second.poll() is None, second.communicate()
    time.sleep(0.05)
  os.kill(first.pid, signal.SIGCONT)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 2, err[-3000:]
  assert err.strip().splitlines() == [err.strip()] and err.startswith(
      f"error: lost the lock {workdir}/.lock: another process (host ")
  out, err = second.communicate(timeout=300)
  assert second.returncode == 0, err[-3000:]
  results = [files.read_json(str(d / "results.json")) for d in (tmp_path / "reference", workdir)]
  assert results[0]["params_sha256"] == results[1]["params_sha256"]
  train_steps = [[json.loads(l)["step"] for l in open(d / "metrics.jsonl") if '"train"' in l]
                 for d in (tmp_path / "reference", workdir)]
  assert train_steps[0] == train_steps[1]  # Each logged once.
