"""The sweep report's figures and a run's learning curve (matplotlib, Agg backend: no display
needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from cnnlab.base import files

DPI = 120


def save(fig: plt.Figure, path: str) -> str:
  """Writes `fig` as a PNG to `path` atomically (a reader sees the old file or the whole new
  one; a failed write is one WorkdirError), closes it, and returns `path`."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  plt.close(fig)
  files.write_bytes_atomic(path, buffer.getvalue())
  return path


def clipped(stat: tuple[float, float, float, float]) -> bool:
  """Whether the 95% t-interval of an accuracy `stats.mean_ci` runs past [0, 1]: the figures
  draw it clipped there (an accuracy cannot leave it)."""
  return stat[2] < 0 or stat[3] > 1


def accuracy(path: str, summary: list[dict], rows: list[dict], baseline: str) -> None:
  """Test accuracy per cell: mean with 95% CI bars (clipped to [0, 100]%, the clipped ends
  marked), one dot per seed of `rows` (the finished runs); baseline highlighted; a cell without
  finished runs (all diverged) is labelled so."""
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(summary) + 1.5), constrained_layout=True)
  for i, s in enumerate(summary):
    if not s["n"]:
      ax.annotate("all seeds diverged", (0, i), xycoords=("axes fraction", "data"),
                  xytext=(4, 0), textcoords="offset points", va="center", color="tab:gray")
      continue
    mean, _, lo, hi = (100 * v for v in s["test_accuracy"])
    color = "tab:red" if s["cell"] == baseline else "tab:blue"
    err = None if np.isnan(lo) else [[max(mean - max(lo, 0), 0)], [max(min(hi, 100) - mean, 0)]]
    ax.errorbar(mean, i, xerr=err, fmt="o", color=color, capsize=4, markersize=7)
    if lo < 0:  # An arrowhead where the interval is cut.
      ax.plot(0, i, marker="<", color=color, markersize=8)
    if hi > 100:
      ax.plot(100, i, marker=">", color=color, markersize=8)
    seeds = [100 * r["test_accuracy"] for r in rows if r["cell"] == s["cell"]]
    ax.scatter(seeds, [i + 0.18] * len(seeds), s=12, color="gray", alpha=0.7)
  ax.set_yticks(range(len(summary)), [
      s["cell"] + (" (baseline)" if s["cell"] == baseline else "")
      + (f" ({len(s['diverged'])} of {s['runs']} diverged)" if s["diverged"] else "")
      for s in summary])
  ax.invert_yaxis()
  ax.set_xlabel("test accuracy (%)")
  note = "; arrowheads: interval clipped at 0 or 100%" if any(
      s["n"] and clipped(s["test_accuracy"]) for s in summary) else ""
  # A figure title that wraps: one over the axes ran off the figure beside long cell names.
  fig.suptitle(f"Test accuracy: mean with 95% t-interval{note}; gray dots: finished seeds",
               wrap=True)
  ax.grid(axis="x", alpha=0.3)
  save(fig, path)


def accuracy_by_axis(path: str, summary: list[dict], rows: list[dict], axis: str) -> None:
  """Test accuracy (mean, 95% CI bars) against the values of sweep axis `axis` (x, in sweep
  order), one line per combination of the other axes (a cell's name without `axis=value`)."""
  values = list(dict.fromkeys(str(r[axis]) for r in rows))
  lines: dict[str, dict[str, tuple]] = {}
  for s in summary:
    value = next((str(r[axis]) for r in rows if r["cell"] == s["cell"]), None)
    if value is not None:
      rest = ",".join(p for p in s["cell"].split(",") if p != f"{axis}={value}") or "all"
      lines.setdefault(rest, {})[value] = s["test_accuracy"]
  fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
  for i, (name, by_value) in enumerate(lines.items()):
    xs = [j + (i - (len(lines) - 1) / 2) * 0.04 for j, v in enumerate(values) if v in by_value]
    stats = [by_value[v] for v in values if v in by_value]
    mean = np.array([100 * m for m, _, _, _ in stats])
    lo = np.array([100 * max(l, 0) if np.isfinite(l) else 100 * m for m, _, l, _ in stats])
    hi = np.array([100 * min(h, 1) if np.isfinite(h) else 100 * m for m, _, _, h in stats])
    ax.errorbar(xs, mean, yerr=[np.maximum(mean - lo, 0), np.maximum(hi - mean, 0)], marker="o",
                capsize=3, label=name)
  note = " (clipped to 0-100%)" if any(
      clipped(stat) for by_value in lines.values() for stat in by_value.values()) else ""
  ax.set_xticks(range(len(values)), ["all" if v == "None" else v for v in values])
  ax.set(xlabel=axis, ylabel="test accuracy (%)")
  fig.suptitle(f"Test accuracy by {axis}: mean over seeds, bars = 95% t-interval{note}",
               wrap=True)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, path)


