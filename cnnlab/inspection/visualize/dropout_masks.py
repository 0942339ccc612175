"""What "drop whole channels" means: on the feature map entering a model's first dropout layer in a
training-mode forward pass, the keep masks of standard (element-wise) and spatial (per channel)
dropout at the model's rate, drawn with the model's own RNG keys (plus DropBlock's if it uses
it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.inspection.visualize.common import panel_grid, record_calls, save, side_colorbar
from cnnlab.nets import layers

MAX_CHANNELS = 16          # Channels (columns) drawn.


def keep_mask(kind: str, rate: float, block_size: int, shape: tuple[int, ...],
              rngs: dict[str, jax.Array]) -> np.ndarray:
  """The 0/1 keep mask [*shape] one training-mode call of `layers.Dropout(kind, ...)` draws (the
  layer applied to ones: survivors come out as 1/(1-rate) > 0)."""
  out = layers.Dropout(kind, rate, block_size).apply({}, jnp.ones(shape), train=True, rngs=rngs)
  return (np.asarray(out) > 0).astype(np.float32)


def write_dropout_masks(model, variables: dict, image: np.ndarray, rngs: dict,
                        path: str) -> str | None:
  """Draws, for one normalised `image` [1, H, W, C], the feature map entering the model's first
  dropout layer on a spatial map and the keep masks of each kind on it. Returns that layer's
  path, or None (nothing drawn) when the model has no active dropout on a feature map."""
  calls = [c for c in record_calls(model, variables, image, (layers.Dropout,), train=True,
                                   rngs=rngs)
           if c.module.kind != "none" and c.module.rate > 0 and c.input.ndim == 4]
  if not calls:
    return None
  layer = calls[0]
  kinds = ["standard", "spatial"] + (["dropblock"] if layer.module.kind == "dropblock" else [])
  shape = layer.input.shape
  masks = {k: keep_mask(k, layer.module.rate, layer.module.block_size, shape, rngs)[0]
           for k in kinds}
  fmap = layer.input[0]                                                 # [h, w, C]
  channels = min(MAX_CHANNELS, shape[-1])
  fig, axes = panel_grid(1 + len(kinds), channels, panel=(1.0, 1.15), top=0.75, left=1.3,
                         right=0.7)
  im = None
  for j in range(channels):
    im = axes[0, j].imshow(fmap[..., j], cmap="viridis", vmin=fmap[..., :channels].min(),
                           vmax=fmap[..., :channels].max(), interpolation="nearest")
    axes[0, j].set_title(f"ch {j}", fontsize=7, pad=2)
    for i, kind in enumerate(kinds, start=1):
      axes[i, j].imshow(masks[kind][..., j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0, 0].set_ylabel("feature map", fontsize=8)
  for i, kind in enumerate(kinds, start=1):
    dropped = 1 - masks[kind][..., :channels]
    whole = int((dropped.reshape(-1, channels).min(axis=0) == 1).sum())
    axes[i, 0].set_ylabel(f"{kind}\n{100 * dropped.mean():.0f}% dropped\n{whole} whole ch",
                          fontsize=8)
  side_colorbar(fig, im, axes[0, -1])
  fig.suptitle(f"Dropout keep masks (white = kept, black = dropped) at rate {layer.module.rate:g}"
               f"\non the input of {layer.path} ({shape[1]}x{shape[2]}x{shape[3]}; the model uses "
               f"{layer.module.kind}), first {channels} channels", fontsize=10)
  save(fig, path)
  return layer.path
