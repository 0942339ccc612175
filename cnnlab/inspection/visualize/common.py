"""What every picture of `cnnlab.inspection.visualize` shares: the Agg backend, saving, showing
input images, and recording the calls of chosen layers during one forward pass."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import numpy as np

if TYPE_CHECKING:
  import matplotlib.pyplot as plt


def pyplot():
  """matplotlib.pyplot on the Agg backend, imported on first use: it costs ~1 s, and a training
  run only needs the numpy filter image (`cnnlab.training.images`)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save(fig: plt.Figure, path: str) -> str:
  """Writes `fig` as a PNG to `path` (atomically, `plots.save`), closes it, returns `path`."""
  from cnnlab.inspection import plots
  return plots.save(fig, path)


def show_image(ax: plt.Axes, image: np.ndarray, title: str | None = None, **title_kw) -> None:
  """Draws a uint8 [H, W, C] dataset image (C = 1: gray) upright, without axis ticks."""
  image = np.asarray(image)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  else:
    ax.imshow(image, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, **title_kw)


def panel_grid(rows: int, cols: int, panel: tuple[float, float] = (1.2, 1.35),
               top: float = 0.6, left: float = 0.15, right: float = 0.15,
               wspace: float = 0.12, hspace: float = 0.4) -> tuple[plt.Figure, np.ndarray]:
  """A figure of rows x cols axes, each `panel` inches (w, h; room for a title line included),
  with fixed margins in inches and no layout engine: constrained layout spent seconds on grids
  of ~50 image axes. Returns (figure, axes [rows, cols])."""
  width, height = cols * panel[0] + left + right, rows * panel[1] + top + 0.1
  fig, axes = pyplot().subplots(rows, cols, figsize=(width, height), squeeze=False,
                                gridspec_kw=dict(left=left / width, right=1 - right / width,
                                                 bottom=0.1 / height, top=1 - top / height,
                                                 wspace=wspace, hspace=hspace))
  return fig, axes


def side_colorbar(fig: plt.Figure, image, axes, label: str = "", width: float = 0.12) -> None:
  """A colour bar `width` inches wide just right of `axes` (one Axes or several), as tall as
  they are together; for figures made by `panel_grid`."""
  boxes = [ax.get_position() for ax in np.ravel(axes)]
  x1, y0, y1 = max(b.x1 for b in boxes), min(b.y0 for b in boxes), max(b.y1 for b in boxes)
  fig_width = fig.get_size_inches()[0]
  cax = fig.add_axes((x1 + 0.08 / fig_width, y0, width / fig_width, y1 - y0))
  bar = fig.colorbar(image, cax=cax)
  bar.ax.tick_params(labelsize=7)
  if label:
    bar.set_label(label, fontsize=8)


@dataclasses.dataclass(frozen=True)
class Call:
  """One recorded layer call: its module path ("stage0_conv0/bn"), the module, first input and
  output (host arrays)."""
  path: str
  module: nn.Module
  input: np.ndarray
  output: np.ndarray


def record_calls(model: nn.Module, variables: dict, images: jax.Array, types: tuple[type, ...],
                 *, train: bool, rngs: dict | None = None) -> list[Call]:
  """The `__call__`s of modules of `types` in call order, during one jitted forward pass of
  `images` [N, H, W, C] in training (batch statistics, dropout on: needs `rngs`) or evaluation
  mode (one compilation, where running the model op by op compiled every primitive)."""
  found: list[tuple[str, nn.Module]] = []

  def forward(variables, images, rngs):
    arrays = []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if isinstance(module, types) and context.method_name == "__call__":
        found.append(("/".join(module.path) or module.name, module))
        arrays.append((args[0], out))
      return out

    with nn.intercept_methods(record):   # Training mode updates (and returns) batch_stats.
      model.apply(variables, images, train=train, rngs=rngs, mutable=["batch_stats"] if train
                  else False)
    return arrays

  arrays = jax.device_get(jax.jit(forward)(variables, images, rngs))
  return [Call(path, module, np.asarray(x), np.asarray(y))
          for (path, module), (x, y) in zip(found, arrays)]
