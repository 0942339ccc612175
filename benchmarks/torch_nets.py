"""The nets of `compare_torch.py` built by hand in PyTorch, and their train and eval steps.

Images arrive channels-last (numpy [N, H, W, C], as cnnlab takes them) and are moved to
torch's NCHW or channels_last memory format. torch is a benchmark-only dependency.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
  return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


def torch_vgg(stages, channels: int, num_classes: int) -> nn.Module:
  """conv3x3 -> BN -> ReLU per width, a 2x2 max pool after each stage, GAP, dense."""
  body = []
  for widths in stages:
    for width in widths:
      body += [*_conv_bn(channels, width), nn.ReLU(inplace=True)]
      channels = width
    body.append(nn.MaxPool2d(2))
  return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(channels, num_classes))


class _BasicUnit(nn.Module):
  """He 2016a's basic unit, option A shortcut: subsample, zero channels appended at the end."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.stride, self.extra = stride, cout - cin
    self.conv1, self.bn1 = _conv_bn(cin, cout, stride)
    self.conv2, self.bn2 = _conv_bn(cout, cout)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
    if self.extra:
      shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
    return F.relu(y + shortcut)


def torch_resnet20(channels: int, num_classes: int) -> nn.Module:
  units, cin = [], 16
  for i, width in enumerate((16, 32, 64)):
    for j in range(3):
      units.append(_BasicUnit(cin, width, 2 if i > 0 and j == 0 else 1))
      cin = width
  return nn.Sequential(*_conv_bn(channels, 16), nn.ReLU(inplace=True), *units,
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def torch_net(name: str, stages, channels: int, num_classes: int) -> nn.Module:
  """`resnet20`, or a VGG-style net of `stages` (tuples of widths) for any other name."""
  if name == "resnet20":
    return torch_resnet20(channels, num_classes)
  return torch_vgg(stages, channels, num_classes)


class TorchRunner:
  """A PyTorch train step (SGD nesterov, decay on kernels only) and eval step on `device`;
  `autocast`: a dtype for torch.autocast (mixed precision), else float32; `tf32`: let cuDNN and
  cuBLAS use TF32 tensor cores (global switches, set before every timed window)."""

  def __init__(self, make_model: Callable[[int], nn.Module], images: np.ndarray,
               labels: np.ndarray, layout: str, compiled: bool, learning_rate: float,
               device: str = "cpu", autocast: torch.dtype | None = None, tf32: bool = False):
    torch.manual_seed(0)
    self.device, self.autocast, self.tf32 = device, autocast, tf32
    self.model = make_model(images.shape[-1])  # From the input channels.
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    self.model = self.model.to(device=device, memory_format=fmt)
    self.x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device).contiguous(
        memory_format=fmt)
    self.y = torch.from_numpy(labels.astype(np.int64)).to(device)
    params = list(self.model.parameters())
    self.opt = torch.optim.SGD(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-4},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=learning_rate, momentum=0.9, nesterov=True)
    self.forward = torch.compile(self.model) if compiled else self.model

  def _numerics(self):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
    return torch.autocast(self.device.split(":")[0], dtype=self.autocast,
                          enabled=self.autocast is not None)

  def train(self, steps: int) -> None:
    self.model.train()
    with self._numerics():
      for _ in range(steps):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.opt.step()
    loss.item()

  def eval(self, steps: int) -> None:
    self.model.eval()
    with torch.no_grad(), self._numerics():
      for _ in range(steps):
        logits = self.forward(self.x)
        loss_sum = F.cross_entropy(logits, self.y, reduction="sum")
        correct = (logits.argmax(-1) == self.y).sum()
    loss_sum.item(), correct.item()
