"""What a trained classifier gets wrong: per-class accuracy, the confusion matrix, the most
confidently misclassified test images, and saliency maps (Simonyan, Vedaldi & Zisserman 2014:
the gradient of the predicted class score w.r.t. the input pixels)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

from cnnlab.inspection.visualize.common import (
  panel_grid,
  save,
  show_image,
  side_colorbar,
)
from cnnlab.training.images import grid_shape

MISTAKE_COLUMNS = 4            # Panels per row of misclassified images (saliency: pairs).
ANNOTATE_MAX_CLASSES = 20      # Confusion matrices up to this size print their counts.


def predict(apply_eval: Callable, batches) -> tuple[np.ndarray, np.ndarray]:
  """(logits [N, K] float32, labels [N]) over padded eval batches (mask 0 rows dropped);
  `apply_eval(images) -> logits` is the model in evaluation mode."""
  logits, labels = [], []
  for batch in batches:
    keep = np.asarray(batch["mask"]) > 0
    logits.append(np.asarray(apply_eval(jnp.asarray(batch["image"])))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(logits).astype(np.float32), np.concatenate(labels)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [K, K]: row = true class, column = predicted class."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (labels, predicted), 1)
  return counts


def confident_mistakes(probs: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
  """Indices of up to `count` misclassified examples, most confident (highest predicted
  probability) first."""
  predicted = probs.argmax(-1)
  wrong = np.flatnonzero(predicted != labels)
  return wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:count]


def saliency(apply_eval: Callable, images: jax.Array) -> np.ndarray:
  """d(logit of the predicted class)/d(input) for each image [N, H, W, C] -> [N, H, W, C].

  In evaluation mode the examples of a batch are independent, so the gradient of the sum of the
  predicted-class logits gives each image its own gradient."""
  def score(x):
    logits = apply_eval(x)
    predicted = jax.lax.stop_gradient(jnp.argmax(logits, -1))
    return jnp.take_along_axis(logits, predicted[:, None], axis=1).sum()

  return np.asarray(jax.jit(jax.grad(score))(jnp.asarray(images, jnp.float32)))


def _names(class_names, k: int) -> list[str]:
  """The labels of classes 0..k-1: their names (None: their numbers)."""
  return list(class_names) if class_names is not None else [str(i) for i in range(k)]


def _class_ticks(set_ticks, names: list[str]) -> None:
  """Ticks at 0..k-1 labelled with `names`, turned upright when they are words."""
  set_ticks(range(len(names)), names, fontsize=8,
            rotation=90 if any(len(n) > 2 for n in names) else 0)


def write_class_accuracy(counts: np.ndarray, path: str, class_names=None) -> None:
  """Bar chart of per-class test accuracy (the confusion matrix's diagonal / row sums)."""
  per_class = 100 * np.diag(counts) / np.maximum(counts.sum(1), 1)
  overall = 100 * np.trace(counts) / max(counts.sum(), 1)
  k = len(counts)
  fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * k + 2), 3.8), constrained_layout=True)
  ax.bar(range(k), per_class, color="tab:blue")
  ax.axhline(overall, color="black", ls="--", lw=1)
  bottom = max(0.0, min(per_class.min() - 5, 90))
  for i, v in enumerate(per_class):
    ax.text(i, v - 0.3, f"{v:.1f}", ha="center", va="top", fontsize=7, color="white",
            rotation=90 if k > 20 else 0)
  _class_ticks(ax.set_xticks, _names(class_names, k))
  ax.set(xlabel="true class", ylabel="test accuracy (%)", ylim=(bottom, 100.5),
         title=f"Per-class test accuracy (dashed: overall {overall:.2f}%; y axis from "
               f"{bottom:.0f}%)")
  save(fig, path)


def write_confusion_matrix(counts: np.ndarray, path: str, class_names=None) -> None:
  """Heat map of the confusion counts with a colour bar (log-scaled: errors stay visible beside
  the large diagonal)."""
  k = len(counts)
  size = max(4.5, 0.42 * k + 2)
  fig, ax = plt.subplots(figsize=(size + 1, size), constrained_layout=True)
  im = ax.imshow(np.where(counts > 0, counts, np.nan), cmap="Blues",
                 norm=mcolors.LogNorm(vmin=1, vmax=max(int(counts.max()), 2)))
  fig.colorbar(im, ax=ax, label="test images (log scale)", shrink=0.8,
               ticks=ticker.LogLocator(subs=(1.0, 2.0, 5.0)), format="%g")
  if k <= ANNOTATE_MAX_CLASSES:
    threshold = np.sqrt(max(int(counts.max()), 1))
    for (i, j), v in np.ndenumerate(counts):
      if v:
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > threshold else "black")
  _class_ticks(ax.set_xticks, _names(class_names, k))
  ax.set_yticks(range(k), _names(class_names, k), fontsize=8)
  ax.set(xlabel="predicted class", ylabel="true class",
         title=f"Confusion matrix ({counts.sum()} test images, {np.trace(counts)} correct)")
  save(fig, path)


def _caption(probs: np.ndarray, labels: np.ndarray, i: int, class_names=None) -> str:
  p = int(probs[i].argmax())
  names = _names(class_names, probs.shape[-1])
  return f"#{i}: pred {names[p]} ({100 * probs[i, p]:.0f}%)\ntrue {names[labels[i]]}"


def write_mistakes(raw: np.ndarray, probs: np.ndarray, labels: np.ndarray, index: np.ndarray,
                   path: str, class_names=None) -> None:
  """The test images `index` (uint8 `raw` [N, H, W, C]) captioned with test index, predicted
  class and probability, and true class (by name, given `class_names`)."""
  rows, cols = grid_shape(max(len(index), 1), MISTAKE_COLUMNS)
  fig, axes = panel_grid(rows, cols, panel=(1.8, 2.1), top=0.8, hspace=0.45)
  for ax in axes.flat:
    ax.set_axis_off()
  for ax, i in zip(axes.flat, index):
    show_image(ax, raw[i], _caption(probs, labels, i, class_names), fontsize=8)
    ax.set_axis_on()
  if not len(index):
    axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
  fig.suptitle("Most confidently misclassified test images", fontsize=10)
  save(fig, path)


def write_saliency(raw: np.ndarray, grads: np.ndarray, probs: np.ndarray, labels: np.ndarray,
                   index: np.ndarray, path: str, what: str, class_names=None) -> None:
  """Each image `index` beside its saliency map: max over channels of |gradient| (`grads`
  [n, H, W, C] for those images), scaled to the image's own maximum."""
  maps = np.abs(grads).max(axis=-1)
  maps = maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
  rows, cols = grid_shape(len(index), MISTAKE_COLUMNS)
  fig, axes = panel_grid(rows, 2 * cols, panel=(1.7, 2.1), top=0.8, right=1.0, hspace=0.45)
  for ax in axes.flat:
    ax.set_axis_off()
  im = None
  for n, i in enumerate(index):
    r, c = divmod(n, cols)
    show_image(axes[r, 2 * c], raw[i], _caption(probs, labels, i, class_names), fontsize=8)
    axes[r, 2 * c].set_axis_on()
    im = axes[r, 2 * c + 1].imshow(maps[n], cmap="hot", vmin=0, vmax=1, interpolation="nearest")
    axes[r, 2 * c + 1].set_title("saliency", fontsize=8)
  if im is not None:
    side_colorbar(fig, im, axes, "|d score / d pixel| / its max", width=0.18)
  fig.suptitle(f"Saliency of the predicted class score, {what}", fontsize=10)
  save(fig, path)
