"""Per-example image transforms for the streaming pipeline: decoding, resizing, crops, flips.

An example transform is a picklable callable `transform(image uint8 [H, W, C], rng) -> uint8
[h, w, C]` with one output shape for every input shape; grain worker processes get a pickled copy,
so transforms are `functools.partial`s of module-level functions. The rng of example `index` in
`epoch` is `example_rng(seed, epoch, index)`: augmentation depends on neither the batch position,
nor the number of processes or workers, nor a resume. Eval transforms ignore the rng (pass None).

Resizing is PIL's bilinear filter, which widens its kernel when shrinking (antialiased, as
torchvision's `antialias=True`); the crops follow torchvision's `RandomResizedCrop`,
`Resize(int)` and `CenterCrop`, so a cnnlab run and a torchvision recipe see the same kind of
images.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from cnnlab.base.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "cifar", "imagenet")
# Eval: the shorter side is resized to round(size / CROP_FRACTION), then the central size x size.
CROP_FRACTION = 0.875

Transform = Callable[[np.ndarray, "np.random.Generator | None"], np.ndarray]


def decode(data: bytes, channels: int = 3) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, anything PIL reads) -> uint8 [H, W, channels].

  Grey, grey+alpha, RGBA, CMYK and palette images are converted (alpha is dropped); channels is 3
  (RGB) or 1 (grey). Raises ValueError on bytes PIL cannot decode: the caller names the file.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels={channels}: decode gives 1 (grey) or 3 (RGB) channels")
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")   # PIL warns when converting such a palette to RGB directly
      array = np.asarray(image.convert("RGB" if channels == 3 else "L"), np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e
  return array.reshape(array.shape[0], array.shape[1], channels)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The augmentation rng of example `index` (its row in the split) in `epoch` of a run seeded
  `seed`: independent streams for every (seed, epoch, index)."""
  return np.random.default_rng((seed, epoch, index))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [height, width, C], PIL bilinear (antialiased when shrinking). RGB
  images in one call, other channel counts one channel at a time."""
  resize = lambda plane: np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR))
  if image.shape[2] == 3:
    return resize(Image.fromarray(image))
  return np.stack([resize(Image.fromarray(np.ascontiguousarray(image[:, :, c])))
                   for c in range(image.shape[2])], axis=-1)


def resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [h, w, C] with min(h, w) = `shorter` and the aspect ratio kept (the
  longer side truncated, as torchvision's Resize(int)); unchanged when already that size."""
  h, w = image.shape[:2]
  if min(h, w) == shorter:
    return image
  if h <= w:
    return _resize(image, int(shorter * w / h), shorter)
  return _resize(image, shorter, int(shorter * h / w))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The eval view: uint8 [H, W, C] -> uint8 [size, size, C], the shorter side resized to
  round(size / CROP_FRACTION) (smaller images are upscaled), then the central size x size (offsets
  rounded as torchvision's CenterCrop)."""
  image = resize_shorter(image, round(size / CROP_FRACTION))
  h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params with numpy draws: (top, left, h, w) of a crop
  covering a U(scale) fraction of the area with a log-uniform aspect ratio w/h in `ratio`; 10
  tries, then the central crop of the whole image clamped to the ratio range."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """ImageNet-style training crop (Szegedy et al. 2015, torchvision's RandomResizedCrop): uint8
  [H, W, C] -> uint8 [size, size, C], the `random_resized_crop_box` region cut out, then resized
  bilinearly (cut first, as torchvision: PIL's `box=` would also blend in pixels outside it)."""
  top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return _resize(np.ascontiguousarray(image[top:top + h, left:left + w]), size, size)


def hflip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 [H, W, C] mirrored left-right with probability 0.5."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def cifar_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """CIFAR augmentation (He et al. 2016): a flip with p = 0.5, then `pad` zero pixels on each side
  and a random crop back to uint8 [H, W, C]."""
  h, w = image.shape[:2]
  image = hflip(image, rng)
  dy, dx = rng.integers(0, 2 * pad + 1, size=2)
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  return padded[dy:dy + h, dx:dx + w]


def _identity(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
  return image


def _eval(image: np.ndarray, rng: np.random.Generator | None, size: int) -> np.ndarray:
  return center_crop(image, size)


def _cifar(image: np.ndarray, rng: np.random.Generator, size: int | None) -> np.ndarray:
  if size is not None:
    image = center_crop(image, size)
  return cifar_crop_flip(image, rng)


def _imagenet(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  return hflip(random_resized_crop(image, size, rng), rng)


def eval_transform(size: int | None) -> Transform:
  """The eval transform: `center_crop` to `size`; the identity for None (images of one shape)."""
  return _identity if size is None else functools.partial(_eval, size=size)


def train_transform(style: str, size: int | None) -> Transform:
  """The training transform of augmentation `style` (AUGMENTATIONS): "none" is the eval
  transform; "cifar" the eval transform then `cifar_crop_flip`; "imagenet" `random_resized_crop`
  to `size` then `hflip` (needs a size). Picklable."""
  if style == "none":
    return eval_transform(size)
  if style == "cifar":
    return functools.partial(_cifar, size=size)
  if style == "imagenet":
    if size is None:
      raise ConfigError("dataset.augment='imagenet' needs dataset.image_size (the crop size, "
                        "e.g. 224); set it")
    return functools.partial(_imagenet, size=size)
  raise ConfigError(f"dataset.augment={style!r} is not one of {', '.join(AUGMENTATIONS)}")