def _band(runs: list[list[dict]], split: str, key: str):
  """(steps, mean, min, max) over seeds of `key` on `split` lines (steps shared by all seeds)."""
  series = [{m["step"]: m[key] for m in run if m["split"] == split} for run in runs]
  steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
  values = np.array([[s[t] for t in steps] for s in series])
  if not steps:
    return steps, values, values, values
  return steps, values.mean(0), values.min(0), values.max(0)


def _held_out(lines: list[dict]) -> str:
  """The split of the learning curves in metrics `lines`: validation if any, else test."""
  return "validation" if any(m["split"] == "validation" for m in lines) else "test"


def learning_curve(path: str, metrics: list[dict], title: str) -> str:
  """One run's loss and accuracy vs step (and epoch, on top) from its metrics.jsonl `metrics`:
  train (mean over each log interval) and held-out (validation, or test for a run without a
  validation split; end of each epoch). Written atomically like every figure; returns `path`."""
  held_out = _held_out(metrics)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
  per_epoch = [m["step"] / m["epoch"] for m in metrics if m.get("epoch")]
  for ax, key, scale, unit in zip(axes, ("loss", "accuracy"), (1.0, 100.0), ("nats", "%")):
    for split, marker in (("train", None), (held_out, "o")):
      steps, values, _, _ = _band([metrics], split, key)
      if steps:
        ax.plot(steps, scale * values, marker=marker, lw=1.5, label=split)
    ax.set(xlabel="training step", ylabel=f"{key} ({unit})")
    if per_epoch:
      ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch[0],
                                           lambda e: e * per_epoch[0])).set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  return save(fig, path)


