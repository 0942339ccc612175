"""Pictures of one trained (or checkpointed) run, written to `<workdir>/pictures/` with an index.md:

    python launch.py --mode=visualize --workdir=runs/default

  filters.png              the first conv layer's filters as tiles (RGB or gray), as in seed 004
  feature_maps.png         every conv stage's most active maps for a few test images
  class_accuracy.png       per-class test accuracy
  confusion_matrix.png     true x predicted counts on the test split
  misclassified.png        the most confidently misclassified test images, predicted vs true
  saliency.png             |d predicted score / d pixel| for those images
  bn_running_stats.png     each BN layer's running means and variances (models with BatchNorm)
  bn_train_vs_eval.png     the values entering each BN layer, training vs evaluation mode
  dropout_masks.png        standard vs spatial dropout keep masks on a feature map (with dropout)

The config comes from `<workdir>/config.json`, the weights from its latest checkpoint
(`cnnlab.training.train.load_trained_state`). The sweep report embeds one filter grid per cell with
`write_filter_grid(state_or_params, path)`; `filter_grid_image(state)` gives the same tiles as a
uint8 image for TensorBoard.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np

from cnnlab import data as data_lib
from cnnlab.base import files
from cnnlab.base.errors import CheckpointError
from cnnlab.data.pipeline import normalise
from cnnlab.inspection.visualize.filters import write_filter_grid
from cnnlab.training import restore, rundir, steps
from cnnlab.training.images import filter_grid_image, filter_tiles

__all__ = ["filter_grid_image", "filter_tiles", "load_run", "write_filter_grid",
           "write_pictures"]

PICTURES_DIR = "pictures"
FEATURE_MAP_IMAGES = 3      # Test images whose feature maps are drawn.
MISTAKES = 12               # Misclassified test images (and saliency maps) drawn.
BN_BATCH = 256              # Training images of the BN train-vs-eval picture.


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, steps.TrainState]:
  """The config (from config.json) and latest-checkpoint state of the run in `workdir`.

  Raises:
    CheckpointError: `workdir` holds no readable config.json, one of another config than its
      results and checkpoints, or no checkpoint (nothing written).
  """
  run = rundir.RunDir(workdir)
  hint = ("--mode=visualize needs the workdir of one trained or checkpointed run (a sweep's runs "
          "are <workdir>/cells/<cell>/seed_<s>)")
  config, _ = run.recorded_config(hint)
  if not (os.path.isdir(run.checkpoint_dir)
          and any(name.isdigit() for name in os.listdir(run.checkpoint_dir))):
    raise CheckpointError(f"{workdir} holds no checkpoint in {run.checkpoint_dir}; {hint}.")
  return config, restore.load_trained_state(config, workdir)


def write_pictures(workdir: str) -> str:
  """Writes every picture of the run in `workdir` and `pictures/index.md`; returns index.md's
  path. Pictures that do not apply to the model (no BatchNorm, no dropout) are listed as such."""
  # Matplotlib's pyplot is imported here, not with the package: a training run only needs the
  # numpy filter image (`filter_grid_image`), and pyplot's import costs ~1 s.
  from cnnlab.inspection.visualize import batchnorm, dropout_masks, filters, predictions
  config, state = load_run(workdir)
  out = os.path.join(workdir, PICTURES_DIR)
  os.makedirs(out, exist_ok=True)
  model = steps.setup(config).model
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  apply_eval = functools.partial(jax.jit(lambda v, x: model.apply(v, x, train=False)), variables)
  rngs = steps.step_rngs(state.rngs, state.step - 1)   # The masks of the last training step.
  mean, std = data_lib.normalisation(config.dataset)
  test = data_lib.load_split(config.dataset, "test")
  names = data_lib.class_names(config.dataset)
  entries: list[tuple[str, str | None, str]] = []      # (heading, PNG name or None, text)
  picture = lambda name: os.path.join(out, name)

  try:
    count = write_filter_grid(state, picture("filters.png"))
    entries.append(("First-layer filters", "filters.png", f"{count} filters of the first conv "
                    "layer, each scaled to its own largest |weight| (mid-gray = 0)."))
  except ValueError:
    entries.append(("First-layer filters", None, "the model has no 2-D conv layer."))
  shown = _one_per_class(test.labels, FEATURE_MAP_IMAGES)
  stages = filters.write_feature_maps(
      model, variables, test.images[shown], normalise(test.images[shown], mean, std),
      [f"test #{i}, {names[test.labels[i]]}" for i in shown], picture("feature_maps.png"))
  entries.append(("Feature maps", "feature_maps.png" if stages else None,
                  f"Conv stages (last block per resolution, eval mode): {', '.join(stages)}."
                  if stages else "the model has no conv stage with maps larger than 1x1."))

  logits, labels = predictions.predict(
      apply_eval, data_lib.eval_batches(config.dataset, "test", config.eval_batch_size))
  assert np.array_equal(labels, test.labels), "eval_batches must keep the split's order"
  probs = np.asarray(jax.nn.softmax(logits, -1))
  counts = predictions.confusion_matrix(labels, probs.argmax(-1), probs.shape[-1])
  predictions.write_class_accuracy(counts, picture("class_accuracy.png"), names)
  predictions.write_confusion_matrix(counts, picture("confusion_matrix.png"), names)
  accuracy = np.trace(counts) / counts.sum()
  entries += [("Per-class accuracy", "class_accuracy.png",
               f"Test accuracy {100 * accuracy:.2f}% over {counts.sum()} images."),
              ("Confusion matrix", "confusion_matrix.png", "Rows: true class; columns: "
               "predicted class; log colour scale.")]
  mistakes = predictions.confident_mistakes(probs, labels, MISTAKES)
  predictions.write_mistakes(test.images, probs, labels, mistakes, picture("misclassified.png"),
                             names)
  entries.append(("Most confident mistakes", "misclassified.png",
                  f"{len(mistakes)} of {int(counts.sum() - np.trace(counts))} misclassified "
                  "test images, highest predicted probability first."))
  index = mistakes if len(mistakes) else np.arange(MISTAKES)
  what = "misclassified test images" if len(mistakes) else "first test images (none is wrong)"
  grads = predictions.saliency(apply_eval, normalise(test.images[index], mean, std))
  predictions.write_saliency(test.images, grads, probs, labels, index, picture("saliency.png"),
                             what, names)
  entries.append(("Saliency", "saliency.png", f"Gradient of the predicted class's logit w.r.t. "
                  f"the input, max |.| over channels, for the {what}."))

  if jax.tree_util.tree_leaves(state.batch_stats):
    batchnorm.write_running_stats(state.batch_stats, picture("bn_running_stats.png"))
    train_images = data_lib.load_split(config.dataset, "train").images[:BN_BATCH]
    shift = batchnorm.write_inputs_train_vs_eval(
        model, variables, normalise(train_images, mean, std), rngs, picture("bn_train_vs_eval.png"))
    ratios = ", ".join(f"{r['layer']} {r['ratio']:.3f}" for r in shift)
    entries += [("BatchNorm running statistics", "bn_running_stats.png",
                 "Per-channel running means and variances of each BN layer."),
                ("BatchNorm inputs, train vs eval", "bn_train_vs_eval.png",
                 f"Variance ratio train/eval per BN layer: {ratios}.")]
  else:
    entries.append(("BatchNorm", None, "the model has no BatchNorm layer."))
  layer = dropout_masks.write_dropout_masks(
      model, variables, normalise(test.images[:1], mean, std), rngs, picture("dropout_masks.png"))
  entries.append(("Dropout masks", "dropout_masks.png" if layer else None,
                  f"Keep masks on the input of {layer}." if layer else
                  "the model has no dropout on a feature map (model.dropout="
                  f"{config.model.dropout}, rate {config.model.dropout_rate})."))
  return _write_index(out, config, state, workdir, entries)


def _one_per_class(labels: np.ndarray, count: int) -> np.ndarray:
  """Indices of the first example of each of the first `count` classes met in `labels`."""
  _, first = np.unique(labels, return_index=True)
  return np.sort(first)[:count]


def _write_index(out: str, config, state, workdir: str, entries) -> str:
  """index.md: what run this is, then one section per picture (or why it is absent)."""
  lines = [f"# Pictures of {os.path.abspath(workdir)}", "",
           f"Model `{config.model.name}` on `{config.dataset.name}`, checkpoint step "
           f"{int(state.step)}, config `{config.name}` (seed {config.seed}).", ""]
  for heading, png, text in entries:
    lines += [f"## {heading}", "", text if png else f"Not drawn: {text}", ""]
    if png:
      lines += [f"![{heading}]({png})", ""]
  path = os.path.join(out, "index.md")
  files.write_text_atomic(path, "\n".join(lines))
  return path
