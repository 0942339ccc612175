"""Streamed datasets end to end, as a user runs them: a JPEG folder and a TFDS dataset trained by
`--config.dataset...` settings only, class names in the pictures, a changed folder noticed, kill -9
with worker processes resumed bit for bit, two processes reading disjoint rows of every global
batch, and the streamed path equal to the in-memory one."""

import io
import json
import os
import signal
import socket
import subprocess
import sys

import matplotlib.text
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from conftest import ROOT, load_config, run_launch, wait_for_checkpoint

from cnnlab import data
from cnnlab.data import synthetic
from cnnlab.inspection import plots, visualize
from cnnlab.training import loop


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """10 classes x 40 images of 48-300 px (JPEG, some PNG and greyscale)."""
  root = str(tmp_path_factory.mktemp("images") / "shapes")
  synthetic.write_image_folder(root, num_classes=10, per_class=40, sizes=(48, 300))
  return root


def _folder_args(root, workdir, data_dir, *extra, epochs=3):
  return ["--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
          "--config.dataset.name=folder", f"--config.dataset.folder={root}",
          f"--config.dataset.data_dir={data_dir}", "--config.dataset.image_size=32",
          "--config.model.name=vgg_cnn", "--config.model.stages=((8,),(16,))",
          "--config.model.bn_placement=before_act", "--config.batch_size=32",
          "--config.eval_batch_size=40", f"--config.num_epochs={epochs}",
          "--config.log_every_steps=5", "--config.checkpoint_every_steps=5", *extra]


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
  """The folder trained uninterrupted with 2 worker processes: (workdir, data dir)."""
  where = tmp_path_factory.mktemp("folder_run")
  workdir, data_dir = str(where / "run"), str(where / "tfds")
  proc = run_launch(*_folder_args(folder, workdir, data_dir, "--config.dataset.workers=2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, data_dir


def test_a_jpeg_folder_trains_by_dataset_settings_and_pictures_name_its_classes(
    folder_run, monkeypatch):
  workdir, _ = folder_run
  results = _results(workdir)
  assert results["test_accuracy"] > 0.25, results   # Chance is 0.1 (80 test images).
  assert len(results["data_digest"]) == 64

  texts = []
  save = plots.save
  monkeypatch.setattr(plots, "save", lambda fig, path: (
      texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text)), save(fig, path))[1])
  visualize.write_pictures(workdir)
  assert set(synthetic.class_names(10)) <= set(texts)   # Per-class accuracy ticks.
  assert any("true class_" in t for t in texts)


def test_a_changed_folder_is_noticed_never_served_stale(folder, tmp_path, caplog):
  root = str(tmp_path / "shapes")
  synthetic.write_image_folder(root, num_classes=3, per_class=6, sizes=(40, 80))
  cfg = load_config("experiments/default.py").dataset
  cfg.update({"name": "folder", "folder": root, "data_dir": str(tmp_path / "tfds"),
              "image_size": 16})
  digests = [data.data_digest(cfg)]
  for change in ("add", "edit", "remove"):
    if change == "add":
      synthetic.write_image_folder(root, num_classes=3, per_class=1, sizes=(40, 80), start=50)
    elif change == "edit":
      path = os.path.join(root, "class_01", "00002.jpg")
      synthetic.write_image_folder(str(tmp_path / "other"), 3, 3, (90, 90), seed=5)
      os.replace(str(tmp_path / "other" / "class_01" / "00002.jpg"), path)
    else:
      os.remove(os.path.join(root, "class_02", "00000.jpg"))
    data.clear_caches()
    caplog.clear()
    digests.append(data.data_digest(cfg))
    changed = [r for r in caplog.records if "changed since it was indexed" in r.getMessage()]
    assert len(changed) == 1, (change, caplog.text)
  assert len(set(digests)) == 4
  data.clear_caches()


