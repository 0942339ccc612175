"""cnnlab.data.stream: the grain streaming pipeline gives TrainIterator's batches, the same with
and without worker processes, resumes bit-for-bit, reads only this process's rows, and never
leaves a worker process behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from cnnlab.base.errors import ConfigError, DatasetError
from cnnlab.data.pipeline import (
  TrainIterator,
  epoch_permutation,
  eval_batches_from_arrays,
  normalise,
)
from cnnlab.data.stream import ArraySource, StreamIterator, source_stats, stream_eval_batches
from cnnlab.data.transforms import example_rng

N, B, SEED = 50, 8, 3      # 6 steps an epoch, 2 examples dropped
MEAN = np.float32([0.5, 0.4, 0.3])
STD = np.float32([0.2, 0.25, 0.3])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def identity(image, rng):
  return image


def crop_flip(image, rng):
  """An augmenting transform: a random flip and a random 4x4 crop of a 6x6 image."""
  if rng.random() < 0.5:
    image = image[:, ::-1]
  y, x = rng.integers(0, 3, size=2)
  return image[y:y + 4, x:x + 4]


class RecordingSource(ArraySource):
  """Records the indices it is asked for (in this process: use it with workers=0)."""

  def __init__(self, images, labels):
    super().__init__(images, labels)
    self.reads = []

  def __getitem__(self, i):
    self.reads.append(int(i))
    return super().__getitem__(i)


@pytest.fixture(scope="module")
def arrays():
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (N, 6, 6, 3), dtype=np.uint8),
          rng.integers(0, 10, N).astype(np.int32))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in g:
      assert g[key].dtype == w[key].dtype, key
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def expected(images, labels, step, transform, rows=slice(None)):
  """Global step `step`'s batch by the definition: the epoch's permutation, example i
  transformed with example_rng(seed, epoch, i), normalised."""
  epoch, batch = divmod(step, N // B)
  idx = epoch_permutation(N, SEED, epoch)[batch * B:(batch + 1) * B][rows]
  out = np.stack([transform(images[i], example_rng(SEED, epoch, int(i))) for i in idx])
  return {"image": normalise(out, MEAN, STD), "label": labels[idx]}


@pytest.mark.parametrize("transform", [None, identity])
def test_identity_batches_equal_train_iterator(arrays, transform):
  images, labels = arrays
  for rows in (slice(None), slice(0, B // 2), slice(B // 2, B)):
    stream = StreamIterator(ArraySource(images, labels), B, SEED, transform, MEAN, STD, rows)
    memory = TrainIterator(images, labels, B, SEED, MEAN, STD, rows=rows)
    assert_batches_equal(take(stream, 20), take(memory, 20))   # 3 epochs and a bit
    assert stream.get_state() == memory.get_state()
    stream.close()


def test_workers_give_the_same_augmented_batches(arrays):
  """workers=0 and workers=2 give bit-identical batches, as the definition says, and the
  training loop's peek (get_state, next, set_state) keeps the worker processes."""
  images, labels = arrays
  source = ArraySource(images, labels)
  local = StreamIterator(source, B, SEED, crop_flip, MEAN, STD, workers=0)
  pooled = StreamIterator(source, B, SEED, crop_flip, MEAN, STD, workers=2)
  want = [expected(images, labels, s, crop_flip) for s in range(14)]
  assert_batches_equal(take(local, 14), want)
  assert_batches_equal(take(pooled, 3), want[:3])
  workers = grain_workers(psutil.Process())
  assert len(workers) == 2
  position = pooled.get_state()
  peeked = next(pooled)
  pooled.set_state(position)
  assert_batches_equal(take(pooled, 11), [peeked] + want[4:14])
  assert pooled.pipeline_builds == 1 and grain_workers(psutil.Process()) == workers
  pooled.close()
  assert not grain_workers(psutil.Process())
  local.set_state({"seed": SEED, "epoch": 0, "batch": 1})   # elsewhere: a new pipeline there
  assert_batches_equal(take(local, 2), want[1:3])
  assert local.pipeline_builds == 2


def grain_workers(process: psutil.Process) -> set[int]:
  """The pids of `process`'s multiprocessing workers (not its resource tracker)."""
  return {p.pid for p in process.children(recursive=True)
          if "spawn_main" in " ".join(p.cmdline()) and alive(p)}


