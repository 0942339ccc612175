"""A synthetic folder of images in the `root/<class>/*.jpg|png` layout, to try the folder dataset,
the ImageNet recipe's `:smoke` variant and the input-pipeline benchmark without real data.

    from cnnlab.data.synthetic import write_image_folder
    write_image_folder("shapes", num_classes=10, per_class=40)   # 400 images, 48-300 px

Class c is a disc of hue c / num_classes at a random place and radius on a noisy background, so a
small net learns it in an epoch or two; sizes vary, most files are JPEGs, every fifth a PNG and
every seventh greyscale (its class then shows only in the disc's brightness).
"""

from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image


def class_names(num_classes: int) -> tuple[str, ...]:
  """The folder names: "class_00", "class_01", ... (sorted order is class order)."""
  return tuple(f"class_{c:02d}" for c in range(num_classes))


def synthetic_image(label: int, num_classes: int, height: int, width: int,
                    rng: np.random.Generator) -> np.ndarray:
  """uint8 [height, width, 3]: a disc of class `label`'s hue on a noisy grey background."""
  image = rng.integers(60, 140, (height, width, 3)).astype(np.float32)
  radius = rng.uniform(0.2, 0.45) * min(height, width)
  cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
  yy, xx = np.mgrid[:height, :width]
  disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
  colour = 255 * np.asarray(colorsys.hsv_to_rgb(label / num_classes, 0.9, 0.5 + 0.5 * (
      label % 2)), np.float32)
  image[disc] = colour
  return image.clip(0, 255).astype(np.uint8)


def write_image_folder(root: str, num_classes: int = 10, per_class: int = 40,
                       sizes: tuple[int, int] = (48, 300), seed: int = 0,
                       start: int = 0) -> list[str]:
  """Writes `per_class` images of each of `num_classes` classes under root/class_XX/, heights
  and widths drawn from `sizes` (inclusive), all drawn with `seed`; file numbers start at
  `start` (to add images to a folder). Returns the paths written, sorted."""
  rng = np.random.default_rng((seed, start))
  paths = []
  for label, name in enumerate(class_names(num_classes)):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(start, start + per_class):
      height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
      picture = Image.fromarray(synthetic_image(label, num_classes, height, width, rng))
      if i % 7 == 3:
        picture = picture.convert("L")
      suffix = ".png" if i % 5 == 4 else ".jpg"
      path = os.path.join(root, name, f"{i:05d}{suffix}")
      picture.save(path, quality=90) if suffix == ".jpg" else picture.save(path)
      paths.append(path)
  return sorted(paths)