def test_a_finished_folder_run_over_changed_files_is_refused(folder, tmp_path):
  root = str(tmp_path / "shapes")
  synthetic.write_image_folder(root, num_classes=3, per_class=8, sizes=(40, 80))
  workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "tfds")
  args = _folder_args(root, workdir, data_dir, "--config.dataset.workers=0",
                      "--config.batch_size=8", epochs=1)
  assert run_launch(*args).returncode == 0
  synthetic.write_image_folder(root, num_classes=3, per_class=1, sizes=(40, 80), start=50)
  proc = run_launch(*args)
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "files have changed since" in lines[0], proc.stderr[-2000:]


class ShapesForTest(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset of PNG-encoded images of varying size in three named classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(60, 0), "test": self._generate_examples(30, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      size = int(rng.integers(20, 60))
      image = synthetic.synthetic_image(i % 3, 3, size, size + 7, rng)
      png = io.BytesIO()   # Encoded here: TFDS encodes arrays with TensorFlow, bytes without.
      PIL.Image.fromarray(image).save(png, format="png")
      yield i, {"image": png.getvalue(), "label": i % 3}


def test_a_tfds_dataset_built_as_array_record_is_trained_by_name(tmp_path):
  data_dir = str(tmp_path / "tfds")
  ShapesForTest(data_dir=data_dir, file_format="array_record").download_and_prepare()
  assert any(name.endswith(".array_record-00000-of-00001") for name in os.listdir(
      os.path.join(data_dir, "shapes_for_test", "1.0.0")))
  workdir = str(tmp_path / "run")
  # The training process has no builder code: TFDS reads what was prepared.
  proc = run_launch("--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
                    "--config.dataset.name=tfds", "--config.dataset.tfds_name=shapes_for_test",
                    f"--config.dataset.data_dir={data_dir}", "--config.dataset.image_size=16",
                    "--config.dataset.workers=0", "--config.model.name=vgg_cnn",
                    "--config.model.stages=((8,),)", "--config.batch_size=10",
                    "--config.num_epochs=2", "--config.log_every_steps=2",
                    "--config.checkpoint_every_steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _results(workdir)["test_accuracy"] > 0.5   # Chance is 1/3: the colours are learnt.
  cfg = load_config("experiments/default.py").dataset
  cfg.update({"name": "tfds", "tfds_name": "shapes_for_test", "data_dir": data_dir,
              "image_size": 16})
  info = data.dataset_info(cfg)
  assert info.class_names == ("red", "green", "blue")
  assert (info.num_train, info.num_test, info.image_shape) == (60, 30, (16, 16, 3))
  data.clear_caches()


def test_kill_9_mid_epoch_with_two_workers_resumes_bit_identically(folder, folder_run, tmp_path):
  whole, data_dir = folder_run
  cut = str(tmp_path / "cut")
  args = _folder_args(folder, cut, data_dir, "--config.dataset.workers=2")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  wait_for_checkpoint(cut, 15, proc)   # Step 15 of 30: mid-epoch 2 (10 steps per epoch).
  os.killpg(proc.pid, signal.SIGKILL)   # The trainer and its grain workers, as an OOM kill.
  proc.wait()
  resumed = run_launch(*args)
  assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
  assert _results(cut)["params_sha256"] == _results(whole)["params_sha256"]
  assert _results(cut)["test_accuracy"] == _results(whole)["test_accuracy"]


def test_streamed_and_in_memory_paths_train_the_same_bits(tiny_config, tmp_path, monkeypatch):
  tiny_config.num_epochs = 1
  memory = loop.train_and_evaluate(tiny_config, str(tmp_path / "memory"), progress=False)
  tiny_config.dataset.in_memory_limit_mb = 0   # digits is then read example by example.
  tiny_config.dataset.workers = 0
  assert data.streamed.is_streamed(tiny_config.dataset)
  data.clear_caches()

  def whole_split(*args):
    raise AssertionError(f"a streamed dataset's split was read whole: {args}")
  monkeypatch.setattr(data, "_load_split", whole_split)
  streamed = loop.train_and_evaluate(tiny_config, str(tmp_path / "streamed"), progress=False)
  assert streamed["params_sha256"] == memory["params_sha256"]
  assert streamed["test_accuracy"] == memory["test_accuracy"]
  monkeypatch.undo()
  data.clear_caches()


RECORDING_DATASET = '''
import os
import sys

import numpy as np
import PIL.Image

from cnnlab.data import register_dataset
from cnnlab.data.stream import ArraySource


class Recording(ArraySource):
  """Writes every index it reads to reads_<process>.txt in $CNNLAB_TEST_READS."""

  def __getitem__(self, i):   # The process index from launch.py's flag, without starting JAX.
    process = next((a.split("=")[1] for a in sys.argv if a.startswith("--process_id=")), "0")
    path = os.path.join(os.environ["CNNLAB_TEST_READS"], f"reads_{process}.txt")
    with open(path, "a") as f:
      f.write(f"{int(i)}\\n")
    return super().__getitem__(i)


def _split(n, seed):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 4
  images = rng.integers(0, 60, (n, 8, 8, 3)).astype(np.uint8)
  images[np.arange(n), :, :, labels % 3] += 150
  images[labels == 3, :4] = 255
  return images, labels.astype(np.int32)


def load(data_dir):
  return {"train": Recording(*_split(256, 0)), "test": ArraySource(*_split(64, 1))}


register_dataset("recorded", load)
'''


def _two_process_args(study, workdir):
  return [os.path.join(ROOT, "launch.py"), "--config=experiments/default.py",
          f"--workdir={workdir}", "--noprogress", f"--config.imports=('{study}',)",
          "--config.dataset.name=recorded", "--config.dataset.normalization=imagenet",
          "--config.dataset.workers=0", "--config.model.name=vgg_cnn",
          "--config.model.stages=((8,),(16,))", "--config.batch_size=32",
          "--config.eval_batch_size=64", "--config.num_epochs=2",
          "--config.log_every_steps=4", "--config.checkpoint_every_steps=8"]


def _environment(reads, devices):
  return dict(os.environ, PYTHONUNBUFFERED="1", CNNLAB_TEST_READS=reads,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def test_two_processes_read_disjoint_rows_of_each_global_batch_and_match_one(tmp_path):
  study = tmp_path / "recording.py"
  study.write_text(RECORDING_DATASET)
  one, two = tmp_path / "one", tmp_path / "two"
  os.makedirs(one / "reads")
  os.makedirs(two / "reads")
  single = subprocess.run([sys.executable, *_two_process_args(study, one / "run")], cwd=ROOT,
                          env=_environment(str(one / "reads"), 2), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-2000:]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, *_two_process_args(study, two / "run"),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_environment(str(two / "reads"), 1), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]

  steps, half = 2 * (256 // 32), 16
  read = lambda where: [int(v) for v in open(where).read().split()]
  whole = read(one / "reads" / "reads_0.txt")[:steps * 32]
  first, second = read(two / "reads" / "reads_0.txt"), read(two / "reads" / "reads_1.txt")
  for step in range(steps):   # Each global batch: rows 0-15 on process 0, 16-31 on process 1.
    a, b = first[step * half:(step + 1) * half], second[step * half:(step + 1) * half]
    assert not set(a) & set(b)
    assert a + b == whole[step * 32:(step + 1) * 32]
  single_results, double = _results(one / "run"), _results(two / "run")
  # The same global batches on 2 devices in one process or 1 device in each of two: the same
  # program up to how the gradient all-reduce is split, so the bits may differ slightly.
  assert abs(single_results["train_loss"] - double["train_loss"]) < 1e-5
  assert abs(single_results["test_accuracy"] - double["test_accuracy"]) <= 1 / 64
