"""The images a training run logs (TensorBoard) and the pictures reuse: the first conv layer's
filters as tiles. numpy only: a run draws them without importing matplotlib."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util

FILTER_COLUMNS = 16           # At most this many filter tiles per row.


def grid_shape(count: int, max_cols: int) -> tuple[int, int]:
  """(rows, cols) of a near-square grid holding `count` panels, at most `max_cols` wide."""
  cols = max(1, min(max_cols, int(np.ceil(np.sqrt(count)))))
  return int(np.ceil(count / cols)), cols


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
