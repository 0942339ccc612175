"""Full check of cnnlab.nets.convert against torchvision itself (needs torch and torchvision).

    python scripts/check_torchvision.py [--sizes 224 64 97] [--archs resnet18 googlenet ...]

For every arch and input size (97 makes the resnet stem's, alexnet's and googlenet's pools see odd
sizes): torchvision's model with its own random init (no download), with
BN running statistics and affine parameters randomised too (at init they are 0/1 and would hide
a mapping error), is run in eval mode on a random batch; its state_dict goes through a .pth file,
`read_state_dict` and `from_torchvision`, and cnnlab's model runs on the same batch (NHWC).
Prints max |cnnlab - torch| / max |torch| per arch and size and exits 1 if any exceeds --tol.
googlenet is also checked with transform_input=True against `googlenet_transform_input`; the
safetensors reader and the refusal of a pickle that is not plain weights are checked once.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile

import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnlab.base.errors import CheckpointError  # noqa: E402
from cnnlab.nets import convert, models  # noqa: E402


class NotWeights:
  """A pickled object that weights_only loading must refuse."""


def torch_model(arch: str, transform_input: bool = False) -> torch.nn.Module:
  """torchvision's `arch`, randomly initialised, BN statistics and affine randomised, eval mode."""
  kwargs = dict(aux_logits=False, transform_input=transform_input, init_weights=True) if (
      arch == "googlenet") else {}
  torch.manual_seed(0)
  model = getattr(torchvision.models, arch)(weights=None, **kwargs).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
  return model


def cnnlab_logits(arch, state_dict, x_nhwc, num_classes=1000, transform_input=False):
  config = ml_collections.ConfigDict(convert.torchvision_model_config(arch))
  variables = convert.from_torchvision(arch, state_dict)
  x = jnp.asarray(x_nhwc)
  if transform_input:
    x = convert.googlenet_transform_input(x)
  return np.asarray(models.get_model(config, num_classes).apply(variables, x, train=False))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def check(arch: str, size: int, tmp: str, transform_input: bool = False) -> float:
  model = torch_model(arch, transform_input)
  x = np.random.default_rng(size).standard_normal((2, size, size, 3), np.float32)
  with torch.no_grad():
    reference = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  path = os.path.join(tmp, f"{arch}.pth")
  torch.save(model.state_dict(), path)
  return relative_error(cnnlab_logits(arch, convert.read_state_dict(path), x,
                                      transform_input=transform_input), reference)


def check_readers(tmp: str) -> None:
  """safetensors round trip; a non-weights pickle refused with CheckpointError."""
  from safetensors.torch import save_file
  state_dict = torch_model("resnet18").state_dict()
  path = os.path.join(tmp, "resnet18.safetensors")
  save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
  read = convert.read_state_dict(path)
  assert all(np.array_equal(read[k], v.numpy()) for k, v in state_dict.items())
  bad = os.path.join(tmp, "not_weights.pth")
  with open(bad, "wb") as f:
    pickle.dump({"conv1.weight": NotWeights()}, f)
  try:
    convert.read_state_dict(bad)
  except CheckpointError as e:
    print(f"readers: safetensors round trip ok; non-weights pickle refused: {e}")
  else:
    raise AssertionError("a pickle holding an arbitrary object was loaded")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", nargs="+", default=list(convert.TORCHVISION_ARCHS))
  parser.add_argument("--sizes", nargs="+", type=int, default=[224, 64, 97])
  parser.add_argument("--tol", type=float, default=1e-4)
  args = parser.parse_args()
  print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
  print(f"{'arch':<28}" + "".join(f"{s:>12}" for s in args.sizes))
  worst = 0.0
  with tempfile.TemporaryDirectory() as tmp:
    rows = [(arch, False) for arch in args.archs]
    if "googlenet" in args.archs:
      rows.append(("googlenet", True))
    for arch, transform_input in rows:
      errors = [check(arch, size, tmp, transform_input) for size in args.sizes]
      worst = max(worst, *errors)
      label = arch + (" (transform_input)" if transform_input else "")
      print(f"{label:<28}" + "".join(f"{e:>12.2e}" for e in errors), flush=True)
    check_readers(tmp)
  print(f"max relative error {worst:.2e} ({'ok' if worst <= args.tol else 'FAIL'}, "
        f"tolerance {args.tol:g})")
  return 0 if worst <= args.tol else 1


if __name__ == "__main__":
  sys.exit(main())
