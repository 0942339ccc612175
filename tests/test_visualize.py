"""cnnlab.inspection.visualize on a tiny trained run (VGG-style, BN before the activation, spatial
dropout): every picture is written, the filter grid has one tile per first-layer filter, saliency
maps have the input's shape, and a workdir without a checkpoint fails cleanly with nothing
written."""

import copy
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_launch
from PIL import Image

from cnnlab.base import files
from cnnlab.base.errors import CheckpointError
from cnnlab.inspection import visualize
from cnnlab.inspection.visualize import dropout_masks, filters, predictions
from cnnlab.training import images, loop, steps

PICTURES = ("filters.png", "feature_maps.png", "class_accuracy.png", "confusion_matrix.png",
            "misclassified.png", "saliency.png", "bn_running_stats.png", "bn_train_vs_eval.png",
            "dropout_masks.png")


@pytest.fixture(scope="module")
def _trained_runs():
  return {}


@pytest.fixture
def trained(tiny_config, tmp_path_factory, _trained_runs):
  """(config, workdir) of one tiny run, trained once for the module."""
  if not _trained_runs:
    workdir = str(tmp_path_factory.mktemp("trained"))
    loop.train_and_evaluate(tiny_config, workdir, progress=False)
    _trained_runs["run"] = (tiny_config, workdir)
  return _trained_runs["run"]


def test_write_pictures_writes_every_picture_and_the_index(trained):
  config, workdir = trained
  index = visualize.write_pictures(workdir)
  out = os.path.dirname(index)
  assert index == os.path.join(workdir, "pictures", "index.md")
  text = open(index).read()
  for name in PICTURES:
    with Image.open(os.path.join(out, name)) as image:
      assert 300 <= min(image.size) and max(image.size) <= 4000, (name, image.size)
    assert os.path.getsize(os.path.join(out, name)) > 5000, name
    assert f"({name})" in text
  assert "Not drawn" not in text


def test_filter_grid_has_one_tile_per_first_layer_filter(trained, tmp_path):
  config, workdir = trained
  _, state = visualize.load_run(workdir)
  width = config.model.stages[0][0]
  assert visualize.write_filter_grid(state, str(tmp_path / "grid.png")) == width
  assert visualize.write_filter_grid(state.params, str(tmp_path / "grid2.png")) == width
  name, kernel = images.first_conv_kernel({"params": state.params})
  assert name == "stage0_conv0/conv" and kernel.shape[-1] == width
  tiles = visualize.filter_tiles(kernel)
  assert tiles.shape == (width, 3, 3, 1) and tiles.min() >= 0 and tiles.max() <= 1
  # Each tile is scaled by its own largest |weight|: every tile reaches 0 or 1.
  assert np.allclose(np.abs(tiles - 0.5).max(axis=(1, 2, 3)), 0.5)
  image = visualize.filter_grid_image(state, zoom=2)
  assert image.dtype == np.uint8 and image.shape[-1] == 1


def test_feature_maps_are_the_last_block_of_each_resolution(trained):
  config, workdir = trained
  _, state = visualize.load_run(workdir)
  model = steps.setup(config).model
  stages = filters.stage_outputs(model, {"params": state.params, "batch_stats": state.batch_stats},
                                 jnp.zeros((2, 8, 8, 1)))
  assert [(s.path, s.output.shape) for s in stages] == [
      ("stage0_conv0", (2, 8, 8, 8)), ("stage1_conv0", (2, 4, 4, 16))]


def test_saliency_of_a_linear_model_is_its_predicted_class_weights():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(5 * 4 * 3, 7)).astype(np.float32)
  images = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
  apply_eval = lambda x: x.reshape(len(x), -1) @ weights
  grads = predictions.saliency(apply_eval, images)
  assert grads.shape == images.shape
  predicted = apply_eval(images).argmax(-1)
  np.testing.assert_allclose(grads, weights[:, predicted].T.reshape(images.shape), rtol=1e-6)


