"""BatchNorm as one run saw it: the running statistics each layer learned, and the activations
entering each BN layer in training vs evaluation mode (the variance shift of Li et al. 2019, see
`cnnlab.inspection.diagnostics`, as a picture)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from flax import traverse_util
from matplotlib import ticker

from cnnlab.inspection.visualize.common import record_calls, save
from cnnlab.nets import layers
from cnnlab.training.images import grid_shape

MAX_PANELS = 16           # BN layers drawn in the train-vs-eval figure (evenly spaced if more).
HISTOGRAM_BINS = 80


def running_stats(batch_stats: dict) -> dict[str, dict[str, np.ndarray]]:
  """{BN layer path: {"mean": [C], "var": [C]}} in parameter order."""
  found: dict[str, dict[str, np.ndarray]] = {}
  for path, leaf in traverse_util.flatten_dict(batch_stats).items():
    found.setdefault("/".join(path[:-1]), {})[path[-1]] = np.asarray(leaf, np.float32)
  return found


def write_running_stats(batch_stats: dict, path: str) -> None:
  """Box plots over channels of each BN layer's running mean (top) and variance (bottom, log)."""
  stats = running_stats(batch_stats)
  names = list(stats)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.55 * len(names) + 2), 6.5),
                                    sharex=True, constrained_layout=True)
  for ax, key, label in ((top, "mean", "running mean"), (bottom, "var", "running variance")):
    ax.boxplot([stats[n][key] for n in names], positions=range(len(names)), widths=0.6,
               showfliers=True, flierprops={"markersize": 2})
    ax.set_ylabel(f"{label} (per channel)")
    ax.grid(axis="y", alpha=0.3)
  bottom.set_yscale("log")
  bottom.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  bottom.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, not 5e-01
  bottom.yaxis.set_minor_formatter(ticker.NullFormatter())
  bottom.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  bottom.set_xlabel("BatchNorm layer")
  top.set_title("BatchNorm running statistics\n(box: quartiles over each layer's channels; "
                "whiskers 1.5 IQR)", fontsize=10)
  save(fig, path)


def write_inputs_train_vs_eval(model, variables: dict, images: np.ndarray, rngs: dict,
                               path: str) -> list[dict[str, float]]:
  """Histograms of the values entering each BN layer for one batch `images`, in training mode
  (dropout on, BN on batch statistics) and evaluation mode (dropout off, running statistics).

  Returns per layer {"layer", "var_train", "var_eval", "ratio"} (mean per-channel variances, as
  `cnnlab.inspection.diagnostics.variance_shift` defines them)."""
  inputs = {mode: {c.path: c.input for c in record_calls(
      model, variables, images, (layers.BatchNorm,), train=mode == "train", rngs=rngs)}
      for mode in ("train", "eval")}
  names = list(inputs["eval"])
  if len(names) > MAX_PANELS:
    names = [names[i] for i in np.linspace(0, len(names) - 1, MAX_PANELS).round().astype(int)]
  rows, cols = grid_shape(len(names), 4)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.6), squeeze=False,
                           constrained_layout=True)
  for ax in axes.flat[len(names):]:
    ax.set_axis_off()
  records = []
  for ax, name in zip(axes.flat, names):
    train_x, eval_x = inputs["train"][name], inputs["eval"][name]
    var = {m: float(np.mean(x.reshape(-1, x.shape[-1]).var(axis=0)))
           for m, x in (("train", train_x), ("eval", eval_x))}
    records.append({"layer": name, "var_train": var["train"], "var_eval": var["eval"],
                    "ratio": var["train"] / var["eval"]})
    lo, hi = np.percentile(np.concatenate([train_x.ravel(), eval_x.ravel()]), [0.1, 99.9])
    bins = np.linspace(lo, hi, HISTOGRAM_BINS)
    for mode, x, color in (("train", train_x, "tab:red"), ("eval", eval_x, "tab:blue")):
      ax.hist(x.ravel(), bins=bins, density=True, histtype="step", color=color, lw=1.2,
              label=f"{mode} (var {var[mode]:.3g})")
    ax.set_yscale("log")
    ax.set_title(f"{name}: var ratio {records[-1]['ratio']:.3f}", fontsize=9)
    ax.set_xlabel("input value", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
  fig.suptitle(f"Values entering each BatchNorm layer, {len(images)} training images: train mode "
               "(dropout on)\nvs eval mode (dropout off); var = mean per-channel variance; ratio "
               "= train / eval", fontsize=10)
  save(fig, path)
  return records
