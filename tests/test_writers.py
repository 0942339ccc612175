"""MetricWriter: TensorBoard events read back with tensorboard's own readers equal metrics.jsonl,
also after a writer is abandoned (a killed run) and a new one resumes."""

import io
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator, event_multiplexer

from cnnlab.training.rundir import RunDir
from cnnlab.training.writers import MetricWriter


def _accumulator(workdir: str) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  return acc


def _assert_events_equal_metrics(run: RunDir) -> None:
  """Every (split, name) series in TensorBoard has exactly the steps and (float32) values of the
  metrics.jsonl lines, in order, and no tag is missing or extra (a tag whose every event was
  purged stays listed, empty)."""
  records = run.read_metrics()
  acc = _accumulator(run.workdir)
  expected = {}
  for r in records:
    for name, value in r.items():
      if name not in ("step", "split"):
        expected.setdefault(f"{r['split']}/{name}", []).append((r["step"], np.float32(value)))
  assert sorted(t for t in acc.Tags()["scalars"] if acc.Scalars(t)) == sorted(expected)
  for tag, series in expected.items():
    assert [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)] == series, tag


def _log_epoch(writer: MetricWriter, steps, scale: float) -> None:
  for step in steps:
    writer.write_scalars(step, "train", {"loss": scale / step, "accuracy": 1 - 1 / step,
                                         "learning_rate": 0.05 * scale})
    if step % 20 == 0:
      writer.write_scalars(step, "test", {"loss": 2 * scale / step, "accuracy": 0.5})


def test_events_equal_metrics_jsonl(tmp_path):
  run = RunDir(str(tmp_path))
  with MetricWriter(run, resume_step=0) as writer:
    _log_epoch(writer, range(10, 70, 10), 1.0)
  assert [r["step"] for r in run.read_metrics() if r["split"] == "test"] == [20, 40, 60]
  _assert_events_equal_metrics(run)


def test_abandoned_writer_and_resume_leave_no_duplicate_steps(tmp_path):
  run = RunDir(str(tmp_path))
  killed = MetricWriter(run, resume_step=0)
  _log_epoch(killed, range(10, 60, 10), 1.0)          # Steps 10..50; checkpoint was at 30.
  resumed = MetricWriter(run, resume_step=30)         # Same second: its file must not clash.
  assert resumed.event_file != killed.event_file
  _log_epoch(resumed, range(40, 80, 10), 3.0)         # Steps 40..70 again, other values.
  resumed.close()
  steps = [r["step"] for r in run.read_metrics() if r["split"] == "train"]
  assert steps == [10, 20, 30, 40, 50, 60, 70]
  _assert_events_equal_metrics(run)
  # A fresh writer (resume_step 0) of a restarted run hides everything before it.
  with MetricWriter(run, resume_step=0) as again:
    _log_epoch(again, [10], 5.0)
  _assert_events_equal_metrics(run)
  assert [e.step for e in _accumulator(run.workdir).Scalars("train/loss")] == [10]


def test_sweep_workdir_has_one_tensorboard_run_per_cell_and_seed(tmp_path):
  runs = {os.path.join("cells", cell, f"seed_{seed}")
          for cell in ("dropout-none-1a2b", "dropout-spatial-3c4d") for seed in (0, 1)}
  for name in runs:
    with MetricWriter(RunDir(str(tmp_path / name))) as writer:
      _log_epoch(writer, [10, 20], 1.0)
  multiplexer = event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(tmp_path))
  multiplexer.Reload()
  assert set(multiplexer.Runs()) == runs
  for name in runs:
    assert [e.step for e in multiplexer.Scalars(name, "test/accuracy")] == [20]


def test_images_read_back(tmp_path):
  rng = np.random.default_rng(0)
  images = {"filters": rng.integers(0, 256, (12, 20, 3), dtype=np.uint8),
            "gray": rng.integers(0, 256, (7, 5, 1), dtype=np.uint8)}
  with MetricWriter(RunDir(str(tmp_path))) as writer:
    writer.write_images(100, images)
    with pytest.raises(ValueError, match="uint8"):
      writer.write_images(100, {"bad": np.zeros((4, 4, 3), np.float32)})
  acc = _accumulator(str(tmp_path))
  for tag, image in images.items():
    (event,) = acc.Images(tag)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert event.step == 100 and (event.height, event.width) == image.shape[:2]
    np.testing.assert_array_equal(decoded.reshape(image.shape[:2] + (-1,))[..., :image.shape[-1]],
                                  image)


def test_full_disk_while_writing_events_is_one_workdir_error(tmp_path, monkeypatch):
  """An event file that cannot be written (disk full) ends in one WorkdirError line naming it,
  like every other write to a workdir, not an OSError traceback."""
  import errno

  from cnnlab.base.errors import WorkdirError
  writer = MetricWriter(RunDir(str(tmp_path)))

  def full(event):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(writer._events, "write_event", full)
  with pytest.raises(WorkdirError, match=r"cannot write .*events.*No space left on device.*"
                                         r"free space"):
    writer.write_scalars(5, "train", {"loss": 1.0})
