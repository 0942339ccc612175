"""Writes tests/fixtures/torchvision/<arch>_<size>.json (needs torch and torchvision).

    python scripts/make_torchvision_fixtures.py

Each fixture holds what tests/test_convert.py needs to check cnnlab.nets.convert without torch:
torchvision's state_dict manifest (key -> shape, in state_dict order), the seed of the
weights (`cnnlab.nets.convert.random_state_dict(manifest, seed)`, which this script loads into
torchvision's model, keeping its `num_batches_tracked`), the shape and seed of the NHWC input
batch (`np.random.default_rng(seed).standard_normal(shape, float32)`), and torchvision's eval-mode
logits on it (10 classes; googlenet without auxiliary heads, transform_input=False).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cnnlab.nets import convert  # noqa: E402

OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "torchvision")
NUM_CLASSES, BATCH = 10, 2
# Every arch at 64x64, and at 97x97 those whose pools see odd sizes there (resnet's stem pool at
# 49, alexnet's at 23, 11, 5; googlenet's ceil-mode pools at 49) and whose last map before a
# flatten is then more than 1x1 (alexnet 2x2). 224x224 is left to scripts/check_torchvision.py:
# the CI test takes over 20 s already.
FIXTURES = [(arch, 64) for arch in convert.TORCHVISION_ARCHS] + [
    (arch, 97) for arch in ("resnet18", "alexnet", "googlenet")]


def make(arch: str, size: int, seed: int) -> dict:
  kwargs = dict(aux_logits=False, transform_input=False, init_weights=False) if (
      arch == "googlenet") else {}
  model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES, **kwargs)
  own = model.state_dict()
  manifest = {key: list(value.shape) for key, value in own.items()}
  weights = convert.random_state_dict(manifest, seed)
  state_dict = {key: own[key] if key.endswith("num_batches_tracked") else
                torch.from_numpy(weights[key]) for key in own}
  model.load_state_dict(state_dict)
  input_shape = [BATCH, size, size, 3]
  x = np.random.default_rng(seed).standard_normal(input_shape, np.float32)
  with torch.no_grad():
    logits = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  return dict(arch=arch, size=size, seed=seed, input_shape=input_shape,
              torch=torch.__version__, torchvision=torchvision.__version__,
              logits=logits.astype(float).tolist(), manifest=manifest)


def main() -> None:
  os.makedirs(OUT_DIR, exist_ok=True)
  for seed, (arch, size) in enumerate(FIXTURES):
    path = os.path.join(OUT_DIR, f"{arch}_{size}.json")
    with open(path, "w") as f:
      json.dump(make(arch, size, seed), f, separators=(",", ":"))
    print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
  main()