def test_confusion_counts_and_most_confident_mistakes():
  labels = np.array([0, 1, 2, 2, 1])
  probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1], [0.05, 0.9, 0.05],
                    [0.7, 0.2, 0.1]])
  counts = predictions.confusion_matrix(labels, probs.argmax(-1), 3)
  np.testing.assert_array_equal(counts, [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
  assert list(predictions.confident_mistakes(probs, labels, 2)) == [3, 4]


def test_spatial_mask_drops_whole_channels_and_standard_single_units():
  rngs = steps.step_rngs(steps.split_seed(0), jnp.asarray(3))
  shape = (1, 6, 6, 64)
  spatial = dropout_masks.keep_mask("spatial", 0.5, 3, shape, rngs)
  standard = dropout_masks.keep_mask("standard", 0.5, 3, shape, rngs)
  per_channel = spatial.reshape(-1, 64)
  assert (per_channel.min(0) == per_channel.max(0)).all() and 0 < per_channel.mean() < 1
  assert (standard.reshape(-1, 64).min(0) != standard.reshape(-1, 64).max(0)).any()


def test_workdir_without_checkpoint_fails_in_one_line_and_writes_nothing(trained, tmp_path):
  config, workdir = trained
  with pytest.raises(CheckpointError, match="config.json"):
    visualize.write_pictures(str(tmp_path))
  only_config = tmp_path / "only_config"
  only_config.mkdir()
  (only_config / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  proc = run_launch("--mode=visualize", f"--workdir={only_config}")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: {only_config} holds no checkpoint in {only_config}/checkpoints; --mode=visualize "
      "needs the workdir of one trained or checkpointed run (a sweep's runs are "
      "<workdir>/cells/<cell>/seed_<s>)."]
  assert sorted(os.listdir(only_config)) == ["config.json"]
  assert sorted(os.listdir(tmp_path)) == ["only_config"]


def test_a_checkpoint_pruned_while_it_is_read_is_read_again_not_called_corrupt(
    trained, tmp_path, monkeypatch):
  """The run that writes a workdir deletes its older checkpoints (it keeps its newest few), also
  while a reader (visualize, a transfer source) reads one: the reader takes the one now newest;
  it called the pruned one corrupt."""
  import orbax.checkpoint as ocp
  _, source = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  checkpoints = workdir / "checkpoints"
  older, newest = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())[-2:]
  os.rename(checkpoints / str(newest), tmp_path / "not_yet_saved")
  real_restore = ocp.CheckpointManager.restore

  def newer_saved_and_this_one_pruned(manager, step, *args, **kwargs):
    if step == older and not (checkpoints / str(newest)).exists():
      os.rename(tmp_path / "not_yet_saved", checkpoints / str(newest))
      shutil.rmtree(checkpoints / str(older))
    return real_restore(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", newer_saved_and_this_one_pruned)
  _, state = visualize.load_run(str(workdir))
  assert int(state.step) == newest
  assert sorted(os.listdir(checkpoints)) == [str(newest)]  # Nothing set aside.


def test_a_refused_visualize_prints_one_line_and_no_orbax_noise(trained, tmp_path):
  """After the one error line, orbax's I/O threads printed 6 to 66 lines of "Event loop is
  closed" tracebacks in 2 of 3 tries (seen on a checkpoint whose array files are garbage)."""
  _, source = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  newest = max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  for root, _, names in os.walk(workdir / "checkpoints" / str(newest) / "state"):
    for name in names:
      if os.path.basename(root) == "d":  # The array data files.
        path = os.path.join(root, name)
        open(path, "wb").write(os.urandom(os.path.getsize(path)))
  for _ in range(3):
    proc = run_launch("--mode=visualize", f"--workdir={workdir}")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[:3000]
    assert proc.stderr.startswith(f"error: checkpoint {workdir}/checkpoints/{newest} cannot be")


def test_visualize_refuses_a_config_json_of_another_config(trained, tmp_path):
  """Issue 22: it drew pictures under another config's config.json (here another seed's)."""
  from cnnlab.training import rundir
  config, source = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  seed_1 = copy.deepcopy(config)
  seed_1.seed = 1
  files.write_json_atomic(str(workdir / "config.json"), {
      "fingerprint": rundir.fingerprint(seed_1), "config": rundir.config_to_dict(seed_1)})
  listing = sorted(os.listdir(workdir))
  with pytest.raises(CheckpointError, match=r"config.json records another config \(fingerprint "
                     r"\w+\) than the run's results.json \(\w+\): it was replaced or edited; "
                     r"--mode=visualize needs"):
    visualize.write_pictures(str(workdir))
  assert sorted(os.listdir(workdir)) == listing