def curves(path: str, curves_by_cell: dict[str, list[list[dict]]]) -> None:
  """Train loss and held-out accuracy (validation, or test for runs without a validation split)
  vs step, mean line per cell with a min-max band over seeds."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
  colors = plt.get_cmap("tab10")
  held_out = _held_out([m for runs in curves_by_cell.values() for run in runs for m in run])
  for i, (cell, runs) in enumerate(curves_by_cell.items()):
    color = colors(i % 10)
    for ax, split, key, scale in ((left, "train", "loss", 1.0), (right, held_out, "accuracy", 100)):
      steps, mean, lo, hi = _band(runs, split, key)
      if steps:
        ax.plot(steps, scale * mean, color=color, label=cell, lw=1.5,
                marker="." if split == held_out else None)
        ax.fill_between(steps, scale * lo, scale * hi, color=color, alpha=0.15, lw=0)
  left.set(xlabel="training step", ylabel="train loss (nats, mean over log interval)",
           yscale="log", title="Train loss: mean over seeds, band = min–max")
  right.set(xlabel="training step", ylabel=f"{held_out} accuracy (%)",
            title=f"{held_out.capitalize()} accuracy (end of each epoch): mean, band = min–max")
  for ax in (left, right):
    ax.grid(alpha=0.3)
  handles, labels = left.get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
  save(fig, path)


def variance_shift(path: str, diagnostics: dict[str, list[dict]]) -> None:
  """Grouped bars: var_train / var_eval per BN layer (x) and cell (colour); line at 1."""
  cells = [c for c, records in diagnostics.items() if records]
  fig, ax = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
  if not cells:
    ax.text(0.5, 0.5, "no BatchNorm layers in any cell", ha="center", va="center")
    ax.set_axis_off()
  else:
    layers = list(dict.fromkeys(d["layer"] for c in cells for d in diagnostics[c]))
    width = 0.8 / len(cells)
    for i, cell in enumerate(cells):
      ratio = {d["layer"]: d["ratio"] for d in diagnostics[cell]}
      xs = [j + (i - (len(cells) - 1) / 2) * width for j in range(len(layers))]
      ax.bar(xs, [ratio.get(l, np.nan) for l in layers], width, label=cell)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xticks(range(len(layers)), layers, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="Var[BN input] train / eval (ratio)", xlabel="BatchNorm layer",
           title="Variance shift per BN layer (1 = no shift; dropout before BN moves it)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  save(fig, path)


def _tuning_x(axis, values: list) -> tuple[list, list | None]:
  """x positions of `values` on `axis`, and tick labels where they are categories (a values
  axis with a non-numeric value is drawn at the positions 0, 1, ... of its values)."""
  if axis.kind != "values" or all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  for v in axis.values):
    return values, None
  index = {repr(v): i for i, v in enumerate(axis.values)}
  return [index[repr(v)] for v in values], [str(v) for v in axis.values]


def tuning(path: str, cells: dict[str, dict]) -> None:
  """Validation accuracy against each nuisance axis: one row of subplots per cell, one column
  per axis. cells: {cell name: {"axes": [tuning.Axis], "trials": [{point, seed, status,
  validation_accuracy, ...}], "per_point": Selection.per_point, "chosen": point or None}}.
  Every trial is a gray dot (a diverged one a red cross at 0); each point's mean over seeds
  (diverged = 0, the selection rule) a blue diamond; the chosen point a red ring and a dotted
  red line; outside the searched range shaded gray. Log axes are drawn on a log scale; with
  several axes each column shows every point at its value on that axis."""
  names = list(cells)
  width = max(len(cells[c]["axes"]) for c in names)
  # One nuisance axis: the cells side by side, three to a row; several: a row per cell.
  columns = min(3, len(names)) if width == 1 else width
  rows = -(-len(names) // columns) if width == 1 else len(names)
  fig, grid = plt.subplots(rows, columns, figsize=(4.5 * columns + 1, 3 * rows + 0.8),
                           squeeze=False, constrained_layout=True)
  panels = grid.reshape(-1, 1) if width == 1 else grid
  for row, cell in zip(panels, names):
    entry = cells[cell]
    for ax, axis in zip(row, entry["axes"]):
      finished = [t for t in entry["trials"] if t["status"] == "finished"]
      diverged = [t for t in entry["trials"] if t["status"] != "finished"]
      xs, labels = _tuning_x(axis, [t["point"][axis.name] for t in finished])
      ax.scatter(xs, [100 * t["validation_accuracy"] for t in finished], s=14, color="gray",
                 alpha=0.7, label="trial (point x seed)")
      if diverged:
        xs, _ = _tuning_x(axis, [t["point"][axis.name] for t in diverged])
        ax.scatter(xs, [0] * len(xs), marker="x", color="tab:red", label="diverged trial")
      xs, _ = _tuning_x(axis, [p["point"][axis.name] for p in entry["per_point"]])
      ax.scatter(xs, [100 * p["mean"] for p in entry["per_point"]], marker="D", s=28,
                 color="tab:blue", label="mean over seeds")
      chosen = entry.get("chosen")
      if chosen is not None:
        (x,), _ = _tuning_x(axis, [chosen[axis.name]])
        mean = next(p["mean"] for p in entry["per_point"] if p["point"] == chosen)
        ax.axvline(x, color="tab:red", ls=":", lw=1)
        ax.scatter([x], [100 * mean], s=160, facecolors="none", edgecolors="tab:red", lw=1.8,
                   label="chosen")
      if axis.kind != "values":   # The whole range and a tenth of it beyond each end.
        if axis.kind == "log":
          ax.set_xscale("log")
          pad = (axis.high / axis.low) ** 0.1
          left, right = axis.low / pad, axis.high * pad
          ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
          ax.xaxis.set_minor_formatter(ticker.NullFormatter())
          tried = sorted({p["point"][axis.name] for p in entry["per_point"]})
          if len(tried) <= 8:   # Ticks at the values tried, where they are few.
            ax.set_xticks(tried, [f"{v:g}" for v in tried])
        else:
          pad = (axis.high - axis.low) * 0.1
          left, right = axis.low - pad, axis.high + pad
        ax.axvspan(left, axis.low, color="gray", alpha=0.15, lw=0)
        ax.axvspan(axis.high, right, color="gray", alpha=0.15, lw=0, label="outside the range")
        ax.set_xlim(left, right)
      elif labels is not None:
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
      ax.set(xlabel=f"{axis.key} ({axis.kind})", ylabel="validation accuracy (%)",
             title=cell, ylim=(-5, 105))
      ax.title.set_fontsize(9)
      ax.grid(alpha=0.3)
    for ax in row[len(entry["axes"]):]:
      ax.set_axis_off()
  for ax in panels[len(names):].ravel():   # Empty places of the last row.
    ax.set_axis_off()
  handles: dict = {}   # One legend entry per label, from whichever subplot drew it.
  for ax in fig.axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  fig.legend(list(handles.values()), list(handles), loc="outside lower center",
             ncol=len(handles) if width > 1 else 3, fontsize=8, frameon=False)
  fig.suptitle("Tuning on the validation split: accuracy per trial, mean per point, chosen "
               "point ringed; shaded: outside the searched range", wrap=True)
  save(fig, path)
