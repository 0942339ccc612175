"""First-layer filters as image tiles (as the AlexNet picture of lecture seed 004) and the feature
maps each conv stage computes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnnlab.inspection.visualize.common import (
  panel_grid,
  record_calls,
  save,
  show_image,
  side_colorbar,
)
from cnnlab.nets import layers
from cnnlab.training.images import (
  FILTER_COLUMNS,
  filter_tiles,
  first_conv_kernel,
  grid_shape,
)

FEATURE_CHANNELS = 8          # Feature maps shown per (image, stage): the most active channels.
# Root-level modules whose outputs are a network's conv stages (ResNet stems are plain nn.Conv).
STAGE_TYPES = (nn.Conv, layers.ConvBlock, layers.ResidualUnit, layers.Inception)


def write_filter_grid(state_or_params: Any, path: str, title: str | None = None) -> int:
  """Draws the first conv layer's filters, one numbered tile each, to the PNG `path`; returns the
  number of tiles (= the layer's output channels). Takes a TrainState or its params."""
  name, kernel = first_conv_kernel(state_or_params)
  tiles = filter_tiles(kernel)
  rows, cols = grid_shape(len(tiles), FILTER_COLUMNS)
  fig, axes = panel_grid(rows, cols, panel=(max(1.0, 6.0 / cols), 1.1), top=0.75)
  for i, ax in enumerate(axes.flat):
    if i >= len(tiles):
      ax.set_axis_off()
      continue
    tile = tiles[i]
    ax.imshow(tile if tile.shape[-1] == 3 else tile[..., 0], cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(str(i), fontsize=8, pad=2)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():  # A thin frame: white weights stay visible on the page.
      spine.set_edgecolor("0.6")
      spine.set_linewidth(0.6)
  kh, kw, c_in, count = kernel.shape
  colour = "RGB" if c_in == 3 else ("gray" if c_in == 1 else f"gray = mean of {c_in} inputs")
  fig.suptitle(title or f"First conv layer {name}: {count} filters {kh}x{kw}x{c_in} ({colour})\n"
               f"each scaled to its own max |w|; mid-gray = 0", fontsize=10)
  save(fig, path)
  return len(tiles)


def stage_outputs(model: nn.Module, variables: dict, images: jnp.ndarray) -> list:
  """The last root-level conv block of each spatial resolution, in eval mode: the output of every
  conv stage (maps of 1x1 are left out). Returns `common.Call`s."""
  calls = [c for c in record_calls(model, variables, images, STAGE_TYPES, train=False)
           if len(c.module.path) == 1 and c.output.ndim == 4 and c.output.shape[1:3] != (1, 1)]
  return [c for i, c in enumerate(calls)
          if i + 1 == len(calls) or calls[i + 1].output.shape[1:3] != c.output.shape[1:3]]


def write_feature_maps(model: nn.Module, variables: dict, raw: np.ndarray, images: np.ndarray,
                       captions: list[str], path: str) -> list[str]:
  """For each input (uint8 `raw` [N, H, W, C], normalised `images`, `captions`), its image beside
  the `FEATURE_CHANNELS` most active (largest mean) channels of every conv stage; one colour bar
  per row. Returns the stage names; draws nothing when the model has no conv stage."""
  stages = stage_outputs(model, variables, jnp.asarray(images))
  if not stages:
    return []
  shown = min(FEATURE_CHANNELS, max(s.output.shape[-1] for s in stages))
  rows, cols = len(raw) * len(stages), shown + 1
  fig, axes = panel_grid(rows, cols, panel=(1.25, 1.35), top=0.8, right=0.75)
  for n in range(len(raw)):
    for s, stage in enumerate(stages):
      row = axes[n * len(stages) + s]
      for ax in row:
        ax.set_axis_off()
      if s == 0:
        show_image(row[0], raw[n], captions[n], fontsize=8)
        row[0].set_axis_on()
      maps = stage.output[n]                                            # [h, w, C]
      top = np.argsort(-maps.mean(axis=(0, 1)))[:shown]
      lo, hi = float(maps[..., top].min()), float(maps[..., top].max())
      for j, channel in enumerate(top, start=1):
        im = row[j].imshow(maps[..., channel], cmap="viridis", vmin=lo, vmax=hi,
                           interpolation="nearest")
        row[j].set_title(f"{stage.path} ch {channel}", fontsize=6, pad=2)
      side_colorbar(fig, im, row[len(top)])
  fig.suptitle("Feature maps of each conv stage (eval mode): the most active channels per image; "
               "colour scale shared along a row", fontsize=10)
  save(fig, path)
  return [s.path for s in stages]
