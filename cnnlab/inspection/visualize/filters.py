"""First-layer filters as image tiles (as the AlexNet picture of lecture seed 004) and the feature
maps each conv stage computes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnnlab.inspection.visualize.common import (
  grid_shape,
  panel_grid,
  record_calls,
  save,
  show_image,
  side_colorbar,
)
from cnnlab.nets import layers

FILTER_COLUMNS = 16           # At most this many filter tiles per row.
FEATURE_CHANNELS = 8          # Feature maps shown per (image, stage): the most active channels.
# Root-level modules whose outputs are a network's conv stages (ResNet stems are plain nn.Conv).
STAGE_TYPES = (nn.Conv, layers.ConvBlock, layers.ResidualUnit, layers.Inception)


def first_conv_kernel(state_or_params: Any) -> tuple[str, np.ndarray]:
  """(parameter path, kernel [kh, kw, C_in, F]) of the first 2-D conv a model creates: the first
  4-D `kernel` in parameter order (Flax keeps creation order; checkpoints restore it).

  Takes a TrainState (its `params`), a variables dict with "params", or the params themselves.
  """
  params = getattr(state_or_params, "params", state_or_params)
  if hasattr(params, "get") and "params" in params:
    params = params["params"]
  for path, leaf in traverse_util.flatten_dict(params).items():
    if path[-1] == "kernel" and np.ndim(leaf) == 4:
      return "/".join(path[:-1]), np.asarray(leaf, np.float32)
  raise ValueError("the parameters hold no 2-D conv kernel [kh, kw, C_in, F].")


def filter_tiles(kernel: np.ndarray) -> np.ndarray:
  """Kernel [kh, kw, C_in, F] -> F tiles [F, kh, kw, C] in [0, 1], C = 3 (RGB) for 3 input
  channels, else 1 (gray; the mean over input channels). Each filter is scaled by its own largest
  |weight| so that 0.5 (mid-gray) is a zero weight: tiles show shape and sign, not size."""
  kernel = np.asarray(kernel, np.float32)
  if kernel.shape[2] != 3:
    kernel = kernel.mean(axis=2, keepdims=True)
  tiles = np.moveaxis(kernel, -1, 0)                                  # [F, kh, kw, C]
  scale = np.abs(tiles).max(axis=(1, 2, 3), keepdims=True)
  return 0.5 + 0.5 * tiles / np.where(scale > 0, scale, 1.0)


def filter_grid_image(state_or_params: Any, zoom: int = 4) -> np.ndarray:
  """The first conv layer's filters as one uint8 [H, W, C] image (tiles `zoom`x enlarged, white
  1-pixel gaps), e.g. for `MetricWriter.write_images`."""
  tiles = filter_tiles(first_conv_kernel(state_or_params)[1])
  tiles = tiles.repeat(zoom, axis=1).repeat(zoom, axis=2)
  count, h, w, c = tiles.shape
  rows, cols = grid_shape(count, FILTER_COLUMNS)
  grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
  for i, tile in enumerate(tiles):
    r, k = divmod(i, cols)
    grid[1 + r * (h + 1):(r + 1) * (h + 1), 1 + k * (w + 1):(k + 1) * (w + 1)] = tile
  return np.round(grid * 255).astype(np.uint8)


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
               f"colour scale shared along a row", fontsize=10)
  save(fig, path)
  return [s.path for s in stages]