def test_rows_read_only_their_examples_and_make_the_batch(arrays):
  images, labels = arrays
  whole = StreamIterator(ArraySource(images, labels), B, SEED, crop_flip, MEAN, STD)
  halves = [RecordingSource(images, labels), RecordingSource(images, labels)]
  parts = [StreamIterator(source, B, SEED, crop_flip, MEAN, STD, rows=rows)
           for source, rows in zip(halves, (slice(0, B // 2), slice(B // 2, B)))]
  steps = 8
  for _ in range(steps):
    a, b, full = next(parts[0]), next(parts[1]), next(whole)
    for key in full:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), full[key])
  orders = [epoch_permutation(N, SEED, e)[:N // B * B].reshape(-1, B) for e in range(2)]
  batches = np.concatenate(orders)   # the reads: the steps' rows, and a prefetched batch or two
  for source, share in zip(halves, (batches[:, :B // 2], batches[:, B // 2:])):
    assert len(source.reads) >= steps * B // 2
    assert source.reads == share.ravel().tolist()[:len(source.reads)]


def test_resume_mid_epoch_equals_uninterrupted(arrays):
  images, labels = arrays
  source = ArraySource(images, labels)
  uninterrupted = take(StreamIterator(source, B, SEED, crop_flip, MEAN, STD), 15)
  first = StreamIterator(source, B, SEED, crop_flip, MEAN, STD)
  take(first, 8)
  state = first.get_state()
  assert state == {"seed": SEED, "epoch": 1, "batch": 2}
  resumed = StreamIterator(source, B, SEED, crop_flip, MEAN, STD, workers=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 7), uninterrupted[8:])
  resumed.close()
  with pytest.raises(ValueError, match="seed 4"):
    resumed.set_state({"seed": 4, "epoch": 0, "batch": 0})


def test_eval_batches_equal_eval_batches_from_arrays(arrays):
  images, labels = arrays[0][:47], arrays[1][:47]   # the last batch: 7 of 10, padded to 12
  source = ArraySource(images, labels)
  for rows, workers in ((slice(None), 0), (slice(0, 6), 0), (slice(6, 12), 1)):
    got = list(stream_eval_batches(source, 10, identity, MEAN, STD, multiple_of=4, rows=rows,
                                   workers=workers))
    want = list(eval_batches_from_arrays(images, labels, 10, MEAN, STD, multiple_of=4,
                                         rows=rows))
    assert_batches_equal(got, want)
  # A share that is all padding in the last batch still has the examples' shape.
  last = list(stream_eval_batches(source, 10, crop_flip_eval, MEAN, STD, 4, slice(8, 12)))[-1]
  assert last["image"].shape == (4, 4, 4, 3) and not last["mask"].any()


def crop_flip_eval(image, rng):
  return image[1:5, 1:5]


class Ragged(ArraySource):
  """Odd examples one row shorter: no one batch shape."""

  def __getitem__(self, i):
    example = super().__getitem__(i)
    return {**example, "image": example["image"][:5 + i % 2]}


def test_bad_inputs_are_one_line_errors(arrays):
  images, labels = arrays
  it = StreamIterator(Ragged(images, labels), B, SEED, None, MEAN, STD)
  with pytest.raises(DatasetError, match=r"^example \d+ is \(\d, 6, 3\) after the transform but "
                                         r"example \d+ is \(\d, 6, 3\); a batch needs one shape"):
    next(it)
  with pytest.raises(ConfigError, match="batch size 51 does not fit the 50 examples"):
    StreamIterator(ArraySource(images, labels), N + 1, SEED, None, MEAN, STD)
  with pytest.raises(ConfigError, match="workers=-1"):
    StreamIterator(ArraySource(images, labels), B, SEED, None, MEAN, STD, workers=-1)


def test_source_stats_by_hand():
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (h, w, 2), dtype=np.uint8) for h, w in
            [(3, 5), (7, 2), (4, 4), (6, 6), (2, 9)]]
  source = RecordingSource(np.empty(5, object), np.zeros(5, np.int32))
  for i, image in enumerate(images):
    source.images[i] = image
  pixels = np.concatenate([x.reshape(-1, 2) for x in images]).astype(np.float64) / 255
  mean, std = source_stats(source, identity)
  assert mean.dtype == std.dtype == np.float32
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
  # A larger source is sampled: max_examples distinct examples, the stats of those.
  source.reads.clear()
  mean, std = source_stats(source, identity, max_examples=3, seed=7)
  assert len(set(source.reads)) == len(source.reads) == 3
  pixels = np.concatenate([images[i].reshape(-1, 2) for i in source.reads]) / 255
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
  flat = ArraySource(np.full((3, 2, 2, 1), 9, np.uint8), np.zeros(3, np.int32))
  assert source_stats(flat, None)[1] == np.float32(1e-3)


CHILD = textwrap.dedent("""
  import sys, time
  import numpy as np
  from cnnlab.data.stream import ArraySource, StreamIterator

  if __name__ == "__main__":
    source = ArraySource(np.zeros((40, 4, 4, 1), np.uint8), np.zeros(40, np.int32))
    it = StreamIterator(source, 8, 0, None, np.zeros(1, np.float32), np.ones(1, np.float32),
                        workers=2)
    batch = next(it)
    print("ready", flush=True)
    if sys.argv[1] == "wait":
      time.sleep(600)
""")


def start_child(tmp_path, mode):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, str(script), mode], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_exit_without_close_is_clean(tmp_path):
  """A script that never closes its iterator exits at once, with no warning from
  multiprocessing (leaked semaphores, shared memory) or grain."""
  child = start_child(tmp_path, "exit")
  out, err = child.communicate(timeout=60)
  assert child.returncode == 0, err
  assert out == "ready\n"
  assert "leaked" not in err and "Traceback" not in err, err


def test_workers_end_when_the_parent_is_killed(tmp_path):
  child, workers = start_child(tmp_path, "wait"), []
  try:
    assert child.stdout.readline() == "ready\n"
    workers = psutil.Process(child.pid).children(recursive=True)
    assert len(grain_workers(psutil.Process(child.pid))) == 2
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in workers):
      time.sleep(0.1)
    assert not [p.pid for p in workers if alive(p)]
  finally:
    for p in workers:
      if alive(p):
        p.kill()
    child.kill()
    child.communicate()


def alive(process: psutil.Process) -> bool:
  try:
    return process.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False
