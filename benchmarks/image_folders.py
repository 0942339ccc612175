"""Synthetic JPEG folders and the two loaders benchmarks/input_pipeline.py times over them:
cnnlab's folder source and torchvision's ImageFolder in a PyTorch DataLoader."""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
from PIL import Image

from cnnlab.data import folders, transforms

IMAGENET_MEAN = np.float32(transforms.IMAGENET_MEAN)
IMAGENET_STD = np.float32(transforms.IMAGENET_STD)

def make_folder(root: str, classes: int, images: int, sides: tuple[int, int], quality: int,
                seed: int) -> str:
  """root/class_XX/NNNNNN.jpg: `images` JPEGs dealt over `classes` classes, each side drawn
  uniformly in `sides` (px): a bicubic-upsampled 48x48 random colour field plus Gaussian grain
  (sigma 12), whose JPEG decodes about as slowly as a photo of its size. Made once (seeded): a
  folder whose `<root>.complete` mark exists is reused."""
  if os.path.exists(f"{root}.complete"):
    return root
  rng = np.random.default_rng(seed)
  tmp = f"{root}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  for i in range(images):
    h, w = (int(s) for s in rng.integers(sides[0], sides[1] + 1, 2))
    field = Image.fromarray(rng.integers(0, 256, (48, 48, 3), np.uint8)).resize(
        (w, h), Image.BICUBIC)
    pixels = np.asarray(field, np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
    folder = os.path.join(tmp, f"class_{i % classes:02d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"{i:06d}.jpg"), quality=quality)
  shutil.rmtree(root, ignore_errors=True)
  os.replace(tmp, root)
  open(f"{root}.complete", "w").close()
  return root


def open_folder(root: str, index_dir: str) -> tuple[folders.FolderIndex, folders.FolderSource]:
  """The folder's index (its seeded 10% test split held out) and a source over its train split."""
  index = folders.index_folder(root, 0.1, 0, index_dir)
  return index, folders.FolderSource(root, index.splits["train"], index.class_names)


def _member(paths: frozenset, path: str) -> bool:
  return os.path.normpath(path) in paths


def torch_loader(root: str, relpaths, size: int, workers: int, batch_size: int,
                 seed: int):
  """torchvision's ImageNet training input over the files `relpaths` of `root`."""
  import torch
  from torchvision import datasets
  from torchvision import transforms as tv
  tf = tv.Compose([tv.RandomResizedCrop(size), tv.RandomHorizontalFlip(), tv.ToTensor(),
                   tv.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])
  paths = frozenset(os.path.normpath(os.path.join(root, p)) for p in relpaths)
  dataset = datasets.ImageFolder(root, tf, is_valid_file=functools.partial(_member, paths))
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
      generator=torch.Generator().manual_seed(seed))
  it = iter(loader)
  return it, getattr(it, "_shutdown_workers", lambda: None)
